//! The Sessions pages for PostgreSQL sessions, over HTTP: listed beside SSH ones with
//! their protocol, a transcript rendered statement by statement with its hash checked
//! against the audit chain, escaped, shown (not a 500) when damaged, downloadable by
//! its viewers only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::transcripts::{self, ALICE, EVE, a_bit_of_everything, failed, rows, with_eve};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_DISPOSITION, CONTENT_TYPE};

/// The text between `<li ... id="stmt-N">` and its `</li>`.
fn card(html: &str, n: usize) -> &str {
    let start = html
        .find(&format!("id=\"stmt-{n}\""))
        .unwrap_or_else(|| panic!("no statement {n}: {html}"));
    let end = html[start..].find("</li>\n").unwrap() + start;
    &html[start..end]
}

#[tokio::test]
async fn a_database_session_is_listed_beside_ssh_ones_and_its_page_shows_every_statement() {
    let app = common::start().await;
    let g = transcripts::grant(&app).await;
    let ssh_id = uuid::Uuid::new_v4().to_string();
    transcripts::open(&app, &g, &ssh_id, "ssh", "/nonexistent.cast").await;
    let pg = transcripts::pg_session_under(&app, &g, a_bit_of_everything()).await;

    let alice = app.browser(ALICE).await;
    let (status, list) = alice.get("/sessions").await;
    assert_eq!(status, StatusCode::OK);
    let row = |id: &str| {
        let start = list.find(&format!("id=\"session-{id}\"")).unwrap();
        list[start..start + list[start..].find("</tr>").unwrap()].to_string()
    };
    let pg_row = row(&pg.id);
    assert!(pg_row.contains(">PostgreSQL<"), "{pg_row}");
    assert!(pg_row.contains(&format!("href=\"/sessions/{}\">transcript<", pg.id)));
    let ssh_row = row(&ssh_id);
    assert!(
        ssh_row.contains(">SSH<") && ssh_row.contains(">replay<"),
        "{ssh_row}"
    );

    let (status, html) = alice.get(&format!("/sessions/{}", pg.id)).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    // Header facts.
    assert!(
        html.contains("id=\"session-who\">alice@example.com<"),
        "{html}"
    );
    assert!(html.contains("id=\"session-database\">app<"));
    assert!(html.contains("id=\"session-state\">ended: closed after"));
    assert!(html.contains("1234 / 5678"));
    assert!(html.contains("id=\"statement-count\">5<"));
    assert!(html.contains(&pg.sha256));
    assert!(html.contains("matches the audit chain (event "), "{html}");
    assert!(!html.contains("id=\"hash-alarm\""));
    // The statements in order.
    let first = card(&html, 1);
    for want in [
        "+0.250 s",
        "extended query",
        "<code>ins_account</code>",
        "insert into accounts (name, note) values ($1, $2)",
        "<code>Zoë</code>",
        "<span class=\"null\">NULL</span>",
        "1.25 ms",
        "<code class=\"tag\">INSERT 0 1</code>",
    ] {
        assert!(first.contains(want), "{want:?} not in {first}");
    }
    let second = card(&html, 2);
    for want in [
        "simple query",
        "<th>id</th><th>name</th><th>note</th>",
        "<td>alpha-row</td>",
        "<td>beta-row</td>",
        "5 rows",
        "3 more rows not kept",
    ] {
        assert!(second.contains(want), "{want:?} not in {second}");
    }
    let third = card(&html, 3);
    assert!(
        third.contains("<span class=\"sqlstate\">42P01</span> ERROR: relation"),
        "{third}"
    );
    assert!(card(&html, 4).contains(">skipped</span>"));
    let fifth = card(&html, 5);
    assert!(fifth.contains(">suspended</span>") && fifth.contains("8 more rows not kept"));
    assert!(html.find("id=\"stmt-1\"").unwrap() < html.find("id=\"stmt-5\"").unwrap());
    assert!(html.contains("NOTIFY <code>jobs</code>: <code>job-42-done</code>"));
    assert!(html.contains("twokey: session ended: grant revoked"));
    assert!(html.contains(&format!("href=\"/sessions/{}/transcript\"", pg.id)));
    // No player on a database session, and no script anywhere.
    assert!(!html.contains("<script"), "{html}");
}

#[tokio::test]
async fn who_may_not_see_the_session_gets_403_and_an_unknown_one_is_404() {
    let app = common::start_with(with_eve).await;
    let pg = transcripts::pg_session(
        &app,
        vec![rows(
            "select secret",
            &["s"],
            vec![vec![Some("hunter2")]],
            1,
        )],
    )
    .await;
    let page = format!("/sessions/{}", pg.id);
    let download = format!("{page}/transcript");

    let eve = app.browser(EVE).await;
    let (_, list) = eve.get("/sessions").await;
    assert!(!list.contains(&pg.id), "{list}");
    for path in [&page, &download] {
        let (status, body) = eve.get(path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert!(
            !body.contains("hunter2") && !body.contains("select secret"),
            "{body}"
        );
    }
    // The holder, an approver of the role and an admin may.
    for who in [ALICE, "bob@example.com", "dave@example.com"] {
        let b = app.browser(who).await;
        let (_, list) = b.get("/sessions").await;
        assert!(list.contains(&pg.id), "{who}");
        for path in [&page, &download] {
            let (status, body) = b.get(path).await;
            assert_eq!(status, StatusCode::OK, "{who} {path}");
            assert!(body.contains("hunter2"), "{who} {path}");
        }
    }
    for path in [
        "/sessions/no-such-session",
        "/sessions/no-such-session/transcript",
    ] {
        let (status, _) = eve.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    // Signed out: sent to sign in.
    let anon = common::Browser::new(app.server.url());
    let resp = anon.get_raw(&download).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn what_the_transcript_holds_is_escaped() {
    let app = common::start().await;
    let x = "<script>alert(1)</script>";
    let pg = transcripts::pg_session(
        &app,
        vec![
            rows(
                &format!("select '{x}' as \"<b>col</b>\""),
                &["<b>col</b>"],
                vec![vec![Some("<script>alert(2)</script>")]],
                1,
            ),
            failed("select 1", "XX000", "<img src=x onerror=alert(3)>"),
            twokey::recording::transcript::Entry::Notification {
                t: 1.0,
                channel: "<i>c</i>".into(),
                payload: "<script>alert(4)</script>".into(),
            },
        ],
    )
    .await;
    let (status, html) = app
        .browser(ALICE)
        .await
        .get(&format!("/sessions/{}", pg.id))
        .await;
    assert_eq!(status, StatusCode::OK);
    for raw in ["<script>", "<b>col</b>", "<img src=x", "<i>c</i>"] {
        assert!(
            !html.contains(raw),
            "{raw:?} reached the page unescaped: {html}"
        );
    }
    for n in [1, 2, 4] {
        let escaped = format!("&#60;script&#62;alert({n})");
        let escaped2 = format!("&lt;script&gt;alert({n})");
        assert!(
            html.contains(&escaped) || html.contains(&escaped2),
            "alert({n}) not shown escaped: {html}"
        );
    }
    assert!(html.contains("&#60;img src=x") || html.contains("&lt;img src=x"));
}

#[tokio::test]
async fn a_damaged_transcript_is_shown_with_its_error_and_the_hash_mismatch() {
    let app = common::start().await;
    let alice = app.browser(ALICE).await;

    // A line appended after the close: the page says which line and that the hash
    // does not match, with the recorded hash beside the one found.
    let pg = transcripts::pg_session(&app, a_bit_of_everything()).await;
    let mut text = std::fs::read_to_string(&pg.path).unwrap();
    text.push_str("{\"type\":\"statement\",\"sql\": not json\n");
    std::fs::write(&pg.path, &text).unwrap();
    let (status, html) = alice.get(&format!("/sessions/{}", pg.id)).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains("id=\"read-error\""), "{html}");
    assert!(html.contains("transcript line 9"), "{html}");
    assert!(html.contains("id=\"hash-alarm\""));
    assert!(html.contains("DOES NOT MATCH the audit chain"));
    assert!(html.contains(&format!("id=\"hash-recorded\">{}<", pg.sha256)));

    // Edited but still valid JSON: shown as found, under the warning.
    let pg = transcripts::pg_session(&app, a_bit_of_everything()).await;
    let text = std::fs::read_to_string(&pg.path)
        .unwrap()
        .replace("alpha-row", "forged-row");
    std::fs::write(&pg.path, &text).unwrap();
    let (status, html) = alice.get(&format!("/sessions/{}", pg.id)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("id=\"hash-alarm\"") && html.contains("DOES NOT MATCH"));
    assert!(html.contains("<td>forged-row</td>"), "{html}");
    assert!(!html.contains("id=\"read-error\""));

    // Gone from disk: the page still answers, and says so; the download is 404.
    let pg = transcripts::pg_session(&app, a_bit_of_everything()).await;
    std::fs::remove_file(&pg.path).unwrap();
    let (status, html) = alice.get(&format!("/sessions/{}", pg.id)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("id=\"read-error\"") && html.contains("No such file"),
        "{html}"
    );
    assert!(html.contains("id=\"hash-alarm\""));
    let (status, _) = alice.get(&format!("/sessions/{}/transcript", pg.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // An untouched one next to them has no alarm.
    let pg = transcripts::pg_session(&app, a_bit_of_everything()).await;
    let (_, html) = alice.get(&format!("/sessions/{}", pg.id)).await;
    assert!(!html.contains("id=\"hash-alarm\"") && !html.contains("id=\"read-error\""));
}

#[tokio::test]
async fn the_transcript_downloads_as_the_file_it_is() {
    let app = common::start().await;
    let pg = transcripts::pg_session(&app, a_bit_of_everything()).await;
    let alice = app.browser(ALICE).await;
    let resp = alice
        .get_raw(&format!("/sessions/{}/transcript", pg.id))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "application/x-ndjson");
    assert_eq!(
        resp.headers()[CONTENT_DISPOSITION],
        format!("attachment; filename=\"{}.jsonl\"", pg.id).as_str()
    );
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.as_ref(), std::fs::read(&pg.path).unwrap().as_slice());
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&body)), pg.sha256);
    // A database session has no terminal recording, and an SSH one no transcript.
    let (status, _) = alice.get(&format!("/sessions/{}/cast", pg.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let g = transcripts::grant(&app).await;
    let ssh_id = uuid::Uuid::new_v4().to_string();
    transcripts::open(&app, &g, &ssh_id, "ssh", "/nonexistent.cast").await;
    let (status, _) = alice.get(&format!("/sessions/{ssh_id}/transcript")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.assert_chain_ok().await;
}

#[tokio::test]
async fn a_long_transcript_shows_its_first_entries_and_counts_the_rest() {
    let app = common::start().await;
    let n = twokey::web::db_session::MAX_SHOWN + 3;
    let entries = (0..n)
        .map(|i| {
            transcripts::ok(
                i as f64,
                twokey::recording::transcript::Protocol::Simple,
                &format!("select {i}"),
                "SELECT 1",
            )
        })
        .collect();
    let pg = transcripts::pg_session(&app, entries).await;
    let (status, html) = app
        .browser(ALICE)
        .await
        .get(&format!("/sessions/{}", pg.id))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(&format!("id=\"statement-count\">{n}<")));
    let last = twokey::web::db_session::MAX_SHOWN;
    assert!(html.contains(&format!("id=\"stmt-{last}\"")));
    assert!(!html.contains(&format!("id=\"stmt-{}\"", last + 1)));
    assert!(
        html.contains("id=\"not-shown\">3 more entries are not shown here"),
        "{}",
        &html[html.len() - 500..]
    );
}

/// The row's hash edited, or another session's transcript put in this one's place: each
/// is flagged though the file itself is intact.
#[tokio::test]
async fn an_edited_row_or_a_swapped_file_is_flagged() {
    let app = common::start().await;
    let alice = app.browser(ALICE).await;
    let pg = transcripts::pg_session(&app, a_bit_of_everything()).await;
    sqlx::query("UPDATE relay_sessions SET recording_sha256 = ? WHERE id = ?")
        .bind("0".repeat(64))
        .bind(&pg.id)
        .execute(&app.state().db)
        .await
        .unwrap();
    let (_, html) = alice.get(&format!("/sessions/{}", pg.id)).await;
    assert!(html.contains("id=\"hash-alarm\""), "{html}");
    assert!(
        html.contains("matches the audit chain, but the session")
            && html.contains("row was changed"),
        "{html}"
    );

    let a = transcripts::pg_session(&app, a_bit_of_everything()).await;
    let b = transcripts::pg_session(&app, vec![failed("select 1", "42601", "x")]).await;
    std::fs::copy(&b.path, &a.path).unwrap();
    let (status, html) = alice.get(&format!("/sessions/{}", a.id)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("id=\"hash-alarm\""));
    let at = html
        .find("id=\"header-mismatch\"")
        .expect("a header warning");
    assert!(
        html[at..at + 200].contains(&format!("session {}", b.id)),
        "{html}"
    );

    // A session ended in the store with no session.ended in the chain: nothing vouches
    // for its file.
    let g = transcripts::grant(&app).await;
    let id = uuid::Uuid::new_v4().to_string();
    let path = a.path.with_file_name(format!("{id}.jsonl"));
    std::fs::copy(&b.path, &path).unwrap();
    transcripts::open(&app, &g, &id, "postgres", &path.display().to_string()).await;
    let mut conn = app.state().db.acquire().await.unwrap();
    let ended = twokey::store::end_session(
        &mut conn,
        &twokey::store::EndedSession {
            id: &id,
            ended_at: app.state().now_ms(),
            reason: "closed",
            bytes_in: 0,
            bytes_out: 0,
            recording_bytes: 0,
            recording_sha256: &b.sha256,
            recording_truncated: false,
            recording_failed: false,
            masked_inputs: 0,
        },
    )
    .await
    .unwrap();
    assert!(ended);
    let (status, html) = alice.get(&format!("/sessions/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("id=\"hash-alarm\""), "{html}");
    assert!(
        html.contains("no session.ended event for this session"),
        "{html}"
    );
}

/// The SSH replay page shows the same check of its recording against the chain.
#[tokio::test]
async fn the_ssh_page_checks_its_recording_against_the_audit_chain_too() {
    let app = common::start().await;
    let g = transcripts::grant(&app).await;
    let (id, path) = transcripts::ssh_session(&app, &g, "hello from the shell\r\n").await;
    let alice = app.browser(ALICE).await;
    let (status, html) = alice.get(&format!("/sessions/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("matches the audit chain (event "), "{html}");
    assert!(!html.contains("id=\"hash-alarm\""));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("hello", "HELLO");
    std::fs::write(&path, text).unwrap();
    let (status, html) = alice.get(&format!("/sessions/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("id=\"hash-alarm\"") && html.contains("DOES NOT MATCH the audit chain"),
        "{html}"
    );
}
