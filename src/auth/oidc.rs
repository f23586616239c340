//! Sign-in with an OpenID Connect provider: authorization code flow with PKCE.
//!
//! What it checks, and the attack each check stops:
//! - `state` is bound to the browser that started the sign-in, in a sealed cookie that
//!   the callback clears (login CSRF: nobody can finish a sign-in in your browser that
//!   you did not start); no server-side row exists before sign-in, so anonymous
//!   visitors cannot fill a table;
//! - the PKCE verifier is sealed (encrypted) in that cookie: the browser cannot read
//!   it, and whoever intercepts the code lacks it (a stolen code is useless);
//! - the ID token's signature, issuer, audience, expiry (on twokey's clock) and nonce
//!   (token replay);
//! - userinfo answers for the same subject (token substitution);
//! - the email is verified when the provider says so, and in an allowed domain.
//!
//! The identity twokey keeps is (issuer, subject); groups are refreshed at every
//! sign-in. Nothing here logs a code, token or secret.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreErrorResponseType,
    CoreGenderClaim, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
    CoreProviderMetadata, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AdditionalClaims, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EmptyExtraTokenFields,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, IdToken, IdTokenFields, IssuerUrl, Nonce,
    OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    StandardErrorResponse, StandardTokenResponse, SubjectIdentifier, TokenResponse,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::config::{OidcConfig, Secret};
use crate::error::{Error, Result};

/// Every claim the provider sent, so the groups and email claims can be configured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AllClaims {
    #[serde(flatten)]
    pub claims: BTreeMap<String, Value>,
}

impl AdditionalClaims for AllClaims {}

type Fields = IdTokenFields<
    AllClaims,
    EmptyExtraTokenFields,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;
type Tokens = StandardTokenResponse<Fields, CoreTokenType>;
pub type OidcIdToken =
    IdToken<AllClaims, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>;
type Client = openidconnect::Client<
    AllClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    Tokens,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// A sign-in in progress, sealed into the browser's sign-in cookie (`web::anon`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
    pub next: String,
    pub started_at: i64,
}

/// How long a started sign-in may take.
pub const PENDING_TTL_MS: i64 = 10 * 60 * 1000;

/// Who the provider says signed in, after every check.
#[derive(Debug, Clone)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
    pub email: String,
    pub name: String,
    /// twokey groups, after the group map.
    pub groups: Vec<String>,
    /// The groups as the provider named them, for the audit log.
    pub idp_groups: Vec<String>,
    /// The provider said `email_verified: true`.
    pub email_verified: bool,
}

/// Why a sign-in was refused. Messages are safe to show.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("this sign-in has expired or was started in another browser; please start again")]
    NoPending,
    #[error("the sign-in response does not match the sign-in this browser started")]
    StateMismatch,
    #[error("the identity provider refused the sign-in ({0})")]
    Provider(String),
    #[error("the identity provider could not be reached or answered badly; try again later")]
    Unreachable,
    #[error("the sign-in code could not be redeemed (already used or expired); please start again")]
    Code,
    #[error("the identity provider's token failed verification: {0}")]
    Token(String),
    #[error("the identity provider gave no email address for this account")]
    NoEmail,
    #[error("this account's email address is not verified at the identity provider")]
    EmailUnverified,
    #[error("accounts in {0} may not sign in to twokey")]
    DomainNotAllowed(String),
}

impl From<SignInError> for Error {
    fn from(e: SignInError) -> Self {
        match e {
            SignInError::Unreachable => Error::Internal(e.to_string()),
            other => Error::Forbidden(other.to_string()),
        }
    }
}

/// How long discovery (and with it the provider's signing keys) is trusted before it is
/// fetched again, so a key rotation at the provider needs no restart here.
const DISCOVERY_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// The configured provider, discovered on first use (so twokey starts even while the
/// provider is down) and refreshed every [`DISCOVERY_TTL`].
pub struct Oidc {
    config: OidcConfig,
    secret: Option<Secret>,
    redirect_url: String,
    http: reqwest::Client,
    client: Mutex<Option<(Arc<Client>, std::time::Instant)>>,
}

impl Oidc {
    pub fn new(config: &OidcConfig, redirect_url: String) -> Result<Self> {
        let secret = config
            .secret()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let http = reqwest::Client::builder()
            // Following redirects from token or userinfo endpoints invites SSRF.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Internal(format!("http client: {e}")))?;
        Ok(Oidc {
            config: config.clone(),
            secret,
            redirect_url,
            http,
            client: Mutex::new(None),
        })
    }

    pub fn display_name(&self) -> &str {
        &self.config.display_name
    }

    async fn client(&self) -> Result<Arc<Client>, SignInError> {
        let mut guard = self.client.lock().await;
        if let Some((c, at)) = guard.as_ref()
            && at.elapsed() < DISCOVERY_TTL
        {
            return Ok(c.clone());
        }
        match self.discover().await {
            Ok(client) => {
                *guard = Some((client.clone(), std::time::Instant::now()));
                Ok(client)
            }
            // The provider is briefly unreachable: the keys it last published still
            // verify what it signed with them.
            Err(e) => match guard.as_ref() {
                Some((c, _)) => Ok(c.clone()),
                None => Err(e),
            },
        }
    }

    async fn discover(&self) -> Result<Arc<Client>, SignInError> {
        let issuer =
            IssuerUrl::new(self.config.issuer.clone()).map_err(|_| SignInError::Unreachable)?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, issuer = %self.config.issuer, "OIDC discovery failed");
                SignInError::Unreachable
            })?;
        let redirect =
            RedirectUrl::new(self.redirect_url.clone()).map_err(|_| SignInError::Unreachable)?;
        let client = Client::from_provider_metadata(
            metadata,
            ClientId::new(self.config.client_id.clone()),
            self.secret
                .as_ref()
                .map(|s| ClientSecret::new(s.expose().to_string())),
        )
        .set_redirect_uri(redirect);
        Ok(Arc::new(client))
    }

    /// Starts a sign-in: the URL to send the browser to, and what to keep in its session.
    pub async fn begin(&self, next: String, now: i64) -> Result<(String, Pending), SignInError> {
        let client = self.client().await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut req = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        for scope in self.config.scopes.iter().filter(|s| *s != "openid") {
            req = req.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = req.set_pkce_challenge(challenge).url();
        Ok((
            url.to_string(),
            Pending {
                state: state.secret().clone(),
                nonce: nonce.secret().clone(),
                pkce_verifier: verifier.secret().clone(),
                next,
                started_at: now,
            },
        ))
    }

    /// Finishes a sign-in from the provider's redirect. `pending` has already been
    /// taken out of the session, so it is used at most once whatever happens here.
    pub async fn finish(
        &self,
        pending: &Pending,
        state: &str,
        code: &str,
        now: DateTime<Utc>,
    ) -> Result<Identity, SignInError> {
        if !super::secrets_equal(&pending.state, state) {
            return Err(SignInError::StateMismatch);
        }
        if now.timestamp_millis() - pending.started_at > PENDING_TTL_MS {
            return Err(SignInError::NoPending);
        }
        let client = self.client().await?;
        let tokens = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|_| SignInError::Unreachable)?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| {
                tracing::info!(error = %e, "OIDC code exchange refused");
                SignInError::Code
            })?;
        let id_token = tokens
            .id_token()
            .ok_or_else(|| SignInError::Token("no ID token in the response".into()))?;
        let mut identity = self.verify_id_token(&client, id_token, &pending.nonce, now)?;

        // Merge userinfo: it often carries the email and groups the ID token leaves out.
        if client.user_info_url().is_some() {
            let subject = SubjectIdentifier::new(identity.subject.clone());
            let info = client
                .user_info(tokens.access_token().clone(), Some(subject))
                .map_err(|_| SignInError::Unreachable)?
                .request_async::<AllClaims, _, CoreGenderClaim>(&self.http)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "OIDC userinfo failed");
                    SignInError::Token("userinfo did not verify".into())
                })?;
            let mut claims = info.additional_claims().claims.clone();
            if let Some(email) = info.email() {
                claims.insert("email".into(), Value::String(email.to_string()));
            }
            if let Some(v) = info.email_verified() {
                claims.insert("email_verified".into(), Value::Bool(v));
            }
            if let Some(name) = info.name().and_then(|n| n.get(None)) {
                claims.insert("name".into(), Value::String(name.to_string()));
            }
            self.merge(&mut identity, &claims)?;
        }
        self.finalize(identity)
    }

    /// Verifies an ID token (signature, issuer, audience, expiry on `now`, nonce) and
    /// reads the identity from it. Public so tests can feed it real tokens minted for
    /// another client.
    pub async fn verify(
        &self,
        id_token: &str,
        nonce: &str,
        now: DateTime<Utc>,
    ) -> Result<Identity, SignInError> {
        let client = self.client().await?;
        let token: OidcIdToken = id_token
            .parse()
            .map_err(|_| SignInError::Token("not a JWT".into()))?;
        let identity = self.verify_id_token(&client, &token, nonce, now)?;
        self.finalize(identity)
    }

    fn verify_id_token(
        &self,
        client: &Client,
        token: &OidcIdToken,
        nonce: &str,
        now: DateTime<Utc>,
    ) -> Result<Identity, SignInError> {
        let verifier = client.id_token_verifier().set_time_fn(move || now);
        let claims = token
            .claims(&verifier, &Nonce::new(nonce.to_string()))
            .map_err(|e| SignInError::Token(e.to_string()))?;
        let mut identity = Identity {
            issuer: claims.issuer().to_string(),
            subject: claims.subject().to_string(),
            email: String::new(),
            name: String::new(),
            groups: Vec::new(),
            idp_groups: Vec::new(),
            email_verified: false,
        };
        let mut all = claims.additional_claims().claims.clone();
        if let Some(email) = claims.email() {
            all.insert("email".into(), Value::String(email.to_string()));
        }
        if let Some(v) = claims.email_verified() {
            all.insert("email_verified".into(), Value::Bool(v));
        }
        if let Some(name) = claims.name().and_then(|n| n.get(None)) {
            all.insert("name".into(), Value::String(name.to_string()));
        }
        self.merge(&mut identity, &all)?;
        Ok(identity)
    }

    /// Fills what the identity still lacks from these claims.
    fn merge(
        &self,
        id: &mut Identity,
        claims: &BTreeMap<String, Value>,
    ) -> Result<(), SignInError> {
        match claims.get("email_verified") {
            Some(Value::Bool(false)) => return Err(SignInError::EmailUnverified),
            Some(Value::Bool(true)) => id.email_verified = true,
            _ => {}
        }
        if id.email.is_empty()
            && let Some(Value::String(e)) = claims.get(&self.config.email_claim)
        {
            id.email = e.trim().to_string();
        }
        if id.name.is_empty()
            && let Some(Value::String(n)) = claims.get("name")
        {
            id.name = n.clone();
        }
        if id.idp_groups.is_empty() {
            id.idp_groups = match claims.get(&self.config.groups_claim) {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                Some(Value::String(s)) => vec![s.clone()],
                _ => Vec::new(),
            };
        }
        Ok(())
    }

    /// Checks email and domain, and maps groups.
    fn finalize(&self, mut id: Identity) -> Result<Identity, SignInError> {
        if id.email.is_empty() || !id.email.contains('@') {
            return Err(SignInError::NoEmail);
        }
        // An email the provider does not vouch for may be one the user typed in: it must
        // not pass the domain check, nor map a Slack account to this identity. Only a
        // provider known to issue verified emails without the claim may be trusted
        // without it (`require_verified_email = false`).
        if !id.email_verified && self.config.require_verified_email {
            return Err(SignInError::EmailUnverified);
        }
        let domain = id
            .email
            .rsplit('@')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !self.config.allowed_email_domains.is_empty()
            && !self
                .config
                .allowed_email_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(&domain))
        {
            return Err(SignInError::DomainNotAllowed(domain));
        }
        id.groups = map_groups(&self.config.group_map, &id.idp_groups);
        if id.name.is_empty() {
            id.name = id.email.clone();
        }
        Ok(id)
    }
}

/// IdP groups → twokey groups. Only mapped groups count, and an empty map maps
/// nothing: an IdP group never grants anything by accident, whatever it is called
/// (a self-service group named `admins` stays just a name).
pub fn map_groups(map: &BTreeMap<String, Vec<String>>, idp_groups: &[String]) -> Vec<String> {
    let out: BTreeSet<String> = idp_groups
        .iter()
        .filter_map(|g| map.get(g))
        .flatten()
        .cloned()
        .collect();
    out.into_iter().collect()
}

/// A safe place to go after sign-in: a path on this site, never another origin.
/// Anything else becomes `/requests`.
pub fn safe_next(next: Option<&str>) -> String {
    const HOME: &str = "/requests";
    let Some(next) = next else { return HOME.into() };
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_control() || c.is_whitespace())
        && next.len() <= 2048
        && !next.starts_with("/auth/")
        && !next.starts_with("/login")
        && !next.starts_with("/logout");
    if ok { next.to_string() } else { HOME.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_targets() {
        for (input, want) in [
            (None, "/requests"),
            (Some("/queue"), "/queue"),
            (Some("/requests/abc?x=1"), "/requests/abc?x=1"),
            (Some("https://evil.example/"), "/requests"),
            (Some("//evil.example/"), "/requests"),
            (Some("/\\evil.example"), "/requests"),
            (Some("javascript:alert(1)"), "/requests"),
            (Some("/x\r\nLocation: https://evil"), "/requests"),
            (Some("/\t/evil.example"), "/requests"),
            (Some("/login"), "/requests"),
            (Some("/auth/oidc/callback?code=x"), "/requests"),
            (Some(""), "/requests"),
        ] {
            assert_eq!(safe_next(input), want, "{input:?}");
        }
    }

    #[test]
    fn group_mapping() {
        let idp = vec![
            "okta-sre".to_string(),
            "okta-new".to_string(),
            "admins".to_string(),
        ];
        // No map, no groups: `admins` at the provider is not `admins` here.
        assert!(map_groups(&BTreeMap::new(), &idp).is_empty());
        let map = BTreeMap::from([(
            "okta-sre".to_string(),
            vec!["sre-leads".to_string(), "engineers".to_string()],
        )]);
        assert_eq!(map_groups(&map, &idp), ["engineers", "sre-leads"]);
    }
}
