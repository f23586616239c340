//! The approval workflow through `/api/v1`, against the real server on 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use reqwest::StatusCode;
use serde_json::json;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const CAROL: &str = "carol@example.com";
const DAVE: &str = "dave@example.com";

#[tokio::test]
async fn request_approve_grant_end_to_end() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;

    let id = alice.file("demo-db", "read", "30m", None).await;
    let (s, r) = alice.get(&format!("/requests/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["status"], "pending");
    assert_eq!(r["requester"], ALICE);
    assert_eq!(r["required_approvals"], 1);

    let (s, r) = bob.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["status"], "approved");
    assert_eq!(r["approvals"][0]["approver"], BOB);
    assert_eq!(r["approvals"][0]["channel"], "api");
    assert_eq!(r["grant"]["status"], "active");
    assert_eq!(r["grant"]["starts_at"], "2026-11-22T12:00:00Z");
    assert_eq!(r["grant"]["ends_at"], "2026-11-22T12:30:00Z");

    assert_eq!(
        app.audit_actions().await,
        [
            "token.created",
            "token.created",
            "request.created",
            "request.approval",
            "request.approved",
            "grant.started"
        ]
    );
    app.assert_chain_ok().await;
}

#[tokio::test]
async fn two_distinct_approvers_and_ticket_for_ssh_admin() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;
    let carol = app.api(CAROL).await;

    // The role demands a ticket and caps at 1h.
    let (s, r) = alice
        .post("/requests", json!({"resource": "demo-ssh", "role": "admin", "duration": "2h", "reason": "patch host"}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = r["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["duration", "ticket"]);

    let id = alice.file("demo-ssh", "admin", "45m", Some("OPS-7")).await;
    let (s, r) = bob.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["status"], "pending", "one approval of two");
    assert_eq!(r["approval_count"], 1);
    // The same human again counts once: refused.
    let (s, _) = bob.act(&id, "approve").await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, r) = carol.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["status"], "approved");
    assert_eq!(r["approval_count"], 2);
    assert_eq!(r["grant"]["ends_at"], "2026-11-22T12:45:00Z");
    app.assert_chain_ok().await;
}

#[tokio::test]
async fn self_approval_is_refused_for_everyone_including_admins() {
    let app = common::start().await;
    // An admin who is also an approver for the role, and may request it.
    app.user("erin@example.com", &["sre-leads", "admins"]).await;
    let erin = app.api("erin@example.com").await;
    let id = erin.file("demo-db", "read", "1h", None).await;
    for action in ["approve", "deny"] {
        let (s, r) = erin.act(&id, action).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{action}: {r}");
        assert!(
            r["message"].as_str().unwrap().contains("your own request"),
            "{r}"
        );
    }
    // A requester who is not an approver is refused too.
    let alice = app.api(ALICE).await;
    let id2 = alice.file("demo-db", "read", "1h", None).await;
    let (s, _) = alice.act(&id2, "approve").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Nothing changed.
    let (_, r) = erin.get(&format!("/requests/{id}")).await;
    assert_eq!(r["status"], "pending");
    assert_eq!(r["approvals"].as_array().unwrap().len(), 0);
    let (_, r) = alice.get(&format!("/requests/{id2}")).await;
    assert_eq!(r["status"], "pending");
    // An admin who is not in the approver groups may see but not approve others'.
    let dave = app.api(DAVE).await;
    let (s, _) = dave.get(&format!("/requests/{id2}")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = dave.act(&id2, "approve").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn approver_removed_from_group_is_refused() {
    let app = common::start().await;
    app.user("gina@example.com", &["sre-leads"]).await;
    let gina = app.api("gina@example.com").await;
    let alice = app.api(ALICE).await;
    let id = alice.file("demo-db", "read", "1h", None).await;
    // Membership changes after gina authenticated but before she approves.
    app.user("gina@example.com", &["engineers"]).await;
    let (s, _) = gina.act(&id, "approve").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, r) = alice.get(&format!("/requests/{id}")).await;
    assert_eq!(r["status"], "pending");
}

#[tokio::test]
async fn other_users_requests_are_neither_visible_nor_actionable() {
    let app = common::start().await;
    app.user("frank@example.com", &["engineers"]).await;
    let frank = app.api("frank@example.com").await;
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;
    let id = frank.file("demo-db", "read", "1h", None).await;

    let (s, _) = alice.get(&format!("/requests/{id}")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    for action in ["approve", "deny", "cancel", "revoke"] {
        let (s, _) = alice.act(&id, action).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{action}");
    }
    // Only the requester cancels, even for an approver who can see it.
    let (s, _) = bob.act(&id, "cancel").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, list) = alice.get("/requests").await;
    assert!(list["requests"].as_array().unwrap().is_empty(), "{list}");
    let (_, list) = bob.get("/requests?status=pending").await;
    assert_eq!(list["requests"].as_array().unwrap().len(), 1);
    let (s, _) = bob
        .get("/requests/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, r) = bob.get("/requests?status=bogus").await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r["fields"][0]["field"], "status");
}

#[tokio::test]
async fn decided_requests_conflict() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;
    let carol = app.api(CAROL).await;

    let denied = alice.file("demo-db", "read", "1h", None).await;
    let (s, r) = bob.act(&denied, "deny").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["status"], "denied");
    for action in ["approve", "deny"] {
        let (s, _) = carol.act(&denied, action).await;
        assert_eq!(s, StatusCode::CONFLICT, "{action}");
    }
    let (s, _) = alice.act(&denied, "cancel").await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = bob.act(&denied, "revoke").await;
    assert_eq!(s, StatusCode::CONFLICT);

    let cancelled = alice.file("demo-db", "read", "1h", None).await;
    let (s, r) = alice.act(&cancelled, "cancel").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["status"], "cancelled");
    let (s, _) = bob.act(&cancelled, "approve").await;
    assert_eq!(s, StatusCode::CONFLICT);

    let pending = alice.file("demo-db", "read", "1h", None).await;
    let (s, _) = bob.act(&pending, "revoke").await;
    assert_eq!(s, StatusCode::CONFLICT, "a pending request has no grant");

    let granted = alice.file("demo-db", "read", "1h", None).await;
    bob.act(&granted, "approve").await;
    let (s, _) = alice.act(&granted, "cancel").await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, r) = carol.act(&granted, "revoke").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["grant"]["status"], "revoked");
    assert_eq!(r["grant"]["ended_by"], CAROL);
    let (s, _) = bob.act(&granted, "revoke").await;
    assert_eq!(s, StatusCode::CONFLICT);
    // alice (engineers) may not revoke frank-like others, but may give back her own.
    let own = alice.file("demo-db", "read", "1h", None).await;
    bob.act(&own, "approve").await;
    let (s, _) = alice.act(&own, "revoke").await;
    assert_eq!(s, StatusCode::OK);

    let actions = app.audit_actions().await;
    assert_eq!(actions.iter().filter(|a| *a == "request.denied").count(), 1);
    assert_eq!(
        actions.iter().filter(|a| *a == "request.cancelled").count(),
        1
    );
    assert_eq!(actions.iter().filter(|a| *a == "grant.revoked").count(), 2);
    app.assert_chain_ok().await;
}

#[tokio::test]
async fn bad_input_gets_field_level_422_and_changes_nothing() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let cases = [
        (
            json!({"resource": "demo-db", "role": "read", "duration": "forever", "reason": "x y z"}),
            "duration",
        ),
        (
            json!({"resource": "demo-db", "role": "read", "duration": "5h", "reason": "x y z"}),
            "duration",
        ),
        (
            json!({"resource": "demo-db", "role": "read", "duration": 10, "reason": "x y z"}),
            "duration",
        ),
        (
            json!({"resource": "demo-db", "role": "read", "duration": -5, "reason": "x y z"}),
            "duration",
        ),
        (
            json!({"resource": "demo-db", "role": "read", "duration": "1h", "reason": "   "}),
            "reason",
        ),
        (
            json!({"resource": "demo-db", "role": "read", "duration": "1h"}),
            "reason",
        ),
        (
            json!({"resource": "nope", "role": "read", "duration": "1h", "reason": "x y z"}),
            "resource",
        ),
        (
            json!({"resource": "demo-db", "role": "write", "duration": "1h", "reason": "x y z"}),
            "role",
        ),
        (
            json!({"resource": 5, "role": "read", "duration": "1h", "reason": "x y z"}),
            "resource",
        ),
        (
            json!({"resource": "demo-db", "role": "read", "duration": "1h", "reason": "x y z", "admin": true}),
            "body",
        ),
        (json!(["not", "an", "object"]), "body"),
    ];
    for (body, field) in cases {
        let (s, r) = alice.post("/requests", body.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(r["error"], "invalid");
        assert_eq!(r["fields"][0]["field"], field, "{body} → {r}");
    }
    let resp = alice
        .http
        .post(format!("{}/requests", alice.base))
        .bearer_auth(&alice.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let (_, list) = alice.get("/requests").await;
    assert!(list["requests"].as_array().unwrap().is_empty());
    // Comments are bounded too.
    let id = alice.file("demo-db", "read", "1h", None).await;
    let bob = app.api(BOB).await;
    let (s, r) = bob
        .post(
            &format!("/requests/{id}/approve"),
            json!({"comment": "x".repeat(5000)}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r["fields"][0]["field"], "comment");
    let (_, r) = bob.get(&format!("/requests/{id}")).await;
    assert_eq!(r["status"], "pending");
}

#[tokio::test]
async fn engineers_may_not_request_outside_policy() {
    let app = common::start().await;
    // bob (sre-leads) is not in the requester groups.
    let bob = app.api(BOB).await;
    let (s, r) = bob
        .post(
            "/requests",
            json!({"resource": "demo-db", "role": "read", "duration": "1h", "reason": "x y z"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{r}");
}

#[tokio::test]
async fn missing_or_bad_tokens_are_refused() {
    let app = common::start().await;
    let http = common::http();
    let url = app.url("/api/v1/requests");
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    for bad in ["tk_forged", "nonsense", "", "tk_"] {
        let resp = http.get(&url).bearer_auth(bad).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{bad}");
    }
    // A session cookie is no substitute for a token on the API.
    let b = app.browser(ALICE).await;
    let (s, _) = b.get("/api/v1/requests").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn pending_requests_expire_and_grants_end_on_the_injected_clock() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;

    let stale = alice.file("demo-db", "read", "1h", None).await;
    let granted = alice.file("demo-db", "read", "30m", None).await;
    bob.act(&granted, "approve").await;

    app.clock.advance(chrono::Duration::minutes(31));
    // Before any sweep, the grant already reads as ended and cannot be revoked.
    let (_, r) = alice.get(&format!("/requests/{granted}")).await;
    assert_eq!(r["grant"]["status"], "ended");
    let (s, _) = bob.act(&granted, "revoke").await;
    assert_eq!(s, StatusCode::CONFLICT);

    app.clock.advance(chrono::Duration::hours(24));
    let (s, r) = bob.act(&stale, "approve").await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    assert!(r["message"].as_str().unwrap().contains("expired"));

    // Lists go by the status as it holds now, before the sweeper runs.
    let (_, pending) = alice.get("/requests?status=pending").await;
    assert!(
        pending["requests"].as_array().unwrap().is_empty(),
        "{pending}"
    );
    let (_, expired) = alice.get("/requests?status=expired").await;
    assert_eq!(expired["requests"][0]["id"], stale.as_str());
    let (s, r) = alice.act(&stale, "cancel").await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(r["message"].as_str().unwrap().contains("expired"), "{r}");

    let swept = twokey::access::sweep(app.state()).await.unwrap();
    assert_eq!(
        swept,
        twokey::access::Swept {
            expired_requests: 1,
            ended_grants: 1
        }
    );
    let again = twokey::access::sweep(app.state()).await.unwrap();
    assert_eq!(again, twokey::access::Swept::default());
    let (_, r) = alice.get(&format!("/requests/{stale}")).await;
    assert_eq!(r["status"], "expired");
    // A natural end is recorded at the grant's end time, not at the sweep.
    let (_, r) = alice.get(&format!("/requests/{granted}")).await;
    assert_eq!(r["grant"]["ended_at"], "2026-11-22T12:30:00Z");
    let actions = app.audit_actions().await;
    assert!(actions.contains(&"request.expired".to_string()));
    assert!(actions.contains(&"grant.ended".to_string()));
    app.assert_chain_ok().await;
}

/// Fires `n` concurrent actions and counts the answers by status.
async fn race(calls: Vec<(common::Api, String, &'static str)>) -> BTreeMap<u16, usize> {
    let mut set = tokio::task::JoinSet::new();
    for (api, id, action) in calls {
        set.spawn(async move { api.act(&id, action).await.0.as_u16() });
    }
    let mut counts = BTreeMap::new();
    while let Some(code) = set.join_next().await {
        *counts.entry(code.unwrap()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_approvals_make_exactly_one_transition() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let mut approvers = Vec::new();
    for i in 0..50 {
        let email = format!("approver{i}@example.com");
        app.user(&email, &["sre-leads"]).await;
        approvers.push(app.api(&email).await);
    }

    // 1 approval needed, 50 distinct approvers race: one wins.
    let one = alice.file("demo-db", "read", "1h", None).await;
    let calls = approvers
        .iter()
        .map(|a| (clone(a), one.clone(), "approve"))
        .collect();
    assert_eq!(race(calls).await, BTreeMap::from([(200, 1), (409, 49)]));

    // 2 approvals needed: exactly two count, one transition.
    let two = alice.file("demo-ssh", "admin", "30m", Some("OPS-1")).await;
    let calls = approvers
        .iter()
        .map(|a| (clone(a), two.clone(), "approve"))
        .collect();
    assert_eq!(race(calls).await, BTreeMap::from([(200, 2), (409, 48)]));

    // The same approver 50 times on a 2-approval request: one approval, still pending.
    let same = alice.file("demo-ssh", "admin", "30m", Some("OPS-2")).await;
    let calls = (0..50)
        .map(|_| (clone(&approvers[0]), same.clone(), "approve"))
        .collect();
    assert_eq!(race(calls).await, BTreeMap::from([(200, 1), (409, 49)]));

    for (id, count, status) in [
        (&one, 1, "approved"),
        (&two, 2, "approved"),
        (&same, 1, "pending"),
    ] {
        let (_, r) = alice.get(&format!("/requests/{id}")).await;
        assert_eq!(r["status"], status);
        assert_eq!(r["approvals"].as_array().unwrap().len(), count);
    }
    let actions = app.audit_actions().await;
    assert_eq!(
        actions.iter().filter(|a| *a == "request.approved").count(),
        2
    );
    assert_eq!(actions.iter().filter(|a| *a == "grant.started").count(), 2);
    assert_eq!(
        actions.iter().filter(|a| *a == "request.approval").count(),
        4
    );
    let grants: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM grants")
        .fetch_one(&app.state().db)
        .await
        .unwrap();
    assert_eq!(grants, 2);
    app.assert_chain_ok().await;
}

fn clone(a: &common::Api) -> common::Api {
    common::Api {
        base: a.base.clone(),
        token: a.token.clone(),
        http: a.http.clone(),
    }
}

#[tokio::test]
async fn tokens_are_stored_hashed_and_never_audited() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let id = alice.file("demo-db", "read", "1h", None).await;
    app.api(BOB).await.act(&id, "approve").await;
    let secret = &alice.token["tk_".len()..];
    let stored: Vec<String> = sqlx::query_scalar("SELECT token_hash FROM api_tokens")
        .fetch_all(&app.state().db)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|h| !h.contains(secret)));
    assert!(stored.contains(&twokey::auth::hash_token(&alice.token)));
    let events = twokey::audit::page(&app.state().db, 0, 1000).await.unwrap();
    for e in events {
        assert!(
            !e.to_export_line().contains(secret),
            "token leaked into {}",
            e.action
        );
    }
}

#[tokio::test]
async fn health_and_metrics() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    alice.file("demo-db", "read", "1h", None).await;
    let http = common::http();
    let resp = http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("twokey_requests_created_total 1\n"), "{text}");
    assert!(text.contains("twokey_pending_requests 1\n"), "{text}");
    assert!(text.contains("# TYPE twokey_live_grants gauge"), "{text}");
}

#[tokio::test]
async fn tokens_expire_are_revocable_and_die_with_a_forced_re_sign_in() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let (s, _) = alice.get("/whoami").await;
    assert_eq!(s, StatusCode::OK);

    // Forced re-sign-in by an admin ends tokens made before it.
    app.clock.advance(chrono::Duration::seconds(1));
    let dave = {
        let mut conn = app.state().db.acquire().await.unwrap();
        let id = twokey::store::user_id_by_email(&mut conn, DAVE)
            .await
            .unwrap()
            .unwrap();
        twokey::store::load_actor(&mut conn, &id, &["admins".to_string()])
            .await
            .unwrap()
            .unwrap()
    };
    let alice_id = {
        let mut conn = app.state().db.acquire().await.unwrap();
        twokey::store::user_id_by_email(&mut conn, ALICE)
            .await
            .unwrap()
            .unwrap()
    };
    twokey::auth::force_reauth(app.state(), &dave, &alice_id)
        .await
        .unwrap();
    let (s, _) = alice.get("/whoami").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // A token made after it works, until it is revoked...
    app.clock.advance(chrono::Duration::seconds(1));
    let fresh = app.api(ALICE).await;
    assert_eq!(fresh.get("/whoami").await.0, StatusCode::OK);
    // Both stored tokens: the one the forced re-sign-in ended, and the fresh one.
    assert_eq!(
        twokey::auth::revoke_api_tokens(app.state(), ALICE)
            .await
            .unwrap(),
        2
    );
    assert_eq!(fresh.get("/whoami").await.0, StatusCode::UNAUTHORIZED);

    // ...or until its lifetime (auth.token_ttl, 7 days by default) is over.
    let later = app.api(ALICE).await;
    app.clock
        .advance(chrono::Duration::days(7) - chrono::Duration::seconds(1));
    assert_eq!(later.get("/whoami").await.0, StatusCode::OK);
    app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(later.get("/whoami").await.0, StatusCode::UNAUTHORIZED);
    let actions = app.audit_actions().await;
    assert!(actions.contains(&"user.reauth_forced".to_string()));
    assert!(actions.contains(&"token.revoked".to_string()));
}

#[tokio::test]
async fn a_requester_removed_from_the_requester_groups_gets_no_grant() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;
    let id = alice.file("demo-db", "read", "1h", None).await;
    app.user(ALICE, &["interns"]).await;
    let (s, r) = bob.act(&id, "approve").await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    assert!(r["message"].as_str().unwrap().contains("no longer request"));
    let (_, r) = bob.get(&format!("/requests/{id}")).await;
    assert_eq!(r["status"], "pending");
    assert!(
        r["approvals"].as_array().unwrap().is_empty(),
        "the refused approval was rolled back"
    );
}

#[tokio::test]
async fn a_transition_and_its_audit_event_commit_together_or_not_at_all() {
    let app = common::start().await;
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;
    let id = alice.file("demo-db", "read", "1h", None).await;
    let before = app.audit_actions().await.len();
    // Make the audit append fail for the approval's transition, as a full disk would.
    sqlx::query(
        "CREATE TRIGGER fail_approved BEFORE INSERT ON audit_events WHEN NEW.action = 'request.approved'
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
    )
    .execute(&app.state().db)
    .await
    .unwrap();
    let (s, r) = bob.act(&id, "approve").await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        !r.to_string().contains("injected failure"),
        "internal detail leaked: {r}"
    );
    sqlx::query("DROP TRIGGER fail_approved")
        .execute(&app.state().db)
        .await
        .unwrap();

    let (_, r) = alice.get(&format!("/requests/{id}")).await;
    assert_eq!(r["status"], "pending");
    assert!(r["approvals"].as_array().unwrap().is_empty());
    assert!(r["grant"].is_null());
    assert_eq!(
        app.audit_actions().await.len(),
        before,
        "no half-written step"
    );
    // With the fault gone the same approval goes through.
    let (s, r) = bob.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["status"], "approved");
    app.assert_chain_ok().await;
}

#[tokio::test]
async fn all_groups_needs_an_approver_from_each_listed_group() {
    let app = common::start_with(|c| {
        let role = &mut c.resources[0].roles[0];
        role.approver_groups = vec!["sre-leads".into(), "dbas".into()];
        role.all_groups = true;
        role.min_approvals = 2;
        c.validate().unwrap();
    })
    .await;
    app.user("erin@example.com", &["dbas"]).await;
    let id = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    let (_, r) = app.api(BOB).await.act(&id, "approve").await;
    assert_eq!(r["status"], "pending");
    // Two distinct approvers, but both from sre-leads: the dbas group is missing.
    let (_, r) = app.api(CAROL).await.act(&id, "approve").await;
    assert_eq!(
        (r["status"].as_str(), r["approval_count"].as_u64()),
        (Some("pending"), Some(2))
    );
    let (s, r) = app.api("erin@example.com").await.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["status"], "approved");
    assert!(r["grant"]["id"].is_string());
}

use twokey::auth::scopes::Scopes;

#[tokio::test]
async fn approving_through_the_api_needs_the_approve_scope() {
    let app = common::start().await;
    let alice = app.api_with(ALICE, &Scopes::requests()).await;
    let bob_requests = app.api_with(BOB, &Scopes::requests()).await;
    let bob_approve = app.api_with(BOB, &Scopes::parse("approve").unwrap()).await;
    let id = alice.file("demo-db", "read", "30m", None).await;

    // A `requests` token: no deciding, and not even reading someone else's request.
    for action in ["approve", "deny"] {
        let (s, r) = bob_requests.act(&id, action).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap()
                .contains("lacks the \"approve\" scope"),
            "{r}"
        );
    }
    let (s, _) = bob_requests.get(&format!("/requests/{id}")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, r) = bob_requests.get("/requests").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["requests"].as_array().unwrap().len(), 0, "{r}");
    let (_, r) = alice.get(&format!("/requests/{id}")).await;
    assert_eq!(
        (r["status"].as_str(), r["approval_count"].as_u64()),
        (Some("pending"), Some(0))
    );
    // An `approve`-only token decides, but cannot file or get credentials.
    let (s, r) = bob_approve
        .post(
            "/requests",
            json!({"resource": "demo-db", "role": "read", "duration": "1h", "reason": "x"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{r}");
    let (s, r) = bob_approve.get("/requests").await;
    assert_eq!(
        (s, r["requests"].as_array().unwrap().len()),
        (StatusCode::OK, 1)
    );
    let (s, r) = bob_approve.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["status"], "approved");
    // Revoking: one's own grant with `requests`; another's needs `approve`.
    let (s, _) = bob_requests.act(&id, "revoke").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, r) = alice.act(&id, "revoke").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["grant"]["status"], "revoked");
    // whoami answers any token, with its scopes.
    assert_eq!(
        bob_approve.get("/whoami").await.1["scopes"],
        json!(["approve"])
    );
    assert_eq!(alice.get("/whoami").await.1["scopes"], json!(["requests"]));
}

#[tokio::test]
async fn a_token_works_until_its_own_end_on_the_injected_clock() {
    let app = common::start().await;
    let token = twokey::auth::create_scoped_token(
        app.state(),
        ALICE,
        "short",
        &Scopes::requests(),
        Some(std::time::Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let api = common::Api {
        base: app.url("/api/v1"),
        token,
        http: common::http(),
    };
    let (s, me) = api.get("/whoami").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me["token_expires_at"], "2026-11-22T13:00:00Z");
    app.clock
        .advance(chrono::Duration::minutes(59) + chrono::Duration::seconds(59));
    assert_eq!(api.get("/whoami").await.0, StatusCode::OK);
    app.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(api.get("/whoami").await.0, StatusCode::UNAUTHORIZED);
    // No token outlives auth.token_ttl, nor has no scope.
    let err = twokey::auth::create_scoped_token(
        app.state(),
        ALICE,
        "long",
        &Scopes::requests(),
        Some(std::time::Duration::from_secs(8 * 86400)),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("invalid"), "{err}");
    let err =
        twokey::auth::create_scoped_token(app.state(), ALICE, "none", &Scopes::default(), None)
            .await
            .unwrap_err();
    assert!(matches!(err, twokey::Error::Invalid(_)), "{err}");
}

/// The id of the only token labelled `label`.
async fn token_id(app: &common::TestApp, label: &str) -> String {
    let (id,): (String,) = sqlx::query_as("SELECT id FROM api_tokens WHERE label = ?")
        .bind(label)
        .fetch_one(&app.state().db)
        .await
        .unwrap();
    id
}

async fn labelled(app: &common::TestApp, email: &str, label: &str) -> common::Api {
    let token = twokey::auth::create_scoped_token(app.state(), email, label, &Scopes::all(), None)
        .await
        .unwrap();
    common::Api {
        base: app.url("/api/v1"),
        token,
        http: common::http(),
    }
}

#[tokio::test]
async fn tokens_page_lists_and_revokes_for_their_owner_and_admins_only() {
    let app = common::start().await;
    let bob_api = labelled(&app, BOB, "bob-laptop").await;
    let alice_api = labelled(&app, ALICE, "alice-ci").await;
    assert_eq!(bob_api.get("/whoami").await.0, StatusCode::OK);
    let (bob_id, alice_id) = (
        token_id(&app, "bob-laptop").await,
        token_id(&app, "alice-ci").await,
    );

    // Bob sees his own token (never the token itself), not alice's.
    let bob = app.browser(BOB).await;
    let (s, page) = bob.get("/tokens").await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        page.contains("bob-laptop") && page.contains("requests approve"),
        "{page}"
    );
    assert!(
        page.contains("2026-11-29 12:00:00 UTC"),
        "ends after 7 days: {page}"
    );
    assert!(!page.contains("alice-ci"), "{page}");
    assert!(
        !page.contains(&bob_api.token[3..]),
        "the token itself is never shown"
    );
    // Bob cannot revoke alice's token, nor without the session's CSRF token.
    let csrf = common::csrf_in(&page).unwrap();
    let resp = bob
        .post(&format!("/tokens/{alice_id}/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = bob
        .post(&format!("/tokens/{bob_id}/revoke"), &[("csrf", "forged")])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(alice_api.get("/whoami").await.0, StatusCode::OK);
    assert_eq!(bob_api.get("/whoami").await.0, StatusCode::OK);
    // His own: revoked at once, and a second try conflicts.
    let resp = bob
        .post(&format!("/tokens/{bob_id}/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(bob_api.get("/whoami").await.0, StatusCode::UNAUTHORIZED);
    let resp = bob
        .post(&format!("/tokens/{bob_id}/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert!(!bob.get("/tokens").await.1.contains("bob-laptop"));

    // Dave (an admin) sees alice's token and revokes it.
    let dave = app.browser(DAVE).await;
    let (_, page) = dave.get("/tokens").await;
    assert!(page.contains("alice-ci") && page.contains(ALICE), "{page}");
    let csrf = common::csrf_in(&page).unwrap();
    let resp = dave
        .post(&format!("/tokens/{alice_id}/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(alice_api.get("/whoami").await.0, StatusCode::UNAUTHORIZED);
    let (_, page) = dave.get("/tokens").await;
    assert!(!page.contains("alice-ci"), "{page}");
    assert_eq!(
        dave.post("/tokens/no-such-token/revoke", &[("csrf", &csrf)])
            .await
            .status(),
        StatusCode::NOT_FOUND
    );

    let events = twokey::audit::page(&app.state().db, 0, 1000).await.unwrap();
    let revoked: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.action == "token.revoked")
        .map(|e| {
            let d: serde_json::Value = serde_json::from_str(&e.details).unwrap();
            (e.actor.clone(), d["token_id"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(revoked, [(BOB.into(), bob_id), (DAVE.into(), alice_id)]);
    app.assert_chain_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tokens_page_revoke_button_revokes_in_a_browser() {
    let app = common::start().await;
    let api = labelled(&app, BOB, "bob-laptop").await;
    let id = token_id(&app, "bob-laptop").await;
    let base = app.server.url();
    let b = common::webdriver::Browser::start().await;
    b.goto(&format!("{base}/login")).await;
    b.click_and_wait(&format!("button[id='login-{BOB}']")).await;
    b.goto(&format!("{base}/requests")).await;
    b.click_and_wait("nav a[href='/tokens']").await;
    assert!(b.url().await.ends_with("/tokens"));
    assert_eq!(
        b.text(&format!("#token-{id} td.scopes")).await,
        "requests approve"
    );
    assert_eq!(api.get("/whoami").await.0, StatusCode::OK);
    b.click_and_wait(&format!("#revoke-{id}")).await;
    assert!(b.url().await.ends_with("/tokens"));
    assert!(!b.exists(&format!("#token-{id}")).await);
    assert!(b.exists("#no-tokens").await);
    assert_eq!(api.get("/whoami").await.0, StatusCode::UNAUTHORIZED);
    b.quit().await;
}

#[tokio::test]
async fn someone_outside_the_role_cannot_see_or_decide_a_request() {
    let app = common::start().await;
    // Another engineer: may file requests, but neither asked for this one nor approves it.
    app.user("frank@example.com", &["engineers"]).await;
    let frank = app.api("frank@example.com").await;
    let alice = app.api(ALICE).await;
    let id = alice.file("demo-db", "read", "30m", None).await;
    let (s, r) = frank.get(&format!("/requests/{id}")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{r}");
    for action in ["approve", "deny"] {
        let (s, r) = frank.act(&id, action).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{action}: {r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap()
                .contains("you may not see this request"),
            "{action}: {r}"
        );
    }
    // Nothing changed.
    let (_, r) = alice.get(&format!("/requests/{id}")).await;
    assert_eq!(
        (r["status"].as_str(), r["approval_count"].as_u64()),
        (Some("pending"), Some(0))
    );
}

/// A reload that drops an approver group drops what its members approved: the count
/// the API shows is the one the rule uses, and the request waits for approvals the
/// role accepts now.
#[tokio::test]
async fn a_reload_that_drops_an_approver_group_drops_its_approvals() {
    let both = |c: &mut twokey::config::Config| {
        let db = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-db")
            .unwrap();
        db.roles[0].approver_groups = vec!["sre-leads".into(), "dbas".into()];
        db.roles[0].min_approvals = 2;
    };
    let app = common::start_with(both).await;
    app.user(CAROL, &["dbas"]).await;
    let id = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    let (s, r) = app.api(BOB).await.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["approval_count"], 1);

    app.reload_roles("demo-db", |roles| {
        roles[0].approver_groups = vec!["dbas".into()];
    })
    .await;
    let (_, r) = app.api(ALICE).await.get(&format!("/requests/{id}")).await;
    assert_eq!(r["approval_count"], 0, "bob's group approves no more: {r}");
    let (s, r) = app.api(CAROL).await.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        r["status"], "pending",
        "one approval of two that count: {r}"
    );
    assert_eq!(r["approval_count"], 1);
}
