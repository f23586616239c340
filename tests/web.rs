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

#[tokio::test]
async fn sign_in_rotates_the_session_and_sets_safe_cookie_flags() {
    let app = common::start().await;
    let b = common::Browser::new(app.server.url());
    let resp = b.get_raw("/login").await;
    let before = session_cookie(&resp).expect("login page starts a session for its CSRF token");
    assert!(before.contains("HttpOnly"), "{before}");
    assert!(before.contains("SameSite=Lax"), "{before}");
    assert!(!before.contains("Secure"), "plain http: {before}");
    let html = resp.text().await.unwrap();
    let csrf = common::csrf_in(&html).unwrap();
    let resp = b
        .post("/login/dev", &[("csrf", &csrf), ("email", ALICE)])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let after = session_cookie(&resp).expect("sign-in sets a new session cookie");
    assert_ne!(
        cookie_id(&before),
        cookie_id(&after),
        "session id rotated at sign-in"
    );

    // The pre-sign-in id is dead: replaying it does not sign anyone in.
    let fixated = common::http_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = fixated
        .get(app.url("/requests"))
        .header("cookie", cookie_id(&before))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[LOCATION], "/login?next=/requests");
}

#[tokio::test]
async fn cookies_are_secure_behind_https() {
    let app =
        common::start_with(|c| c.server.public_url = Some("https://twokey.example.com".into()))
            .await;
    let b = common::Browser::new(app.server.url());
    let cookie = session_cookie(&b.get_raw("/login").await).unwrap();
    assert!(cookie.contains("Secure"), "{cookie}");
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
