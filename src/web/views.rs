//! What every page shares: the chrome around its content (who is signed in, the
//! sign-out form's CSRF token, the demo banner), the CSRF-only form, time in words,
//! the view models of requests and grants that several pages show, and the 404
//! fallback.
//!
//! Pages are built from view models with display strings made here, so templates stay
//! logic-free and escape everything by default. What this module must never do: decide
//! who may see or do anything (that is the extractors' and `access`'s job).

use serde::Deserialize;
use tower_sessions::Session;

pub use super::chrome::Chrome;
use super::error::PageError;
use super::extract::WebUser;
use crate::access::RequestView;
use crate::auth::{self, SESSION_CSRF};
use crate::clock::from_millis;
use crate::error::Error;
use crate::policy::{self, Actor, format_duration};
use crate::state::AppState;
use crate::store::GrantRow;

impl Chrome {
    pub(crate) async fn new(
        state: &AppState,
        session: &Session,
        actor: Option<&Actor>,
    ) -> Result<Self, PageError> {
        Ok(Chrome {
            user: actor.map(|a| a.email.clone()),
            is_admin: actor.is_some_and(|a| a.is_admin),
            // Only a signed-in session gets a CSRF token (it has a row already); an
            // anonymous page view must not write one (see `web::anon`).
            csrf: match actor {
                Some(_) => csrf_token(session).await?,
                None => String::new(),
            },
            dev_banner: state.config().auth.dev_login,
        })
    }

    pub async fn of(state: &AppState, user: &WebUser) -> Result<Self, PageError> {
        Chrome::new(state, &user.session, Some(&user.actor)).await
    }
}

/// The session's CSRF token, made on first use.
async fn csrf_token(session: &Session) -> Result<String, PageError> {
    if let Some(t) = session.get::<String>(SESSION_CSRF).await? {
        return Ok(t);
    }
    let t = auth::new_csrf();
    session.insert(SESSION_CSRF, &t).await?;
    Ok(t)
}

pub(crate) fn when(ms: i64) -> String {
    from_millis(ms).format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn time_left(ends_ms: i64, now_ms: i64) -> String {
    if ends_ms <= now_ms {
        return "ended".into();
    }
    let secs = ((ends_ms - now_ms) / 1000) as u64;
    let (h, m) = (secs / 3600, (secs % 3600) / 60);
    if h > 0 {
        format!("{h}h {m}m left")
    } else if m > 0 {
        format!("{m}m left")
    } else {
        format!("{secs}s left")
    }
}

/// A request as pages show it.
pub struct RequestVm {
    pub id: String,
    pub resource: String,
    pub role: String,
    pub requester: String,
    pub duration: String,
    pub reason: String,
    pub ticket: String,
    pub status: String,
    /// What the badge says: the request's status, except that an approved request
    /// whose grant is over says how it ended ("revoked", "ended"), never "approved".
    pub badge: String,
    /// When and by whom the grant was revoked or ended (and why), beside the badge.
    pub badge_note: String,
    pub created: String,
    pub expires: String,
    pub have: usize,
    pub need: u32,
    pub grant: Option<GrantVm>,
}

pub struct GrantVm {
    pub id: String,
    pub request_id: String,
    pub holder: String,
    pub resource: String,
    pub role: String,
    /// `active`, `ended` or `revoked`: an active grant past its end (not yet swept)
    /// shows as `ended`, so a page never calls a grant live that the relay refuses.
    pub status: String,
    pub starts: String,
    pub ends: String,
    pub left: String,
    /// For a grant that is over: "revoked 2026-… UTC by bob@…: reason" or "ended …";
    /// empty while it is live.
    pub ended: String,
}

fn grant_status(g: &GrantRow, now: i64) -> &str {
    if g.status == policy::GrantStatus::Active && g.ends_at <= now {
        "ended"
    } else {
        g.status.as_str()
    }
}

/// How a grant that is over ended, in words: "revoked 2026-… UTC by bob@…: why".
fn grant_ended(g: &GrantRow, now: i64) -> String {
    match grant_status(g, now) {
        "active" => String::new(),
        status => format!("{status} {}", grant_end_detail(g, now)),
    }
}

/// When a grant that is over ended, by whom where known, and why; empty while live.
fn grant_end_detail(g: &GrantRow, now: i64) -> String {
    if grant_status(g, now) == "active" {
        return String::new();
    }
    // A grant that ran out has no ended_at until the sweeper records it: its end is
    // the planned one then.
    let at = g.ended_at.unwrap_or(g.ends_at);
    let mut out = when(at);
    if let Some(by) = g.ended_by_email.as_deref().filter(|b| !b.is_empty()) {
        out.push_str(&format!(" by {by}"));
    }
    if let Some(c) = g.end_comment.as_deref().filter(|c| !c.is_empty()) {
        out.push_str(&format!(": {c}"));
    }
    out
}

pub(crate) fn grant_vm(g: &GrantRow, now: i64) -> GrantVm {
    let status = grant_status(g, now).to_string();
    GrantVm {
        id: g.id.clone(),
        request_id: g.request_id.clone(),
        holder: g.user_email.clone(),
        resource: g.resource.clone(),
        role: g.role.clone(),
        starts: when(g.starts_at),
        ends: when(g.ends_at),
        left: if status == "active" {
            time_left(g.ends_at, now)
        } else {
            status.clone()
        },
        ended: grant_ended(g, now),
        status,
    }
}

pub(crate) fn request_vm(v: &RequestView, now: i64) -> RequestVm {
    let r = &v.request;
    RequestVm {
        id: r.id.clone(),
        resource: r.resource.clone(),
        role: r.role.clone(),
        requester: r.requester_email.clone(),
        duration: format_duration(std::time::Duration::from_secs(r.duration_secs as u64)),
        reason: r.reason.clone(),
        ticket: r.ticket.clone().unwrap_or_default(),
        status: r.status.to_string(),
        badge: match &v.grant {
            Some(g) if r.status == policy::RequestStatus::Approved => match grant_status(g, now) {
                "active" => r.status.to_string(),
                over => over.to_string(),
            },
            _ => r.status.to_string(),
        },
        badge_note: match &v.grant {
            Some(g) if r.status == policy::RequestStatus::Approved => grant_end_detail(g, now),
            _ => String::new(),
        },
        created: when(r.created_at),
        expires: when(r.expires_at),
        have: v.approval_count(),
        need: v.required_approvals,
        grant: v.grant.as_ref().map(|g| grant_vm(g, now)),
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    pub csrf: String,
}

pub async fn not_found() -> PageError {
    PageError(Error::NotFound("page"))
}
