//! The one domain error. Web code maps it to a status and a page or JSON body in
//! `web::error`; internal details are logged there and never rendered.

use crate::policy::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not signed in, or a bad token.
    #[error("sign-in required")]
    Unauthenticated,
    /// Signed in but not allowed; the message is safe to show.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The target is no longer in a state that allows the action.
    #[error("{0}")]
    Conflict(String),
    /// Bad input, field by field.
    #[error("invalid input")]
    Invalid(Vec<FieldError>),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database migration error")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("session error")]
    Session(#[from] tower_sessions::session::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn forbidden(msg: impl Into<String>) -> Self {
        Error::Forbidden(msg.into())
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        Error::Conflict(msg.into())
    }
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid(vec![FieldError {
            field,
            message: message.into(),
        }])
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
