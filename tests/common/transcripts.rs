//! A PostgreSQL session made without the relay, as the relay makes one: a grant (alice
//! files `demo-db/read`, bob approves), the session's row and `session.started` event
//! (`store::insert_session`), a transcript written with `recording::transcript`, and
//! its close through the relay's own `lifecycle::close` (row, hash, `session.ended`).
//! For testing the Sessions pages; never a stand-in for the relay's own tests.

use reqwest::StatusCode;
use twokey::recording::transcript::{
    Entry, FORMAT, Header, Protocol, Statement, StatementError, Transcript,
};

use super::TestApp;

pub const ALICE: &str = "alice@example.com";

/// A dev user in `engineers` who holds nothing: may not see alice's sessions.
pub const EVE: &str = "eve@example.com";

/// Adds [`EVE`] to the demo sign-in.
pub fn with_eve(c: &mut twokey::config::Config) {
    c.auth.dev_users.push(twokey::config::DevUser {
        email: EVE.into(),
        name: None,
        groups: vec!["engineers".into()],
    });
}

/// A session made by [`pg_session`].
pub struct PgSession {
    pub id: String,
    pub grant_id: String,
    /// The transcript's path.
    pub path: std::path::PathBuf,
    /// The SHA-256 the audit chain recorded.
    pub sha256: String,
}

/// alice's live grant on `demo-db/read`, approved by bob through the API.
pub async fn grant(app: &TestApp) -> twokey::store::GrantRow {
    let req = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    let (s, r) = app.api("bob@example.com").await.act(&req, "approve").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let mut conn = app.state().db.acquire().await.unwrap();
    twokey::store::grant_for_request(&mut conn, &req)
        .await
        .unwrap()
        .expect("a grant")
}

/// Opens a session under `g` for `protocol` with its row and `session.started`, as
/// `relay::lifecycle::open` does.
pub async fn open(
    app: &TestApp,
    g: &twokey::store::GrantRow,
    id: &str,
    protocol: &str,
    recording: &str,
) {
    let state = app.state();
    let now = state.now_ms();
    let mut tx = twokey::store::begin_write(&state.db).await.unwrap();
    twokey::store::insert_session(
        &mut tx,
        &twokey::store::NewSession {
            id,
            grant_id: &g.id,
            user_email: &g.user_email,
            resource: &g.resource,
            peer: Some("127.0.0.1"),
            started_at: now,
            recording,
            relay_instance: "test",
            protocol,
        },
    )
    .await
    .unwrap();
    twokey::audit::append(
        &mut tx,
        now,
        &twokey::audit::NewEvent {
            actor: &g.user_email,
            action: "session.started",
            subject: &g.id,
            details: serde_json::json!({ "session_id": id, "protocol": protocol }),
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// A closed PostgreSQL session of alice's on `demo-db` whose transcript holds
/// `entries`, hashed into the audit chain by the relay's own close.
pub async fn pg_session(app: &TestApp, entries: Vec<Entry>) -> PgSession {
    let g = grant(app).await;
    pg_session_under(app, &g, entries).await
}

/// The same under a grant already made.
pub async fn pg_session_under(
    app: &TestApp,
    g: &twokey::store::GrantRow,
    entries: Vec<Entry>,
) -> PgSession {
    let state = app.state();
    let dir = state.config().server.data_dir.join("recordings");
    // The id is chosen before the file, as the relay does; the row names the file.
    let id = uuid::Uuid::new_v4().to_string();
    let path = dir.join(format!("{id}.jsonl"));
    let header = Header {
        format: FORMAT.into(),
        version: 1,
        timestamp: state.clock.now().timestamp(),
        session: id.clone(),
        resource: g.resource.clone(),
        user: g.user_email.clone(),
        database: "app".into(),
        rows_cap: 2,
    };
    let mut t = Transcript::create(&dir, &header, 1 << 20).unwrap();
    for e in entries {
        t.write(e);
    }
    let done = t.finish().unwrap();
    assert_eq!(std::path::Path::new(&done.path), path);
    let sha256 = done.sha256.clone();
    open(app, g, &id, "postgres", &done.path).await;
    twokey::relay::lifecycle::close(
        state,
        twokey::relay::lifecycle::Closing {
            id: &id,
            grant: g,
            reason: "closed",
            bytes_in: 1234,
            bytes_out: 5678,
            recording: Ok(done),
            recording_path: &path.display().to_string(),
        },
    )
    .await
    .unwrap();
    PgSession {
        id,
        grant_id: g.id.clone(),
        path,
        sha256,
    }
}

/// A closed SSH session under `g` whose asciicast recording holds `output`, closed by
/// the relay's own `lifecycle::close`; returns its id and the recording's path.
pub async fn ssh_session(
    app: &TestApp,
    g: &twokey::store::GrantRow,
    output: &str,
) -> (String, std::path::PathBuf) {
    let state = app.state();
    let id = uuid::Uuid::new_v4().to_string();
    let dir = state.config().server.data_dir.join("recordings");
    let mut r =
        twokey::recording::Recorder::create(&dir, &id, 1 << 20, state.clock.now().timestamp())
            .unwrap();
    r.output(output.as_bytes());
    let done = r.finish().unwrap();
    let path = std::path::PathBuf::from(&done.path);
    open(app, g, &id, "ssh", &done.path).await;
    twokey::relay::lifecycle::close(
        state,
        twokey::relay::lifecycle::Closing {
            id: &id,
            grant: g,
            reason: "closed",
            bytes_in: 1,
            bytes_out: 2,
            recording: Ok(done),
            recording_path: &path.display().to_string(),
        },
    )
    .await
    .unwrap();
    (id, path)
}

/// A statement that completed with `tag`.
pub fn ok(t: f64, protocol: Protocol, sql: &str, tag: &str) -> Entry {
    Entry::Statement(Box::new(Statement {
        t,
        protocol: Some(protocol),
        sql: sql.into(),
        ms: 0.42,
        tag: Some(tag.into()),
        ..Default::default()
    }))
}

/// A statement with a result: `columns`, the rows kept, and how many it had.
pub fn rows(sql: &str, columns: &[&str], kept: Vec<Vec<Option<&str>>>, row_count: u64) -> Entry {
    Entry::Statement(Box::new(Statement {
        t: 1.5,
        protocol: Some(Protocol::Simple),
        sql: sql.into(),
        ms: 3.0,
        columns: columns.iter().map(|c| c.to_string()).collect(),
        rows: kept
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.map(String::from)).collect())
            .collect(),
        row_count,
        tag: Some(format!("SELECT {row_count}")),
        ..Default::default()
    }))
}

/// A statement the server refused with SQLSTATE `code`.
pub fn failed(sql: &str, code: &str, message: &str) -> Entry {
    Entry::Statement(Box::new(Statement {
        t: 2.0,
        protocol: Some(Protocol::Simple),
        sql: sql.into(),
        ms: 0.3,
        error: Some(StatementError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
        }),
        ..Default::default()
    }))
}

/// A session with one of everything the page shows: an extended statement with a
/// NULL parameter, a result with more rows than kept, an error, a skipped and a
/// suspended statement, a NOTIFY and a note.
pub fn a_bit_of_everything() -> Vec<Entry> {
    vec![
        Entry::Statement(Box::new(Statement {
            t: 0.25,
            protocol: Some(Protocol::Extended),
            sql: "insert into accounts (name, note) values ($1, $2)".into(),
            statement: Some("ins_account".into()),
            params: vec![Some("Zoë".into()), None],
            ms: 1.25,
            tag: Some("INSERT 0 1".into()),
            ..Default::default()
        })),
        rows(
            "select id, name, note from accounts order by id",
            &["id", "name", "note"],
            vec![
                vec![Some("1"), Some("alpha-row"), None],
                vec![Some("2"), Some("beta-row"), Some("n")],
            ],
            5,
        ),
        failed(
            "select * from no_such_table",
            "42P01",
            "relation \"no_such_table\" does not exist",
        ),
        Entry::Statement(Box::new(Statement {
            t: 2.1,
            protocol: Some(Protocol::Extended),
            sql: "select 'after the error'".into(),
            skipped: true,
            ..Default::default()
        })),
        Entry::Statement(Box::new(Statement {
            t: 2.2,
            protocol: Some(Protocol::Extended),
            sql: "select n from generate_series(1, 100) n".into(),
            columns: vec!["n".into()],
            rows: vec![vec![Some("1".into())], vec![Some("2".into())]],
            row_count: 10,
            suspended: true,
            ..Default::default()
        })),
        Entry::Notification {
            t: 3.0,
            channel: "jobs".into(),
            payload: "job-42-done".into(),
        },
        Entry::Note {
            t: 4.0,
            text: "session ended: grant revoked".into(),
        },
    ]
}
