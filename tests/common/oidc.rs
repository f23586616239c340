//! A real OpenID Connect provider for tests: npm `oidc-provider` run by
//! `tests/oidc/provider.mjs` on a loopback port, killed on drop. Plus a twokey server
//! configured against it, and a cookie-keeping walker that signs in through the
//! provider's own HTML forms as a browser would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use twokey::clock::ManualClock;
use twokey::server::{self, Server};

pub const CLIENT_ID: &str = "twokey";
pub const CLIENT_SECRET: &str = "twokey-test-client-secret-0123456789";
pub const OTHER_ID: &str = "other-app";
pub const OTHER_SECRET: &str = "other-app-test-client-secret-0123456789";

pub struct Provider {
    child: Child,
    pub issuer: String,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Provider {
    /// Starts the provider with these clients' redirect URIs and the standard accounts.
    pub fn start(twokey_callback: &str, other_callback: &str, id_token_ttl: u64) -> Provider {
        let root = env!("CARGO_MANIFEST_DIR");
        assert!(
            std::path::Path::new(root)
                .join("node_modules/oidc-provider")
                .exists(),
            "node_modules/oidc-provider is missing: run ./scripts/test, which runs npm ci"
        );
        let port = free_port();
        let config = json!({
            "port": port,
            "id_token_ttl": id_token_ttl,
            "clients": [
                {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [twokey_callback]},
                {"client_id": OTHER_ID, "client_secret": OTHER_SECRET, "redirect_uris": [other_callback]},
            ],
            "accounts": {
                "alice": {"email": "alice@corp.example", "email_verified": true, "name": "Alice Example", "groups": ["idp-eng"]},
                "bob": {"email": "bob@corp.example", "email_verified": true, "name": "Bob Example", "groups": ["idp-sre"]},
                "carol": {"email": "carol@corp.example", "email_verified": true, "groups": ["idp-sre"]},
                "dave": {"email": "dave@corp.example", "email_verified": true, "groups": ["idp-admins"]},
                "eve": {"email": "eve@corp.example", "email_verified": true, "groups": ["idp-unmapped"]},
                "outsider": {"email": "outsider@other.example", "email_verified": true, "groups": ["idp-sre"]},
                "unverified": {"email": "unverified@corp.example", "email_verified": false, "groups": ["idp-sre"]},
                "silent": {"email": "silent@corp.example", "groups": ["idp-sre"]},
            },
        });
        let mut child = Command::new("node")
            .arg(format!("{root}/tests/oidc/provider.mjs"))
            .arg(config.to_string())
            .current_dir(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node (install nodejs)");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(issuer) = line.strip_prefix("ready ") {
                    let _ = tx.send(issuer.to_string());
                }
            }
        });
        let issuer = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("oidc-provider did not start within 20 s");
        Provider { child, issuer }
    }

    /// Changes what the provider says about an account from its next sign-in on.
    pub async fn set_groups(&self, login: &str, groups: &[&str]) {
        let resp = super::http()
            .post(format!("{}/__test/accounts/{login}", self.issuer))
            .body(json!({ "groups": groups }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    }
}

pub struct OidcApp {
    pub server: Server,
    pub clock: Arc<ManualClock>,
    pub provider: Provider,
    pub dir: tempfile::TempDir,
    pub base: String,
}

/// twokey (demo sign-in off) in front of a fresh provider. The clock starts at the real
/// time, since the provider stamps its tokens with the real time.
pub async fn start(id_token_ttl: u64) -> OidcApp {
    start_with(id_token_ttl, |_| {}).await
}

pub async fn start_with(
    id_token_ttl: u64,
    tweak: impl FnOnce(&mut twokey::config::Config),
) -> OidcApp {
    start_inner(id_token_ttl, tweak, true).await
}

/// The same without `Config::validate`, for what must hold even if a config skipped
/// it (one built in code).
pub async fn start_unvalidated(
    id_token_ttl: u64,
    tweak: impl FnOnce(&mut twokey::config::Config),
) -> OidcApp {
    start_inner(id_token_ttl, tweak, false).await
}

async fn start_inner(
    id_token_ttl: u64,
    tweak: impl FnOnce(&mut twokey::config::Config),
    validate: bool,
) -> OidcApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let provider = Provider::start(
        &format!("{base}/auth/oidc/callback"),
        &format!("{base}/other/cb"),
        id_token_ttl,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = super::test_config(dir.path());
    config.auth.dev_login = false;
    config.auth.dev_users.clear();
    config.email = None;
    config.server.public_url = Some(base.clone());
    let secret_file = dir.path().join("oidc-secret");
    std::fs::write(&secret_file, format!("{CLIENT_SECRET}\n")).unwrap();
    let toml = format!(
        r#"
issuer = "{}"
client_id = "{CLIENT_ID}"
client_secret_file = "{}"
display_name = "Test IdP"
allowed_email_domains = ["corp.example"]
[group_map]
idp-eng = ["engineers"]
idp-sre = ["sre-leads"]
idp-admins = ["admins"]
"#,
        provider.issuer,
        secret_file.display()
    );
    config.auth.oidc = Some(toml::from_str(&toml).unwrap());
    tweak(&mut config);
    if validate {
        config.validate().unwrap();
    }
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let server = server::start(config, clock.clone(), listener)
        .await
        .unwrap();
    OidcApp {
        server,
        clock,
        provider,
        dir,
        base,
    }
}

/// A cookie-keeping client that never follows redirects by itself.
pub fn client() -> reqwest::Client {
    client_with(Arc::new(reqwest::cookie::Jar::default()))
}

pub fn client_with(jar: Arc<reqwest::cookie::Jar>) -> reqwest::Client {
    super::http_builder()
        .cookie_provider(jar)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn resolve(base: &str, location: &str) -> String {
    reqwest::Url::parse(base)
        .unwrap()
        .join(location)
        .unwrap()
        .to_string()
}

fn form_action(html: &str) -> String {
    let marker = "action=\"";
    let start = html.find(marker).expect("a form") + marker.len();
    let end = html[start..].find('"').unwrap();
    html[start..start + end].replace("&amp;", "&")
}

/// Follows redirects from `url` through the provider's login and consent forms (as
/// `login`) until the provider sends the browser to a URL starting with `stop_at`,
/// which is returned without being fetched.
pub async fn walk(http: &reqwest::Client, url: &str, login: &str, stop_at: &str) -> String {
    let mut url = url.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..30 {
        assert!(Instant::now() < deadline, "sign-in walk took too long");
        if url.starts_with(stop_at) {
            return url;
        }
        let resp = http.get(&url).send().await.unwrap();
        if resp.status().is_redirection() {
            url = resolve(&url, resp.headers()["location"].to_str().unwrap());
            continue;
        }
        let status = resp.status();
        let html = resp.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{url}: {html}");
        let fields: Vec<(&str, &str)> = if html.contains("name=\"login\"") {
            vec![("prompt", "login"), ("login", login), ("password", "any")]
        } else if html.contains("name=\"prompt\" value=\"consent\"") {
            vec![("prompt", "consent")]
        } else {
            panic!("unexpected page at {url}: {html}");
        };
        let action = resolve(&url, &form_action(&html));
        let resp = http.post(&action).form(&fields).send().await.unwrap();
        assert!(
            resp.status().is_redirection(),
            "{action}: {}",
            resp.status()
        );
        url = resolve(&action, resp.headers()["location"].to_str().unwrap());
    }
    panic!("sign-in walk did not reach {stop_at}");
}

impl OidcApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Starts a sign-in in `http`'s session and walks it to the callback URL.
    pub async fn callback_url(&self, http: &reqwest::Client, login: &str, next: &str) -> String {
        let start = self.url(&format!("/auth/oidc/start?next={next}"));
        walk(http, &start, login, &self.url("/auth/oidc/callback")).await
    }

    /// A full sign-in; returns the client and where twokey sent it afterwards.
    pub async fn sign_in(&self, login: &str, next: &str) -> (reqwest::Client, String) {
        let http = client();
        let cb = self.callback_url(&http, login, next).await;
        let resp = http.get(&cb).send().await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::SEE_OTHER,
            "sign-in as {login}: {}",
            resp.text().await.unwrap()
        );
        let loc = resp.headers()["location"].to_str().unwrap().to_string();
        (http, loc)
    }

    /// Who the session in `http` is signed in as (from the page header), if anyone.
    pub async fn whoami(&self, http: &reqwest::Client) -> Option<String> {
        let resp = http.get(self.url("/policy")).send().await.unwrap();
        if resp.status() != StatusCode::OK {
            return None;
        }
        let html = resp.text().await.unwrap();
        let marker = "<span class=\"who\">";
        let start = html.find(marker)? + marker.len();
        let end = html[start..].find('<')?;
        Some(html[start..start + end].to_string())
    }

    pub async fn audit(&self) -> Vec<twokey::audit::AuditEvent> {
        twokey::audit::page(&self.server.state.db, 0, 100_000)
            .await
            .unwrap()
    }

    /// Obtains a real ID token minted for the *other* client, by running its code flow
    /// (with PKCE) as that client would.
    pub async fn other_clients_id_token(&self, login: &str, nonce: &str) -> String {
        self.id_token_for(OTHER_ID, OTHER_SECRET, &self.url("/other/cb"), login, nonce)
            .await
    }

    /// An ID token the provider issues to twokey's own client for `login` with this
    /// nonce, obtained by walking the code flow by hand (twokey never sees it).
    pub async fn own_id_token(&self, login: &str, nonce: &str) -> String {
        self.id_token_for(
            CLIENT_ID,
            CLIENT_SECRET,
            &self.url("/auth/oidc/callback"),
            login,
            nonce,
        )
        .await
    }

    async fn id_token_for(
        &self,
        client_id: &str,
        client_secret: &str,
        redirect: &str,
        login: &str,
        nonce: &str,
    ) -> String {
        use base64::Engine;
        use sha2::Digest;
        let verifier = "other-app-pkce-verifier-0123456789-0123456789-0123456789";
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes()));
        let redirect = redirect.to_string();
        let auth = format!(
            "{}/auth?client_id={client_id}&response_type=code&scope=openid%20email&redirect_uri={}&state=s&nonce={nonce}&code_challenge={challenge}&code_challenge_method=S256",
            self.provider.issuer,
            urlencode(&redirect)
        );
        let http = client();
        let cb = walk(&http, &auth, login, &redirect).await;
        let code = reqwest::Url::parse(&cb)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.to_string())
            .expect("code");
        let tokens: Value = super::http()
            .post(format!("{}/token", self.provider.issuer))
            .basic_auth(client_id, Some(client_secret))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", &redirect),
                ("code_verifier", verifier),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tokens["id_token"].as_str().expect("id_token").to_string()
    }
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
