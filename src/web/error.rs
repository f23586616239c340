//! The one place a domain [`Error`] becomes an HTTP response: a page for browsers,
//! JSON for the API. Internal errors are logged with their detail and shown only as
//! "something went wrong", so no database text or secret reaches a user.

use askama::Template;
use askama_web::WebTemplate;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::json;

use crate::error::Error;

fn status_of(err: &Error) -> StatusCode {
    match err {
        Error::Unauthenticated => StatusCode::UNAUTHORIZED,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::Database(_) | Error::Migrate(_) | Error::Session(_) | Error::Internal(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// The message safe to show; internals are logged instead.
fn public_message(err: &Error) -> String {
    match err {
        Error::Database(_) | Error::Migrate(_) | Error::Session(_) | Error::Internal(_) => {
            tracing::error!(error = ?err, "internal error");
            "something went wrong on our side; it has been logged".into()
        }
        Error::Invalid(fields) => fields
            .iter()
            .map(|f| format!("{}: {}", f.field, f.message))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// An error answered as JSON: `{"error": code, "message": …, "fields": [...]}`.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl<E: Into<Error>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(&self.0);
        let code = match &self.0 {
            Error::Unauthenticated => "unauthenticated",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Invalid(_) => "invalid",
            _ => "internal",
        };
        let mut body = json!({ "error": code, "message": public_message(&self.0) });
        if let Error::Invalid(fields) = &self.0 {
            body["fields"] = json!(fields);
        }
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "error.html")]
pub struct ErrorPage {
    chrome: super::chrome::Chrome,
    status: u16,
    title: &'static str,
    message: String,
}

/// An error answered as a page. Sign-in problems redirect to the sign-in page.
#[derive(Debug)]
pub struct PageError(pub Error);

impl<E: Into<Error>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError(e.into())
    }
}

/// What an error page says; rendered by [`render_error_pages`], which knows the
/// server's settings (the demo banner) that a bare error does not.
#[derive(Clone)]
struct ErrorInfo {
    title: &'static str,
    message: String,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        if matches!(self.0, Error::Unauthenticated) {
            return Redirect::to("/login").into_response();
        }
        let status = status_of(&self.0);
        let title = match status {
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::CONFLICT => "Too late for that",
            StatusCode::UNPROCESSABLE_ENTITY => "Please check your input",
            _ => "Something went wrong",
        };
        let mut resp = status.into_response();
        resp.extensions_mut().insert(ErrorInfo {
            title,
            message: public_message(&self.0),
        });
        resp
    }
}

/// A response that [`render_error_pages`] turns into the error page with this title
/// and message (for refusals made outside a handler, such as rate limits).
pub fn page_response(status: StatusCode, title: &'static str, message: String) -> Response {
    let mut resp = status.into_response();
    resp.extensions_mut().insert(ErrorInfo { title, message });
    resp
}

/// Middleware that turns a [`PageError`] response into the error page.
pub async fn render_error_pages(
    axum::extract::State(state): axum::extract::State<crate::state::AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    let Some(info) = resp.extensions().get::<ErrorInfo>().cloned() else {
        return resp;
    };
    let status = resp.status();
    let page = ErrorPage {
        chrome: super::chrome::Chrome::anonymous(state.config().auth.dev_login),
        status: status.as_u16(),
        title: info.title,
        message: info.message,
    };
    let mut out = (status, page).into_response();
    // What the handler said besides the error stays said: a cleared sign-in cookie,
    // how long to wait.
    for name in [
        axum::http::header::SET_COOKIE,
        axum::http::header::RETRY_AFTER,
    ] {
        for v in resp.headers().get_all(&name) {
            out.headers_mut().append(name.clone(), v.clone());
        }
    }
    out
}
