//! Who is asking: demo sign-in, browser sessions, CSRF tokens and personal API tokens.
//!
//! Tokens are random 256-bit values shown once; only their SHA-256 is stored, and the
//! stored hash is compared in constant time. Nothing here logs a token.

pub mod oidc;
pub mod scopes;
pub mod sealed;
pub mod secret;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::audit::{self, NewEvent};
use crate::error::{Error, Result};
use crate::policy::Actor;
use crate::state::AppState;
use crate::store;
use scopes::Scopes;
pub use secret::{hash_token, new_csrf, new_secret, secrets_equal};

/// Prefix that makes a leaked twokey token easy to recognise (and to scan for).
pub const TOKEN_PREFIX: &str = "tk_";

/// Session keys.
pub const SESSION_USER: &str = "user_id";
pub const SESSION_CSRF: &str = "csrf";
/// When this session signed in (ms), for the absolute lifetime and forced re-sign-in.
pub const SESSION_SIGNED_IN_AT: &str = "signed_in_at";
/// When the session was last used (ms), for the idle timeout on the injected clock.
pub const SESSION_LAST_SEEN: &str = "last_seen";

/// A personal API token and the hash to store.
pub fn new_api_token() -> (String, String) {
    new_secret(TOKEN_PREFIX)
}

/// Who is calling with a bearer token, and what the token may do.
#[derive(Debug, Clone)]
pub struct TokenUser {
    pub actor: Actor,
    pub scopes: Scopes,
    pub token_id: String,
    pub expires_at: i64,
}

/// The user behind a bearer token, with their current groups and the token's scopes.
/// A token works until the earlier of its own end and `auth.token_ttl` after it was
/// made, unless revoked or older than the user's last forced re-sign-in.
pub async fn authenticate_token(state: &AppState, token: &str) -> Result<TokenUser> {
    if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
        return Err(Error::Unauthenticated);
    }
    let hash = hash_token(token);
    let Some(row) = store::token_owner(&state.db, &hash).await? else {
        return Err(Error::Unauthenticated);
    };
    // The lookup matched on the hash already; compare again in constant time so the
    // decision never rests on a variable-time comparison.
    if !secrets_equal(&row.token_hash, &hash) {
        return Err(Error::Unauthenticated);
    }
    let now = state.now_ms();
    let cap = row.created_at + state.config().token_ttl().as_millis() as i64;
    if now >= row.expires_at || now >= cap {
        return Err(Error::Unauthenticated);
    }
    let mut conn = state.db.acquire().await?;
    let actor = store::load_actor(&mut conn, &row.user_id, &state.config().auth.admin_groups)
        .await?
        .ok_or(Error::Unauthenticated)?;
    drop(conn);
    // A forced re-sign-in ends the user's tokens made before it too.
    if row.created_at <= actor.sessions_valid_after {
        return Err(Error::Unauthenticated);
    }
    store::touch_token(&state.db, &row.id, now).await?;
    Ok(TokenUser {
        actor,
        scopes: Scopes::from_db(&row.scopes),
        token_id: row.id,
        expires_at: row.expires_at.min(cap),
    })
}

/// Loads the signed-in user of a session.
pub async fn session_actor(state: &AppState, user_id: &str) -> Result<Option<Actor>> {
    let mut conn = state.db.acquire().await?;
    store::load_actor(&mut conn, user_id, &state.config().auth.admin_groups).await
}

/// Demo sign-in: only for users listed in config, only when `auth.dev_login` is on.
/// Refreshes the user's groups from config and records the sign-in.
pub async fn dev_sign_in(state: &AppState, email: &str) -> Result<Actor> {
    if !state.config().auth.dev_login {
        return Err(Error::NotFound("page"));
    }
    let config = state.config();
    let Some(dev) = config.dev_user(email) else {
        return Err(Error::forbidden("no such demo user"));
    };
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let user_id = sync_user(&mut tx, dev, now).await?;
    let revoked = crate::access::revoke_ineligible(state, &mut tx, &user_id, now).await?;
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: &dev.email,
            action: "auth.signed_in",
            subject: &user_id,
            details: json!({ "method": "dev", "iss": "dev", "sub": dev.email, "groups": dev.groups }),
        },
    )
    .await?;
    let actor = store::load_actor(&mut tx, &user_id, &state.config().auth.admin_groups)
        .await?
        .ok_or(Error::Unauthenticated)?;
    tx.commit().await?;
    crate::access::after_revocations(state, revoked);
    Ok(actor)
}

/// Records a verified OIDC sign-in: the identity (issuer, subject) is created or
/// refreshed, its groups replaced by what the provider says now, and the sign-in
/// audited with both the stable identity and the email.
pub async fn oidc_sign_in(state: &AppState, id: &oidc::Identity) -> Result<Actor> {
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let user_id =
        store::upsert_identity(&mut tx, &id.issuer, &id.subject, &id.email, &id.name, now).await?;
    store::set_user_groups(&mut tx, &user_id, &id.groups, now).await?;
    // Groups are replaced at every sign-in: a grant whose role they no longer allow ends
    // here, in the same transaction, not at its planned end.
    let revoked = crate::access::revoke_ineligible(state, &mut tx, &user_id, now).await?;
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: &id.email,
            action: "auth.signed_in",
            subject: &user_id,
            details: json!({
                "method": "oidc",
                "iss": id.issuer,
                "sub": id.subject,
                "email": id.email,
                "idp_groups": id.idp_groups,
                "groups": id.groups,
            }),
        },
    )
    .await?;
    let actor = store::load_actor(&mut tx, &user_id, &state.config().auth.admin_groups)
        .await?
        .ok_or(Error::Unauthenticated)?;
    tx.commit().await?;
    crate::access::after_revocations(state, revoked);
    Ok(actor)
}

/// Revokes every API token of a user (by email). Returns how many were live.
pub async fn revoke_api_tokens(state: &AppState, email: &str) -> Result<u64> {
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let Some(user_id) = store::user_id_by_email(&mut tx, email).await? else {
        return Err(Error::invalid("user", format!("no user {email}")));
    };
    let n = store::revoke_tokens(&mut tx, &user_id, now).await?;
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: "cli",
            action: "token.revoked",
            subject: &user_id,
            details: json!({ "user": email, "count": n }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(n)
}

/// Ends every browser session and API token of a user at once: they must sign in
/// again (and so get their groups refreshed). Their live grants are revoked in the same
/// transaction, each with its audit event: whoever was forced out must not keep what
/// they were granted while signed in (certificates reach the KRL, database logins are
/// dropped, relayed sessions are cut). Returns how many grants were revoked.
pub async fn force_reauth(state: &AppState, admin: &Actor, user_id: &str) -> Result<usize> {
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    if !store::force_reauth(&mut tx, user_id, now).await? {
        return Err(Error::NotFound("user"));
    }
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: &admin.email,
            action: "user.reauth_forced",
            subject: user_id,
            details: json!({ "by": admin.identity() }),
        },
    )
    .await?;
    let revoked = crate::access::revoke_all_of_user(state, &mut tx, admin, user_id, now).await?;
    tx.commit().await?;
    crate::access::after_revocations(state, revoked);
    Ok(revoked)
}

async fn sync_user(
    conn: &mut store::Conn,
    dev: &crate::config::DevUser,
    now: i64,
) -> Result<String> {
    let name = dev.name.clone().unwrap_or_else(|| dev.email.clone());
    let id = store::upsert_user(conn, &dev.email, &name, now).await?;
    store::set_user_groups(conn, &id, &dev.groups, now).await?;
    Ok(id)
}

/// Makes every configured demo user exist with the groups config gives them, so
/// approvers can be told about requests before they first sign in.
pub async fn sync_dev_users(state: &AppState) -> Result<()> {
    if !state.config().auth.dev_login {
        return Ok(());
    }
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    for dev in &state.config().auth.dev_users {
        sync_user(&mut tx, dev, now).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Creates a personal API token with only the `requests` scope and the default life.
pub async fn create_api_token(state: &AppState, email: &str, label: &str) -> Result<String> {
    create_scoped_token(state, email, label, &Scopes::requests(), None).await
}

/// Creates a personal API token for an existing user, with these scopes, for `ttl`
/// (at most, and by default, `auth.token_ttl`). Returns the token, which is never
/// stored and cannot be shown again.
pub async fn create_scoped_token(
    state: &AppState,
    email: &str,
    label: &str,
    scopes: &Scopes,
    ttl: Option<std::time::Duration>,
) -> Result<String> {
    let max = state.config().token_ttl();
    let ttl = match ttl {
        Some(t) if t.is_zero() => return Err(Error::invalid("ttl", "must be longer than zero")),
        Some(t) if t > max => {
            return Err(Error::invalid(
                "ttl",
                format!(
                    "may be at most auth.token_ttl ({})",
                    crate::policy::format_duration(max)
                ),
            ));
        }
        Some(t) => t,
        None => max,
    };
    if scopes.iter().next().is_none() {
        return Err(Error::invalid("scope", "name at least one scope"));
    }
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let user_id = match store::user_id_by_email(&mut tx, email).await? {
        Some(id) => id,
        None => match state.config().dev_user(email) {
            Some(dev) if state.config().auth.dev_login => sync_user(&mut tx, dev, now).await?,
            _ => {
                return Err(Error::invalid(
                    "user",
                    format!("no user {email}: they must sign in once first"),
                ));
            }
        },
    };
    let token = issue_token(
        &mut tx,
        &NewToken {
            user_id: &user_id,
            label,
            scopes,
            ttl,
            details: json!({ "user": email }),
            now,
        },
    )
    .await?;
    tx.commit().await?;
    Ok(token)
}

struct NewToken<'a> {
    user_id: &'a str,
    label: &'a str,
    scopes: &'a Scopes,
    ttl: std::time::Duration,
    details: serde_json::Value,
    now: i64,
}

/// Stores a new API token's hash with its audit event, in the caller's transaction;
/// returns the token (shown once, never stored).
async fn issue_token(tx: &mut store::Conn, t: &NewToken<'_>) -> Result<String> {
    let (token, hash) = new_api_token();
    let expires_at = t.now + t.ttl.as_millis() as i64;
    let scopes = t.scopes.to_db();
    let token_id = store::insert_token(
        tx,
        &store::NewToken {
            user_id: t.user_id,
            token_hash: &hash,
            label: t.label,
            scopes: &scopes,
            now: t.now,
            expires_at,
        },
    )
    .await?;
    let mut details = t.details.clone();
    details["token_id"] = json!(token_id);
    details["label"] = json!(t.label);
    details["scopes"] = json!(scopes);
    details["expires_at"] = json!(expires_at);
    audit::append(
        tx,
        t.now,
        &NewEvent {
            actor: "cli",
            action: "token.created",
            subject: t.user_id,
            details,
        },
    )
    .await?;
    Ok(token)
}

/// Revokes one token from the web app: its owner or an admin may. One conditional
/// UPDATE with its audit event.
pub async fn revoke_token(state: &AppState, actor: &Actor, token_id: &str) -> Result<()> {
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let Some(row) = store::token_by_id(&mut tx, token_id).await? else {
        return Err(Error::NotFound("token"));
    };
    // Owners manage their own tokens; only admins reach anyone else's.
    if row.user_id != actor.user_id && !actor.is_admin {
        return Err(Error::forbidden(
            "only the token's owner or an admin may revoke it",
        ));
    }
    if !store::revoke_token(&mut tx, token_id, &actor.user_id, now).await? {
        return Err(Error::conflict("this token is already revoked"));
    }
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: &actor.email,
            action: "token.revoked",
            subject: &row.user_id,
            details: json!({
                "by": actor.identity(),
                "user": row.owner_email,
                "token_id": token_id,
                "label": row.label,
                "count": 1,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// How long a CLI sign-in code works.
pub const CLI_CODE_TTL_MS: i64 = 2 * 60 * 1000;

/// The PKCE S256 challenge of a verifier: base64url(SHA-256(verifier)), unpadded.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The signed-in user confirmed `twokey login`: a one-time code for the CLI, bound to
/// its PKCE challenge and to the scopes the user agreed to.
pub async fn begin_cli_login(
    state: &AppState,
    actor: &Actor,
    challenge: &str,
    scopes: &Scopes,
) -> Result<String> {
    let now = state.now_ms();
    let (code, hash) = new_secret("lc_");
    let mut tx = store::begin_write(&state.db).await?;
    store::insert_cli_code(
        &mut tx,
        &hash,
        &actor.user_id,
        challenge,
        &scopes.to_db(),
        now,
        now + CLI_CODE_TTL_MS,
    )
    .await?;
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: &actor.email,
            action: "cli_login.confirmed",
            subject: &actor.user_id,
            details: json!({
                "by": actor.identity(),
                "scopes": scopes.to_db(),
                "code_expires_at": now + CLI_CODE_TTL_MS,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(code)
}

/// The CLI trades its code and PKCE verifier for an API token. Whoever saw the code in
/// transit cannot: they lack the verifier, which never left the CLI.
pub async fn redeem_cli_code(state: &AppState, code: &str, verifier: &str) -> Result<String> {
    let refused = || {
        Error::forbidden("this sign-in code is unknown, used or expired: run twokey login again")
    };
    if !code.starts_with("lc_") || code.len() > 128 || verifier.len() < 43 || verifier.len() > 128 {
        return Err(refused());
    }
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let Some((user_id, challenge, scopes)) =
        store::consume_cli_code(&mut tx, &hash_token(code), now).await?
    else {
        return Err(refused());
    };
    if !secrets_equal(&pkce_challenge(verifier), &challenge) {
        // The code is spent either way: a wrong verifier burns it.
        audit::append(
            &mut tx,
            now,
            &NewEvent {
                actor: "cli",
                action: "cli_login.refused",
                subject: &user_id,
                details: json!({ "reason": "PKCE verifier did not match; the code is spent" }),
            },
        )
        .await?;
        tx.commit().await?;
        return Err(refused());
    }
    let token = issue_token(
        &mut tx,
        &NewToken {
            user_id: &user_id,
            label: "twokey login",
            scopes: &Scopes::from_db(&scopes),
            ttl: state.config().cli_token_ttl(),
            details: json!({ "via": "browser confirmation" }),
            now,
        },
    )
    .await?;
    tx.commit().await?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_rfc_7636() {
        // The example in RFC 7636, appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn tokens_are_random_prefixed_and_hashed() {
        let (a, ha) = new_api_token();
        let (b, hb) = new_api_token();
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert_eq!(hash_token(&a), ha);
        assert!(!ha.contains(&a[TOKEN_PREFIX.len()..]));
    }

    #[test]
    fn secret_comparison() {
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "abcd"));
        assert!(!secrets_equal("", "a"));
    }
}
