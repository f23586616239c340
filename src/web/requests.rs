//! Requests in the browser: the new-request form (step 1 picks a role, step 2 the
//! duration), my requests, the approval queue, a request's page with its timeline and
//! deliveries, and the approve / deny / cancel / revoke buttons.
//!
//! Every POST form carries the session's CSRF token and is checked before anything
//! else. Who may decide, cancel or revoke is `access`'s to refuse; the `can_*` flags here
//! only choose which buttons to show.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::error::PageError;
use super::extract::WebUser;
use super::views::{Chrome, RequestVm, request_vm, when};
use crate::access::{self, Channel, Decision, RequestView};
use crate::error::Error;
use crate::policy::{self, Actor, FieldError, RequestInput, format_duration};
use crate::state::AppState;
use crate::store;

/// `/requests`, `/requests/new`, `/requests/{id}` and its actions, `/queue`.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/requests", get(my_requests).post(create_request))
        .route("/requests/new", get(new_request))
        .route("/requests/{id}", get(request_detail))
        .route("/requests/{id}/{action}", post(act))
        .route("/queue", get(queue))
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
        let config = state.config();
        let (_, role) = config.role(res, role)?;
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
    for r in &state.config().resources {
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
    /// The holder of a live grant on a resource reached through the PostgreSQL relay.
    can_get_relay_password: bool,
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
    let config = state.config();
    let role = config.role(&r.resource, &r.role).map(|(_, role)| role);
    let pending = r.status == policy::RequestStatus::Pending;
    let own_request = r.requester_id == actor.user_id;
    let can_decide = pending
        && !view.decided_by(&actor.user_id)
        && role.is_some_and(|role| policy::may_decide(actor, &r.requester_id, role).is_ok());
    let grant_live = view.grant.as_ref().is_some_and(|g| g.is_live(now));
    let can_revoke = grant_live && policy::may_revoke(actor, &r.requester_id, role);
    let resource = config.resource(&r.resource);
    let is_ssh = resource.is_some_and(|res| res.kind == crate::config::ResourceKind::Ssh);
    let manages_db = resource.is_some_and(|res| res.manages_db_roles());
    // A relay resource never hands out the target's login, only a relay password.
    let via_relay = resource.is_some_and(|res| {
        res.kind == crate::config::ResourceKind::Postgres
            && state.config().db_access(res) == crate::config::DbAccess::Relay
    });
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
        can_get_db_credentials: grant_live && own_request && manages_db && !via_relay,
        can_get_relay_password: grant_live && own_request && via_relay,
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
    pub(super) csrf: String,
    #[serde(default)]
    pub(super) comment: String,
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
