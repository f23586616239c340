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

async fn setup() -> Setup {
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

    async fn status(&self, id: &str) -> (String, usize) {
        let mut conn = self.app.state().db.acquire().await.unwrap();
        let status = twokey::store::get_request(&mut conn, id)
            .await
            .unwrap()
            .unwrap()
            .status;
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
async fn unmapped_users_and_self_approval_are_refused_and_told_why() {
    let s = setup().await;
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    s.deliver().await;

    assert_eq!(s.click("U_STRANGER", "approve", &id).await, StatusCode::OK);
    let told = s.fake.calls("response_url/U_STRANGER-approve");
    assert!(
        told[0]["text"]
            .as_str()
            .unwrap()
            .contains("twokey does not know you"),
        "{told:?}"
    );
    assert_eq!(told[0]["response_type"], "ephemeral");

    // A Slack user whose email is not a twokey user.
    s.fake.user("U_EVE", "eve@elsewhere.example");
    assert_eq!(s.click("U_EVE", "deny", &id).await, StatusCode::OK);
    assert!(
        s.fake.calls("response_url/U_EVE-deny")[0]["text"]
            .as_str()
            .unwrap()
            .contains("does not know you")
    );

    // Bob's email, but Slack has not confirmed it (or does not say), or the account
    // is deactivated: not bob.
    for (slack_id, user) in [
        (
            "U_BOB2",
            serde_json::json!({"id": "U_BOB2", "deleted": false, "is_email_confirmed": false, "profile": {"email": BOB}}),
        ),
        (
            "U_BOB3",
            serde_json::json!({"id": "U_BOB3", "deleted": false, "profile": {"email": BOB}}),
        ),
        (
            "U_BOB4",
            serde_json::json!({"id": "U_BOB4", "deleted": true, "is_email_confirmed": true, "profile": {"email": BOB}}),
        ),
    ] {
        s.fake.user_as(slack_id, user);
        assert_eq!(s.click(slack_id, "approve", &id).await, StatusCode::OK);
        let told = s.fake.calls(&format!("response_url/{slack_id}-approve"));
        assert!(
            told[0]["text"]
                .as_str()
                .unwrap()
                .contains("does not know you"),
            "{slack_id}: {told:?}"
        );
    }

    for action in ["approve", "deny"] {
        assert_eq!(s.click("U_ALICE", action, &id).await, StatusCode::OK);
        let told = s.fake.calls(&format!("response_url/U_ALICE-{action}"));
        assert!(
            told[0]["text"]
                .as_str()
                .unwrap()
                .contains("your own request"),
            "{told:?}"
        );
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
