//! Sign-in through a real OpenID Connect provider (npm oidc-provider on loopback):
//! the happy path in headless Chromium and over HTTP, and every refusal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::oidc::{self, OidcApp};
use reqwest::StatusCode;

async fn refused(app: &OidcApp, http: &reqwest::Client, callback: &str, why: &str) {
    let resp = http.get(callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{callback}");
    let html = resp.text().await.unwrap();
    assert!(html.contains(why), "expected {why:?} in {html}");
    assert_eq!(
        app.whoami(http).await,
        None,
        "a refused sign-in leaves nobody signed in"
    );
}

#[tokio::test]
async fn sign_in_lands_on_the_page_asked_for_with_idp_groups() {
    let app = oidc::start(3600).await;
    let (http, landed) = app.sign_in("alice", "/requests/new").await;
    assert_eq!(landed, "/requests/new");
    assert_eq!(
        app.whoami(&http).await.as_deref(),
        Some("alice@corp.example")
    );
    // idp-eng maps to engineers, who may request.
    let html = http
        .get(app.url("/requests/new"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("value=\"demo-db/read\""), "{html}");

    // The identity is issuer + subject; the audit log records both and the email.
    let users = twokey::store::list_users(&app.server.state.db)
        .await
        .unwrap();
    let alice = users
        .iter()
        .find(|u| u.email == "alice@corp.example")
        .unwrap();
    assert_eq!(alice.issuer, app.provider.issuer);
    assert_eq!(alice.subject, "alice");
    assert_eq!(alice.groups, "engineers");
    assert!(alice.synced_at.is_some());
    let ev = app
        .audit()
        .await
        .into_iter()
        .find(|e| e.action == "auth.signed_in")
        .unwrap();
    let d: serde_json::Value = serde_json::from_str(&ev.details).unwrap();
    assert_eq!(d["iss"], app.provider.issuer.as_str());
    assert_eq!(d["sub"], "alice");
    assert_eq!(d["email"], "alice@corp.example");
    assert_eq!(d["idp_groups"], serde_json::json!(["idp-eng"]));
    // No secret of the flow reaches the audit log.
    assert!(!ev.details.contains(oidc::CLIENT_SECRET));
}

#[tokio::test]
async fn tampered_state_and_callbacks_without_a_started_sign_in_are_refused() {
    let app = oidc::start(3600).await;
    let http = oidc::client();
    let cb = app.callback_url(&http, "alice", "/queue").await;
    let tampered = cb.replace("state=", "state=x");
    refused(
        &app,
        &http,
        &tampered,
        "does not match the sign-in this browser started",
    )
    .await;
    // The pending sign-in was used up by the failed attempt: the real callback is dead too.
    refused(
        &app,
        &http,
        &cb,
        "sign-in has expired or was started in another browser",
    )
    .await;

    // Login CSRF: an attacker's callback opened in a victim's browser that started nothing.
    let attacker = oidc::client();
    let cb = app.callback_url(&attacker, "outsider", "/queue").await;
    let victim = oidc::client();
    refused(
        &app,
        &victim,
        &cb,
        "sign-in has expired or was started in another browser",
    )
    .await;
    // Nor in a victim who started a sign-in of their own.
    let victim = oidc::client();
    let _own = app.callback_url(&victim, "alice", "/queue").await;
    refused(&app, &victim, &cb, "does not match").await;
}

#[tokio::test]
async fn a_replayed_code_is_refused() {
    let app = oidc::start(3600).await;
    let http = oidc::client();
    let cb = app.callback_url(&http, "alice", "/queue").await;
    let used = http.get(&cb).send().await.unwrap();
    assert_eq!(used.status(), StatusCode::SEE_OTHER);
    // Start a fresh sign-in in the same browser, then present the old code with the new state.
    let fresh = app.callback_url(&oidc::client(), "alice", "/queue").await;
    drop(fresh);
    let start = http
        .get(app.url("/auth/oidc/start?next=/queue"))
        .send()
        .await
        .unwrap();
    let auth = start.headers()["location"].to_str().unwrap().to_string();
    let new_state = reqwest::Url::parse(&auth)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .to_string();
    let old = reqwest::Url::parse(&cb).unwrap();
    let code = old
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .to_string();
    let replay = app.url(&format!(
        "/auth/oidc/callback?code={}&state={}",
        oidc::urlencode(&code),
        oidc::urlencode(&new_state)
    ));
    let resp = http.get(&replay).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.text().await.unwrap().contains("could not be redeemed"));
    assert_eq!(app.whoami(&http).await, None);
}

#[tokio::test]
async fn an_expired_id_token_is_refused() {
    // The provider's ID tokens live 60 s; twokey's clock moves 5 minutes on before the
    // browser comes back (still inside the 10-minute sign-in window).
    let app = oidc::start(60).await;
    let http = oidc::client();
    let cb = app.callback_url(&http, "alice", "/queue").await;
    app.clock.advance(chrono::Duration::minutes(5));
    refused(&app, &http, &cb, "failed verification").await;

    // A sign-in left hanging longer than its window is refused before anything else.
    let http = oidc::client();
    let cb = app.callback_url(&http, "alice", "/queue").await;
    app.clock.advance(chrono::Duration::minutes(11));
    refused(&app, &http, &cb, "sign-in has expired").await;
}

#[tokio::test]
async fn an_id_token_for_another_client_is_refused() {
    let app = oidc::start(3600).await;
    let provider = app.server.state.oidc.clone().unwrap();
    let token = app.other_clients_id_token("alice", "n-123").await;
    let err = provider
        .verify(&token, "n-123", chrono::Utc::now())
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("audience"), "{err}");
    // A token for twokey itself verifies with its nonce, and not with another: the
    // nonce check is what refuses it.
    let own = app.own_id_token("alice", "n-456").await;
    // With its own nonce the token passes every token check; what stops it here is
    // only that emails come from userinfo, which this shortcut skips.
    let ok_nonce = provider.verify(&own, "n-456", chrono::Utc::now()).await;
    assert!(
        matches!(
            ok_nonce,
            Ok(_) | Err(twokey::auth::oidc::SignInError::NoEmail)
        ),
        "{:?}",
        ok_nonce.err().map(|e| e.to_string())
    );
    let err = provider
        .verify(&own, "n-other", chrono::Utc::now())
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("nonce"), "{err}");
    assert!(
        provider
            .verify("not.a.jwt", "n-123", chrono::Utc::now())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn tampered_next_never_leaves_the_site() {
    let app = oidc::start(3600).await;
    for next in [
        "https%3A%2F%2Fevil.example%2F",
        "%2F%2Fevil.example",
        "%2F%5Cevil.example",
        "javascript%3Aalert(1)",
        "%2Fqueue%0D%0ALocation%3A%20https%3A%2F%2Fevil.example",
    ] {
        let (_, landed) = app.sign_in("alice", next).await;
        assert_eq!(landed, "/requests", "{next}");
    }
}

#[tokio::test]
async fn accounts_outside_the_domain_or_unverified_are_refused() {
    let app = oidc::start(3600).await;
    let http = oidc::client();
    let cb = app.callback_url(&http, "outsider", "/queue").await;
    refused(
        &app,
        &http,
        &cb,
        "accounts in other.example may not sign in",
    )
    .await;
    let http = oidc::client();
    let cb = app.callback_url(&http, "unverified", "/queue").await;
    refused(&app, &http, &cb, "not verified").await;
    // A provider that says nothing about verification is not taken as vouching.
    let http = oidc::client();
    let cb = app.callback_url(&http, "silent", "/queue").await;
    refused(&app, &http, &cb, "not verified").await;
    let users = twokey::store::list_users(&app.server.state.db)
        .await
        .unwrap();
    assert!(users.is_empty(), "refused sign-ins create no user");
}

#[tokio::test]
async fn a_failed_sign_in_then_a_good_one_yields_only_the_good_identity() {
    use reqwest::cookie::CookieStore;
    let app = oidc::start(3600).await;
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let http = oidc::client_with(jar.clone());
    let cb = app.callback_url(&http, "outsider", "/queue").await;
    refused(&app, &http, &cb, "may not sign in").await;
    // Same browser as far as twokey goes (its cookies, if any, carried over); the
    // provider's own session for "outsider" is dropped (the user signed out there), so
    // the provider asks who is signing in again.
    let twokey_url = reqwest::Url::parse(&app.base).unwrap();
    let jar2 = std::sync::Arc::new(reqwest::cookie::Jar::default());
    if let Some(cookies) = jar.cookies(&twokey_url) {
        for c in cookies.to_str().unwrap().split("; ") {
            if c.starts_with("twokey_") {
                jar2.add_cookie_str(c, &twokey_url);
            }
        }
    }
    let http = oidc::client_with(jar2);
    let cb = app.callback_url(&http, "alice", "/queue").await;
    assert_eq!(
        http.get(&cb).send().await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        app.whoami(&http).await.as_deref(),
        Some("alice@corp.example")
    );
}

async fn csrf(http: &reqwest::Client, url: &str) -> String {
    let html = http.get(url).send().await.unwrap().text().await.unwrap();
    common::csrf_in(&html).unwrap()
}

#[tokio::test]
async fn idp_groups_decide_who_requests_and_who_approves() {
    let app = oidc::start(3600).await;
    let (alice, _) = app.sign_in("alice", "/requests/new").await;
    let (bob, _) = app.sign_in("bob", "/queue").await;
    let (eve, _) = app.sign_in("eve", "/queue").await;

    // bob (idp-sre → sre-leads) may not request; eve's unmapped group grants nothing.
    let html = bob
        .get(app.url("/requests/new"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("lets you request nothing"), "{html}");
    let html = eve
        .get(app.url("/requests/new"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("lets you request nothing"), "{html}");

    let token = csrf(&alice, &app.url("/requests/new")).await;
    let resp = alice
        .post(app.url("/requests"))
        .form(&[
            ("csrf", token.as_str()),
            ("target", "demo-db/read"),
            ("duration", "1h"),
            ("reason", "check replication"),
            ("ticket", ""),
        ])
        .send()
        .await
        .unwrap();
    let detail = app.url(resp.headers()["location"].to_str().unwrap());

    // eve may not even see it; bob may approve it.
    assert_eq!(
        eve.get(&detail).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let token = csrf(&eve, &app.url("/queue")).await;
    let resp = eve
        .post(format!("{detail}/approve"))
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let token = csrf(&bob, &detail).await;
    let resp = bob
        .post(format!("{detail}/approve"))
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let html = alice
        .get(&detail)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("id=\"status\">approved<"), "{html}");
}

#[tokio::test]
async fn removal_from_an_idp_group_takes_effect_at_the_next_sign_in_which_an_admin_can_force() {
    let app = oidc::start(3600).await;
    let (alice, _) = app.sign_in("alice", "/requests").await;
    let (carol, _) = app.sign_in("carol", "/queue").await;
    let (dave, _) = app.sign_in("dave", "/admin/users").await;

    let token = csrf(&alice, &app.url("/requests/new")).await;
    let resp = alice
        .post(app.url("/requests"))
        .form(&[
            ("csrf", token.as_str()),
            ("target", "demo-db/read"),
            ("duration", "1h"),
            ("reason", "check replication"),
            ("ticket", ""),
        ])
        .send()
        .await
        .unwrap();
    let detail = app.url(resp.headers()["location"].to_str().unwrap());

    // The IdP admin removes carol from idp-sre; dave forces her to sign in again.
    app.provider.set_groups("carol", &[]).await;
    app.clock.advance(chrono::Duration::seconds(1));
    let users = twokey::store::list_users(&app.server.state.db)
        .await
        .unwrap();
    let carol_id = users
        .iter()
        .find(|u| u.email == "carol@corp.example")
        .unwrap()
        .id
        .clone();
    let token = csrf(&dave, &app.url("/admin/users")).await;
    let resp = dave
        .post(app.url(&format!("/admin/users/{carol_id}/reauth")))
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    // A non-admin cannot do that.
    let token = csrf(&alice, &app.url("/requests")).await;
    let resp = alice
        .post(app.url(&format!("/admin/users/{carol_id}/reauth")))
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    let resp = carol.get(&detail).send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::SEE_OTHER,
        "carol's old session is over"
    );
    assert!(
        resp.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/login?next=")
    );
    // Signed in again, she holds no approver group any more.
    app.clock.advance(chrono::Duration::seconds(1));
    let cb = app.callback_url(&carol, "carol", "/queue").await;
    assert_eq!(
        carol.get(&cb).send().await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        carol.get(&detail).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let audit: Vec<String> = app.audit().await.into_iter().map(|e| e.action).collect();
    assert!(audit.contains(&"user.reauth_forced".to_string()));
}

#[tokio::test]
async fn sessions_end_after_their_lifetime_and_at_sign_out() {
    let app = oidc::start(3600).await;
    let (http, _) = app.sign_in("alice", "/requests").await;
    let token = csrf(&http, &app.url("/requests")).await;
    let resp = http
        .post(app.url("/logout"))
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(app.whoami(&http).await, None);

    let (http, _) = app.sign_in("alice", "/requests").await;
    assert!(app.whoami(&http).await.is_some());
    // Used every few hours, it lasts its 12h lifetime, and no longer.
    app.clock.advance(chrono::Duration::hours(6));
    assert!(app.whoami(&http).await.is_some(), "6h");
    app.clock.advance(chrono::Duration::hours(5));
    assert!(app.whoami(&http).await.is_some(), "inside the 12h lifetime");
    app.clock.advance(chrono::Duration::hours(2));
    assert_eq!(app.whoami(&http).await, None, "12h lifetime is over");

    // Left alone for longer than the 8h idle timeout, it ends. (Back to the real time
    // first: the provider stamps its ID tokens with it.)
    app.clock.set(chrono::Utc::now());
    let (http, _) = app.sign_in("alice", "/requests").await;
    app.clock.advance(chrono::Duration::hours(5));
    assert!(app.whoami(&http).await.is_some(), "used 5h after sign-in");
    app.clock.advance(chrono::Duration::hours(5));
    assert!(
        app.whoami(&http).await.is_some(),
        "10h after sign-in but 5h after the last use"
    );
    app.clock.set(chrono::Utc::now());
    let (http, _) = app.sign_in("alice", "/requests").await;
    app.clock
        .advance(chrono::Duration::hours(8) + chrono::Duration::minutes(1));
    assert_eq!(app.whoami(&http).await, None, "idle for more than 8h");
}

#[tokio::test]
async fn signing_in_through_the_provider_rotates_the_session_id() {
    use reqwest::cookie::CookieStore;
    let app = oidc::start(3600).await;
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let http = oidc::client_with(jar.clone());
    let cb = app.callback_url(&http, "alice", "/queue").await;
    let url = reqwest::Url::parse(&app.base).unwrap();
    // The jar holds the provider's cookies too (same host): pick twokey's.
    let session = || {
        jar.cookies(&url)
            .unwrap()
            .to_str()
            .unwrap()
            .split("; ")
            .find_map(|c| c.strip_prefix("twokey_session="))
            .map(str::to_string)
    };
    assert_eq!(session(), None, "no session before sign-in");
    // Session fixation: an id planted in the browser before sign-in is not kept.
    jar.add_cookie_str("twokey_session=planted-by-an-attacker", &url);
    let resp = http.get(&cb).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let after = session().expect("a session after sign-in");
    assert_ne!(
        after, "planted-by-an-attacker",
        "the pre-sign-in session id must not survive sign-in"
    );
    assert_eq!(
        app.whoami(&http).await.as_deref(),
        Some("alice@corp.example")
    );
    let planted = oidc::client();
    let resp = planted
        .get(app.url("/policy"))
        .header("cookie", "twokey_session=planted-by-an-attacker")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::SEE_OTHER,
        "the planted id signs nobody in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_signs_in_through_the_provider_and_lands_where_it_asked() {
    let app = oidc::start(3600).await;
    let b = common::webdriver::Browser::start().await;
    b.goto(&app.url("/requests/new")).await;
    assert!(b.url().await.contains("/login?next="), "{}", b.url().await);
    b.click_and_wait("#oidc-sign-in").await;
    assert!(
        b.url().await.starts_with(&app.provider.issuer),
        "at the provider: {}",
        b.url().await
    );
    b.fill("input[name=login]", "alice").await;
    b.fill("input[name=password]", "any").await;
    b.click_and_wait("button[type=submit]").await;
    b.click_and_wait("button[type=submit]").await; // consent
    assert_eq!(b.url().await, app.url("/requests/new"));
    assert!(b.source().await.contains("value=\"demo-db/read\""));
    assert_eq!(b.text("span.who").await, "alice@corp.example");
    b.quit().await;
}

#[tokio::test]
async fn stale_idp_groups_stop_an_api_token_until_the_user_signs_in_again() {
    let app = oidc::start_with(3 * 3600, |c| {
        c.auth.groups_max_age = std::time::Duration::from_secs(3600)
    })
    .await;
    let (_bob_web, _) = app.sign_in("bob", "/queue").await;
    // A token that may approve: what stops it here is the stale groups, not its scope.
    let token = twokey::auth::create_scoped_token(
        &app.server.state,
        "bob@corp.example",
        "cli",
        &twokey::auth::scopes::Scopes::all(),
        None,
    )
    .await
    .unwrap();
    let (alice, _) = app.sign_in("alice", "/requests").await;
    let csrf = csrf(&alice, &app.url("/requests/new")).await;
    let resp = alice
        .post(app.url("/requests"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("target", "demo-db/read"),
            ("duration", "1h"),
            ("reason", "check replication"),
            ("ticket", ""),
        ])
        .send()
        .await
        .unwrap();
    let id = resp.headers()["location"]
        .to_str()
        .unwrap()
        .trim_start_matches("/requests/")
        .to_string();

    app.clock.advance(chrono::Duration::hours(2));
    let approve = || {
        common::http()
            .post(app.url(&format!("/api/v1/requests/{id}/approve")))
            .bearer_auth(&token)
            .send()
    };
    let resp = approve().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("sign in to twokey again")
    );

    // A fresh sign-in refreshes the groups, and the same token may act again.
    let (_bob_web, _) = app.sign_in("bob", "/queue").await;
    let resp = approve().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_emailed_link_leads_through_idp_sign_in_back_to_its_confirm_page() {
    let app = oidc::start(3600).await;
    let state = &app.server.state;
    // alice and bob have signed in once; alice files a request.
    app.sign_in("alice", "/").await;
    app.sign_in("bob", "/").await;
    let token = twokey::auth::create_api_token(state, "alice@corp.example", "t")
        .await
        .unwrap();
    let resp = common::http()
        .post(app.url("/api/v1/requests"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"resource": "demo-db", "role": "read", "duration": "1h", "reason": "slow query"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The link the outbox would mail bob.
    let mut conn = state.db.acquire().await.unwrap();
    let bob = twokey::store::user_id_by_email(&mut conn, "bob@corp.example")
        .await
        .unwrap()
        .unwrap();
    drop(conn);
    let (link, hash) = twokey::auth::new_secret("ak_");
    let now = state.now_ms();
    let mut tx = twokey::store::begin_write(&state.db).await.unwrap();
    twokey::store::insert_action_token(&mut tx, &hash, &id, &bob, "approve", now, now + 600_000)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let path = format!("/a/{link}");

    // Signed out: the link page offers sign-in, and sign-in offers the IdP, both
    // carrying the way back.
    let http = oidc::client();
    let page = http
        .get(app.url(&path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&format!("href=\"/login?next={path}\"")),
        "{page}"
    );
    assert!(!page.contains("slow query"), "no details before sign-in");
    let login = http
        .get(app.url(&format!("/login?next={path}")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let start = format!("/auth/oidc/start?next={path}");
    assert!(login.contains(&start), "{login}");
    let cb = oidc::walk(
        &http,
        &app.url(&start),
        "bob",
        &app.url("/auth/oidc/callback"),
    )
    .await;
    let resp = http.get(&cb).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], path.as_str());

    // Back on the confirm page, as bob: confirming approves.
    let page = http
        .get(app.url(&path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("Approve this request?") && page.contains("slow query"),
        "{page}"
    );
    let csrf = common::csrf_in(&page).unwrap();
    let resp = http
        .post(app.url(&path))
        .form(&[("csrf", csrf.as_str()), ("comment", "via mail")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let mut conn = state.db.acquire().await.unwrap();
    let req = twokey::store::get_request(&mut conn, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.status.as_str(), "approved");
    let approvals = twokey::store::approvals_for(&mut conn, &id).await.unwrap();
    assert_eq!(
        (
            approvals[0].approver_email.as_str(),
            approvals[0].channel.as_str()
        ),
        ("bob@corp.example", "email")
    );
}

#[tokio::test]
async fn idp_groups_named_like_twokey_groups_grant_nothing_unless_mapped() {
    let app = oidc::start(3600).await;
    // A self-service group at the provider called exactly like twokey's admin group.
    app.provider
        .set_groups("eve", &["admins", "engineers", "sre-leads"])
        .await;
    let (eve, _) = app.sign_in("eve", "/queue").await;
    assert_eq!(app.whoami(&eve).await.as_deref(), Some("eve@corp.example"));
    for (path, status) in [
        ("/audit", StatusCode::FORBIDDEN),
        ("/admin/users", StatusCode::FORBIDDEN),
    ] {
        let resp = eve.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), status, "{path}");
    }
    let html = eve
        .get(app.url("/requests/new"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("lets you request nothing"), "{html}");
    let users = twokey::store::list_users(&app.server.state.db)
        .await
        .unwrap();
    let row = users
        .iter()
        .find(|u| u.email == "eve@corp.example")
        .unwrap();
    assert_eq!(
        row.groups, "",
        "unmapped IdP groups pass through as nothing"
    );
    // The audit log still says what the provider claimed.
    let ev = app
        .audit()
        .await
        .into_iter()
        .rfind(|e| e.action == "auth.signed_in")
        .unwrap();
    let d: serde_json::Value = serde_json::from_str(&ev.details).unwrap();
    assert_eq!(
        d["idp_groups"],
        serde_json::json!(["admins", "engineers", "sre-leads"])
    );
    assert_eq!(d["groups"], serde_json::json!([]));

    // Mapped, the provider's `idp-admins` does make dave an admin.
    let (dave, _) = app.sign_in("dave", "/audit").await;
    assert_eq!(
        dave.get(app.url("/audit")).send().await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn without_a_group_map_idp_groups_grant_nothing_even_if_validation_is_skipped() {
    // Validation refuses such a config; a config built in code might skip it.
    let app = oidc::start_unvalidated(3600, |c| {
        c.auth.oidc.as_mut().unwrap().group_map.clear();
    })
    .await;
    app.provider
        .set_groups("eve", &["admins", "engineers"])
        .await;
    let (eve, _) = app.sign_in("eve", "/queue").await;
    assert_eq!(app.whoami(&eve).await.as_deref(), Some("eve@corp.example"));
    assert_eq!(
        eve.get(app.url("/audit")).send().await.unwrap().status(),
        StatusCode::FORBIDDEN,
        "an IdP group named admins made eve an admin"
    );
    let users = twokey::store::list_users(&app.server.state.db)
        .await
        .unwrap();
    let row = users
        .iter()
        .find(|u| u.email == "eve@corp.example")
        .unwrap();
    assert_eq!(row.groups, "");
}

#[test]
fn oidc_with_groups_but_no_group_map_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let oidc_toml = |extra: &str| {
        let mut c = common::test_config(dir.path());
        c.server.public_url = Some("https://twokey.example.com".into());
        c.auth.oidc = Some(
            toml::from_str(&format!(
                "issuer = \"https://idp.example.com\"\nclient_id = \"twokey\"\n{extra}"
            ))
            .unwrap(),
        );
        c.validate()
    };
    let err = oidc_toml("").unwrap_err().to_string();
    assert!(
        err.starts_with(
            "auth.oidc.group_map: is required when groups come from the identity provider"
        ),
        "{err}"
    );
    assert!(err.contains("unmapped groups grant nothing"), "{err}");
    let err = oidc_toml("groups_claim = \"roles\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("groups_claim = \"roles\""), "{err}");
    // A map, or taking no groups from the provider at all, is fine.
    oidc_toml("[group_map]\n\"okta-sre\" = [\"sre-leads\"]").unwrap();
    oidc_toml("groups_claim = \"\"").unwrap();
}

async fn session_rows(app: &OidcApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM tower_sessions")
        .fetch_one(&app.server.state.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn starting_sign_ins_writes_nothing_and_the_sealed_cookie_cannot_be_forged() {
    let app = oidc::start(3600).await;
    assert_eq!(session_rows(&app).await, 0);
    // Within the sign-in rate limit (20 at once per address): 5 × 2 here, 4 below.
    for _ in 0..5 {
        let http = oidc::client();
        for path in [
            "/login",
            "/auth/oidc/start?next=/queue",
            "/auth/oidc/callback?state=x&code=y",
        ] {
            let status = http.get(app.url(path)).send().await.unwrap().status();
            assert!(status.as_u16() < 500, "{path}: {status}");
        }
    }
    assert_eq!(
        session_rows(&app).await,
        0,
        "anonymous sign-in starts wrote sessions"
    );

    // The sign-in cookie is sealed: its secrets are not readable in it, and a cookie
    // changed by one character is as good as none.
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let http = oidc::client_with(jar.clone());
    let resp = http
        .get(app.url("/auth/oidc/start?next=/queue"))
        .send()
        .await
        .unwrap();
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.starts_with("twokey_oidc="), "{set}");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let state = reqwest::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .to_string();
    let value = set.split(';').next().unwrap()["twokey_oidc=".len()..].to_string();
    assert!(!value.contains(&state), "the state is not in the clear");
    let cb = app.callback_url(&http, "alice", "/queue").await;
    let mut forged = value.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let resp = oidc::client()
        .get(&cb)
        .header("cookie", format!("twokey_oidc={forged}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("sign-in has expired or was started in another browser")
    );
    // The browser that started it finishes it, once; the answer clears the cookie.
    let resp = http.get(&cb).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cleared = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("twokey_oidc="))
        .expect("the callback clears the sign-in cookie");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    assert_eq!(
        session_rows(&app).await,
        1,
        "the sign-in made the one session"
    );
}

#[tokio::test]
async fn a_sign_in_cookie_older_than_ten_minutes_is_refused() {
    let app = oidc::start(3600).await;
    let http = oidc::client();
    let cb = app.callback_url(&http, "alice", "/queue").await;
    app.clock.advance(chrono::Duration::milliseconds(
        twokey::auth::oidc::PENDING_TTL_MS,
    ));
    refused(
        &app,
        &http,
        &cb,
        "sign-in has expired or was started in another browser",
    )
    .await;
}

/// Groups are replaced at each sign-in through the provider: a sign-in that still
/// carries the group keeps alice's grant, and the one after the IdP removed her from
/// the group revokes it at once, with its audit event and reason.
#[tokio::test]
async fn a_sign_in_without_the_group_revokes_the_grant_it_allowed() {
    let app = oidc::start(3600).await;
    let (alice, _) = app.sign_in("alice", "/requests").await;
    let (bob, _) = app.sign_in("bob", "/queue").await;
    let token = csrf(&alice, &app.url("/requests/new")).await;
    let resp = alice
        .post(app.url("/requests"))
        .form(&[
            ("csrf", token.as_str()),
            ("target", "demo-db/read"),
            ("duration", "1h"),
            ("reason", "check replication"),
            ("ticket", ""),
        ])
        .send()
        .await
        .unwrap();
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let id = location.rsplit('/').next().unwrap().to_string();
    let detail = app.url(&location);
    let token = csrf(&bob, &detail).await;
    let resp = bob
        .post(format!("{detail}/approve"))
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let grant = || async {
        let mut conn = app.server.state.db.acquire().await.unwrap();
        twokey::store::grant_for_request(&mut conn, &id)
            .await
            .unwrap()
            .expect("a grant")
    };
    assert_eq!(grant().await.status.as_str(), "active");

    // Signing in again with the same groups changes nothing.
    app.clock.advance(chrono::Duration::seconds(1));
    let cb = app.callback_url(&alice, "alice", "/requests").await;
    assert_eq!(
        alice.get(&cb).send().await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
    assert_eq!(grant().await.status.as_str(), "active");

    // The IdP drops her from idp-eng (→ engineers); her next sign-in ends the grant.
    app.provider.set_groups("alice", &["idp-unmapped"]).await;
    app.clock.advance(chrono::Duration::seconds(1));
    let cb = app.callback_url(&alice, "alice", "/requests").await;
    assert_eq!(
        alice.get(&cb).send().await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
    let g = grant().await;
    assert_eq!(g.status.as_str(), "revoked");
    assert_eq!(
        g.end_comment.as_deref(),
        Some("the user's groups no longer allow this role")
    );
    let revoked: Vec<serde_json::Value> = app
        .audit()
        .await
        .into_iter()
        .filter(|e| e.action == "grant.revoked")
        .map(|e| {
            assert_eq!(e.subject, g.id);
            assert_eq!(e.actor, "system");
            serde_json::from_str(&e.details).unwrap()
        })
        .collect();
    assert_eq!(revoked.len(), 1);
    assert_eq!(
        revoked[0]["reason"],
        "the user's groups no longer allow this role"
    );
    assert_eq!(revoked[0]["request_id"], id.as_str());
    // Her request page shows it.
    let html = alice
        .get(&detail)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("revoked"), "{html}");
}
