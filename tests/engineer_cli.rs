//! The engineer's CLI end to end, as the real binary: `twokey login` through the
//! browser confirmation and loopback redirect, `request`, `status`, and `twokey ssh`
//! into a real sshd that trusts twokey's CA — with the messages for every dead end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use chrono::Utc;
use common::sshd::{self, Sshd};
use reqwest::StatusCode;
use reqwest::header::LOCATION;
use serde_json::json;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";

struct Setup {
    app: common::TestApp,
    sshd: Sshd,
    home: tempfile::TempDir,
    _ca_dir: tempfile::TempDir,
}

/// A CA made first (so sshd can trust it), sshd, then twokey pointing demo-ssh at that
/// sshd with its host key pinned.
async fn setup() -> Setup {
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_config = twokey::config::CaConfig {
        key_file: Some(ca_dir.path().join("ca")),
        passphrase_file: None,
    };
    let ca = twokey::ca::Ca::load_or_create(&ca_config, ca_dir.path()).unwrap();
    let sshd = Sshd::start(&ca.public_key_line(), "");
    let (port, host_key, login) = (sshd.port, sshd.host_key_line(), sshd::login());
    let app = common::start_with(move |c| {
        c.ca = ca_config;
        let ssh = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-ssh")
            .unwrap();
        ssh.address = Some(format!("127.0.0.1:{port}"));
        ssh.host_key = Some(host_key);
        ssh.roles[0].principals = vec![login];
        let mut quick = ssh.roles[0].clone();
        quick.name = "quick".into();
        quick.min_approvals = 1;
        quick.require_ticket = false;
        ssh.roles.push(quick);
        c.validate().unwrap();
    })
    .await;
    app.clock.set(Utc::now());
    Setup {
        app,
        sshd,
        home: tempfile::tempdir().unwrap(),
        _ca_dir: ca_dir,
    }
}

impl Setup {
    fn twokey_home(&self) -> PathBuf {
        self.home.path().join("twokey")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_twokey"));
        c.args(args)
            .env("HOME", self.home.path())
            .env("TWOKEY_HOME", self.twokey_home())
            .env_remove("TWOKEY_SERVER")
            .env("TWOKEY_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    /// Runs the binary to completion off the runtime's threads (the server under test
    /// shares the runtime).
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.cmd(args);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// `twokey login` through the browser: alice confirms in her signed-in session.
    async fn login_as(&self, email: &str) {
        self.login_with(email, &[]).await;
    }

    /// `twokey login EXTRA…` confirmed in `email`'s session; returns the consent page.
    async fn login_with(&self, email: &str, extra: &[&str]) -> String {
        let server = self.app.server.url();
        let mut args = vec!["login", "--server", &server, "--no-browser"];
        args.extend_from_slice(extra);
        let mut child = self
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut url = String::new();
        for _ in 0..5 {
            let mut line = String::new();
            err.read_line(&mut line).unwrap();
            if line.trim().starts_with("http") {
                url = line.trim().to_string();
                break;
            }
        }
        assert!(url.contains("/cli/login?port="), "{url}");
        let path = &url[url.find("/cli/login").unwrap()..];

        let browser = self.app.browser(email).await;
        let (status, page) = browser.get(path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(
            page.contains(&format!("acts as <strong>{email}</strong> for 12h")),
            "{page}"
        );
        let consent = page.clone();
        let field = |name: &str| {
            let marker = format!("name=\"{name}\" value=\"");
            let start = page.find(&marker).unwrap() + marker.len();
            page[start..start + page[start..].find('"').unwrap()].to_string()
        };
        let csrf = common::csrf_in(&page).unwrap();
        let (port, state, challenge, scope) = (
            field("port"),
            field("state"),
            field("challenge"),
            field("scope"),
        );
        let resp = browser
            .post(
                "/cli/login",
                &[
                    ("csrf", csrf.as_str()),
                    ("port", port.as_str()),
                    ("state", state.as_str()),
                    ("challenge", challenge.as_str()),
                    ("scope", scope.as_str()),
                ],
            )
            .await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        let csp = resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            csp.contains(&format!("form-action 'self' http://127.0.0.1:{port}")),
            "{csp}"
        );
        let back = resp.headers()[LOCATION].to_str().unwrap().to_string();
        assert!(
            back.starts_with(&format!("http://127.0.0.1:{port}/callback?code=lc_")),
            "{back}"
        );
        // The browser follows the redirect to the CLI's loopback listener.
        let page = reqwest::get(&back).await.unwrap().text().await.unwrap();
        assert!(page.contains("Signed in"), "{page}");
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("as {email}")),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        // The code in that URL is spent.
        let code = back
            .split("code=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        let resp = common::http()
            .post(self.app.url("/api/v1/cli/token"))
            .json(&json!({"code": code, "verifier": "x".repeat(64)}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        consent
    }

    /// The token `twokey login` saved.
    fn saved_token(&self) -> String {
        let creds = std::fs::read_to_string(self.twokey_home().join("credentials.toml")).unwrap();
        let v: toml::Value = toml::from_str(&creds).unwrap();
        v["token"].as_str().unwrap().to_string()
    }
}

fn out(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_request_wait_and_ssh_end_to_end() {
    let s = setup().await;
    // Before login: a clear instruction.
    let o = s.run(&["status"]).await;
    assert!(!o.status.success());
    assert!(out(&o).1.contains("run twokey login"), "{:?}", out(&o));

    s.login_as(ALICE).await;
    let creds = s.twokey_home().join("credentials.toml");
    assert_eq!(mode(&creds), 0o600);
    assert_eq!(mode(&s.twokey_home()), 0o700);

    // No grant yet.
    let o = s.run(&["ssh", "demo-ssh", "--", "true"]).await;
    assert!(!o.status.success());
    let (_, err) = out(&o);
    assert!(err.contains("You have no live grant for demo-ssh"), "{err}");
    assert!(err.contains("twokey request demo-ssh --role ROLE"), "{err}");

    // File; a pending request is named as such.
    let o = s
        .run(&[
            "request",
            "demo-ssh",
            "--role",
            "quick",
            "--for",
            "30m",
            "--reason",
            "deploy the fix",
        ])
        .await;
    let (stdout, err) = out(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        stdout.contains("demo-ssh/quick — pending (0 of 1 approvals from sre-leads)"),
        "{stdout}"
    );
    let id = stdout.split_whitespace().next().unwrap().to_string();
    let o = s.run(&["ssh", "demo-ssh", "--", "true"]).await;
    assert!(!o.status.success());
    assert!(out(&o).1.contains("It needs approval"), "{:?}", out(&o));
    // Bad input is refused with the server's field message.
    let o = s
        .run(&[
            "request", "demo-ssh", "--role", "quick", "--for", "5h", "--reason", "x y z",
        ])
        .await;
    assert!(!o.status.success());
    assert!(out(&o).1.contains("duration"), "{:?}", out(&o));

    // Approved: status says so, and ssh runs a command on the real sshd.
    let (st, _) = s.app.api(BOB).await.act(&id, "approve").await;
    assert_eq!(st, StatusCode::OK);
    let approved_at = Instant::now();
    let o = s.run(&["status"]).await;
    assert!(
        out(&o).0.contains(&format!(
            "{id} demo-ssh/quick — approved, grant active until"
        )),
        "{:?}",
        out(&o)
    );
    let o = s.run(&["ssh", "demo-ssh", "--", "echo", "twokey-ok"]).await;
    let elapsed = approved_at.elapsed();
    let (stdout, err) = out(&o);
    assert!(o.status.success(), "{err}\n{}", s.sshd.log());
    assert_eq!(stdout.trim(), "twokey-ok");
    eprintln!("approval → working ssh through `twokey ssh`: {elapsed:?}");
    // The key twokey made (HOME has no ~/.ssh) is private, and so is the certificate.
    assert_eq!(mode(&s.twokey_home().join("id_ed25519")), 0o600);
    assert_eq!(
        mode(&s.twokey_home().join("certs").join(format!("{id}-cert.pub"))),
        0o600
    );

    // Revoked: ssh says so (and sshd would refuse the certificate through the KRL).
    s.app.api(BOB).await.act(&id, "revoke").await;
    let o = s.run(&["ssh", "demo-ssh", "--", "true"]).await;
    assert!(!o.status.success());
    assert!(out(&o).1.contains("has been revoked"), "{:?}", out(&o));

    // --wait: the CLI waits for the decision, then connects.
    let mut child = s
        .cmd(&[
            "request",
            "demo-ssh",
            "--role",
            "quick",
            "--for",
            "15m",
            "--reason",
            "second look",
            "--wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id2 = {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.split_whitespace().next().unwrap().to_string()
    };
    // Checked: a failed approval would leave `--wait` polling for ever.
    let (approved, body) = s.app.api(BOB).await.act(&id2, "approve").await;
    assert_eq!(approved, StatusCode::OK, "{body}");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let o = s.run(&["ssh", "demo-ssh", "--", "echo", "again"]).await;
    assert_eq!(out(&o).0.trim(), "again", "{:?}", out(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_requests_and_bad_login_attempts_are_explained() {
    let s = setup().await;
    s.login_as(ALICE).await;
    let o = s
        .run(&[
            "request",
            "demo-ssh",
            "--role",
            "quick",
            "--for",
            "30m",
            "--reason",
            "look around",
        ])
        .await;
    let id = out(&o).0.split_whitespace().next().unwrap().to_string();
    s.app
        .api(BOB)
        .await
        .post(
            &format!("/requests/{id}/deny"),
            json!({"comment": "use staging"}),
        )
        .await;
    let o = s.run(&["ssh", "demo-ssh", "--", "true"]).await;
    assert!(!o.status.success());
    let err = out(&o).1;
    assert!(
        err.contains("denied by bob@example.com: use staging"),
        "{err}"
    );

    // The confirm page only sends codes to a loopback port, for well-formed requests.
    let browser = s.app.browser(ALICE).await;
    let good_state = "a".repeat(32);
    let good_challenge = "b".repeat(43);
    for (port, state, challenge) in [
        ("80", good_state.as_str(), good_challenge.as_str()),
        ("evil.example", good_state.as_str(), good_challenge.as_str()),
        ("4000", "<script>", good_challenge.as_str()),
        ("4000", good_state.as_str(), "short"),
    ] {
        let (status, page) = browser
            .get(&format!(
                "/cli/login?port={port}&state={state}&challenge={challenge}"
            ))
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{port} {state} {challenge}"
        );
        assert!(!page.contains("<script>"), "{page}");
    }
    // Signed out: sent to sign in first, and back.
    let anon = common::Browser::new(s.app.server.url());
    let resp = anon
        .get_raw(&format!(
            "/cli/login?port=4000&state={good_state}&challenge={good_challenge}"
        ))
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(
        resp.headers()[LOCATION]
            .to_str()
            .unwrap()
            .starts_with("/login?next=/cli/login")
    );
    // A POST without the session's CSRF token mints nothing.
    let resp = browser
        .post(
            "/cli/login",
            &[
                ("csrf", "forged"),
                ("port", "4000"),
                ("state", &good_state),
                ("challenge", &good_challenge),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // The token endpoint: unknown codes, a code with the wrong verifier (which burns
    // it), and garbage.
    let token = |body: serde_json::Value| {
        let url = s.app.url("/api/v1/cli/token");
        async move {
            common::http()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(
        token(json!({"code": "lc_nope", "verifier": "v".repeat(64)})).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        token(json!({"code": 1})).await,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let verifier = "w".repeat(64);
    let actor = {
        let mut conn = s.app.state().db.acquire().await.unwrap();
        let uid = twokey::store::user_id_by_email(&mut conn, ALICE)
            .await
            .unwrap()
            .unwrap();
        twokey::store::load_actor(&mut conn, &uid, &[])
            .await
            .unwrap()
            .unwrap()
    };
    let code = twokey::auth::begin_cli_login(
        s.app.state(),
        &actor,
        &twokey::auth::pkce_challenge(&verifier),
        &twokey::auth::scopes::Scopes::requests(),
    )
    .await
    .unwrap();
    assert_eq!(
        token(json!({"code": code, "verifier": "x".repeat(64)})).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        token(json!({"code": code, "verifier": verifier})).await,
        StatusCode::FORBIDDEN,
        "burnt"
    );
    // Expired: a fresh code, two minutes and a second later.
    let code = twokey::auth::begin_cli_login(
        s.app.state(),
        &actor,
        &twokey::auth::pkce_challenge(&verifier),
        &twokey::auth::scopes::Scopes::requests(),
    )
    .await
    .unwrap();
    s.app.clock.advance(chrono::Duration::seconds(121));
    assert_eq!(
        token(json!({"code": code, "verifier": verifier})).await,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn login_asks_only_for_requests_unless_told_and_says_so() {
    let s = setup().await;
    let alice = s.app.api(ALICE).await;
    let id = alice.file("demo-ssh", "quick", "30m", None).await;
    let api = |token: String| common::Api {
        base: s.app.url("/api/v1"),
        token,
        http: common::http(),
    };

    // Plain `twokey login`: the page says what the token may do, and that it cannot
    // approve; the token indeed cannot.
    let page = s.login_with(BOB, &[]).await;
    assert!(
        page.contains("<code>requests</code>: file and read your own requests"),
        "{page}"
    );
    assert!(!page.contains("<code>approve</code>"), "{page}");
    assert!(page.contains("It cannot approve or deny anyone"), "{page}");
    let bob = api(s.saved_token());
    let (status, me) = bob.get("/whoami").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["scopes"], json!(["requests"]));
    let ends =
        chrono::DateTime::parse_from_rfc3339(me["token_expires_at"].as_str().unwrap()).unwrap();
    let life = ends.timestamp() - s.app.state().clock.now().timestamp();
    assert!((12 * 3600 - 5..=12 * 3600).contains(&life), "{life}");
    let (status, body) = bob.act(&id, "approve").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("approve"),
        "{body}"
    );

    // `twokey login --approve` asks for it, and the page warns.
    let page = s.login_with(BOB, &["--approve"]).await;
    assert!(
        page.contains("<code>approve</code>: read the requests you may decide"),
        "{page}"
    );
    assert!(page.contains("cli-approve-warning"), "{page}");
    let bob = api(s.saved_token());
    assert_eq!(
        bob.get("/whoami").await.1["scopes"],
        json!(["requests", "approve"])
    );
    let (status, body) = bob.act(&id, "approve").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A tampered consent form cannot ask for a scope that does not exist.
    let browser = s.app.browser(BOB).await;
    let (status, _) = browser
        .get(&format!(
            "/cli/login?port=4000&state={}&challenge={}&scope=admin",
            "a".repeat(32),
            "b".repeat(43)
        ))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// Starts `twokey login EXTRA… --no-browser` and returns it with the consent URL it
/// prints.
fn spawn_cli_login(s: &Setup, extra: &[&str]) -> (std::process::Child, String) {
    let server = s.app.server.url();
    let mut args = vec!["login", "--server", &server, "--no-browser"];
    args.extend_from_slice(extra);
    let mut child = s
        .cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut url = String::new();
    for _ in 0..5 {
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        if line.trim().starts_with("http") {
            url = line.trim().to_string();
            break;
        }
    }
    assert!(url.contains("/cli/login?port="), "{url}");
    (child, url)
}

/// Headless Chromium opens the consent URL `twokey login EXTRA…` printed, signs in as
/// `email`, and is left on the consent page; returns the CLI process.
async fn chromium_consent(
    s: &Setup,
    b: &common::webdriver::Browser,
    email: &str,
    extra: &[&str],
) -> std::process::Child {
    let (child, url) = spawn_cli_login(s, extra);
    b.goto(&url).await;
    assert!(b.url().await.contains("/login?next="), "{}", b.url().await);
    b.click_and_wait(&format!("button[id='login-{email}']"))
        .await;
    assert_eq!(b.url().await, url, "back on the consent page after sign-in");
    assert_eq!(b.text("h1").await, "Sign in the twokey command line?");
    child
}

/// The scope names the consent page lists.
async fn listed_scopes(b: &common::webdriver::Browser) -> serde_json::Value {
    b.script(
        "return [...document.querySelectorAll('#cli-scopes li code')].map(e => e.textContent);",
    )
    .await
}

/// Clicks "Sign in the CLI", lands on the CLI's loopback page, and waits for the CLI.
async fn click_consent_and_wait(b: &common::webdriver::Browser, child: std::process::Child) {
    b.click_and_wait("#confirm-cli").await;
    assert!(
        b.url().await.starts_with("http://127.0.0.1:")
            && b.url().await.contains("/callback?code=lc_"),
        "{}",
        b.url().await
    );
    assert!(
        b.text("body").await.contains("Signed in."),
        "{}",
        b.source().await
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The consent page in Chromium: clicking "Sign in the CLI" gives the CLI a working
/// token with exactly the scopes the page listed, and that token cannot approve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_login_consent_clicked_in_chromium_gives_the_listed_scopes() {
    let s = setup().await;
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-ssh", "quick", "30m", None)
        .await;
    let b = common::webdriver::Browser::start().await;
    let child = chromium_consent(&s, &b, BOB, &[]).await;
    assert_eq!(listed_scopes(&b).await, json!(["requests"]));
    assert!(b.exists("#cli-no-approve").await);
    assert!(!b.exists("#cli-approve-warning").await);
    assert!(
        b.text("main")
            .await
            .contains(&format!("acts as {BOB} for 12h")),
        "{}",
        b.source().await
    );
    let listed = listed_scopes(&b).await;
    click_consent_and_wait(&b, child).await;
    b.quit().await;

    let bob = common::Api {
        base: s.app.url("/api/v1"),
        token: s.saved_token(),
        http: common::http(),
    };
    let (status, me) = bob.get("/whoami").await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["email"], json!(BOB), "{me}");
    assert_eq!(me["scopes"], listed, "the token has what the page said");
    let (status, body) = bob.act(&id, "approve").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

/// `twokey login --approve` in Chromium: the page lists the approve scope and warns
/// about it, and the clicked token can approve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_login_with_approve_warns_in_chromium_and_the_token_can_approve() {
    let s = setup().await;
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-ssh", "quick", "30m", None)
        .await;
    let b = common::webdriver::Browser::start().await;
    let child = chromium_consent(&s, &b, BOB, &["--approve"]).await;
    assert_eq!(listed_scopes(&b).await, json!(["requests", "approve"]));
    let warning = b.text("#cli-approve-warning").await;
    assert!(
        warning.contains("This token can approve other people's requests"),
        "{warning}"
    );
    assert!(!b.exists("#cli-no-approve").await);
    let listed = listed_scopes(&b).await;
    click_consent_and_wait(&b, child).await;
    b.quit().await;

    let bob = common::Api {
        base: s.app.url("/api/v1"),
        token: s.saved_token(),
        http: common::http(),
    };
    let (status, me) = bob.get("/whoami").await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["scopes"], listed, "the token has what the page said");
    let (status, body) = bob.act(&id, "approve").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
