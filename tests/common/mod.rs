//! Shared harness: boots the real server on 127.0.0.1:0 with the demo policy, a
//! throwaway data dir and a manual clock, and gives tests API and browser-like clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod mail;
pub mod oidc;
pub mod postgres;
pub mod psql;
pub mod relay_pg;
pub mod slack;
pub mod sshd;
pub mod transcripts;
pub mod webdriver;

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use twokey::clock::ManualClock;
use twokey::config::{Config, demo_config_toml};
use twokey::server::{self, Server};
use twokey::state::AppState;

/// An HTTP client for tests: a peer that stalls fails the test instead of hanging it.
pub fn http() -> reqwest::Client {
    http_builder().build().unwrap()
}

/// The same, to configure further (cookies, redirects).
pub fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().timeout(std::time::Duration::from_secs(60))
}

pub struct TestApp {
    pub server: Server,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
}

/// The demo config, sweeper off (tests sweep by hand after moving the clock).
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::parse(&demo_config_toml("127.0.0.1:0", dir), "demo").unwrap();
    config.server.sweep_interval = std::time::Duration::ZERO;
    config.server.outbox_interval = std::time::Duration::ZERO;
    config.server.reconcile_interval = std::time::Duration::ZERO;
    config.validate().unwrap();
    config
}

pub async fn start() -> TestApp {
    start_with(|_| {}).await
}

pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = server::start(config, clock.clone(), listener)
        .await
        .unwrap();
    TestApp { server, clock, dir }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.server.url(), path)
    }

    pub fn state(&self) -> &AppState {
        &self.server.state
    }

    /// The configuration as its file says now, with `f` applied to `resource`'s roles:
    /// a file to reload.
    pub fn config_with_roles(
        &self,
        resource: &str,
        f: impl FnOnce(&mut Vec<twokey::config::RoleConfig>),
    ) -> Config {
        let mut c = self.state().config_as_read();
        f(&mut c
            .resources
            .iter_mut()
            .find(|r| r.name == resource)
            .unwrap()
            .roles);
        c
    }

    /// Reloads the configuration with `f` applied to `resource`'s roles.
    pub async fn reload_roles(
        &self,
        resource: &str,
        f: impl FnOnce(&mut Vec<twokey::config::RoleConfig>),
    ) -> twokey::server::Reloaded {
        let c = self.config_with_roles(resource, f);
        twokey::server::reload(self.state(), c).await.unwrap()
    }

    /// Creates (or updates) a user with exactly these groups, in one transaction as
    /// sign-in does (the relay's cut watcher must never see the user with no groups).
    pub async fn user(&self, email: &str, groups: &[&str]) {
        let mut tx = twokey::store::begin_write(&self.state().db).await.unwrap();
        let id = twokey::store::upsert_user(&mut tx, email, email, 0)
            .await
            .unwrap();
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        twokey::store::set_user_groups(&mut tx, &id, &groups, 0)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    /// An API client for a user (who must exist, or be a demo user), with a token of
    /// both scopes (`requests` and `approve`).
    pub async fn api(&self, email: &str) -> Api {
        self.api_with(email, &twokey::auth::scopes::Scopes::all())
            .await
    }

    /// An API client whose token has exactly these scopes.
    pub async fn api_with(&self, email: &str, scopes: &twokey::auth::scopes::Scopes) -> Api {
        let token = twokey::auth::create_scoped_token(self.state(), email, "test", scopes, None)
            .await
            .unwrap();
        Api {
            base: self.url("/api/v1"),
            token,
            http: http(),
        }
    }

    /// A browser-like client (cookies, no redirects) signed in through the demo form.
    pub async fn browser(&self, email: &str) -> Browser {
        let b = Browser::new(self.server.url());
        b.sign_in(email).await;
        b
    }

    pub async fn audit_actions(&self) -> Vec<String> {
        twokey::audit::page(&self.state().db, 0, 100_000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect()
    }

    pub async fn assert_chain_ok(&self) {
        let res = twokey::audit::verify_chain(&self.state().db).await.unwrap();
        assert!(res.is_ok(), "audit chain broken: {res:?}");
    }
}

pub struct Api {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Files a request and returns its id, asserting 201.
    pub async fn file(
        &self,
        resource: &str,
        role: &str,
        duration: &str,
        ticket: Option<&str>,
    ) -> String {
        let (status, body) = self
            .post(
                "/requests",
                json!({"resource": resource, "role": role, "duration": duration,
                       "reason": "investigate incident", "ticket": ticket}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    pub async fn act(&self, id: &str, action: &str) -> (StatusCode, Value) {
        self.post(
            &format!("/requests/{id}/{action}"),
            json!({"comment": "ok"}),
        )
        .await
    }
}

/// A cookie-keeping HTTP client that reads CSRF tokens out of pages, as a browser would.
#[derive(Clone)]
pub struct Browser {
    pub base: String,
    pub http: reqwest::Client,
}

impl Browser {
    pub fn new(base: String) -> Self {
        let http = http_builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Browser { base, http }
    }

    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let resp = self
            .http
            .get(format!("{}{}", self.base, path))
            .send()
            .await
            .unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    pub async fn get_raw(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{}", self.base, path))
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(format!("{}{}", self.base, path))
            .form(form)
            .send()
            .await
            .unwrap()
    }

    /// The CSRF token in a page's forms.
    pub async fn csrf(&self, path: &str) -> String {
        let (_, html) = self.get(path).await;
        csrf_in(&html).expect("page has a csrf field")
    }

    pub async fn sign_in(&self, email: &str) {
        let csrf = self.csrf("/login").await;
        let resp = self
            .post("/login/dev", &[("csrf", &csrf), ("email", email)])
            .await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "sign-in as {email}");
    }
}

pub fn csrf_in(html: &str) -> Option<String> {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker)? + marker.len();
    let end = html[start..].find('"')?;
    Some(html[start..start + end].to_string())
}
