//! Pages for requesters, approvers and admins (askama templates under `templates/`).
//!
//! Every POST form carries the session's CSRF token and is checked before anything
//! else. Pages are built from view models with display strings made here, so
//! templates stay logic-free and escape everything by default.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tower_sessions::Session;

use super::anon;
use super::error::PageError;
use super::extract::{AdminUser, MaybeUser, WebUser, check_csrf};
use crate::access::{self, Channel, Decision, RequestView};
use crate::auth::{self, SESSION_CSRF, SESSION_SIGNED_IN_AT, SESSION_USER, oidc};
use crate::clock::from_millis;
use crate::error::Error;
use crate::policy::{self, Actor, FieldError, RequestInput, format_duration};
use crate::state::AppState;
use crate::store::{self, GrantRow};

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
            dev_banner: state.config.auth.dev_login,
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

fn grant_vm(g: &GrantRow, now: i64) -> GrantVm {
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

fn request_vm(v: &RequestView, now: i64) -> RequestVm {
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

pub struct TimelineItem {
    pub when: String,
    pub what: String,
    pub who: String,
    pub note: String,
}

fn timeline(v: &RequestView) -> Vec<TimelineItem> {
    let r = &v.request;
    let mut items = vec![(
        r.created_at,
        TimelineItem {
            when: when(r.created_at),
            what: "filed".into(),
            who: r.requester_email.clone(),
            note: String::new(),
        },
    )];
    for a in &v.approvals {
        items.push((
            a.created_at,
            TimelineItem {
                when: when(a.created_at),
                what: if a.decision == Decision::Approve {
                    "approved".into()
                } else {
                    "denied".into()
                },
                who: a.approver_email.clone(),
                note: format!(
                    "via {}{}",
                    a.channel,
                    a.comment
                        .as_deref()
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default()
                ),
            },
        ));
    }
    if let Some(g) = &v.grant {
        items.push((
            g.starts_at,
            TimelineItem {
                when: when(g.starts_at),
                what: "granted".into(),
                who: String::new(),
                note: format!("until {}", when(g.ends_at)),
            },
        ));
        if let Some(ended) = g.ended_at {
            items.push((
                ended,
                TimelineItem {
                    when: when(ended),
                    what: if g.status == policy::GrantStatus::Revoked {
                        "revoked".into()
                    } else {
                        "ended".into()
                    },
                    who: g.ended_by_email.clone().unwrap_or_default(),
                    note: g.end_comment.clone().unwrap_or_default(),
                },
            ));
        }
    }
    if matches!(r.status.as_str(), "cancelled" | "expired") {
        let at = r.decided_at.unwrap_or(r.expires_at);
        let who = if r.status == policy::RequestStatus::Cancelled {
            r.requester_email.clone()
        } else {
            String::new()
        };
        items.push((
            at,
            TimelineItem {
                when: when(at),
                what: r.status.to_string(),
                who,
                note: String::new(),
            },
        ));
    }
    items.sort_by_key(|(t, _)| *t);
    items.into_iter().map(|(_, i)| i).collect()
}

// ------------------------------------------------------------------ sign-in

pub async fn home(user: MaybeUser) -> Redirect {
    if user.actor.is_some() {
        Redirect::to("/requests")
    } else {
        Redirect::to("/login")
    }
}

pub struct DevUserVm {
    pub email: String,
    pub name: String,
    pub groups: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "login.html")]
struct LoginPage {
    chrome: Chrome,
    dev_users: Vec<DevUserVm>,
    oidc_name: Option<String>,
    next: String,
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

pub async fn login_page(
    State(state): State<AppState>,
    user: MaybeUser,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Result<Response, PageError> {
    let dev_users = if state.config.auth.dev_login {
        state
            .config
            .auth
            .dev_users
            .iter()
            .map(|u| DevUserVm {
                email: u.email.clone(),
                name: u.name.clone().unwrap_or_default(),
                groups: u.groups.join(", "),
            })
            .collect()
    } else {
        Vec::new()
    };
    // The demo sign-in forms carry a CSRF token from a sealed cookie, not a session:
    // this page is anyone's, and writes nothing server-side.
    let mut chrome = Chrome::new(&state, &user.session, user.actor.as_ref()).await?;
    let mut set_cookie = None;
    if !dev_users.is_empty() {
        let (csrf, cookie) = anon::login_csrf(&state, &headers)?;
        chrome.csrf = csrf;
        set_cookie = cookie;
    }
    let mut resp = LoginPage {
        chrome,
        dev_users,
        oidc_name: state.oidc.as_ref().map(|o| o.display_name().to_string()),
        next: oidc::safe_next(q.next.as_deref()),
    }
    .into_response();
    if let Some(c) = set_cookie {
        resp.headers_mut().append(SET_COOKIE, c);
    }
    Ok(resp)
}

/// Makes `actor` the user of this session: a new session id (so a fixated id is
/// worthless), a new CSRF token, and the sign-in time for the lifetime checks.
async fn start_session(
    state: &AppState,
    session: &Session,
    actor: &Actor,
) -> Result<(), PageError> {
    session.cycle_id().await?;
    session.insert(SESSION_USER, &actor.user_id).await?;
    session.insert(SESSION_CSRF, auth::new_csrf()).await?;
    session.insert(SESSION_SIGNED_IN_AT, state.now_ms()).await?;
    Ok(())
}

#[derive(Deserialize)]
pub struct DevLoginForm {
    csrf: String,
    email: String,
    #[serde(default)]
    next: Option<String>,
}

pub async fn dev_login(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Form(form): Form<DevLoginForm>,
) -> Result<Redirect, PageError> {
    // Login CSRF: the form must come from this browser's own sign-in page.
    anon::check_login_csrf(&state, &headers, &form.csrf)?;
    let actor = auth::dev_sign_in(&state, &form.email).await?;
    start_session(&state, &session, &actor).await?;
    tracing::info!(user = %actor.email, "signed in (demo)");
    Ok(Redirect::to(&oidc::safe_next(form.next.as_deref())))
}

/// Starts an OIDC sign-in: hands state, nonce and PKCE verifier to this browser in a
/// sealed, short-lived cookie (nothing is stored server-side for a visitor who is not
/// signed in) and sends the browser to the provider.
pub async fn oidc_start(
    State(state): State<AppState>,
    Query(q): Query<NextQuery>,
) -> Result<Response, PageError> {
    let Some(provider) = state.oidc.clone() else {
        return Err(Error::NotFound("page").into());
    };
    let next = oidc::safe_next(q.next.as_deref());
    let (url, pending) = provider.begin(next, state.now_ms()).await?;
    let cookie = anon::pending_cookie(&state, &pending)?;
    Ok(([(SET_COOKIE, cookie)], Redirect::to(&url)).into_response())
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
}

/// The provider's redirect back. The answer clears the sign-in cookie whatever the
/// outcome, so a browser presents a started sign-in once, and a failure leaves nobody
/// signed in.
pub async fn oidc_callback(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Result<Response, PageError> {
    let clear = anon::clear_pending(&state);
    let mut resp = match oidc_finish(&state, &session, &headers, &q).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    if let Some(c) = clear {
        resp.headers_mut().append(SET_COOKIE, c);
    }
    Ok(resp)
}

async fn oidc_finish(
    state: &AppState,
    session: &Session,
    headers: &HeaderMap,
    q: &CallbackQuery,
) -> Result<Redirect, PageError> {
    let Some(provider) = state.oidc.clone() else {
        return Err(Error::NotFound("page").into());
    };
    let pending = anon::pending(state, headers);
    let had_pending = pending.is_some();
    let result = async {
        let pending = pending.ok_or(oidc::SignInError::NoPending)?;
        if let Some(err) = &q.error {
            // Only the error code, filtered: it is attacker-controlled text.
            let code: String = err
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(64)
                .collect();
            return Err(oidc::SignInError::Provider(code));
        }
        let (Some(st), Some(code)) = (q.state.as_deref(), q.code.as_deref()) else {
            return Err(oidc::SignInError::StateMismatch);
        };
        let identity = provider
            .finish(&pending, st, code, state.clock.now())
            .await?;
        Ok((identity, pending.next))
    }
    .await;
    match result {
        Ok((identity, next)) => {
            let actor = auth::oidc_sign_in(state, &identity).await?;
            start_session(state, session, &actor).await?;
            tracing::info!(user = %actor.email, iss = %identity.issuer, sub = %identity.subject, "signed in (oidc)");
            Ok(Redirect::to(&next))
        }
        Err(e) => {
            // A sign-in this browser started has failed: fail closed, signed out. (A
            // stray callback with no sign-in started changes nothing, so a cross-site
            // link to it cannot sign anyone out.)
            if had_pending {
                session.remove_value(SESSION_USER).await?;
            }
            tracing::info!(reason = %e, "OIDC sign-in refused");
            Err(Error::from(e).into())
        }
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    pub csrf: String,
}

pub async fn logout(session: Session, Form(form): Form<CsrfForm>) -> Result<Redirect, PageError> {
    check_csrf(&session, &form.csrf).await?;
    // Deletes the server-side record: the old cookie no longer signs anyone in.
    session.flush().await?;
    Ok(Redirect::to("/login"))
}

// ------------------------------------------------------------------ requests

pub struct RoleOption {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

#[derive(Template, WebTemplate)]
#[template(path = "new_request.html")]
struct NewRequestPage {
    chrome: Chrome,
    options: Vec<RoleOption>,
    /// Step 2: the role picked, with the durations it allows.
    chosen: Option<ChosenRole>,
    reason: String,
    ticket: String,
    errors: Vec<FieldError>,
}

pub struct ChosenRole {
    pub value: String,
    pub label: String,
    pub durations: Vec<RoleOption>,
    pub ticket_required: bool,
}

/// Grant lengths offered, capped at the role's maximum (which is always offered).
const DURATION_CHOICES: [u64; 8] = [
    15 * 60,
    30 * 60,
    3600,
    2 * 3600,
    4 * 3600,
    8 * 3600,
    12 * 3600,
    24 * 3600,
];

fn duration_options(max: std::time::Duration, selected: &str) -> Vec<RoleOption> {
    let mut secs: Vec<u64> = DURATION_CHOICES
        .iter()
        .copied()
        .filter(|s| *s < max.as_secs())
        .collect();
    secs.push(max.as_secs());
    let selected = policy::parse_duration(selected).ok().map(|d| d.as_secs());
    let default = secs
        .iter()
        .copied()
        .find(|s| *s >= 3600)
        .unwrap_or(max.as_secs());
    secs.into_iter()
        .map(|s| {
            let text = format_duration(std::time::Duration::from_secs(s));
            RoleOption {
                selected: selected.map_or(s == default, |x| x == s),
                value: text.clone(),
                label: text,
            }
        })
        .collect()
}

/// The new-request form: step 1 picks a role the actor may request; step 2 (with a
/// valid `target`) offers only durations up to that role's maximum.
/// What the requester typed, kept across a refused submission.
#[derive(Default)]
struct Typed {
    target: String,
    duration: String,
    reason: String,
    ticket: String,
}

fn new_request_page(
    state: &AppState,
    actor: &Actor,
    chrome: Chrome,
    typed: Typed,
    errors: Vec<FieldError>,
) -> NewRequestPage {
    let Typed {
        target,
        duration,
        reason,
        ticket,
    } = typed;
    let options = role_options(state, actor, &target);
    let chosen = options.iter().find(|o| o.value == target).and_then(|o| {
        let (res, role) = target.split_once('/')?;
        let (_, role) = state.config.role(res, role)?;
        Some(ChosenRole {
            value: o.value.clone(),
            label: o.label.clone(),
            durations: duration_options(role.max_duration(), &duration),
            ticket_required: role.require_ticket,
        })
    });
    NewRequestPage {
        chrome,
        options,
        chosen,
        reason,
        ticket,
        errors,
    }
}

impl NewRequestPage {
    fn err(&self, field: &str) -> String {
        self.errors
            .iter()
            .filter(|e| e.field == field)
            .map(|e| e.message.clone())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The resource/role pairs this actor may request, as form options.
fn role_options(state: &AppState, actor: &Actor, selected: &str) -> Vec<RoleOption> {
    let mut out = Vec::new();
    for r in &state.config.resources {
        for role in &r.roles {
            if !policy::may_request(actor, role) {
                continue;
            }
            let value = format!("{}/{}", r.name, role.name);
            let mut label = format!(
                "{} ({}) — {}: up to {}, {} approval{} from {}",
                r.name,
                r.kind,
                role.name,
                format_duration(role.max_duration()),
                role.min_approvals,
                if role.min_approvals == 1 { "" } else { "s" },
                role.approver_groups
                    .join(if role.all_groups { " and " } else { " or " }),
            );
            if role.require_ticket {
                label.push_str(", ticket required");
            }
            out.push(RoleOption {
                selected: value == selected,
                value,
                label,
            });
        }
    }
    out
}

#[derive(Deserialize)]
pub struct TargetQuery {
    target: Option<String>,
}

pub async fn new_request(
    State(state): State<AppState>,
    user: WebUser,
    Query(q): Query<TargetQuery>,
) -> Result<impl IntoResponse, PageError> {
    let chrome = Chrome::of(&state, &user).await?;
    let typed = Typed {
        target: q.target.unwrap_or_default(),
        ..Typed::default()
    };
    Ok(new_request_page(
        &state,
        &user.actor,
        chrome,
        typed,
        Vec::new(),
    ))
}

#[derive(Deserialize)]
pub struct NewRequestForm {
    csrf: String,
    target: String,
    duration: String,
    reason: String,
    #[serde(default)]
    ticket: String,
}

pub async fn create_request(
    State(state): State<AppState>,
    user: WebUser,
    Form(form): Form<NewRequestForm>,
) -> Result<Response, PageError> {
    user.check_csrf(&form.csrf).await?;
    let (resource, role) = form
        .target
        .split_once('/')
        .unwrap_or((form.target.as_str(), ""));
    let input = RequestInput {
        resource: resource.into(),
        role: role.into(),
        duration: form.duration.clone(),
        reason: form.reason.clone(),
        ticket: Some(form.ticket.clone()),
    };
    match access::create_request(&state, &user.actor, &input, Channel::Web).await {
        Ok(view) => Ok(Redirect::to(&format!("/requests/{}", view.request.id)).into_response()),
        // Bad input: show the form again with what was typed, nothing lost.
        Err(Error::Invalid(errors)) => {
            let errors = errors
                .into_iter()
                .map(|e| {
                    if e.field == "resource" || e.field == "role" {
                        FieldError {
                            field: "target",
                            ..e
                        }
                    } else {
                        e
                    }
                })
                .collect();
            let chrome = Chrome::of(&state, &user).await?;
            let typed = Typed {
                target: form.target,
                duration: form.duration,
                reason: form.reason,
                ticket: form.ticket,
            };
            let page = new_request_page(&state, &user.actor, chrome, typed, errors);
            Ok((StatusCode::UNPROCESSABLE_ENTITY, page).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "request_list.html")]
struct RequestListPage {
    chrome: Chrome,
    title: &'static str,
    intro: &'static str,
    empty: &'static str,
    requests: Vec<RequestVm>,
}

pub async fn my_requests(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    let now = state.now_ms();
    let requests = access::list(&state, &user.actor, access::Scope::Mine, None)
        .await?
        .iter()
        .map(|v| request_vm(v, now))
        .collect();
    Ok(RequestListPage {
        chrome: Chrome::of(&state, &user).await?,
        title: "My requests",
        intro: "Requests you filed, newest first.",
        empty: "You have not asked for access yet.",
        requests,
    })
}

pub async fn queue(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    let now = state.now_ms();
    let requests = access::queue(&state, &user.actor)
        .await?
        .iter()
        .map(|v| request_vm(v, now))
        .collect();
    Ok(RequestListPage {
        chrome: Chrome::of(&state, &user).await?,
        title: "Approval queue",
        intro: "Pending requests you may decide on. Your own requests never appear here.",
        empty: "Nothing is waiting for you.",
        requests,
    })
}

#[derive(Template, WebTemplate)]
#[template(path = "request_detail.html")]
struct RequestDetailPage {
    chrome: Chrome,
    r: RequestVm,
    reason_lines: Vec<String>,
    timeline: Vec<TimelineItem>,
    can_decide: bool,
    own_request: bool,
    can_cancel: bool,
    can_revoke: bool,
    approver_groups: String,
    deliveries: Vec<DeliveryVm>,
    can_get_certificate: bool,
    can_get_db_credentials: bool,
    /// The grant's database login, in words (errors included), for whoever may see
    /// the request.
    db_credential: String,
}

pub struct DeliveryVm {
    pub what: String,
    pub to: String,
    pub state: String,
}

pub async fn request_detail(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, PageError> {
    let view = access::view(&state, &user.actor, &id).await?;
    let now = state.now_ms();
    let actor = &user.actor;
    let r = &view.request;
    let role = state
        .config
        .role(&r.resource, &r.role)
        .map(|(_, role)| role);
    let pending = r.status == policy::RequestStatus::Pending;
    let own_request = r.requester_id == actor.user_id;
    let can_decide = pending
        && !view.decided_by(&actor.user_id)
        && role.is_some_and(|role| policy::may_decide(actor, &r.requester_id, role).is_ok());
    let grant_live = view.grant.as_ref().is_some_and(|g| g.is_live(now));
    let can_revoke = grant_live && policy::may_revoke(actor, &r.requester_id, role);
    let resource = state.config.resource(&r.resource);
    let is_ssh = resource.is_some_and(|res| res.kind == crate::config::ResourceKind::Ssh);
    let manages_db = resource.is_some_and(|res| res.manages_db_roles());
    let db_credential = match &view.grant {
        Some(g) if manages_db => {
            let mut conn = state.db.acquire().await?;
            store::db_credential(&mut conn, &g.id)
                .await?
                .map(|row| crate::dbcreds::state_words(&row))
                .unwrap_or_default()
        }
        _ => String::new(),
    };
    Ok(RequestDetailPage {
        can_get_certificate: grant_live && own_request && is_ssh,
        can_get_db_credentials: grant_live && own_request && manages_db,
        db_credential,
        chrome: Chrome::of(&state, &user).await?,
        reason_lines: r.reason.lines().map(str::to_string).collect(),
        timeline: timeline(&view),
        can_decide,
        own_request,
        can_cancel: pending && own_request,
        can_revoke,
        deliveries: store::outbox_for_request(&state.db, &r.id)
            .await?
            .into_iter()
            .map(|o| DeliveryVm {
                what: format!("{} ({})", o.kind.replace('_', " "), o.channel),
                to: o.recipient,
                state: match o.status.as_str() {
                    "sent" => format!("sent {}", o.sent_at.map(when).unwrap_or_default()),
                    "skipped" => "not needed any more".into(),
                    _ if o.attempts > 0 => format!("retrying (attempt {} failed)", o.attempts),
                    _ => "queued".into(),
                },
            })
            .collect(),
        approver_groups: view
            .approver_groups
            .join(if view.all_groups { " and " } else { " or " }),
        r: request_vm(&view, now),
    })
}

#[derive(Deserialize)]
pub struct ActionForm {
    csrf: String,
    #[serde(default)]
    comment: String,
}

pub async fn act(
    State(state): State<AppState>,
    user: WebUser,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Result<Redirect, PageError> {
    user.check_csrf(&form.csrf).await?;
    let comment = Some(form.comment.as_str());
    let actor = &user.actor;
    match action.as_str() {
        "approve" => {
            access::decide(&state, actor, &id, Decision::Approve, comment, Channel::Web).await?
        }
        "deny" => access::decide(&state, actor, &id, Decision::Deny, comment, Channel::Web).await?,
        "cancel" => access::cancel(&state, actor, &id, comment).await?,
        "revoke" => access::revoke(&state, actor, &id, comment).await?,
        _ => return Err(Error::NotFound("action").into()),
    };
    Ok(Redirect::to(&format!("/requests/{id}")))
}

#[derive(Deserialize)]
pub struct CertificateForm {
    csrf: String,
    #[serde(default)]
    public_key: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "ssh_certificate.html")]
struct CertificatePage {
    chrome: Chrome,
    request_id: String,
    resource: String,
    certificate: String,
    certificate_uri: String,
    valid_until: String,
    principals: String,
    login: String,
    address: String,
    host: String,
    port: String,
    serial: String,
    key_id: String,
    fingerprint: String,
}

/// The holder pastes a public key and gets a certificate for the live grant.
pub async fn ssh_certificate(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
    Form(form): Form<CertificateForm>,
) -> Result<impl IntoResponse, PageError> {
    user.check_csrf(&form.csrf).await?;
    let minted = access::ssh::mint_certificate(&state, &user.actor, &id, &form.public_key).await?;
    let mut conn = state.db.acquire().await?;
    let req = store::get_request(&mut conn, &id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    drop(conn);
    let address = state
        .config
        .resource(&req.resource)
        .and_then(|r| r.address.clone())
        .unwrap_or_default();
    let (host, port) = address
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap_or_default();
    Ok(CertificatePage {
        chrome: Chrome::of(&state, &user).await?,
        request_id: id,
        resource: req.resource,
        certificate_uri: form_urlencoded::byte_serialize(minted.certificate.as_bytes())
            .collect::<String>()
            .replace('+', "%20"),
        certificate: minted.certificate,
        valid_until: when(i64::try_from(minted.valid_before).unwrap_or(0) * 1000),
        login: minted.principals.first().cloned().unwrap_or_default(),
        principals: minted.principals.join(", "),
        address,
        host,
        port,
        serial: minted.serial.to_string(),
        key_id: minted.key_id,
        fingerprint: minted.fingerprint,
    })
}

#[derive(Template, WebTemplate)]
#[template(path = "db_credentials.html")]
struct DbCredentialsPage {
    chrome: Chrome,
    request_id: String,
    resource: String,
    c: crate::dbcreds::Issued,
}

/// The holder asks for a database login; the password is on this page only.
pub async fn db_credentials(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<impl IntoResponse, PageError> {
    user.check_csrf(&form.csrf).await?;
    let issued = crate::dbcreds::issue(&state, &user.actor, &id).await?;
    let mut conn = state.db.acquire().await?;
    let req = store::get_request(&mut conn, &id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    Ok(DbCredentialsPage {
        chrome: Chrome::of(&state, &user).await?,
        request_id: id,
        resource: req.resource,
        c: issued,
    })
}

// ------------------------------------------------------------------ grants, audit, policy

#[derive(Template, WebTemplate)]
#[template(path = "grants.html")]
struct GrantsPage {
    chrome: Chrome,
    grants: Vec<GrantVm>,
}

pub async fn grants(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    let now = state.now_ms();
    let grants = access::live_grants(&state, &user.actor)
        .await?
        .iter()
        .map(|g| grant_vm(g, now))
        .collect();
    Ok(GrantsPage {
        chrome: Chrome::of(&state, &user).await?,
        grants,
    })
}

pub struct AuditVm {
    pub seq: i64,
    pub when: String,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub details: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "audit.html")]
struct AuditPage {
    chrome: Chrome,
    chain: String,
    chain_ok: bool,
    events: Vec<AuditVm>,
}

pub async fn audit_log(
    State(state): State<AppState>,
    AdminUser(user): AdminUser,
) -> Result<impl IntoResponse, PageError> {
    // The signed checkpoints too: a rewrite that recomputed every hash passes the
    // chain check alone.
    let keys = [state.audit_key.public_key().clone()];
    let (chain, chain_ok) =
        match crate::audit::checkpoint::verify_db(&state.db, &keys, None).await? {
            Ok(ok) => (
                format!(
                    "chain verified: {} events, head {}; signed checkpoint at seq {}",
                    ok.chain.events,
                    &ok.chain.head[..16],
                    ok.checkpoint
                        .map_or("none yet".to_string(), |s| s.to_string())
                ),
                true,
            ),
            Err(f) => (format!("chain BROKEN: {f}"), false),
        };
    let events = crate::audit::recent(&state.db, None, 200)
        .await?
        .into_iter()
        .map(|e| AuditVm {
            seq: e.seq,
            when: when(e.ts),
            actor: e.actor,
            action: e.action,
            subject: e.subject,
            details: e.details,
        })
        .collect();
    Ok(AuditPage {
        chrome: Chrome::of(&state, &user).await?,
        chain,
        chain_ok,
        events,
    })
}

pub struct PolicyRowVm {
    pub resource: String,
    pub kind: String,
    pub role: String,
    pub requesters: String,
    pub approvers: String,
    pub approvals: String,
    pub max: String,
    pub ticket: bool,
    pub pending_ttl: String,
    pub you_may_request: bool,
}

#[derive(Template, WebTemplate)]
#[template(path = "policy.html")]
struct PolicyPage {
    chrome: Chrome,
    rows: Vec<PolicyRowVm>,
}

pub async fn policy(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    let mut rows = Vec::new();
    for r in &state.config.resources {
        for role in &r.roles {
            rows.push(PolicyRowVm {
                resource: r.name.clone(),
                kind: r.kind.to_string(),
                role: role.name.clone(),
                requesters: role.requester_groups.join(", "),
                approvers: role.approver_groups.join(", "),
                approvals: if role.all_groups {
                    format!("{} (every group)", role.min_approvals)
                } else {
                    role.min_approvals.to_string()
                },
                max: format_duration(role.max_duration()),
                ticket: role.require_ticket,
                pending_ttl: format_duration(state.config.pending_ttl(role)),
                you_may_request: policy::may_request(&user.actor, role),
            });
        }
    }
    Ok(PolicyPage {
        chrome: Chrome::of(&state, &user).await?,
        rows,
    })
}

pub struct UserVm {
    pub id: String,
    pub email: String,
    pub identity: String,
    pub groups: String,
    pub synced: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "users.html")]
struct UsersPage {
    chrome: Chrome,
    users: Vec<UserVm>,
}

/// Admins: who exists, with which groups as of which sign-in.
pub async fn users(
    State(state): State<AppState>,
    AdminUser(user): AdminUser,
) -> Result<impl IntoResponse, PageError> {
    let users = store::list_users(&state.db)
        .await?
        .into_iter()
        .map(|u| UserVm {
            id: u.id,
            email: u.email,
            identity: format!("{} · {}", u.issuer, u.subject),
            groups: u.groups,
            synced: u.synced_at.map(when).unwrap_or_else(|| "never".into()),
        })
        .collect();
    Ok(UsersPage {
        chrome: Chrome::of(&state, &user).await?,
        users,
    })
}

/// Admins: end a user's browser sessions so their next request signs in again.
pub async fn force_reauth(
    State(state): State<AppState>,
    AdminUser(user): AdminUser,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    user.check_csrf(&form.csrf).await?;
    auth::force_reauth(&state, &user.actor, &id).await?;
    Ok(Redirect::to("/admin/users"))
}

pub struct MailVm {
    pub to: String,
    pub subject: String,
    pub when: String,
    pub html: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "mailbox.html")]
struct MailboxPage {
    chrome: Chrome,
    mails: Vec<MailVm>,
}

/// The demo's mailbox: what twokey would have emailed. Exists only with demo sign-in.
pub async fn dev_mailbox(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    if !(state.config.auth.dev_login && state.config.email.as_ref().is_some_and(|e| e.dev_mailbox))
    {
        return Err(Error::NotFound("page").into());
    }
    let mails = store::dev_mailbox(&state.db, 100)
        .await?
        .into_iter()
        .map(|m| MailVm {
            to: m.recipient,
            subject: m.subject,
            when: when(m.created_at),
            html: m.body_html,
        })
        .collect();
    Ok(MailboxPage {
        chrome: Chrome::of(&state, &user).await?,
        mails,
    })
}

pub async fn not_found() -> PageError {
    PageError(Error::NotFound("page"))
}
