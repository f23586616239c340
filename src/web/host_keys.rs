//! Admins: the host keys that targets presented to the relay, to confirm or reject.
//! A target whose config pins no `host_key` gets no session until its key is confirmed
//! here (see `relay::host_keys`).

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use russh::keys::ssh_key::{HashAlg, PublicKey};

use super::error::PageError;
use super::extract::AdminUser;
use super::views::{Chrome, CsrfForm, when};
use crate::error::Error;
use crate::relay::host_keys::{self, Decision};
use crate::state::AppState;
use crate::store;

/// `/admin/host-keys` and its confirm / reject / withdraw buttons.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/host-keys", get(list))
        .route("/admin/host-keys/{id}/{action}", post(decide))
}

pub struct KeyVm {
    pub id: String,
    pub resource: String,
    pub address: String,
    pub fingerprint: String,
    pub algorithm: String,
    pub status: String,
    pub seen: String,
    pub decided: String,
    pub pending: bool,
    pub confirmed: bool,
    /// For a pending key: the confirmed key that confirming it would replace.
    pub replaces: String,
}

pub struct PinnedVm {
    pub resource: String,
    pub fingerprint: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "host_keys.html")]
struct HostKeysPage {
    chrome: Chrome,
    keys: Vec<KeyVm>,
    pinned: Vec<PinnedVm>,
}

pub async fn list(
    State(state): State<AppState>,
    AdminUser(user): AdminUser,
) -> Result<impl IntoResponse, PageError> {
    let rows = store::host_keys(&state.db).await?;
    let confirmed_of = |resource: &str| {
        rows.iter()
            .find(|k| k.resource == resource && k.status == crate::policy::HostKeyStatus::Confirmed)
            .map(|k| k.fingerprint.clone())
            .unwrap_or_default()
    };
    let keys = rows
        .iter()
        .cloned()
        .map(|k| KeyVm {
            replaces: if k.status == crate::policy::HostKeyStatus::Pending {
                confirmed_of(&k.resource)
            } else {
                String::new()
            },
            confirmed: k.status == crate::policy::HostKeyStatus::Confirmed,
            algorithm: PublicKey::from_openssh(&k.public_key)
                .map(|p| p.algorithm().to_string())
                .unwrap_or_default(),
            decided: match (&k.decided_by, k.decided_at) {
                (Some(by), Some(at)) => format!("{by}, {}", when(at)),
                (None, Some(at)) => when(at),
                _ => String::new(),
            },
            pending: k.status == crate::policy::HostKeyStatus::Pending,
            seen: when(k.first_seen_at),
            id: k.id,
            resource: k.resource,
            address: k.address,
            fingerprint: k.fingerprint,
            status: k.status.to_string(),
        })
        .collect();
    let pinned = state
        .config()
        .resources
        .iter()
        .filter_map(|r| {
            let key = PublicKey::from_openssh(r.host_key.as_deref()?.trim()).ok()?;
            Some(PinnedVm {
                resource: r.name.clone(),
                fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
            })
        })
        .collect();
    Ok(HostKeysPage {
        chrome: Chrome::of(&state, &user).await?,
        keys,
        pinned,
    })
}

/// Confirm or reject a pending key.
pub async fn decide(
    State(state): State<AppState>,
    AdminUser(user): AdminUser,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    user.check_csrf(&form.csrf).await?;
    let decision = match action.as_str() {
        "confirm" => Decision::Confirm,
        "reject" => Decision::Reject,
        "withdraw" => Decision::Withdraw,
        _ => return Err(Error::NotFound("action").into()),
    };
    host_keys::decide(&state, &user.actor, &id, decision).await?;
    Ok(Redirect::to("/admin/host-keys"))
}
