//! Email notifications and action links: the demo mailbox, a real SMTP server
//! (maildev) that goes down and comes back, and links followed in headless Chromium.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::mail::{self, MailDev};
use reqwest::StatusCode;
use reqwest::header::LOCATION;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const CAROL: &str = "carol@example.com";

async fn deliver(app: &common::TestApp) -> twokey::notify::Delivered {
    twokey::notify::deliver_due(app.state()).await.unwrap()
}

/// The demo mailbox's messages to `to`, newest first.
async fn mailbox(app: &common::TestApp, to: &str) -> Vec<twokey::store::DevMail> {
    twokey::store::dev_mailbox(&app.state().db, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.recipient == to)
        .collect()
}

/// The path of an emailed link (`/a/ak_…`).
fn path_of(url: &str) -> String {
    reqwest::Url::parse(url).unwrap().path().to_string()
}

async fn status_of(app: &common::TestApp, id: &str) -> String {
    let mut conn = app.state().db.acquire().await.unwrap();
    twokey::store::get_request(&mut conn, id)
        .await
        .unwrap()
        .unwrap()
        .status
        .to_string()
}

#[tokio::test]
async fn filing_mails_each_approver_and_a_link_approves_once_after_sign_in() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let id = alice.file("demo-ssh", "admin", "30m", Some("OPS-9")).await;
    assert_eq!(
        deliver(&app).await,
        twokey::notify::Delivered {
            sent: 2,
            skipped: 0,
            failed: 0
        }
    );
    assert_eq!(
        deliver(&app).await,
        twokey::notify::Delivered::default(),
        "each message once"
    );
    assert!(
        mailbox(&app, ALICE).await.is_empty(),
        "the requester is not asked to approve"
    );
    let mail = mailbox(&app, BOB).await.remove(0);
    assert!(
        mail.subject
            .contains("admin on demo-ssh for alice@example.com"),
        "{}",
        mail.subject
    );
    for part in ["Reason: investigate incident", "Ticket: OPS-9", "30m"] {
        assert!(
            mail.body_text.contains(part),
            "{part} missing: {}",
            mail.body_text
        );
    }
    let approve = path_of(&mail::link(&mail.body_text, "Approve:"));
    assert!(approve.starts_with("/a/ak_"));
    // Only the token's hash is stored.
    let secret = &approve["/a/".len()..];
    let hashes: Vec<String> = sqlx::query_scalar("SELECT token_hash FROM action_tokens")
        .fetch_all(&app.state().db)
        .await
        .unwrap();
    assert!(hashes.contains(&twokey::auth::hash_token(secret)));
    assert!(!hashes.iter().any(|h| h.contains(secret)));

    // Not signed in: the page asks to sign in and shows no details.
    let anon = common::Browser::new(app.server.url());
    let (s, html) = anon.get(&approve).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        html.contains("Sign in to twokey to confirm") && !html.contains("OPS-9"),
        "{html}"
    );

    // bob signs in from there and lands back on the confirm page.
    let bob = common::Browser::new(app.server.url());
    let (_, html) = bob.get(&format!("/login?next={approve}")).await;
    let csrf = common::csrf_in(&html).unwrap();
    let resp = bob
        .post(
            "/login/dev",
            &[("csrf", &csrf), ("email", BOB), ("next", &approve)],
        )
        .await;
    assert_eq!(resp.headers()[LOCATION], approve.as_str());
    let (s, html) = bob.get(&approve).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        html.contains("Approve this request?") && html.contains("OPS-9"),
        "{html}"
    );
    let csrf = common::csrf_in(&html).unwrap();
    let resp = bob
        .post(&approve, &[("csrf", &csrf), ("comment", "from my phone")])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, detail) = bob.get(&format!("/requests/{id}")).await;
    assert!(detail.contains("via email: from my phone"), "{detail}");
    assert!(
        detail.contains("approval needed (email) → bob@example.com"),
        "delivery state shown: {detail}"
    );

    // The same link again: used.
    let resp = bob.post(&approve, &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::GONE);
    assert!(resp.text().await.unwrap().contains("already been used"));
    assert_eq!(
        status_of(&app, &id).await,
        "pending",
        "one of two approvals"
    );

    // carol's own link completes it; alice hears the outcome.
    let carol_mail = mailbox(&app, CAROL).await.remove(0);
    let carol_link = path_of(&mail::link(&carol_mail.body_text, "Approve:"));
    let carol = app.browser(CAROL).await;
    let csrf = carol.csrf(&carol_link).await;
    assert_eq!(
        carol.post(&carol_link, &[("csrf", &csrf)]).await.status(),
        StatusCode::SEE_OTHER
    );
    assert_eq!(status_of(&app, &id).await, "approved");
    deliver(&app).await;
    let outcome = mailbox(&app, ALICE).await.remove(0);
    assert!(
        outcome.subject.contains("was approved"),
        "{}",
        outcome.subject
    );
    assert!(outcome.body_text.contains("Your access runs from"));
}

#[tokio::test]
async fn scanners_get_pages_never_actions() {
    let app = common::start().await;
    let id = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    deliver(&app).await;
    let mail = mailbox(&app, BOB).await.remove(0);
    let approve = path_of(&mail::link(&mail.body_text, "Approve:"));
    let raw = common::http_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = app.url(&approve);
    for _ in 0..3 {
        assert_eq!(raw.get(&url).send().await.unwrap().status(), StatusCode::OK);
        assert_eq!(
            raw.head(&url).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
    // A scripted POST without a session, with and without a guessed CSRF token.
    for form in [
        vec![],
        vec![("csrf", "x")],
        vec![("csrf", ""), ("comment", "scanner")],
    ] {
        let resp = raw.post(&url).form(&form).send().await.unwrap();
        assert!(
            resp.status().is_client_error(),
            "{:?}: {}",
            form,
            resp.status()
        );
    }
    // bob's own session GETting it (as a prefetch would) changes nothing either.
    let bob = app.browser(BOB).await;
    let (s, _) = bob.get(&approve).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(status_of(&app, &id).await, "pending");
    let used: Option<i64> = sqlx::query_scalar("SELECT MAX(used_at) FROM action_tokens")
        .fetch_one(&app.state().db)
        .await
        .unwrap();
    assert_eq!(used, None, "no link was used");
    // And the link still works for its approver.
    let csrf = bob.csrf(&approve).await;
    assert_eq!(
        bob.post(&approve, &[("csrf", &csrf)]).await.status(),
        StatusCode::SEE_OTHER
    );
    assert_eq!(status_of(&app, &id).await, "approved");
}

#[tokio::test]
async fn expired_foreign_unknown_and_self_approval_links_are_refused() {
    let app = common::start().await;
    let id = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    deliver(&app).await;
    let bob_link = path_of(&mail::link(
        &mailbox(&app, BOB).await[0].body_text,
        "Approve:",
    ));
    let deny_link = path_of(&mail::link(&mailbox(&app, BOB).await[0].body_text, "Deny:"));

    // Someone else's link.
    let carol = app.browser(CAROL).await;
    let (s, html) = carol.get(&bob_link).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(html.contains("sent to someone else") && !html.contains("investigate incident"));
    let csrf = carol.csrf("/requests").await;
    assert_eq!(
        carol.post(&bob_link, &[("csrf", &csrf)]).await.status(),
        StatusCode::FORBIDDEN
    );

    // Unknown or forged tokens.
    for bad in ["/a/ak_forged", "/a/tk_x", "/a/%3Cscript%3E"] {
        let (s, html) = carol.get(bad).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{bad}");
        assert!(html.contains("This link is not valid"));
    }

    // Expired after 10 minutes; the request page still works.
    app.clock.advance(chrono::Duration::minutes(11));
    let bob = app.browser(BOB).await;
    let (s, html) = bob.get(&deny_link).await;
    assert_eq!(s, StatusCode::GONE);
    assert!(
        html.contains("has expired") && html.contains(&format!("/requests/{id}")),
        "{html}"
    );
    let csrf = bob.csrf("/requests").await;
    assert_eq!(
        bob.post(&deny_link, &[("csrf", &csrf)]).await.status(),
        StatusCode::GONE
    );
    assert_eq!(status_of(&app, &id).await, "pending");

    // Self-approval: twokey mints no link for the requester; a forged one is refused.
    let (token, hash) = twokey::auth::new_secret("ak_");
    let alice_id = {
        let mut conn = app.state().db.acquire().await.unwrap();
        twokey::store::user_id_by_email(&mut conn, ALICE)
            .await
            .unwrap()
            .unwrap()
    };
    let now = app.state().now_ms();
    let mut conn = app.state().db.acquire().await.unwrap();
    twokey::store::insert_action_token(
        &mut conn,
        &hash,
        &id,
        &alice_id,
        "approve",
        now,
        now + 600_000,
    )
    .await
    .unwrap();
    drop(conn);
    let alice = app.browser(ALICE).await;
    let csrf = alice.csrf(&format!("/a/{token}")).await;
    let resp = alice.post(&format!("/a/{token}"), &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.text().await.unwrap().contains("your own request"));
    assert_eq!(status_of(&app, &id).await, "pending");
}

#[tokio::test]
async fn a_decided_request_shows_its_outcome_and_stale_invitations_are_not_sent() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let id = alice.file("demo-db", "read", "1h", None).await;
    deliver(&app).await;
    let carol_link = path_of(&mail::link(
        &mailbox(&app, CAROL).await[0].body_text,
        "Approve:",
    ));
    app.api(BOB).await.act(&id, "deny").await;
    let carol = app.browser(CAROL).await;
    let (s, html) = carol.get(&carol_link).await;
    assert_eq!(s, StatusCode::GONE);
    assert!(html.contains("already been denied"), "{html}");

    // Filed and cancelled before delivery: the invitations are skipped, not sent.
    let id2 = alice.file("demo-db", "read", "1h", None).await;
    alice.act(&id2, "cancel").await;
    let d = deliver(&app).await;
    assert_eq!(d.skipped, 2, "{d:?}");
}

fn smtp_config(smtp_port: u16) -> impl FnOnce(&mut twokey::config::Config) {
    move |c| {
        let email = c.email.as_mut().unwrap();
        email.dev_mailbox = false;
        email.smtp_host = Some("127.0.0.1".into());
        email.smtp_port = Some(smtp_port);
        email.tls = twokey::config::SmtpTls::None;
    }
}

#[tokio::test]
async fn smtp_down_delays_messages_but_loses_and_duplicates_none() {
    let mut maildev = MailDev::reserve();
    let app = common::start_with(smtp_config(maildev.smtp_port)).await;
    let alice = app.api(ALICE).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(alice.file("demo-db", "read", "1h", None).await);
    }
    // Filing never waited on SMTP; delivery fails and is retried later.
    let d = deliver(&app).await;
    assert_eq!((d.sent, d.failed), (0, 40), "{d:?}");
    let (_, html) = app
        .browser(ALICE)
        .await
        .get(&format!("/requests/{}", ids[0]))
        .await;
    assert!(html.contains("retrying (attempt 1 failed)"), "{html}");
    assert_eq!(
        deliver(&app).await,
        twokey::notify::Delivered::default(),
        "backoff: not yet due"
    );

    maildev.up().await;
    app.clock.advance(chrono::Duration::minutes(10));
    let d = deliver(&app).await;
    assert_eq!((d.sent, d.failed), (40, 0), "{d:?}");
    app.clock.advance(chrono::Duration::minutes(10));
    assert_eq!(deliver(&app).await, twokey::notify::Delivered::default());

    let mails = maildev.wait_for(40).await;
    assert_eq!(mails.len(), 40);
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for m in &mails {
        let subject = m["subject"].as_str().unwrap().to_string();
        let text = m["text"].as_str().unwrap_or_default();
        let request = ids
            .iter()
            .find(|id| text.contains(id.as_str()))
            .expect("mail names its request")
            .clone();
        assert!(subject.starts_with("Approve read on demo-db"), "{subject}");
        *seen.entry((request, mail::to(m))).or_default() += 1;
    }
    assert_eq!(seen.len(), 40, "every request × approver");
    assert!(seen.values().all(|n| *n == 1), "exactly once each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approver_follows_the_mailed_link_in_chromium_and_the_requester_hears_back() {
    let maildev = MailDev::start().await;
    let app = common::start_with(smtp_config(maildev.smtp_port)).await;
    let id = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "2h", None)
        .await;
    deliver(&app).await;
    let mails = maildev.wait_for(2).await;
    let to_bob = mails
        .iter()
        .find(|m| mail::to(m) == BOB)
        .expect("mail to bob");
    assert!(
        to_bob["html"].as_str().unwrap().contains(">Approve</a>"),
        "HTML part"
    );
    let approve = mail::link(to_bob["text"].as_str().unwrap(), "Approve:");
    assert!(approve.starts_with(&app.server.url()), "{approve}");

    let b = common::webdriver::Browser::start().await;
    b.goto(&approve).await;
    assert!(b.text("#notice").await.contains("Sign in"));
    b.click_and_wait("#sign-in").await;
    b.click_and_wait(&format!("button[id='login-{BOB}']")).await;
    assert_eq!(
        b.url().await,
        approve,
        "back on the confirm page after sign-in"
    );
    b.set_window(390, 844).await;
    // On a phone: nothing wider than the screen, buttons big enough for a thumb.
    let (page, viewport, button) = b.phone_fit().await;
    assert!(viewport <= 400.0, "the window did not shrink: {viewport}");
    assert!(
        page <= viewport,
        "confirm page scrolls sideways: {page} > {viewport}"
    );
    assert!(button >= 40.0, "a button is {button}px tall");
    b.fill("#comment", "ok from the train").await;
    b.click_and_wait("#confirm").await;
    assert!(b.url().await.ends_with(&format!("/requests/{id}")));
    assert_eq!(b.text("#status").await, "approved");
    let (page, viewport, button) = b.phone_fit().await;
    assert!(
        page <= viewport,
        "request page scrolls sideways: {page} > {viewport}"
    );
    assert!(button >= 40.0, "a button is {button}px tall");
    b.quit().await;

    deliver(&app).await;
    let mails = maildev.wait_for(3).await;
    let outcome = mails
        .iter()
        .find(|m| mail::to(m) == ALICE)
        .expect("outcome mail to alice");
    assert!(
        outcome["subject"]
            .as_str()
            .unwrap()
            .contains("was approved")
    );
}

#[tokio::test]
async fn the_demo_worker_fills_the_mailbox_page_and_requesters_hear_every_outcome() {
    // The background worker on (every 50ms), as in `twokey demo`.
    let app =
        common::start_with(|c| c.server.outbox_interval = std::time::Duration::from_millis(50))
            .await;
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;
    let denied = alice.file("demo-db", "read", "1h", None).await;
    let revoked = alice.file("demo-db", "read", "1h", None).await;
    let expired = alice.file("demo-db", "read", "1h", None).await;
    bob.act(&denied, "deny").await;
    bob.act(&revoked, "approve").await;
    bob.act(&revoked, "revoke").await;
    app.clock.advance(chrono::Duration::hours(25));
    twokey::access::sweep(app.state()).await.unwrap();
    assert_eq!(status_of(&app, &expired).await, "expired");

    // Outcomes to the requester: approved, denied, revoked, expired — one each.
    let page_for_bob = app.browser(BOB).await;
    let want = [
        "was denied",
        "was approved",
        "was revoked",
        "was not decided in time and has expired",
    ];
    let mut page = String::new();
    for _ in 0..200 {
        page = page_for_bob.get("/dev/mailbox").await.1;
        if want.iter().all(|w| page.contains(w)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    for w in want {
        assert!(
            page.contains(w),
            "{w} missing from the mailbox page:\n{page}"
        );
    }
    let outcomes = mailbox(&app, ALICE).await;
    assert_eq!(
        outcomes.len(),
        4,
        "{:?}",
        outcomes.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );
    let denial = outcomes
        .iter()
        .find(|m| m.subject.contains("denied"))
        .unwrap();
    assert!(
        denial.body_text.contains("Denied by bob@example.com: ok"),
        "{}",
        denial.body_text
    );
    let revocation = outcomes
        .iter()
        .find(|m| m.subject.contains("revoked"))
        .unwrap();
    assert!(
        revocation.body_text.contains("Revoked by bob@example.com"),
        "{}",
        revocation.body_text
    );
    assert!(page.contains("To alice@example.com"), "{page}");
}

/// A grant twokey ends itself (the holder's groups no longer allow the role) names
/// twokey and the reason in the requester's mail, not an empty "Revoked by :".
#[tokio::test]
async fn a_revocation_by_twokey_itself_says_so_in_the_mail() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;
    let id = alice.file("demo-db", "read", "1h", None).await;
    bob.act(&id, "approve").await;
    app.user(ALICE, &[]).await;
    let state = app.state();
    let mut tx = twokey::store::begin_write(&state.db).await.unwrap();
    let user = twokey::store::user_id_by_email(&mut tx, ALICE)
        .await
        .unwrap()
        .unwrap();
    let now = twokey::clock::to_millis(twokey::clock::Clock::now(&*app.clock));
    let n = twokey::access::revoke_ineligible(state, &mut tx, &user, now)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(n, 1);
    deliver(&app).await;
    let revocation = mailbox(&app, ALICE)
        .await
        .into_iter()
        .find(|m| m.subject.contains("revoked"))
        .expect("a revocation mail");
    assert!(
        revocation
            .body_text
            .contains("Revoked by twokey: the user's groups no longer allow this role"),
        "{}",
        revocation.body_text
    );
    assert!(!revocation.body_text.contains("Revoked by :"));
}

/// The mailed Deny link, followed in Chromium: sign in, confirm on the page, and the
/// request is denied, once, with the comment, and the requester's mail says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approver_follows_the_mailed_deny_link_in_chromium_and_the_requester_hears_back() {
    let maildev = MailDev::start().await;
    let app = common::start_with(smtp_config(maildev.smtp_port)).await;
    let id = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "2h", None)
        .await;
    deliver(&app).await;
    let mails = maildev.wait_for(2).await;
    let to_bob = mails
        .iter()
        .find(|m| mail::to(m) == BOB)
        .expect("mail to bob");
    assert!(
        to_bob["html"].as_str().unwrap().contains(">Deny</a>"),
        "HTML part"
    );
    let deny = mail::link(to_bob["text"].as_str().unwrap(), "Deny:");
    assert!(deny.starts_with(&app.server.url()), "{deny}");
    assert_ne!(
        deny,
        mail::link(to_bob["text"].as_str().unwrap(), "Approve:")
    );

    let b = common::webdriver::Browser::start().await;
    b.goto(&deny).await;
    assert!(b.text("#notice").await.contains("Sign in"));
    b.click_and_wait("#sign-in").await;
    b.click_and_wait(&format!("button[id='login-{BOB}']")).await;
    assert_eq!(
        b.url().await,
        deny,
        "back on the confirm page after sign-in"
    );
    assert_eq!(b.text("h1").await, "Deny this request?");
    assert_eq!(b.text("#confirm").await, "Deny");
    assert_eq!(status_of(&app, &id).await, "pending", "nothing decided yet");
    b.fill("#comment", "not during the freeze").await;
    b.click_and_wait("#confirm").await;
    assert!(b.url().await.ends_with(&format!("/requests/{id}")));
    assert_eq!(b.text("#status").await, "denied");
    assert_eq!(status_of(&app, &id).await, "denied");
    // The link worked once: following it again decides nothing.
    b.goto(&deny).await;
    assert!(!b.exists("#confirm").await, "a used link offers no button");
    assert_eq!(status_of(&app, &id).await, "denied");
    b.quit().await;

    deliver(&app).await;
    let mails = maildev.wait_for(3).await;
    assert_eq!(mails.len(), 3, "one outcome mail, no more");
    let outcome = mails
        .iter()
        .find(|m| mail::to(m) == ALICE)
        .expect("outcome mail to alice");
    assert!(
        outcome["subject"].as_str().unwrap().contains("was denied"),
        "{}",
        outcome["subject"]
    );
    let text = outcome["text"].as_str().unwrap();
    assert!(
        text.contains("Denied by bob@example.com: not during the freeze"),
        "{text}"
    );
}
