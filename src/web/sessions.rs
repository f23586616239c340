//! Relay sessions: the list (live and past, SSH and PostgreSQL), a replay page that
//! plays an SSH recording in the browser with asciinema-player (from npm, served as
//! is), the recording itself, and an admin's button to end a live session. A
//! PostgreSQL session's page and transcript are [`super::db_session`]'s, as is the check
//! of a recording's SHA-256 on disk against the audit chain that both pages show.
//!
//! A session is visible to its holder, the approvers of its role, and admins — as its
//! request is. Recordings can hold anything typed, passwords included: never to anyone
//! else.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::error::PageError;
use super::extract::{SessionAdmin, WebUser};
use super::views::{Chrome, CsrfForm, when};
use crate::error::Error;
use crate::policy;
use crate::state::AppState;
use crate::store::{self, SessionRow};

/// `/sessions`, a session's replay page, its recording, and ending it.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/sessions", get(list))
        .route("/sessions/{id}", get(show))
        .route("/sessions/{id}/cast", get(cast))
        .route("/sessions/{id}/transcript", get(transcript))
        .route("/sessions/{id}/terminate", post(terminate))
}

pub struct SessionVm {
    pub id: String,
    pub who: String,
    pub resource: String,
    pub started: String,
    pub duration: String,
    pub bytes: String,
    pub live: bool,
    /// `SSH` or `PostgreSQL`, for its badge.
    pub protocol: &'static str,
    /// A PostgreSQL session (a transcript, not a terminal recording).
    pub postgres: bool,
}

pub(super) fn vm(state: &AppState, s: &SessionRow) -> SessionVm {
    let end = s.ended_at.unwrap_or_else(|| state.now_ms());
    SessionVm {
        id: s.id.clone(),
        who: s.user_email.clone(),
        resource: s.resource.clone(),
        started: when(s.started_at),
        duration: crate::policy::format_duration(std::time::Duration::from_millis(
            (end - s.started_at).max(0) as u64,
        )),
        bytes: format!("{} / {}", s.bytes_in, s.bytes_out),
        live: s.ended_at.is_none() && state.live_sessions.is_live(&s.id),
        protocol: if is_postgres(s) { "PostgreSQL" } else { "SSH" },
        postgres: is_postgres(s),
    }
}

fn is_postgres(s: &SessionRow) -> bool {
    s.protocol == "postgres"
}

fn may_see(state: &AppState, user: &WebUser, s: &SessionRow) -> bool {
    let config = state.config();
    let role = config.role(&s.resource, &s.role).map(|(_, r)| r);
    policy::may_view(&user.actor, &s.holder_id, role)
}

async fn visible(state: &AppState, user: &WebUser, id: &str) -> Result<SessionRow, PageError> {
    let s = store::session(&state.db, id)
        .await?
        .ok_or(Error::NotFound("session"))?;
    if !may_see(state, user, &s) {
        return Err(Error::forbidden("you may not see this session").into());
    }
    Ok(s)
}

#[derive(Template, WebTemplate)]
#[template(path = "sessions.html")]
struct SessionsPage {
    chrome: Chrome,
    sessions: Vec<SessionVm>,
}

pub async fn list(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    let sessions = store::sessions(&state.db, 500)
        .await?
        .iter()
        .filter(|s| may_see(&state, &user, s))
        .map(|s| vm(&state, s))
        .collect();
    Ok(SessionsPage {
        chrome: Chrome::of(&state, &user).await?,
        sessions,
    })
}

#[derive(Template, WebTemplate)]
#[template(path = "session.html")]
struct SessionPage {
    chrome: Chrome,
    s: SessionVm,
    grant_id: String,
    end_reason: String,
    /// The recording as it is on disk, checked against the audit chain.
    hash: super::db_session::HashVm,
    /// The recording reached its cap; the rest was counted, not recorded.
    truncated: bool,
    failed: bool,
    /// Spans of input masked at a password prompt, each marked in the recording.
    masked_inputs: i64,
    /// twokey stopped without ending it; closed at the next start.
    interrupted: bool,
}

/// The replay page runs two scripts from this origin (the player and its start-up) and
/// the player's WebAssembly terminal, fetching the recording from here: it alone allows
/// `script-src 'self' 'wasm-unsafe-eval'` and `connect-src 'self'` — still no inline
/// script and nothing from elsewhere.
pub async fn show(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let s = visible(&state, &user, &id).await?;
    if is_postgres(&s) {
        return super::db_session::show(&state, &user, s).await;
    }
    let hash = super::db_session::recording_check(&state, &s).await?;
    let page = SessionPage {
        chrome: Chrome::of(&state, &user).await?,
        s: vm(&state, &s),
        grant_id: s.grant_id,
        end_reason: s.end_reason.unwrap_or_default(),
        hash,
        truncated: s.recording_truncated,
        failed: s.recording_failed,
        masked_inputs: s.masked_inputs,
        interrupted: s.interrupted,
    };
    let csp = super::CSP.replace("default-src 'none';", "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; worker-src 'self' blob:;");
    Ok(([(header::CONTENT_SECURITY_POLICY, csp)], page).into_response())
}

/// The recording, to its viewers only.
pub async fn cast(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let s = visible(&state, &user, &id).await?;
    if is_postgres(&s) {
        return Err(Error::NotFound("terminal recording").into());
    }
    // Streamed from disk: a large recording never sits in memory whole.
    let file = tokio::fs::File::open(&s.recording)
        .await
        .map_err(|e| Error::Internal(format!("recording {}: {e}", s.id)))?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok(([(header::CONTENT_TYPE, "application/x-asciicast")], body).into_response())
}

/// A PostgreSQL session's transcript (`.jsonl`), to its viewers only.
pub async fn transcript(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let s = visible(&state, &user, &id).await?;
    if !is_postgres(&s) {
        return Err(Error::NotFound("transcript").into());
    }
    super::db_session::download(s).await
}

/// An admin ends a live session.
pub async fn terminate(
    State(state): State<AppState>,
    SessionAdmin(user): SessionAdmin,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    user.check_csrf(&form.csrf).await?;
    let s = visible(&state, &user, &id).await?;
    if !state.live_sessions.terminate(&s.id) {
        return Err(Error::conflict("this session is not live").into());
    }
    let mut tx = store::begin_write(&state.db).await?;
    crate::audit::append(
        &mut tx,
        state.now_ms(),
        &crate::audit::NewEvent {
            actor: &user.actor.email,
            action: "session.terminated",
            subject: &s.grant_id,
            details: serde_json::json!({ "session_id": s.id, "by": user.actor.identity() }),
        },
    )
    .await?;
    tx.commit().await?;
    wait_ended(&state, &s.id).await;
    Ok(Redirect::to(&format!("/sessions/{id}")))
}

/// How long the End session button waits for the session to close before showing its
/// page again.
const END_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits (bounded by [`END_WAIT`]) until the cut session's record is closed, so the page
/// the admin comes back to shows it ended, not still live. On a timeout the page shows
/// what the store says then; the session still ends.
async fn wait_ended(state: &AppState, id: &str) {
    let deadline = tokio::time::Instant::now() + END_WAIT;
    loop {
        match store::session(&state.db, id).await {
            Ok(Some(row)) if row.ended_at.is_none() => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, session = %id, "reading a terminated session's record failed");
                return;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(session = %id, "a terminated session had not closed its record within {END_WAIT:?}");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
