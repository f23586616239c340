//! `/api/v1`: JSON over bearer tokens, for the CLI and automation.
//!
//! 401 without a valid token, 403 when the caller may not act (self-approval
//! included) or the token lacks the scope the action needs, 404 for an unknown id, 409
//! when the request is no longer in a state that allows the action, 422 with
//! field-level messages for bad input.
//!
//! Scopes ([`crate::auth::scopes`]): `requests` for one's own requests, grants and
//! credentials; `approve` to read, decide or revoke anyone else's. A token never acts
//! beyond its scopes, whatever its owner may do in the browser.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::{ApiToken, ApiUser};
use crate::access::{self, Channel, Decision, RequestView};
use crate::auth::scopes::Scope;
use crate::clock::from_millis;
use crate::error::Error;
use crate::policy::{FieldError, RequestInput};
use crate::state::AppState;

/// Everything under `/api/v1` but the CLI's token exchange (in [`super::cli_login`]);
/// `web::router` nests it and adds the JSON 404.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/requests", get(list).post(create))
        .route("/requests/{id}", get(show))
        .route("/requests/{id}/ssh-certificate", post(ssh_certificate))
        .route("/requests/{id}/db-credentials", post(db_credentials))
        .route("/requests/{id}/relay-login", post(relay_login))
        .route("/requests/{id}/{action}", post(act))
        .route("/ca/ssh", get(ca_public_key))
        .route("/ca/krl", get(ca_krl))
        .route("/relay/host-key", get(relay_host_key))
        .route("/relay/pg-cert", get(relay_pg_cert))
        .route("/whoami", get(whoami))
}

fn iso(ms: i64) -> String {
    from_millis(ms).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The API's view of a request. `db_access` (`"relay"` or `"direct"`, null for SSH)
/// tells `twokey psql` which way the resource is reached.
pub fn request_json(state: &AppState, v: &RequestView) -> Value {
    let r = &v.request;
    let db_access = state
        .config()
        .resource(&r.resource)
        .filter(|res| res.kind == crate::config::ResourceKind::Postgres)
        .map(|res| state.config().db_access(res).to_string());
    json!({
        "id": r.id,
        "status": r.status,
        "resource": r.resource,
        "db_access": db_access,
        "role": r.role,
        "requester": r.requester_email,
        "duration_secs": r.duration_secs,
        "reason": r.reason,
        "ticket": r.ticket,
        "created_at": iso(r.created_at),
        "expires_at": iso(r.expires_at),
        "decided_at": r.decided_at.map(iso),
        "required_approvals": v.required_approvals,
        "all_groups": v.all_groups,
        "approver_groups": v.approver_groups,
        "approval_count": v.approval_count(),
        "approvals": v.approvals.iter().map(|a| json!({
            "approver": a.approver_email,
            "decision": a.decision,
            "comment": a.comment,
            "channel": a.channel,
            "at": iso(a.created_at),
        })).collect::<Vec<_>>(),
        "grant": v.grant.as_ref().map(|g| json!({
            "id": g.id,
            "status": g.status,
            "starts_at": iso(g.starts_at),
            "ends_at": iso(g.ends_at),
            "ended_at": g.ended_at.map(iso),
            "ended_by": g.ended_by_email,
        })),
    })
}

fn parse_body(body: &Bytes) -> Result<serde_json::Map<String, Value>, Error> {
    if body.is_empty() {
        return Ok(Default::default());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::invalid("body", "must be a JSON object")),
        Err(e) => Err(Error::invalid("body", format!("is not valid JSON: {e}"))),
    }
}

/// A string field; `required` fields must be present.
fn string_field(
    map: &serde_json::Map<String, Value>,
    name: &'static str,
    required: bool,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match map.get(name) {
        Some(Value::String(s)) => Some(s.clone()),
        None | Some(Value::Null) if !required => None,
        None | Some(Value::Null) => {
            errors.push(FieldError {
                field: name,
                message: "is required".into(),
            });
            None
        }
        Some(_) => {
            errors.push(FieldError {
                field: name,
                message: "must be a string".into(),
            });
            None
        }
    }
}

pub async fn create(
    State(state): State<AppState>,
    ApiUser(actor): ApiUser,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let map = parse_body(&body)?;
    let mut errors = Vec::new();
    let resource = string_field(&map, "resource", true, &mut errors);
    let role = string_field(&map, "role", true, &mut errors);
    let duration = match map.get("duration") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) if n.as_u64().is_some() => Some(n.to_string()),
        None | Some(Value::Null) => {
            errors.push(FieldError {
                field: "duration",
                message: "is required, e.g. \"30m\" or 1800".into(),
            });
            None
        }
        Some(_) => {
            errors.push(FieldError {
                field: "duration",
                message: "must be a string like \"30m\" or a whole number of seconds".into(),
            });
            None
        }
    };
    let reason = string_field(&map, "reason", true, &mut errors);
    let ticket = string_field(&map, "ticket", false, &mut errors);
    for key in map.keys() {
        if !["resource", "role", "duration", "reason", "ticket"].contains(&key.as_str()) {
            errors.push(FieldError {
                field: "body",
                message: format!("unknown field {key:?}"),
            });
        }
    }
    if !errors.is_empty() {
        return Err(Error::Invalid(errors).into());
    }
    let input = RequestInput {
        resource: resource.unwrap_or_default(),
        role: role.unwrap_or_default(),
        duration: duration.unwrap_or_default(),
        reason: reason.unwrap_or_default(),
        ticket,
    };
    let view = access::create_request(&state, &actor, &input, Channel::Api).await?;
    Ok((StatusCode::CREATED, Json(request_json(&state, &view))))
}

/// The scope needed to touch a request: `requests` for one's own, `approve` for
/// anyone else's.
fn scope_for(actor_id: &str, view: &RequestView) -> Scope {
    if view.request.requester_id == actor_id {
        Scope::Requests
    } else {
        Scope::Approve
    }
}

pub async fn show(
    State(state): State<AppState>,
    token: ApiToken,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let actor = &token.0.actor;
    let view = access::view(&state, actor, &id).await?;
    token.require(scope_for(&actor.user_id, &view))?;
    Ok(Json(request_json(&state, &view)))
}

#[derive(Deserialize)]
pub struct ListQuery {
    status: Option<String>,
}

/// With `approve`, every request the caller may see; with only `requests`, their own.
pub async fn list(
    State(state): State<AppState>,
    token: ApiToken,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let which = if token.0.scopes.contains(Scope::Approve) {
        access::Scope::Visible
    } else {
        token.require(Scope::Requests)?;
        access::Scope::Mine
    };
    let views = access::list(&state, &token.0.actor, which, q.status.as_deref()).await?;
    Ok(Json(json!({
        "requests": views.iter().map(|v| request_json(&state, v)).collect::<Vec<_>>()
    })))
}

/// approve / deny need the `approve` scope; cancel needs `requests` (it is only ever
/// one's own); revoke needs `requests` for one's own grant and `approve` for anyone
/// else's.
pub async fn act(
    State(state): State<AppState>,
    token: ApiToken,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let actor = &token.0.actor;
    // The scope is checked before anything else: a token without it learns nothing.
    match action.as_str() {
        "approve" | "deny" => {
            token.require(Scope::Approve)?;
        }
        "cancel" => {
            token.require(Scope::Requests)?;
        }
        "revoke" => {
            let view = access::view(&state, actor, &id).await?;
            token.require(scope_for(&actor.user_id, &view))?;
        }
        _ => return Err(Error::NotFound("action").into()),
    }
    let map = parse_body(&body)?;
    let mut errors = Vec::new();
    let comment = string_field(&map, "comment", false, &mut errors);
    if !errors.is_empty() {
        return Err(Error::Invalid(errors).into());
    }
    let comment = comment.as_deref();
    let view = match action.as_str() {
        "approve" => {
            access::decide(&state, actor, &id, Decision::Approve, comment, Channel::Api).await?
        }
        "deny" => access::decide(&state, actor, &id, Decision::Deny, comment, Channel::Api).await?,
        "cancel" => access::cancel(&state, actor, &id, comment).await?,
        "revoke" => access::revoke(&state, actor, &id, comment).await?,
        _ => return Err(Error::NotFound("action").into()),
    };
    Ok(Json(request_json(&state, &view)))
}

/// `POST /requests/{id}/ssh-certificate {public_key}`: a certificate for the grant's
/// holder while the grant is live.
pub async fn ssh_certificate(
    State(state): State<AppState>,
    ApiUser(actor): ApiUser,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let map = parse_body(&body)?;
    let mut errors = Vec::new();
    let key = string_field(&map, "public_key", true, &mut errors);
    if let Some(k) = map.keys().find(|k| k.as_str() != "public_key") {
        errors.push(FieldError {
            field: "body",
            message: format!("unknown field {k:?}"),
        });
    }
    if !errors.is_empty() {
        return Err(Error::Invalid(errors).into());
    }
    let minted =
        access::ssh::mint_certificate(&state, &actor, &id, &key.unwrap_or_default()).await?;
    // Where to connect and which host key to expect, for `twokey ssh`.
    let mut body = json!(minted);
    let view = access::view(&state, &actor, &id).await?;
    if let Some(res) = state.config().resource(&view.request.resource) {
        body["address"] = json!(res.address);
        body["host_key"] = json!(res.host_key);
    }
    Ok((StatusCode::CREATED, Json(body)))
}

/// `POST /requests/{id}/db-credentials`: a login on the grant's PostgreSQL resource,
/// for its holder while the grant is live. The password is in this answer only.
pub async fn db_credentials(
    State(state): State<AppState>,
    ApiUser(actor): ApiUser,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let issued = crate::dbcreds::issue(&state, &actor, &id).await?;
    Ok((StatusCode::CREATED, Json(json!(issued))))
}

/// `POST /requests/{id}/relay-login`: a relay password for the holder's live grant on
/// a PostgreSQL resource reached through the relay, with where to connect and the
/// relay's certificate. The password is in this answer only; asking again replaces it.
pub async fn relay_login(
    State(state): State<AppState>,
    ApiUser(actor): ApiUser,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let login = crate::dbcreds::issue_relay_login(&state, &actor, &id).await?;
    Ok((StatusCode::CREATED, Json(json!(login))))
}

/// `GET /ca/ssh`: the line for sshd's `TrustedUserCAKeys`. Public, like any CA cert.
pub async fn ca_public_key(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        format!("{}\n", state.ca.public_key_line()),
    )
}

/// `GET /relay/host-key`: the SSH relay's host key line, so `twokey ssh --relay` can pin
/// it. Public; 404 when the relay is off.
pub async fn relay_host_key(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let relay = state.relay.as_ref().ok_or(Error::NotFound("relay"))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        format!("{}\n", relay.host.public_key_line()),
    ))
}

/// `GET /relay/pg-cert`: the PostgreSQL relay's certificate (PEM), for clients'
/// `sslrootcert`. Public, like any certificate; 404 when the PostgreSQL relay is off.
pub async fn relay_pg_cert(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let tls = state
        .relay_pg
        .as_ref()
        .ok_or(Error::NotFound("PostgreSQL relay"))?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/x-pem-file"),
            (
                axum::http::header::CONTENT_DISPOSITION,
                "attachment; filename=\"twokey-relay.pem\"",
            ),
        ],
        tls.cert_pem.clone(),
    ))
}

/// `GET /ca/krl`: the binary KRL for sshd's `RevokedKeys`, computed from the store now.
pub async fn ca_krl(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let krl = access::ssh::current_krl(&state).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        krl,
    ))
}

/// Who the token is for and what it may do, with any scope.
pub async fn whoami(ApiToken(token): ApiToken) -> Json<Value> {
    let actor = &token.actor;
    Json(json!({
        "email": actor.email,
        "name": actor.display_name,
        "groups": actor.groups,
        "admin": actor.is_admin,
        "scopes": token.scopes.iter().map(Scope::as_str).collect::<Vec<_>>(),
        "token_expires_at": iso(token.expires_at),
    }))
}

pub async fn not_found() -> ApiError {
    ApiError(Error::NotFound("endpoint"))
}
