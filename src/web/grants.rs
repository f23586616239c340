//! Live access and its credentials: the grants page, the SSH certificate a holder gets
//! for their live grant by pasting a public key, and the database login of a grant on
//! a PostgreSQL resource reached directly, or the relay password of one reached
//! through the relay (each password shown on that page only).
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

/// `/grants`, `/requests/{id}/ssh-certificate`, `/requests/{id}/db-credentials`,
/// `/requests/{id}/relay-login`.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/grants", get(grants))
        .route("/requests/{id}/ssh-certificate", post(ssh_certificate))
        .route("/requests/{id}/db-credentials", post(db_credentials))
        .route("/requests/{id}/relay-login", post(relay_login))
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
        .config()
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

#[derive(Template, WebTemplate)]
#[template(path = "relay_login.html")]
struct RelayLoginPage {
    chrome: Chrome,
    request_id: String,
    c: crate::dbcreds::RelayLogin,
    /// The psql command line, without the password (psql asks for it).
    psql: String,
    cert_file: &'static str,
}

/// The holder asks for a relay password; it is on this page only (and, like every
/// page, sent with `Cache-Control: no-store`).
pub async fn relay_login(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<impl IntoResponse, PageError> {
    user.check_csrf(&form.csrf).await?;
    let login = crate::dbcreds::issue_relay_login(&state, &user.actor, &id).await?;
    Ok(RelayLoginPage {
        chrome: Chrome::of(&state, &user).await?,
        request_id: id,
        psql: format!("psql \"{}\"", login.conninfo),
        c: login,
        cert_file: crate::dbcreds::RELAY_CERT_FILE,
    })
}
