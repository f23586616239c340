//! Live access and its credentials: the grants page, the SSH certificate a holder gets
//! for their live grant by pasting a public key, and the database login of a grant on
//! a PostgreSQL resource (its password shown on that page only).
//!
//! Every POST carries the session's CSRF token; whether the caller holds a live grant is
//! for `access::ssh` and `dbcreds` to refuse. What this module must never do: log or
//! keep a credential it shows.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::error::PageError;
use super::extract::WebUser;
use super::views::{Chrome, CsrfForm, GrantVm, grant_vm, when};
use crate::access;
use crate::error::Error;
use crate::state::AppState;
use crate::store;

/// `/grants`, `/requests/{id}/ssh-certificate`, `/requests/{id}/db-credentials`.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/grants", get(grants))
        .route("/requests/{id}/ssh-certificate", post(ssh_certificate))
        .route("/requests/{id}/db-credentials", post(db_credentials))
}

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
