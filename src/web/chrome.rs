//! The frame every page shows around its content (who is signed in, the sign-out
//! form's CSRF token, the demo warning), as plain data: error pages and pages both
//! render it. Building it for a session is `views`'s.

/// What every page shows around its content: who is signed in, the sign-out form's
/// CSRF token, and the demo warning.
pub struct Chrome {
    pub user: Option<String>,
    pub is_admin: bool,
    pub csrf: String,
    pub dev_banner: bool,
}

impl Chrome {
    pub fn anonymous(dev_banner: bool) -> Self {
        Chrome {
            user: None,
            is_admin: false,
            csrf: String::new(),
            dev_banner,
        }
    }
}
