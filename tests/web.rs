//! Pages, sessions and CSRF, through an HTTP client that behaves like a browser.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, LOCATION, SET_COOKIE};

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";

fn session_cookie(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("twokey_session="))
}

fn cookie_id(cookie: &str) -> &str {
    cookie.split(';').next().unwrap()
}

fn cookie_named(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with(&format!("{name}=")))
}

#[tokio::test]
async fn sign_in_rotates_the_session_and_sets_safe_cookie_flags() {
    let app = common::start().await;
    let b = common::Browser::new(app.server.url());
    let resp = b.get_raw("/login").await;
    assert_eq!(
        session_cookie(&resp),
        None,
        "the sign-in page starts no session"
    );
    let csrf_cookie = cookie_named(&resp, "twokey_login_csrf").expect("a sealed CSRF cookie");
    assert!(csrf_cookie.contains("HttpOnly"), "{csrf_cookie}");
    assert!(csrf_cookie.contains("SameSite=Strict"), "{csrf_cookie}");
    assert!(!csrf_cookie.contains("Secure"), "plain http: {csrf_cookie}");
    let html = resp.text().await.unwrap();
    let csrf = common::csrf_in(&html).unwrap();
    // The cookie is sealed: the token in the form is not readable from it.
    assert!(!csrf_cookie.contains(&csrf), "{csrf_cookie}");

    // Session fixation: an id planted before sign-in is not the one sign-in uses.
    let planted = "twokey_session=planted-by-an-attacker";
    let resp = b
        .http
        .post(app.url("/login/dev"))
        .header("cookie", format!("{}; {planted}", cookie_id(&csrf_cookie)))
        .form(&[("csrf", csrf.as_str()), ("email", ALICE)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let after = session_cookie(&resp).expect("sign-in sets a session cookie");
    assert!(
        after.contains("HttpOnly") && after.contains("SameSite=Lax"),
        "{after}"
    );
    assert_ne!(cookie_id(&after), planted, "a fresh session id at sign-in");

    // The planted id signs nobody in; the real one does.
    let plain = common::http_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (cookie, status) in [
        (planted, StatusCode::SEE_OTHER),
        (cookie_id(&after), StatusCode::OK),
    ] {
        let resp = plain
            .get(app.url("/requests"))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{cookie}");
    }
}

#[tokio::test]
async fn cookies_are_secure_and_hsts_is_sent_behind_https() {
    let app =
        common::start_with(|c| c.server.public_url = Some("https://twokey.example.com".into()))
            .await;
    let http = common::http_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http.get(app.url("/login")).send().await.unwrap();
    let csrf_cookie = cookie_named(&resp, "__Host-twokey_login_csrf")
        .expect("behind https the CSRF cookie has the __Host- prefix");
    assert!(
        csrf_cookie.contains("Secure") && csrf_cookie.contains("Path=/"),
        "{csrf_cookie}"
    );
    let csrf = common::csrf_in(&resp.text().await.unwrap()).unwrap();
    let resp = http
        .post(app.url("/login/dev"))
        .header("cookie", cookie_id(&csrf_cookie))
        .form(&[("csrf", csrf.as_str()), ("email", ALICE)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = session_cookie(&resp).unwrap();
    assert!(cookie.contains("Secure"), "{cookie}");

    // Strict-Transport-Security on every response: pages, errors, redirects, the API,
    // static files, health.
    for (method, path) in [
        ("GET", "/login"),
        ("GET", "/requests"),
        ("GET", "/nope"),
        ("GET", "/api/v1/whoami"),
        ("GET", "/static/style.css"),
        ("GET", "/healthz"),
        ("POST", "/logout"),
    ] {
        let resp = http
            .request(method.parse().unwrap(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers()
                .get("strict-transport-security")
                .map(|v| v.to_str().unwrap()),
            Some("max-age=31536000"),
            "{method} {path} ({})",
            resp.status()
        );
    }
}

#[tokio::test]
async fn no_hsts_over_plain_http() {
    let app = common::start().await;
    let resp = common::http().get(app.url("/login")).send().await.unwrap();
    assert!(resp.headers().get("strict-transport-security").is_none());
}

async fn session_rows(app: &common::TestApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM tower_sessions")
        .fetch_one(&app.state().db)
        .await
        .unwrap()
}

#[tokio::test]
async fn anonymous_visitors_leave_no_session_rows() {
    let app = common::start().await;
    // A real, unused emailed link, so its sign-in prompt is shown too.
    let alice = app.api(ALICE).await;
    let id = alice.file("demo-db", "read", "1h", None).await;
    let state = app.state();
    let mut conn = state.db.acquire().await.unwrap();
    let bob = twokey::store::user_id_by_email(&mut conn, BOB)
        .await
        .unwrap()
        .unwrap();
    drop(conn);
    let (token, hash) = twokey::auth::new_secret("ak_");
    let now = state.now_ms();
    let mut tx = twokey::store::begin_write(&state.db).await.unwrap();
    twokey::store::insert_action_token(&mut tx, &hash, &id, &bob, "approve", now, now + 600_000)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let link = Some(format!("/a/{token}"));
    assert_eq!(session_rows(&app).await, 0);
    for i in 0..10 {
        // Each a new visitor with no cookies, as a flood would be.
        let b = common::Browser::new(app.server.url());
        for path in [
            "/login".to_string(),
            "/login?next=/queue".to_string(),
            "/".to_string(),
            "/requests".to_string(),
            "/nope".to_string(),
            format!("/a/ak_unknown{i}"),
        ]
        .into_iter()
        .chain(link.clone())
        {
            let (status, _) = b.get(&path).await;
            assert!(status.as_u16() < 500, "{path}: {status}");
        }
        // A form posted without a session changes nothing either.
        let resp = b
            .post("/login/dev", &[("csrf", "x"), ("email", ALICE)])
            .await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(
        session_rows(&app).await,
        0,
        "anonymous requests wrote sessions"
    );
    // Signing in is what makes the first row.
    app.browser(ALICE).await;
    assert_eq!(session_rows(&app).await, 1);
}

/// A client whose connections come from `ip` (any 127.0.0.0/8 address works on Linux).
fn client_from(ip: &str) -> reqwest::Client {
    common::http_builder()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Sends `n` requests; returns the statuses.
async fn burst(
    http: &reqwest::Client,
    n: usize,
    req: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
) -> Vec<StatusCode> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(req(http).send().await.unwrap().status());
    }
    out
}

#[tokio::test]
async fn sign_in_links_token_and_slack_are_rate_limited_per_address() {
    let app = common::start().await;
    let sign_in = |h: &reqwest::Client| {
        h.post(app.url("/login/dev"))
            .form(&[("csrf", "x"), ("email", ALICE)])
    };
    let link = |h: &reqwest::Client| h.get(app.url("/a/ak_guess"));
    let token = |h: &reqwest::Client| {
        h.post(app.url("/api/v1/cli/token"))
            .body(r#"{"code":"lc_guess","verifier":"v"}"#)
    };
    let slack = |h: &reqwest::Client| h.post(app.url("/slack/interactions")).body("payload=x");
    let a = client_from("127.0.0.1");
    let b = client_from("127.0.0.2");
    type Req<'a> = &'a dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder;
    // (what, request, burst, ms until one more, Retry-After in whole seconds)
    let cases: [(&str, Req, usize, i64, u64); 4] = [
        ("sign-in", &sign_in, 20, 3000, 3),
        ("links", &link, 30, 2000, 2),
        ("token", &token, 10, 6000, 6),
        ("slack", &slack, 120, 200, 1),
    ];
    for (name, req, burst_size, refill_ms, refill_secs) in cases {
        let statuses = burst(&a, burst_size, req).await;
        assert!(
            statuses.iter().all(|s| *s != StatusCode::TOO_MANY_REQUESTS),
            "{name}: limited too early: {statuses:?}"
        );
        let resp = req(&a).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "{name}");
        assert_eq!(
            resp.headers()["retry-after"].to_str().unwrap(),
            refill_secs.to_string(),
            "{name}"
        );
        let body = resp.text().await.unwrap();
        let what = match name {
            "sign-in" => "sign-in attempts",
            "links" => "link visits",
            "token" => "token requests",
            _ => "Slack requests",
        };
        assert!(
            body.contains(&format!(
                "Too many {what} from your address. Wait {refill_secs} second"
            )),
            "{name}: {body}"
        );
        // People get a page; the CLI and Slack get JSON.
        assert_eq!(
            body.starts_with("<!doctype html>"),
            matches!(name, "sign-in" | "links"),
            "{name}: {body}"
        );
        // Another address has its own budget.
        assert_ne!(
            req(&b).send().await.unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{name} from another address"
        );
        // One request more is allowed after refill_ms on twokey's clock, not before.
        app.clock
            .advance(chrono::Duration::milliseconds(refill_ms - 1));
        assert_eq!(
            req(&a).send().await.unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{name}"
        );
        app.clock.advance(chrono::Duration::milliseconds(1));
        assert_ne!(
            req(&a).send().await.unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{name}"
        );
        assert_eq!(
            req(&a).send().await.unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{name}"
        );
    }
    // Signed-in pages are not limited.
    let (s, _) = app.browser(BOB).await.get("/requests").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_counts_and_nobody_else_can_claim_one() {
    let app = common::start_with(|c| c.server.trusted_proxies = vec!["127.0.0.1".into()]).await;
    let proxy = client_from("127.0.0.1");
    let token = |h: &reqwest::Client, client: &str| {
        h.post(app.url("/api/v1/cli/token"))
            .header("x-forwarded-for", format!("198.51.100.66, {client}"))
            .body("{}")
    };
    for _ in 0..10 {
        assert_ne!(
            token(&proxy, "203.0.113.1").send().await.unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    assert_eq!(
        token(&proxy, "203.0.113.1").send().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client behind the same proxy is not affected.
    assert_ne!(
        token(&proxy, "203.0.113.2").send().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // A client that is not the proxy cannot name itself someone else.
    let direct = client_from("127.0.0.3");
    for _ in 0..10 {
        token(&direct, "203.0.113.3").send().await.unwrap();
    }
    assert_eq!(
        token(&direct, "203.0.113.4").send().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS,
        "X-Forwarded-For from an untrusted peer is ignored"
    );
}

#[test]
fn a_trusted_proxy_must_be_an_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::test_config(dir.path());
    c.server.trusted_proxies = vec!["proxy.internal".into()];
    let err = c.validate().unwrap_err().to_string();
    assert!(err.starts_with("server.trusted_proxies[0]:"), "{err}");
}

#[tokio::test]
async fn every_page_has_security_headers_and_the_demo_banner() {
    let app = common::start().await;
    let b = app.browser(ALICE).await;
    for path in [
        "/login",
        "/requests",
        "/requests/new",
        "/queue",
        "/grants",
        "/policy",
        "/nope",
    ] {
        let resp = b.get_raw(path).await;
        let csp = resp.headers()[CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        assert_eq!(resp.headers()["x-frame-options"], "DENY");
        let html = resp.text().await.unwrap();
        assert!(
            html.contains("Demo sign-in is on"),
            "{path} lacks the demo banner"
        );
    }
}

#[tokio::test]
async fn sign_in_returns_to_the_page_asked_for_and_nowhere_else() {
    let app = common::start().await;
    for (next, lands) in [
        ("/queue", "/queue"),
        ("/requests/abc", "/requests/abc"),
        ("https://evil.example/", "/requests"),
        ("//evil.example/x", "/requests"),
        ("/\\evil.example", "/requests"),
        ("javascript:alert(1)", "/requests"),
    ] {
        let b = common::Browser::new(app.server.url());
        let csrf = b.csrf("/login").await;
        let resp = b
            .post(
                "/login/dev",
                &[("csrf", &csrf), ("email", ALICE), ("next", next)],
            )
            .await;
        assert_eq!(resp.headers()[LOCATION], lands, "{next}");
    }
    // The login page echoes a safe `next` only, escaped.
    let b = common::Browser::new(app.server.url());
    let (_, html) = b
        .get("/login?next=/queue%22%3E%3Cscript%3Ealert(1)%3C/script%3E")
        .await;
    assert!(!html.contains("<script>alert(1)"), "{html}");
    let (_, html) = b.get("/login?next=/queue").await;
    assert!(html.contains("name=\"next\" value=\"/queue\""), "{html}");
}

#[tokio::test]
async fn sign_in_without_csrf_or_as_unknown_user_is_refused() {
    let app = common::start().await;
    let b = common::Browser::new(app.server.url());
    let csrf = b.csrf("/login").await;
    // Login CSRF: a form posted from elsewhere carries no (or another) token.
    let resp = b
        .post("/login/dev", &[("csrf", "forged"), ("email", ALICE)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = b
        .post("/login/dev", &[("csrf", ""), ("email", ALICE)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = b
        .post(
            "/login/dev",
            &[("csrf", &csrf), ("email", "mallory@example.com")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let (s, _) = b.get("/requests").await;
    assert_eq!(s, StatusCode::SEE_OTHER, "still signed out");
}

#[tokio::test]
async fn dev_sign_in_does_not_exist_unless_configured() {
    let app = common::start_with(|c| c.auth.dev_login = false).await;
    let b = common::Browser::new(app.server.url());
    let (_, html) = b.get("/login").await;
    assert!(!html.contains("Demo sign-in is on"));
    assert!(!html.contains("alice@example.com"));
    let resp = b
        .post("/login/dev", &[("csrf", "x"), ("email", ALICE)])
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(!resp.text().await.unwrap().contains("Demo sign-in is on"));
}

#[tokio::test]
async fn sign_out_kills_the_session_server_side() {
    let app = common::start().await;
    let b = common::Browser::new(app.server.url());
    let csrf = b.csrf("/login").await;
    let resp = b
        .post("/login/dev", &[("csrf", &csrf), ("email", ALICE)])
        .await;
    // Keep the signed-in cookie, as a thief would.
    let stolen = cookie_id(&session_cookie(&resp).unwrap()).to_string();
    let raw = common::http_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = raw
        .get(app.url("/requests"))
        .header("cookie", &stolen)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "the cookie works before sign-out"
    );

    let csrf = b.csrf("/requests").await;
    let resp = b.post("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (s, _) = b.get("/requests").await;
    assert_eq!(s, StatusCode::SEE_OTHER, "signed out");
    let resp = raw
        .get(app.url("/requests"))
        .header("cookie", &stolen)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::SEE_OTHER,
        "the old cookie is dead server-side"
    );
}

#[tokio::test]
async fn the_workflow_through_pages() {
    let app = common::start().await;
    let alice = app.browser(ALICE).await;
    let bob = app.browser(BOB).await;

    // The form offers only what alice may request, with the role's limits.
    let (_, form) = alice.get("/requests/new").await;
    assert!(form.contains("value=\"demo-db/read\""));
    assert!(form.contains("value=\"demo-ssh/admin\""));
    assert!(form.contains("up to 4h"));
    let csrf = common::csrf_in(&form).unwrap();

    // Step 2 offers only durations the role allows.
    let (_, step2) = alice.get("/requests/new?target=demo-db/read").await;
    assert!(
        step2.contains("value=\"4h\"") && !step2.contains("value=\"8h\""),
        "{step2}"
    );
    let (_, ssh) = alice.get("/requests/new?target=demo-ssh/admin").await;
    assert!(ssh.contains("value=\"1h\"") && !ssh.contains("value=\"2h\""));
    assert!(ssh.contains("required for this role"));
    // A role alice may not request never reaches step 2.
    let (_, other) = alice.get("/requests/new?target=nope/none").await;
    assert!(other.contains("id=\"choose-role\""));

    // Bad input (a forged duration): 422, the form comes back with what was typed.
    let resp = alice
        .post(
            "/requests",
            &[
                ("csrf", &csrf),
                ("target", "demo-db/read"),
                ("duration", "9h"),
                ("reason", "keep this text"),
                ("ticket", ""),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = resp.text().await.unwrap();
    assert!(html.contains("must be at most 4h"), "{html}");
    assert!(html.contains("keep this text"));
    let resp = alice
        .post(
            "/requests",
            &[
                ("csrf", &csrf),
                ("target", "demo-ssh/admin"),
                ("duration", "30m"),
                ("reason", "patch the host"),
                ("ticket", " "),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = resp.text().await.unwrap();
    assert!(html.contains("this role requires a ticket") && html.contains("patch the host"));
    assert!(
        html.contains("<option value=\"30m\" selected>"),
        "typed duration kept: {html}"
    );

    let resp = alice
        .post(
            "/requests",
            &[
                ("csrf", &csrf),
                ("target", "demo-db/read"),
                ("duration", "2h"),
                ("reason", "rotate keys"),
                ("ticket", ""),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let detail = resp.headers()[LOCATION].to_str().unwrap().to_string();
    let id = detail.trim_start_matches("/requests/").to_string();

    // alice sees no approve button on her own request, and the endpoint refuses her.
    let (_, html) = alice.get(&detail).await;
    assert!(!html.contains("id=\"approve\""));
    assert!(html.contains("someone else must approve it"));
    let resp = alice
        .post(&format!("{detail}/approve"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // bob sees it in his queue, with the reason.
    let (_, queue) = bob.get("/queue").await;
    assert!(queue.contains(&id) && queue.contains("rotate keys"));
    let (_, html) = bob.get(&detail).await;
    assert!(html.contains("id=\"approve\""));
    let bob_csrf = common::csrf_in(&html).unwrap();

    // A POST without bob's CSRF token changes nothing.
    let resp = bob
        .post(&format!("{detail}/approve"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = bob
        .post(
            &format!("{detail}/approve"),
            &[("csrf", ""), ("comment", "lgtm")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // GET never acts.
    let (s, _) = bob.get(&format!("{detail}/approve")).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let (_, html) = alice.get(&detail).await;
    assert!(html.contains("id=\"status\">pending<"));

    let resp = bob
        .post(
            &format!("{detail}/approve"),
            &[("csrf", &bob_csrf), ("comment", "lgtm")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, html) = alice.get(&detail).await;
    assert!(html.contains("id=\"status\">approved<"), "{html}");
    assert!(html.contains("id=\"grant-status\">active<"));
    assert!(html.contains("<strong>approved</strong> by bob@example.com"));
    assert!(html.contains("via web: lgtm"));
    assert!(html.contains("<strong>granted</strong>"));
    let (_, grants) = alice.get("/grants").await;
    assert!(grants.contains("2h 0m left"), "{grants}");

    // Approving again is too late; bob revokes instead.
    let resp = bob
        .post(&format!("{detail}/approve"), &[("csrf", &bob_csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let resp = bob
        .post(
            &format!("{detail}/revoke"),
            &[("csrf", &bob_csrf), ("comment", "done early")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, html) = alice.get(&detail).await;
    assert!(
        html.contains("<strong>revoked</strong> by bob@example.com"),
        "{html}"
    );
}

#[tokio::test]
async fn user_input_is_escaped() {
    let app = common::start().await;
    let alice = app.browser(ALICE).await;
    let csrf = alice.csrf("/requests/new").await;
    let resp = alice
        .post(
            "/requests",
            &[
                ("csrf", &csrf),
                ("target", "demo-db/read"),
                ("duration", "1h"),
                ("reason", "<script>alert(1)</script>"),
                ("ticket", ""),
            ],
        )
        .await;
    let detail = resp.headers()[LOCATION].to_str().unwrap().to_string();
    let (_, html) = alice.get(&detail).await;
    assert!(!html.contains("<script>alert(1)"));
    assert!(
        html.contains("&#60;script&#62;") || html.contains("&lt;script&gt;"),
        "{html}"
    );
}

#[tokio::test]
async fn audit_page_is_for_admins_only() {
    let app = common::start().await;
    let bob = app.browser(BOB).await;
    let (s, _) = bob.get("/audit").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let dave = app.browser("dave@example.com").await;
    let (s, html) = dave.get("/audit").await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("chain verified"), "{html}");
    assert!(html.contains("auth.signed_in"));
}

/// Ending a relay session is for admins: anyone else is refused before the session is
/// even looked up (so the refusal says nothing about which sessions exist), an admin
/// gets past the check (an unknown session is then 404), and a signed-out visitor is
/// sent to sign in.
#[tokio::test]
async fn only_an_admin_may_end_a_relay_session() {
    let app = common::start().await;
    let bob = app.browser(BOB).await;
    let csrf = bob.csrf("/sessions").await;
    let resp = bob
        .post("/sessions/no-such-session/terminate", &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let html = resp.text().await.unwrap();
    assert!(html.contains("only an admin may end a session"), "{html}");

    let dave = app.browser("dave@example.com").await;
    let csrf = dave.csrf("/sessions").await;
    let resp = dave
        .post("/sessions/no-such-session/terminate", &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let anon = common::Browser::new(app.server.url());
    let resp = anon
        .post("/sessions/no-such-session/terminate", &[("csrf", "x")])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[LOCATION], "/login");
}

#[tokio::test]
async fn signed_out_visitors_are_sent_to_sign_in() {
    let app = common::start().await;
    let b = common::Browser::new(app.server.url());
    let resp = b.get_raw("/").await;
    assert_eq!(resp.headers()[LOCATION], "/login");
    for path in [
        "/requests",
        "/requests/new",
        "/queue",
        "/grants",
        "/audit",
        "/policy",
        "/admin/users",
        "/requests/x?a=1&b=2",
    ] {
        let resp = b.get_raw(path).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
        let want = format!(
            "/login?next={}",
            path.replace('?', "%3F")
                .replace('&', "%26")
                .replace('=', "%3D")
        );
        assert_eq!(resp.headers()[LOCATION], want.as_str(), "{path}");
    }
    let resp = b.post("/requests/x/approve", &[("csrf", "x")]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
}

fn with_extra_dev_users(c: &mut twokey::config::Config) {
    for (email, groups) in [
        ("erin@example.com", vec!["engineers", "sre-leads", "admins"]),
        ("frank@example.com", vec!["engineers"]),
    ] {
        c.auth.dev_users.push(twokey::config::DevUser {
            email: email.into(),
            name: None,
            groups: groups.into_iter().map(String::from).collect(),
        });
    }
}

#[tokio::test]
async fn an_approver_and_admin_cannot_approve_their_own_request_in_the_browser() {
    let app = common::start_with(with_extra_dev_users).await;
    let erin = app.browser("erin@example.com").await;
    let csrf = erin.csrf("/requests/new").await;
    let resp = erin
        .post(
            "/requests",
            &[
                ("csrf", &csrf),
                ("target", "demo-db/read"),
                ("duration", "1h"),
                ("reason", "own change"),
                ("ticket", ""),
            ],
        )
        .await;
    let detail = resp.headers()[LOCATION].to_str().unwrap().to_string();
    let (_, html) = erin.get(&detail).await;
    assert!(
        !html.contains("id=\"approve\""),
        "no approve button for the requester"
    );
    assert!(!html.contains("id=\"deny\""));
    let (_, queue) = erin.get("/queue").await;
    assert!(
        !queue.contains(detail.trim_start_matches("/requests/")),
        "own request not in the queue"
    );
    for action in ["approve", "deny"] {
        let resp = erin
            .post(&format!("{detail}/{action}"), &[("csrf", &csrf)])
            .await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{action}");
        assert!(resp.text().await.unwrap().contains("your own request"));
    }
    let (_, html) = erin.get(&detail).await;
    assert!(html.contains("id=\"status\">pending<"));
}

#[tokio::test]
async fn another_engineers_request_is_invisible_and_untouchable_in_pages() {
    let app = common::start_with(with_extra_dev_users).await;
    let frank = app.browser("frank@example.com").await;
    let csrf = frank.csrf("/requests/new").await;
    let resp = frank
        .post(
            "/requests",
            &[
                ("csrf", &csrf),
                ("target", "demo-db/read"),
                ("duration", "1h"),
                ("reason", "franks change"),
                ("ticket", ""),
            ],
        )
        .await;
    let detail = resp.headers()[LOCATION].to_str().unwrap().to_string();
    let id = detail.trim_start_matches("/requests/").to_string();

    let alice = app.browser(ALICE).await;
    let (s, html) = alice.get(&detail).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(!html.contains("franks change"));
    let csrf = alice.csrf("/requests").await;
    for action in ["approve", "deny", "cancel", "revoke"] {
        let resp = alice
            .post(&format!("{detail}/{action}"), &[("csrf", &csrf)])
            .await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{action}");
    }
    for page in ["/requests", "/queue", "/grants"] {
        let (_, html) = alice.get(page).await;
        assert!(
            !html.contains(&id) && !html.contains("franks change"),
            "{page} leaks it"
        );
    }
    let (_, html) = frank.get(&detail).await;
    assert!(html.contains("id=\"status\">pending<"), "nothing changed");
}

/// `outbox_interval = "50ms"` in the file is what runs. Each request is filed just after
/// a delivery pass, so with the 2 s it used to become, each would wait about 2 s for
/// its mail; at 50 ms none waits anywhere near a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_interval_of_50ms_in_the_file_is_the_interval_that_runs() {
    use std::time::{Duration, Instant};
    let text = twokey::config::demo_config_toml("127.0.0.1:0", std::path::Path::new("/tmp/x"))
        .replacen("[server]", "[server]\noutbox_interval = \"50ms\"", 1);
    let from_file = twokey::config::Config::parse(&text, "twokey.toml").unwrap();
    from_file.validate().unwrap();
    assert_eq!(from_file.outbox_interval(), Duration::from_millis(50));
    let interval = from_file.server.outbox_interval;
    let app = common::start_with(move |c| c.server.outbox_interval = interval).await;
    let alice = app.api(ALICE).await;
    let mailed = || async {
        twokey::store::dev_mailbox(&app.state().db, 1000)
            .await
            .unwrap()
            .len()
    };
    let mut waits = Vec::new();
    for _ in 0..4 {
        let before = mailed().await;
        let t = Instant::now();
        alice.file("demo-db", "read", "1h", None).await;
        while mailed().await == before {
            assert!(t.elapsed() < Duration::from_secs(10), "never delivered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        waits.push(t.elapsed());
        // Let the pass that delivered it finish before the next request.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("filed → mailed: {waits:?}");
    assert!(
        waits.iter().all(|w| *w < Duration::from_secs(1)),
        "{waits:?}"
    );
}
