//! Held actions through the PostgreSQL relay, against a real PostgreSQL as the README
//! sets it up (TLS both sides, the non-superuser admin): a statement the role marks
//! `review` does not reach the target until other people approve that exact
//! statement; then it runs once and the client gets its result. Denied, not decided
//! in time, or its session cut: it never runs, and the client is told who or why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Output;

use common::postgres::Version;
use common::psql::{self as client, eventually};
use common::relay_pg::{ALICE, BOB, Setup, relay_password, setup_on};
use reqwest::StatusCode;
use twokey::config::SqlPolicy;
use twokey::policy::HeldStatus;
use twokey::store::HeldRow;

const CAROL: &str = "carol@example.com";

/// demo-db's role `read` as `writer` (owns `victims`, rows 1 to 5, and `payments`),
/// holding DELETE, DROP and every statement on `payments` for review by `approvals`
/// people.
async fn setup(approvals: u32) -> Setup {
    let s = setup_on(Version::Pg15, move |c| {
        let db = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-db")
            .unwrap();
        let role = &mut db.roles[0];
        role.db_roles = vec!["writer".into()];
        role.sql = SqlPolicy {
            review: vec!["DELETE".into(), "DROP".into()],
            review_tables: vec!["payments".into()],
            ..SqlPolicy::default()
        };
        role.review.approvals = Some(approvals);
    })
    .await;
    s.cluster.admin("postgres", "CREATE ROLE writer NOLOGIN;");
    s.cluster.admin(
        "app",
        "CREATE TABLE victims (id int); INSERT INTO victims SELECT generate_series(1, 5);
         ALTER TABLE victims OWNER TO writer;
         CREATE TABLE payments (id int, amount int); INSERT INTO payments VALUES (1, 10);
         ALTER TABLE payments OWNER TO writer;",
    );
    s
}

/// Alice's relay password for a grant Bob approved.
async fn password(s: &Setup) -> String {
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    let (st, r) = s.app.api(BOB).await.act(&id, "approve").await;
    assert_eq!(st, StatusCode::OK, "{r}");
    // The relay takes the newest relay password of the user on the resource.
    s.app.clock.advance(chrono::Duration::seconds(1));
    relay_password(&s.app, &id).await
}

fn victims(s: &Setup) -> String {
    s.cluster
        .admin(
            "app",
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM victims",
        )
        .trim()
        .to_string()
}

/// The held actions, newest first.
async fn held(s: &Setup) -> Vec<HeldRow> {
    twokey::store::list_held(&s.app.state().db, None, None, 100)
        .await
        .unwrap()
}

/// Waits until a held action other than `known` is filed; returns it.
async fn filed(s: &Setup, known: &[&str]) -> HeldRow {
    let new = async || {
        held(s)
            .await
            .into_iter()
            .find(|h| !known.contains(&h.id.as_str()))
    };
    eventually("the statement to be held", async || new().await.is_some()).await;
    new().await.unwrap()
}

/// psql as alice running `sql`, started now; its output once it ends.
fn psql(s: &Setup, pw: &str, sql: &str) -> tokio::task::JoinHandle<Output> {
    let cmd = s.psql_cmd(pw, &["-c", sql]);
    tokio::spawn(client::output(cmd))
}

/// A signed-in approver's decision from the held action's page.
async fn decide(s: &Setup, who: &str, id: &str, action: &str, comment: &str) -> StatusCode {
    let b = s.app.browser(who).await;
    let csrf = b.csrf(&format!("/held/{id}")).await;
    let r = b
        .post(
            &format!("/held/{id}/{action}"),
            &[("csrf", &csrf), ("comment", comment)],
        )
        .await;
    let st = r.status();
    if st != StatusCode::SEE_OTHER {
        // What the page said, for a failure's message.
        let page = r.text().await.unwrap_or_default();
        let said = page
            .find("<main>")
            .map(|i| &page[i..(i + 600).min(page.len())])
            .unwrap_or_default();
        let trail: Vec<String> = twokey::audit::page(&s.app.state().db, 0, 100_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.action.starts_with("held.") || e.action.starts_with("session."))
            .map(|e| format!("{} {}", e.action, e.details))
            .collect();
        eprintln!("{who} {action} {id}: {st}: {said}\n{trail:#?}");
    }
    st
}

async fn status(s: &Setup, id: &str) -> HeldStatus {
    let mut conn = s.app.state().db.acquire().await.unwrap();
    twokey::store::get_held(&mut conn, id)
        .await
        .unwrap()
        .unwrap()
        .status
}

#[tokio::test]
async fn a_held_statement_runs_once_after_two_others_approve_it_and_never_by_its_sender() {
    let s = setup(2).await;
    let pw = password(&s).await;
    // What is not held runs as usual; the held statement waits, and the approvers
    // see it with the session so far.
    let run = tokio::spawn(client::output(s.psql_cmd(
        &pw,
        &[
            "-c",
            "select count(*) from victims",
            "-c",
            "delete from victims where id = 1 returning id",
        ],
    )));
    let h = filed(&s, &[]).await;
    let (st, page) = s
        .app
        .browser(CAROL)
        .await
        .get(&format!("/held/{}", h.id))
        .await;
    assert_eq!(st, StatusCode::OK);
    let so_far = &page[page.find("id=\"so-far\"").expect("the session so far")..];
    assert!(
        so_far.contains(
            "<code>select count(*) from victims</code> <span class=\"muted\">SELECT 1</span>"
        ) && page.contains(
            "<pre class=\"sql\" id=\"action\">delete from victims where id = 1 returning id</pre>"
        ) && page.contains("id=\"approve\""),
        "{page}"
    );
    assert_eq!(h.action, "delete from victims where id = 1 returning id");
    assert_eq!(h.parse().kinds, ["DELETE"]);
    assert_eq!(h.parse().tables, ["victims"]);
    assert_eq!(h.why, "DELETE is held for review (review = \"DELETE\")");
    assert_eq!(h.requester_email, ALICE);
    assert_eq!(h.required_approvals, 2);
    assert_eq!(victims(&s), "1,2,3,4,5", "nothing ran while it is held");

    // Its sender may not decide it, not even as an approver and admin (her groups set
    // after she signs in, as her identity provider might say at her next sign-in).
    let alice = s.app.browser(ALICE).await;
    s.app
        .user(ALICE, &["engineers", "sre-leads", "admins"])
        .await;
    let (_, own) = alice.get(&format!("/held/{}", h.id)).await;
    assert!(
        own.contains("id=\"own-note\"") && !own.contains("id=\"approve\""),
        "{own}"
    );
    let csrf = alice.csrf(&format!("/held/{}", h.id)).await;
    let r = alice
        .post(&format!("/held/{}/approve", h.id), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("you cannot approve or deny your own held action")
    );
    // Someone outside the approver groups may not either.
    let dave = s.app.browser("dave@example.com").await;
    let csrf = dave.csrf("/held").await;
    let r = dave
        .post(&format!("/held/{}/approve", h.id), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A forged form (no CSRF token) does nothing.
    let bob = s.app.browser(BOB).await;
    let r = bob.post(&format!("/held/{}/approve", h.id), &[]).await;
    assert!(r.status().is_client_error(), "{}", r.status());

    // One approval of two: still held.
    assert_eq!(
        decide(&s, BOB, &h.id, "approve", "looks right").await,
        StatusCode::SEE_OTHER
    );
    assert_eq!(status(&s, &h.id).await, HeldStatus::Pending);
    assert_eq!(
        decide(&s, BOB, &h.id, "approve", "").await,
        StatusCode::CONFLICT,
        "one person counts once"
    );
    assert!(!run.is_finished());
    assert_eq!(victims(&s), "1,2,3,4,5");
    // The second: it runs, once, and psql gets its result.
    assert_eq!(
        decide(&s, CAROL, &h.id, "approve", "").await,
        StatusCode::SEE_OTHER
    );
    let out = run.await.unwrap();
    assert_eq!(client::ok(&out), "5\n1");
    let told = String::from_utf8_lossy(&out.stderr);
    assert!(
        told.contains("twokey holds this statement for review: DELETE is held for review")
            && told.contains(&format!("/held/{}", h.id))
            && told.contains("approved by bob@example.com (looks right), carol@example.com"),
        "{told}"
    );
    assert_eq!(victims(&s), "2,3,4,5");
    assert_eq!(status(&s, &h.id).await, HeldStatus::Ran);
    // Decided and run: no further decision counts.
    assert_eq!(
        decide(&s, "carol@example.com", &h.id, "deny", "").await,
        StatusCode::CONFLICT
    );
    let actions = s.app.audit_actions().await;
    let held_events: Vec<&str> = actions
        .iter()
        .map(String::as_str)
        .filter(|a| a.starts_with("held."))
        .collect();
    assert_eq!(
        held_events,
        [
            "held.filed",
            "held.approval",
            "held.approval",
            "held.approved",
            "held.ran"
        ]
    );
    // The audit says what was held by its hash and parse, never its text.
    let events = twokey::audit::page(&s.app.state().db, 0, 100_000)
        .await
        .unwrap();
    let filed_event = events.iter().find(|e| e.action == "held.filed").unwrap();
    assert!(filed_event.details.contains(&h.action_sha256));
    assert!(
        !filed_event.details.contains("where id"),
        "{}",
        filed_event.details
    );
    s.app.assert_chain_ok().await;
    // Afterwards the page says what became of it, and offers no decision.
    let (_, page) = s
        .app
        .browser(CAROL)
        .await
        .get(&format!("/held/{}", h.id))
        .await;
    assert!(
        page.contains("status-ran")
            && page.contains("<code>delete from victims where id = 1 returning id</code> <span class=\"muted\">DELETE 1</span>")
            && !page.contains("id=\"approve\""),
        "{page}"
    );
}

#[tokio::test]
async fn a_denied_or_undecided_statement_never_runs_and_the_session_goes_on() {
    let s = setup(1).await;
    let pw = password(&s).await;
    let run = psql(&s, &pw, "delete from victims where id = 2");
    let h = filed(&s, &[]).await;
    // The approvers are told by mail, without the statement itself.
    twokey::notify::deliver_due(s.app.state()).await.unwrap();
    let mail = twokey::store::dev_mailbox(&s.app.state().db, 10)
        .await
        .unwrap();
    let about: Vec<_> = mail
        .iter()
        .filter(|m| m.body_text.contains(&format!("/held/{}", h.id)))
        .collect();
    let mut to: Vec<&str> = about.iter().map(|m| m.recipient.as_str()).collect();
    to.sort();
    assert_eq!(to, [BOB, CAROL], "the role's approvers, never its sender");
    assert!(
        about[0]
            .subject
            .starts_with("Review a statement by alice@example.com on demo-db"),
        "{}",
        about[0].subject
    );
    assert!(
        about
            .iter()
            .all(|m| !m.body_text.contains("where id") && !m.body_html.contains("where id"))
    );

    assert_eq!(
        decide(&s, BOB, &h.id, "deny", "not during the freeze").await,
        StatusCode::SEE_OTHER
    );
    let out = run.await.unwrap();
    let told = client::refused(&out);
    assert!(
        told.contains("twokey refused this statement (review): denied by bob@example.com (not during the freeze)")
            && told.contains("it did not run"),
        "{told}"
    );
    assert_eq!(victims(&s), "1,2,3,4,5");

    // Ctrl-C in psql (its CancelRequest) withdraws the held statement.
    let child = s
        .psql_cmd(&pw, &["-c", "delete from victims where id = 2"])
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let h_cancelled = filed(&s, &[&h.id]).await;
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let told = client::refused(&client::wait(child).await);
    assert!(
        told.contains("(review): cancelled by you while it waited"),
        "{told}"
    );
    assert_eq!(status(&s, &h_cancelled.id).await, HeldStatus::Withdrawn);
    assert_eq!(victims(&s), "1,2,3,4,5");

    // Not decided within the role's wait (10 minutes): refused, and the same
    // connection goes on.
    let mut conn: sqlx::postgres::PgConnection =
        sqlx::ConnectOptions::connect(&s.sqlx(&pw)).await.unwrap();
    let waiting = tokio::spawn(async move {
        let r = sqlx::query("delete from victims where id = $1")
            .bind(3i32)
            .execute(&mut conn)
            .await;
        (r.map(|d| d.rows_affected()), conn)
    });
    let h2 = filed(&s, &[&h.id, &h_cancelled.id]).await;
    assert_eq!(
        h2.params(),
        [Some("3".to_string())],
        "the extended protocol's parameters"
    );
    s.app.clock.advance(chrono::Duration::minutes(11));
    let (r, mut conn) = waiting.await.unwrap();
    let err = r.unwrap_err().to_string();
    assert!(err.contains("(review): not approved by"), "{err}");
    assert_eq!(status(&s, &h2.id).await, HeldStatus::Expired);
    assert_eq!(
        decide(&s, BOB, &h2.id, "approve", "").await,
        StatusCode::CONFLICT,
        "too late"
    );
    let n: i64 = sqlx::query_scalar("select count(*) from victims")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 5);

    // The same statement through the extended protocol, approved: it runs with its
    // parameters, once.
    let waiting = tokio::spawn(async move {
        let r = sqlx::query("delete from victims where id = $1")
            .bind(4i32)
            .execute(&mut conn)
            .await;
        (r.map(|d| d.rows_affected()), conn)
    });
    let h3 = filed(&s, &[&h.id, &h_cancelled.id, &h2.id]).await;
    assert_eq!(
        decide(&s, CAROL, &h3.id, "approve", "").await,
        StatusCode::SEE_OTHER
    );
    let (r, mut conn) = waiting.await.unwrap();
    assert_eq!(r.unwrap(), 1);
    assert_eq!(victims(&s), "1,2,3,5");
    // What is not held still works as usual where statements are held: COPY in, and
    // a prepared statement bound and run again and again.
    let mut copy = conn.copy_in_raw("copy victims from stdin").await.unwrap();
    copy.send(b"6\n7\n".as_slice()).await.unwrap();
    assert_eq!(copy.finish().await.unwrap(), 2);
    for i in 0..20 {
        let n: i64 = sqlx::query_scalar("select count(*) + $1 from victims")
            .bind(i)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 6 + i);
    }
    assert_eq!(victims(&s), "1,2,3,5,6,7");
    // A held DROP: never by its sender, then once another approves.
    let run = psql(&s, &pw, "drop table victims");
    let h4 = filed(&s, &[&h.id, &h_cancelled.id, &h2.id, &h3.id]).await;
    assert_eq!(h4.parse().kinds, ["DROP TABLE"]);
    assert_eq!(
        decide(&s, ALICE, &h4.id, "approve", "").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(victims(&s), "1,2,3,5,6,7", "still there");
    assert_eq!(
        decide(&s, BOB, &h4.id, "approve", "").await,
        StatusCode::SEE_OTHER
    );
    client::ok(&run.await.unwrap());
    assert_eq!(
        s.cluster
            .admin("app", "SELECT to_regclass('victims') IS NULL")
            .trim(),
        "t"
    );
    let actions = s.app.audit_actions().await;
    assert!(actions.contains(&"held.denied".to_string()));
    assert!(actions.contains(&"held.expired".to_string()));
    s.app.assert_chain_ok().await;
}

#[tokio::test]
async fn a_statement_held_when_its_grant_is_revoked_is_withdrawn_and_never_runs() {
    let s = setup(1).await;
    let pw = password(&s).await;
    let run = psql(&s, &pw, "select * from payments");
    let h = filed(&s, &[]).await;
    assert_eq!(
        h.why,
        "payments is held for review (review_tables = \"payments\")"
    );
    // The Policy page says what is held, for how long and by whom.
    let (_, policy) = s.app.browser(ALICE).await.get("/policy").await;
    assert!(
        policy.contains("held for review (runs once approved): DELETE")
            && policy.contains("every statement naming these tables held for review: payments")
            && policy
                .contains("a held statement waits up to 10m for 1 of sre-leads (never its sender)"),
        "{policy}"
    );
    let request_id = h.request_id.clone();
    let (st, r) = s.app.api(BOB).await.act(&request_id, "revoke").await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let told = client::refused(&run.await.unwrap());
    assert!(told.contains("terminating connection"), "{told}");
    eventually("the held statement to be withdrawn", async || {
        status(&s, &h.id).await == HeldStatus::Withdrawn
    })
    .await;
    assert_eq!(
        decide(&s, BOB, &h.id, "approve", "").await,
        StatusCode::CONFLICT
    );
    let pw = password(&s).await;
    // The client killed while its statement waits: withdrawn, never run.
    let child = s
        .psql_cmd(&pw, &["-c", "delete from victims where id = 3"])
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let gone = filed(&s, &[&h.id]).await;
    // A GET of the action's address decides nothing.
    let bob = s.app.browser(BOB).await;
    let (st, _) = bob.get(&format!("/held/{}/approve", gone.id)).await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(status(&s, &gone.id).await, HeldStatus::Pending);
    assert!(
        std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success()
    );
    let _ = client::wait(child).await;
    eventually("the held statement to be withdrawn", async || {
        status(&s, &gone.id).await == HeldStatus::Withdrawn
    })
    .await;
    assert_eq!(victims(&s), "1,2,3,4,5");
    // PREPARE would keep a held statement to run later, unheld: refused.
    let told = client::refused(
        &s.psql(&pw, "prepare p as delete from victims where id = 1")
            .await,
    );
    assert!(
        told.contains("(review): PREPARE of a statement that is held"),
        "{told}"
    );
    // Nor prepared through the protocol (Parse, Describe, Sync: not run) and run by
    // SQL's EXECUTE, which names it: refused, whatever it names.
    let mut conn: sqlx::postgres::PgConnection =
        sqlx::ConnectOptions::connect(&s.sqlx(&pw)).await.unwrap();
    sqlx::Executor::prepare(&mut conn, "delete from victims where id = $1")
        .await
        .unwrap();
    for sql in [
        "execute sqlx_s_1(1)",
        "explain analyze execute sqlx_s_1(1)",
        "create table copied as execute sqlx_s_1(1)",
    ] {
        let err = sqlx::raw_sql(sql).execute(&mut conn).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("(review): EXECUTE of a prepared statement is refused"),
            "{sql}: {err}"
        );
    }
    assert_eq!(victims(&s), "1,2,3,4,5");
}

/// Every button of the held-action pages, clicked in headless Chromium by an approver,
/// with its effect on the waiting psql checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_clicks_approve_and_deny_in_chromium_and_psql_gets_the_outcome() {
    use common::webdriver::Browser;
    let s = setup(1).await;
    let pw = password(&s).await;
    let base = s.app.server.url();
    let run = psql(&s, &pw, "delete from victims where id = 5");
    let h = filed(&s, &[]).await;

    let b = Browser::start().await;
    b.goto(&format!("{base}/login")).await;
    b.click_and_wait(&format!("button[id='login-{BOB}']")).await;
    b.click_and_wait("nav a[href='/held']").await;
    assert!(
        b.text("#waiting").await.contains("DELETE on victims"),
        "{}",
        b.source().await
    );
    b.click_and_wait("#waiting a.held-link").await;
    assert!(b.url().await.ends_with(&format!("/held/{}", h.id)));
    assert_eq!(b.text("#action").await, "delete from victims where id = 5");
    assert_eq!(b.text("#status").await, "pending");
    b.fill("#approve-comment", "go ahead").await;
    b.click_and_wait("#approve").await;
    assert!(b.url().await.ends_with(&format!("/held/{}", h.id)));
    let shown = b.text("#status").await;
    assert!(shown == "approved" || shown == "ran", "{shown}");
    assert!(
        b.text("#decisions")
            .await
            .contains("approved by bob@example.com")
    );
    assert!(!b.exists("#approve").await, "decided: no more buttons");
    client::ok(&run.await.unwrap());
    assert_eq!(victims(&s), "1,2,3,4");

    let run = psql(&s, &pw, "delete from victims where id = 4");
    let h2 = filed(&s, &[&h.id]).await;
    b.goto(&format!("{base}/held")).await;
    assert!(
        b.exists("#others").await,
        "the one that ran is listed below"
    );
    b.click_and_wait("#waiting a.held-link").await;
    assert!(b.url().await.ends_with(&format!("/held/{}", h2.id)));
    b.fill("#deny-comment", "use the batch job").await;
    b.click_and_wait("#deny").await;
    assert_eq!(b.text("#status").await, "denied");
    let told = client::refused(&run.await.unwrap());
    assert!(
        told.contains("denied by bob@example.com (use the batch job)"),
        "{told}"
    );
    assert_eq!(victims(&s), "1,2,3,4");
    b.goto(&format!("{base}/held")).await;
    assert!(b.exists("#nothing-waiting").await);
    b.quit().await;
}

/// A held statement twokey cannot file (its store refuses the write) never runs: the
/// client is told it did not run and to try again, and the session goes on.
#[tokio::test]
async fn a_statement_twokey_cannot_file_never_runs_and_the_session_goes_on() {
    let s = setup(1).await;
    let pw = password(&s).await;
    let db = &s.app.state().db;
    sqlx::raw_sql(
        "CREATE TRIGGER no_room BEFORE INSERT ON held_actions
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
    )
    .execute(db)
    .await
    .unwrap();
    let mut conn: sqlx::PgConnection = sqlx::ConnectOptions::connect(&s.sqlx(&pw)).await.unwrap();
    let e = sqlx::raw_sql("delete from victims where id = 2")
        .execute(&mut conn)
        .await
        .unwrap_err();
    let sqlx::Error::Database(e) = e else {
        panic!("not the relay's refusal: {e}")
    };
    assert_eq!(e.code().as_deref(), Some("42501"));
    assert_eq!(
        e.message(),
        "twokey refused this statement (review): twokey could not file it for review right now"
    );
    let pg = e.downcast_ref::<sqlx::postgres::PgDatabaseError>();
    assert_eq!(pg.hint(), Some("it did not run; try again in a moment"));
    let still: String = sqlx::query_scalar("select 'still here'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(still, "still here", "the session goes on");
    assert_eq!(victims(&s), "1,2,3,4,5");
    assert!(held(&s).await.is_empty());

    // Filed once the store takes it again.
    sqlx::raw_sql("DROP TRIGGER no_room")
        .execute(db)
        .await
        .unwrap();
    let run = psql(&s, &pw, "delete from victims where id = 2");
    let h = filed(&s, &[]).await;
    assert_eq!(
        decide(&s, BOB, &h.id, "approve", "").await,
        StatusCode::SEE_OTHER
    );
    client::ok(&run.await.unwrap());
    assert_eq!(victims(&s), "1,3,4,5");
    s.app.assert_chain_ok().await;
}

/// A reload that denies a statement while it waits has the last word: approved after,
/// it is refused by the new rule, withdrawn, and never recorded as run.
#[tokio::test]
async fn a_statement_the_rules_deny_while_it_waits_never_runs_once_approved() {
    let s = setup(1).await;
    let pw = password(&s).await;
    let run = psql(&s, &pw, "delete from victims where id = 2");
    let h = filed(&s, &[]).await;
    s.app
        .reload_roles("demo-db", |roles| roles[0].sql.deny.push("DELETE".into()))
        .await;
    assert_eq!(
        decide(&s, BOB, &h.id, "approve", "").await,
        StatusCode::SEE_OTHER
    );
    let told = client::refused(&run.await.unwrap());
    assert!(
        told.contains("twokey refused this statement (deny)"),
        "{told}"
    );
    assert_eq!(victims(&s), "1,2,3,4,5");
    assert_eq!(status(&s, &h.id).await, HeldStatus::Withdrawn);
    assert!(!s.app.audit_actions().await.iter().any(|a| a == "held.ran"));
    s.app.assert_chain_ok().await;
}
