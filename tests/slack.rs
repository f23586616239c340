//! Slack: Block Kit messages posted to a local server that speaks Slack's Web API,
//! and signed interaction callbacks that approve — or are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::slack::{self, FakeSlack};
use reqwest::StatusCode;
use serde_json::Value;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const CAROL: &str = "carol@example.com";

struct Setup {
    app: common::TestApp,
    fake: FakeSlack,
    _secrets: tempfile::TempDir,
}

/// Slack with U_ALICE, U_BOB and U_CAROL linked to their twokey users (through the
/// pages, as a person would).
async fn setup() -> Setup {
    let s = setup_unlinked().await;
    for (slack_id, email) in [("U_ALICE", ALICE), ("U_BOB", BOB), ("U_CAROL", CAROL)] {
        s.link(slack_id, email).await;
    }
    s
}

/// Slack whose users have linked nothing yet.
async fn setup_unlinked() -> Setup {
    let fake = FakeSlack::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("bot-token");
    let secret = secrets.path().join("signing-secret");
    std::fs::write(&token, format!("{}\n", slack::BOT_TOKEN)).unwrap();
    std::fs::write(&secret, slack::SIGNING_SECRET).unwrap();
    let api = fake.api.clone();
    let app = common::start_with(move |c| {
        c.email = None;
        c.slack = Some(twokey::config::SlackConfig {
            bot_token_file: token,
            signing_secret_file: secret,
            channel: "#access-requests".into(),
            team_id: slack::TEAM_ID.into(),
            api_base: api,
        });
        c.validate().unwrap();
    })
    .await;
    fake.user("U_ALICE", ALICE);
    fake.user("U_BOB", BOB);
    fake.user("U_CAROL", CAROL);
    Setup {
        app,
        fake,
        _secrets: secrets,
    }
}

impl Setup {
    async fn deliver(&self) -> twokey::notify::Delivered {
        twokey::notify::deliver_due(self.app.state()).await.unwrap()
    }

    fn now(&self) -> i64 {
        self.app.state().clock.now().timestamp()
    }

    /// Posts an interaction with the given headers; returns the status.
    async fn post(&self, body: &str, ts: Option<i64>, signature: Option<String>) -> StatusCode {
        let mut req = common::http()
            .post(self.app.url("/slack/interactions"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_string());
        if let Some(ts) = ts {
            req = req.header("x-slack-request-timestamp", ts.to_string());
        }
        if let Some(sig) = signature {
            req = req.header("x-slack-signature", sig);
        }
        req.send().await.unwrap().status()
    }

    /// A correctly signed click.
    async fn click(&self, user: &str, action: &str, request_id: &str) -> StatusCode {
        let body = slack::body(&slack::payload(&self.fake.base, user, action, request_id));
        let ts = self.now();
        self.post(
            &body,
            Some(ts),
            Some(slack::sign(slack::SIGNING_SECRET, ts, &body)),
        )
        .await
    }

    /// Posts a correctly signed payload.
    async fn send(&self, payload: &Value) -> StatusCode {
        let body = slack::body(payload);
        let ts = self.now();
        self.post(
            &body,
            Some(ts),
            Some(slack::sign(slack::SIGNING_SECRET, ts, &body)),
        )
        .await
    }

    /// What twokey last told `user` about their click on `action`.
    fn told(&self, user: &str, action: &str) -> String {
        let told = self.fake.calls(&format!("response_url/{user}-{action}"));
        let last = told.last().expect("an ephemeral reply");
        assert_eq!(last["response_type"], "ephemeral");
        last["text"].as_str().unwrap().to_string()
    }

    /// An unlinked user clicks (a button of any request): the path of the one-time link
    /// twokey answers with, privately.
    async fn link_offer(&self, slack_id: &str) -> String {
        let mut payload = slack::payload(&self.fake.base, slack_id, "approve", "any-request");
        payload["response_url"] = format!("{}/actions/{slack_id}-link", self.fake.base).into();
        assert_eq!(self.send(&payload).await, StatusCode::OK);
        let text = self.told(slack_id, "link");
        assert!(
            text.contains("not linked to twokey yet, so this click did not count"),
            "{text}"
        );
        let start = text.find("/slack/link/sl_").expect("a link");
        let end = start + text[start..].find('|').unwrap();
        text[start..end].to_string()
    }

    /// Links `slack_id` to twokey user `email` the way a person does: click in Slack,
    /// open the link signed in, confirm.
    async fn link(&self, slack_id: &str, email: &str) {
        let path = self.link_offer(slack_id).await;
        let b = self.app.browser(email).await;
        let (status, page) = b.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(page.contains("id=\"confirm-link\""), "{page}");
        let csrf = common::csrf_in(&page).unwrap();
        let resp = b.post(&path, &[("csrf", &csrf)]).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(resp.headers()["location"], "/account");
        // A new click a second later does not replay this one.
        self.app.clock.advance(chrono::Duration::seconds(1));
    }

    async fn status(&self, id: &str) -> (String, usize) {
        let mut conn = self.app.state().db.acquire().await.unwrap();
        let status = twokey::store::get_request(&mut conn, id)
            .await
            .unwrap()
            .unwrap()
            .status
            .to_string();
        let approvals = twokey::store::approvals_for(&mut conn, id)
            .await
            .unwrap()
            .len();
        (status, approvals)
    }
}

fn text_of(blocks: &Value) -> String {
    blocks.to_string()
}

#[tokio::test]
async fn a_request_is_posted_with_buttons_and_a_signed_click_approves_it() {
    let s = setup().await;
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    assert_eq!(s.deliver().await.sent, 1);
    let posts = s.fake.calls("chat.postMessage");
    assert_eq!(posts.len(), 1);
    let post = &posts[0];
    assert_eq!(post["channel"], "#access-requests");
    assert!(
        post["text"]
            .as_str()
            .unwrap()
            .contains("alice@example.com asks for read on demo-db for 1h")
    );
    let actions = post["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "actions")
        .unwrap();
    let buttons: Vec<(&str, &str)> = actions["elements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action_id"].as_str().unwrap(),
                e["value"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(buttons, [("approve", id.as_str()), ("deny", id.as_str())]);

    assert_eq!(s.click("U_BOB", "approve", &id).await, StatusCode::OK);
    assert_eq!(s.status(&id).await, ("approved".into(), 1));
    let mut conn = s.app.state().db.acquire().await.unwrap();
    let approvals = twokey::store::approvals_for(&mut conn, &id).await.unwrap();
    assert_eq!(
        (
            approvals[0].approver_email.as_str(),
            approvals[0].channel.as_str()
        ),
        (BOB, "slack")
    );
    drop(conn);

    // The message is updated in place: outcome, no more buttons.
    let updates = s.fake.calls("chat.update");
    let last = updates.last().expect("chat.update");
    assert_eq!(last["channel"], slack::CHANNEL_ID);
    assert_eq!(last["ts"], "1763812800.000100");
    let blocks = text_of(&last["blocks"]);
    assert!(
        blocks.contains("Approved by bob@example.com at 12:00 UTC"),
        "{blocks}"
    );
    assert!(!blocks.contains("\"actions\""), "{blocks}");
    // The outbox's own update for the outcome is idempotent.
    s.deliver().await;
    assert!(
        text_of(&s.fake.calls("chat.update").last().unwrap()["blocks"]).contains("Approved by bob")
    );
}

#[tokio::test]
async fn partial_approvals_keep_the_buttons_and_say_who_approved() {
    let s = setup().await;
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-ssh", "admin", "30m", Some("OPS-5"))
        .await;
    s.deliver().await;
    assert_eq!(s.click("U_BOB", "approve", &id).await, StatusCode::OK);
    assert_eq!(s.status(&id).await, ("pending".into(), 1));
    let blocks = text_of(&s.fake.calls("chat.update").last().unwrap()["blocks"]);
    assert!(
        blocks.contains("Approved so far by bob@example.com") && blocks.contains("\"actions\""),
        "{blocks}"
    );
    // The same person clicks again (a new click, a second later): nothing changes and
    // they are told so.
    s.app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(s.click("U_BOB", "approve", &id).await, StatusCode::OK);
    assert_eq!(s.status(&id).await, ("pending".into(), 1));
    let told = s.fake.calls("response_url/U_BOB-approve");
    assert!(
        told.last().unwrap()["text"]
            .as_str()
            .unwrap()
            .contains("already decided"),
        "{told:?}"
    );
    assert_eq!(s.click("U_CAROL", "approve", &id).await, StatusCode::OK);
    assert_eq!(s.status(&id).await, ("approved".into(), 2));
}

#[tokio::test]
async fn forged_stale_reserialised_and_replayed_interactions_are_refused() {
    let s = setup().await;
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    s.deliver().await;
    let payload = slack::payload(&s.fake.base, "U_BOB", "approve", &id);
    let body = slack::body(&payload);
    let now = s.now();
    let good = slack::sign(slack::SIGNING_SECRET, now, &body);

    // Wrong secret, tampered signature, garbage.
    assert_eq!(
        s.post(
            &body,
            Some(now),
            Some(slack::sign("not-the-secret", now, &body))
        )
        .await,
        StatusCode::UNAUTHORIZED
    );
    let mut tampered = good.clone();
    tampered.replace_range(10..11, if &good[10..11] == "0" { "1" } else { "0" });
    assert_eq!(
        s.post(&body, Some(now), Some(tampered)).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.post(&body, Some(now), Some("v0=zz".into())).await,
        StatusCode::UNAUTHORIZED
    );
    // Missing headers.
    assert_eq!(
        s.post(&body, None, Some(good.clone())).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.post(&body, Some(now), None).await,
        StatusCode::UNAUTHORIZED
    );
    // Older than 5 minutes (signed correctly for that time), or from the future.
    for ts in [now - 301, now + 301] {
        let sig = slack::sign(slack::SIGNING_SECRET, ts, &body);
        assert_eq!(
            s.post(&body, Some(ts), Some(sig)).await,
            StatusCode::UNAUTHORIZED,
            "{ts}"
        );
    }
    // The same JSON re-serialised (a space added) no longer matches the signature.
    let reserialised = slack::body(&serde_json::from_str::<Value>(&payload.to_string()).unwrap())
        .replacen("%7B", "%7B+", 1);
    assert_ne!(reserialised, body);
    assert_eq!(
        s.post(&reserialised, Some(now), Some(good.clone())).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.status(&id).await,
        ("pending".into(), 0),
        "nothing got through"
    );

    // The genuine one works once; its replay is refused.
    assert_eq!(
        s.post(&body, Some(now), Some(good.clone())).await,
        StatusCode::OK
    );
    assert_eq!(s.status(&id).await, ("approved".into(), 1));
    assert_eq!(
        s.post(&body, Some(now), Some(good)).await,
        StatusCode::UNAUTHORIZED
    );
    assert!(
        s.fake.calls("response_url/U_BOB-approve").is_empty(),
        "refusals said nothing to Slack"
    );
}

#[tokio::test]
async fn unknown_and_deactivated_users_and_self_approval_are_refused_and_told_why() {
    let s = setup().await;
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    s.deliver().await;

    // Unknown to Slack, deactivated, a bot: nobody, and no link is offered.
    s.fake.user_as(
        "U_GONE",
        serde_json::json!({"id": "U_GONE", "deleted": true, "is_email_confirmed": true, "profile": {"email": BOB}}),
    );
    s.fake.user_as(
        "U_BOT",
        serde_json::json!({"id": "U_BOT", "is_bot": true, "is_email_confirmed": true, "profile": {"email": BOB}}),
    );
    for slack_id in ["U_STRANGER", "U_GONE", "U_BOT"] {
        assert_eq!(s.click(slack_id, "approve", &id).await, StatusCode::OK);
        let text = s.told(slack_id, "approve");
        assert!(
            text.contains("does not take decisions from this Slack account"),
            "{slack_id}: {text}"
        );
    }
    // Bob's own Slack account, once deactivated, is nobody too, link or not.
    s.fake.user_as(
        "U_BOB",
        serde_json::json!({"id": "U_BOB", "deleted": true, "is_email_confirmed": true, "profile": {"email": BOB}}),
    );
    assert_eq!(s.click("U_BOB", "approve", &id).await, StatusCode::OK);
    assert!(
        s.told("U_BOB", "approve")
            .contains("does not take decisions")
    );

    // Alice is linked, and still cannot decide her own request from Slack.
    for action in ["approve", "deny"] {
        assert_eq!(s.click("U_ALICE", action, &id).await, StatusCode::OK);
        let text = s.told("U_ALICE", action);
        assert!(text.contains("your own request"), "{text}");
    }
    assert_eq!(s.status(&id).await, ("pending".into(), 0));
}

#[tokio::test]
async fn slack_down_delays_messages_and_loses_none() {
    let s = setup().await;
    s.fake.set_down(true);
    let alice = s.app.api(ALICE).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(alice.file("demo-db", "read", "1h", None).await);
    }
    // Filing never waited on Slack; delivery fails and is kept for retry.
    let pass = s.deliver().await;
    assert_eq!((pass.sent, pass.failed), (0, 5));
    assert!(s.fake.calls("chat.postMessage").is_empty());
    let bob = s.app.browser(BOB).await;
    let (_, page) = bob.get(&format!("/requests/{}", ids[0])).await;
    assert!(
        page.contains("approval needed (slack) → #access-requests: <span class=\"muted\">retrying (attempt 1 failed)"),
        "{page}"
    );
    // Not due yet: the backoff holds the retry back.
    assert_eq!(s.deliver().await, twokey::notify::Delivered::default());

    s.fake.set_down(false);
    s.app.clock.advance(chrono::Duration::seconds(2));
    let pass = s.deliver().await;
    assert_eq!((pass.sent, pass.failed), (5, 0));
    let posts = s.fake.calls("chat.postMessage");
    assert_eq!(posts.len(), 5, "each request posted exactly once");
    for id in &ids {
        assert_eq!(
            posts
                .iter()
                .filter(|p| p["blocks"].to_string().contains(id.as_str()))
                .count(),
            1,
            "{id}"
        );
    }
    // Nothing left to send; a later pass posts nothing again.
    s.app.clock.advance(chrono::Duration::minutes(10));
    assert_eq!(s.deliver().await, twokey::notify::Delivered::default());
    assert_eq!(s.fake.calls("chat.postMessage").len(), 5);
    let (_, page) = bob.get(&format!("/requests/{}", ids[0])).await;
    assert!(page.contains("sent "), "{page}");

    // Each message is updated in place, at its own ts, when its request is decided.
    assert_eq!(s.click("U_BOB", "deny", &ids[3]).await, StatusCode::OK);
    let update = s.fake.calls("chat.update");
    let posted_ts = posts
        .iter()
        .position(|p| p["blocks"].to_string().contains(ids[3].as_str()))
        .map(|i| format!("1763812800.{:06}", 100 + i))
        .unwrap();
    assert_eq!(update.last().unwrap()["ts"], posted_ts.as_str());
    assert!(
        update.last().unwrap()["blocks"]
            .to_string()
            .contains("Denied by bob@example.com")
    );
}

#[tokio::test]
async fn cancelled_and_expired_requests_lose_their_buttons() {
    let s = setup().await;
    let alice = s.app.api(ALICE).await;
    let cancelled = alice.file("demo-db", "read", "1h", None).await;
    let expiring = alice.file("demo-db", "read", "1h", None).await;
    assert_eq!(s.deliver().await.sent, 2);
    let (st, _) = alice.act(&cancelled, "cancel").await;
    assert_eq!(st, StatusCode::OK);
    s.app.clock.advance(chrono::Duration::hours(25));
    twokey::access::sweep(s.app.state()).await.unwrap();
    assert_eq!(s.deliver().await.sent, 2);
    let updates = s.fake.calls("chat.update");
    let for_request = |id: &str| {
        let posted = s
            .fake
            .calls("chat.postMessage")
            .iter()
            .position(|p| p["blocks"].to_string().contains(id))
            .unwrap();
        let ts = format!("1763812800.{:06}", 100 + posted);
        updates.iter().rfind(|u| u["ts"] == ts.as_str()).unwrap()["blocks"].to_string()
    };
    let c = for_request(&cancelled);
    assert!(
        c.contains("Cancelled by the requester") && !c.contains("\"actions\""),
        "{c}"
    );
    let e = for_request(&expiring);
    assert!(
        e.contains("Expired without a decision") && !e.contains("\"actions\""),
        "{e}"
    );
    // A click on a stale button changes nothing and says why.
    s.app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(
        s.click("U_BOB", "approve", &cancelled).await,
        StatusCode::OK
    );
    assert_eq!(s.status(&cancelled).await, ("cancelled".into(), 0));
}

#[tokio::test]
async fn a_replay_with_the_signature_in_another_letter_case_is_refused() {
    let s = setup().await;
    // Two approvals needed: a replay that got through would count toward them.
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-ssh", "admin", "30m", Some("OPS-9"))
        .await;
    s.deliver().await;
    let body = slack::body(&slack::payload(&s.fake.base, "U_BOB", "deny", &id));
    let now = s.now();
    let good = slack::sign(slack::SIGNING_SECRET, now, &body);
    let hex = good.strip_prefix("v0=").unwrap();
    assert!(hex.bytes().any(|b| b.is_ascii_lowercase()), "{good}");
    assert_eq!(
        s.post(&body, Some(now), Some(good.clone())).await,
        StatusCode::OK
    );
    assert_eq!(s.status(&id).await, ("denied".into(), 1));
    let mixed: String = hex
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    for replay in [
        format!("v0={}", hex.to_ascii_uppercase()),
        format!("v0={mixed}"),
    ] {
        assert_ne!(replay, good);
        assert_eq!(
            s.post(&body, Some(now), Some(replay.clone())).await,
            StatusCode::UNAUTHORIZED,
            "{replay}"
        );
    }
    // Refused before it was read: Slack was told nothing about the replays.
    assert!(s.fake.calls("response_url/U_BOB-deny").is_empty());
}

/// The rows of `slack_links`: (team, Slack user, twokey email).
async fn links(s: &Setup) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT l.team_id, l.slack_user_id, u.email FROM slack_links l
         JOIN users u ON u.id = l.user_id ORDER BY l.slack_user_id",
    )
    .fetch_all(&s.app.state().db)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_unlinked_click_never_counts_and_linking_through_the_pages_makes_it_count() {
    let s = setup_unlinked().await;
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    s.deliver().await;

    // Bob's Slack profile carries his confirmed email, and still his click does not
    // count: he gets a one-time link, privately.
    assert_eq!(s.click("U_BOB", "approve", &id).await, StatusCode::OK);
    assert_eq!(s.status(&id).await, ("pending".into(), 0));
    let text = s.told("U_BOB", "approve");
    assert!(text.contains("did not count"), "{text}");
    let start = text.find("/slack/link/").unwrap();
    let path = text[start..start + text[start..].find('|').unwrap()].to_string();
    // Only the hash is stored.
    let stored: Vec<(String,)> = sqlx::query_as("SELECT token_hash FROM slack_link_tokens")
        .fetch_all(&s.app.state().db)
        .await
        .unwrap();
    let token = path.trim_start_matches("/slack/link/");
    assert_eq!(stored, [(twokey::auth::hash_token(token),)]);

    // Signed out: only a sign-in prompt, no details of the Slack account.
    let anon = common::Browser::new(s.app.server.url());
    let (status, page) = anon.get(&path).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&format!("/login?next={path}")), "{page}");
    assert!(
        !page.contains("U_BOB") && !page.contains("confirm-link"),
        "{page}"
    );

    // Signed in as bob: a confirm page; the GET linked nothing.
    let bob = s.app.browser(BOB).await;
    let (status, page) = bob.get(&path).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("U_BOB") && page.contains("T0TEAM") && page.contains(BOB),
        "{page}"
    );
    assert!(links(&s).await.is_empty());
    // A POST without the session's CSRF token is refused.
    let resp = bob.post(&path, &[("csrf", "forged")]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(links(&s).await.is_empty());
    let csrf = common::csrf_in(&page).unwrap();
    let resp = bob.post(&path, &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        links(&s).await,
        [("T0TEAM".into(), "U_BOB".into(), BOB.into())]
    );
    // Single use.
    assert_eq!(bob.get(&path).await.0, StatusCode::GONE);
    assert_eq!(
        bob.post(&path, &[("csrf", &csrf)]).await.status(),
        StatusCode::CONFLICT
    );
    // The account page shows the link.
    let (_, account) = bob.get("/account").await;
    assert!(
        account.contains("U_BOB") && account.contains("Unlink"),
        "{account}"
    );

    // Now the click counts, as bob.
    s.app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(s.click("U_BOB", "approve", &id).await, StatusCode::OK);
    assert_eq!(s.status(&id).await, ("approved".into(), 1));

    // Unlinked, the next click counts for nobody again (and earns a new link).
    let id2 = s
        .app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    let resp = bob
        .post(
            "/account/slack/unlink",
            &[
                ("csrf", &csrf),
                ("team_id", "T0TEAM"),
                ("slack_user_id", "U_BOB"),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(links(&s).await.is_empty());
    let (_, account) = bob.get("/account").await;
    assert!(account.contains("no-slack-link"), "{account}");
    s.app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(s.click("U_BOB", "approve", &id2).await, StatusCode::OK);
    assert_eq!(s.status(&id2).await, ("pending".into(), 0));
    assert!(s.told("U_BOB", "approve").contains("did not count"));
    // Unlinking what is not (or no longer) yours is refused.
    let resp = bob
        .post(
            "/account/slack/unlink",
            &[
                ("csrf", &csrf),
                ("team_id", "T0TEAM"),
                ("slack_user_id", "U_BOB"),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let actions = s.app.audit_actions().await;
    assert!(actions.contains(&"slack.linked".to_string()), "{actions:?}");
    assert!(
        actions.contains(&"slack.unlinked".to_string()),
        "{actions:?}"
    );
    s.app.assert_chain_ok().await;
}

#[tokio::test]
async fn a_link_is_refused_to_another_user_after_expiry_and_when_one_exists() {
    let s = setup_unlinked().await;
    let path = s.link_offer("U_BOB").await;
    // Carol cannot take bob's Slack account (its confirmed email is bob's).
    let carol = s.app.browser(CAROL).await;
    let (status, page) = carol.get(&path).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("not carol@example.com"), "{page}");
    let csrf = common::csrf_in(&page).unwrap();
    assert_eq!(
        carol.post(&path, &[("csrf", &csrf)]).await.status(),
        StatusCode::FORBIDDEN
    );
    // An unconfirmed Slack email links nobody.
    s.fake.user_as(
        "U_DAVE",
        serde_json::json!({"id": "U_DAVE", "is_email_confirmed": false, "profile": {"email": CAROL}}),
    );
    let dave = s.link_offer("U_DAVE").await;
    let (status, page) = carol.get(&dave).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("has not confirmed"), "{page}");
    assert!(links(&s).await.is_empty());

    // Ten minutes on (the injected clock), bob's link is dead.
    s.app.clock.advance(chrono::Duration::minutes(10));
    let bob = s.app.browser(BOB).await;
    let (status, page) = bob.get(&path).await;
    assert_eq!(status, StatusCode::GONE);
    assert!(page.contains("expired"), "{page}");
    let csrf = common::csrf_in(&page).unwrap();
    assert_eq!(
        bob.post(&path, &[("csrf", &csrf)]).await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        bob.get("/slack/link/sl_forged").await.0,
        StatusCode::NOT_FOUND
    );
    assert!(links(&s).await.is_empty());

    // Bob links; a second Slack account showing his email cannot be linked to him too.
    s.link("U_BOB", BOB).await;
    s.fake.user("U_MALLORY", BOB);
    let mallory = s.link_offer("U_MALLORY").await;
    let (_, page) = bob.get(&mallory).await;
    let csrf = common::csrf_in(&page).unwrap();
    assert_eq!(
        bob.post(&mallory, &[("csrf", &csrf)]).await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        links(&s).await,
        [("T0TEAM".into(), "U_BOB".into(), BOB.into())]
    );
}

#[tokio::test]
async fn a_changed_slack_email_does_not_move_the_link() {
    let s = setup().await;
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-ssh", "admin", "30m", Some("OPS-8"))
        .await;
    s.deliver().await;
    // Whoever edits profiles gives bob's Slack account carol's email, and a new
    // account bob's: neither moves who the accounts are.
    s.fake.user("U_BOB", CAROL);
    s.fake.user("U_MALLORY", BOB);
    assert_eq!(s.click("U_MALLORY", "approve", &id).await, StatusCode::OK);
    assert!(s.told("U_MALLORY", "approve").contains("did not count"));
    assert_eq!(s.status(&id).await, ("pending".into(), 0));
    assert_eq!(s.click("U_BOB", "approve", &id).await, StatusCode::OK);
    let mut conn = s.app.state().db.acquire().await.unwrap();
    let approvals = twokey::store::approvals_for(&mut conn, &id).await.unwrap();
    let who: Vec<&str> = approvals
        .iter()
        .map(|a| a.approver_email.as_str())
        .collect();
    assert_eq!(who, [BOB]);
}

#[tokio::test]
async fn clicks_from_another_workspace_are_refused() {
    let s = setup().await;
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    s.deliver().await;
    // Signed with the app's own secret (one app, many workspaces), by a user whose id
    // is linked in ours.
    let other = slack::payload_from("T0OTHER", &s.fake.base, "U_BOB", "approve", &id);
    assert_eq!(s.send(&other).await, StatusCode::OK);
    assert!(s.told("U_BOB", "approve").contains("this Slack workspace"));
    // Mixed team ids, or none at all, are refused too.
    s.app.clock.advance(chrono::Duration::seconds(1));
    let mut mixed = slack::payload(&s.fake.base, "U_BOB", "approve", &id);
    mixed["team"]["id"] = "T0OTHER".into();
    assert_eq!(s.send(&mixed).await, StatusCode::OK);
    s.app.clock.advance(chrono::Duration::seconds(1));
    let mut none = slack::payload(&s.fake.base, "U_BOB", "approve", &id);
    none.as_object_mut().unwrap().remove("team");
    none["user"].as_object_mut().unwrap().remove("team_id");
    assert_eq!(s.send(&none).await, StatusCode::OK);
    assert_eq!(
        s.fake.calls("response_url/U_BOB-approve").len(),
        3,
        "each refusal was told"
    );
    assert_eq!(s.status(&id).await, ("pending".into(), 0));
    // From our workspace, the same user's click counts.
    s.app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(s.click("U_BOB", "approve", &id).await, StatusCode::OK);
    assert_eq!(s.status(&id).await, ("approved".into(), 1));
}

/// The link confirm page and the Account page's Unlink button, clicked in headless
/// Chromium: Link makes the link (and the Account page lists it), Unlink removes it,
/// each with its audit event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linking_and_unlinking_slack_in_chromium() {
    let s = setup_unlinked().await;
    let count = |actions: &[String], a: &str| actions.iter().filter(|x| *x == a).count();
    let path = s.link_offer("U_BOB").await;
    let url = s.app.url(&path);

    let b = common::webdriver::Browser::start().await;
    b.goto(&url).await;
    assert_eq!(
        b.text("#notice").await,
        "Sign in to twokey to link your Slack account."
    );
    assert!(!b.exists("#confirm-link").await);
    b.click_and_wait("#sign-in").await;
    b.click_and_wait(&format!("button[id='login-{BOB}']")).await;
    assert_eq!(b.url().await, url, "back on the link page after sign-in");
    let main = b.text("main").await;
    assert!(
        main.contains("U_BOB") && main.contains("T0TEAM") && main.contains(BOB),
        "{main}"
    );
    assert!(b.exists("#link-warning").await);
    assert!(links(&s).await.is_empty(), "the page itself linked nothing");

    b.click_and_wait("#confirm-link").await;
    assert_eq!(b.url().await, s.app.url("/account"));
    assert_eq!(
        links(&s).await,
        [("T0TEAM".into(), "U_BOB".into(), BOB.into())]
    );
    assert_eq!(b.text("#slack-links .slack-user").await, "U_BOB");
    assert!(!b.exists("#no-slack-link").await);
    let actions = s.app.audit_actions().await;
    assert_eq!(count(&actions, "slack.linked"), 1, "{actions:?}");
    assert_eq!(count(&actions, "slack.unlinked"), 0, "{actions:?}");

    b.click_and_wait("button.unlink-slack").await;
    assert_eq!(b.url().await, s.app.url("/account"));
    assert!(links(&s).await.is_empty());
    assert!(!b.exists("#slack-links").await);
    assert!(
        b.text("#no-slack-link")
            .await
            .starts_with("No Slack account is linked")
    );
    b.quit().await;
    let actions = s.app.audit_actions().await;
    assert_eq!(count(&actions, "slack.linked"), 1, "{actions:?}");
    assert_eq!(count(&actions, "slack.unlinked"), 1, "{actions:?}");
    s.app.assert_chain_ok().await;
}

#[tokio::test]
async fn a_held_statement_is_posted_with_a_link_to_its_page_and_never_its_text() {
    let s = setup().await;
    let pg = common::transcripts::pg_session(&s.app, vec![]).await;
    // The request's own messages first (its approval, its outcome).
    s.deliver().await;
    let before = s.fake.calls("chat.postMessage").len();
    let g = twokey::store::grant_by_id(&s.app.state().db, &pg.grant_id)
        .await
        .unwrap()
        .unwrap();
    let held = twokey::access::held::file(
        s.app.state(),
        &twokey::access::held::Filing {
            session_id: &pg.id,
            grant: &g,
            protocol: "postgres",
            action: "delete from orders where note = 'hunter2'",
            params: &[],
            action_sha256: "00",
            parse: &twokey::store::HeldParse {
                kinds: vec!["DELETE".into()],
                tables: vec!["orders".into()],
            },
            why: "DELETE is held for review (review = \"DELETE\")",
        },
    )
    .await
    .unwrap();
    assert_eq!(s.deliver().await.sent, 1);
    let posts = s.fake.calls("chat.postMessage");
    assert_eq!(posts.len(), before + 1);
    let post = posts.last().unwrap();
    let text = post.to_string();
    assert!(
        text.contains("alice@example.com sent a statement on demo-db")
            && text.contains("DELETE on orders")
            && !text.contains("hunter2")
            && !text.contains("where note"),
        "{text}"
    );
    let actions = post["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "actions")
        .unwrap();
    let button = &actions["elements"][0];
    assert_eq!(actions["elements"].as_array().unwrap().len(), 1);
    assert!(
        button["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/held/{}", held.id)),
        "{button}"
    );
    // Slack's callback for the link button decides nothing.
    assert_eq!(
        s.click("U_BOB", "held_open", &held.id).await,
        StatusCode::OK
    );
    let mut conn = s.app.state().db.acquire().await.unwrap();
    let now = twokey::store::get_held(&mut conn, &held.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.status, twokey::policy::HeldStatus::Pending);
    assert!(
        twokey::store::held_decisions_for(&mut conn, &held.id)
            .await
            .unwrap()
            .is_empty()
    );
}
