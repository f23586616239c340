//! The role's SQL rules on the data path, against a real PostgreSQL through the relay as
//! the README sets it up (TLS both sides, the non-superuser admin making the grant's
//! role). The grant's database role could do everything tried here: each attempt is
//! also run under a role with no rules, where PostgreSQL executes it (inside a
//! transaction rolled back), so a refusal is the relay's, not the server's permissions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::postgres::Version;
use common::psql::{self as client, eventually, ok, refused};
use common::relay_pg::{ALICE, BOB, Setup, relay_password, setup_on};
use reqwest::StatusCode;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Statement;
use sqlx::postgres::PgConnection;
use twokey::config::SqlPolicy;

/// The grant's database role: owns `victims`, reads `secrets`, may create in public.
fn writer_sql(version: Version) -> Vec<(&'static str, String)> {
    let admin_grant = match version {
        // On 15 CREATEROLE may grant any role that is not a superuser's.
        Version::Pg15 => String::new(),
        Version::Pg17 => {
            "GRANT writer TO twokey WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;".to_string()
        }
    };
    vec![
        (
            "postgres",
            format!("CREATE ROLE writer NOLOGIN; {admin_grant}"),
        ),
        (
            "app",
            "CREATE TABLE victims (id int); INSERT INTO victims SELECT generate_series(1, 5);
             ALTER TABLE victims OWNER TO writer;
             GRANT USAGE, CREATE ON SCHEMA public TO writer;
             GRANT SELECT ON items, secrets TO writer;
             CREATE SCHEMA shadow; CREATE TABLE shadow.items (id int, name text);
             INSERT INTO shadow.items VALUES (1, 'shadowed');
             GRANT USAGE ON SCHEMA shadow TO writer; GRANT SELECT ON shadow.items TO writer;
             CREATE FUNCTION public.bump() RETURNS int LANGUAGE sql
               AS 'INSERT INTO victims VALUES (100) RETURNING 1';
             ALTER FUNCTION public.bump() OWNER TO writer;"
                .to_string(),
        ),
    ]
}

/// demo-db with role `read` under `rules`, and role `open` (no rules at all) beside it,
/// both as `writer`.
async fn setup(version: Version, rules: SqlPolicy) -> Setup {
    let s = setup_on(version, move |c| {
        let db = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-db")
            .unwrap();
        db.roles[0].db_roles = vec!["writer".into()];
        db.roles[0].sql = rules;
        let mut open = db.roles[0].clone();
        open.name = "open".into();
        open.sql = SqlPolicy {
            require_where: false,
            allow_dynamic_sql: true,
            ..SqlPolicy::default()
        };
        db.roles.push(open);
    })
    .await;
    for (db, sql) in writer_sql(version) {
        s.cluster.admin(db, &sql);
    }
    s
}

/// Alice asks for `role` on demo-db, Bob approves; her relay password for it.
async fn password_for(s: &Setup, role: &str) -> String {
    let id = s
        .app
        .api(ALICE)
        .await
        .file("demo-db", role, "1h", None)
        .await;
    let (st, r) = s.app.api(BOB).await.act(&id, "approve").await;
    assert_eq!(st, StatusCode::OK, "{r}");
    // The relay checks a login against the user's newest relay password on the
    // resource; the test's clock stands still unless moved.
    s.app.clock.advance(chrono::Duration::seconds(1));
    relay_password(&s.app, &id).await
}

async fn connect(s: &Setup, password: &str) -> PgConnection {
    sqlx::ConnectOptions::connect(&s.sqlx(password))
        .await
        .unwrap()
}

/// The server's (or the relay's) error for a simple Query: (SQLSTATE, message).
async fn simple(conn: &mut PgConnection, sql: &str) -> Result<(), (String, String)> {
    sqlx::raw_sql(sql)
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(database_error)
}

#[track_caller]
fn database_error(e: sqlx::Error) -> (String, String) {
    match e {
        sqlx::Error::Database(d) => (
            d.code().map(|c| c.to_string()).unwrap_or_default(),
            d.message().to_string(),
        ),
        other => panic!("not an error from the server: {other}"),
    }
}

/// What the role without rules gets for `sql`: PostgreSQL runs it (rolled back), or
/// PostgreSQL itself refuses it, or the relay refuses it for every role.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Unruled {
    Runs,
    ServerRefuses,
    AlwaysRefused,
}

/// `(sql, rule the role with rules is refused by, what the role without rules gets)`.
const ATTEMPTS: &[(&str, &str, Unruled)] = &[
    // DROP, however it is spelled.
    ("drop table victims", "deny", Unruled::Runs),
    ("DROP TABLE victims", "deny", Unruled::Runs),
    ("dRoP tAbLe \"victims\"", "deny", Unruled::Runs),
    ("drop/* a comment */table/**/victims", "deny", Unruled::Runs),
    (
        "drop -- a line comment\n table victims",
        "deny",
        Unruled::Runs,
    ),
    ("drop table public.victims", "deny", Unruled::Runs),
    ("drop table U&\"\\0076ictims\"", "deny", Unruled::Runs),
    (
        "drop table if exists nothing_here, victims",
        "deny",
        Unruled::Runs,
    ),
    // Stacked behind something harmless.
    ("select 1; drop table victims", "deny", Unruled::Runs),
    ("select 1;; ;drop table victims;", "deny", Unruled::Runs),
    // A string that ends sooner than a regular expression thinks (standard strings:
    // a backslash is a plain character), and a dollar quote holding `$$`.
    (
        "select '\\'; drop table victims; --'",
        "deny",
        Unruled::Runs,
    ),
    (
        "select $a$ $$ $a$; drop table victims",
        "deny",
        Unruled::Runs,
    ),
    // A comment inside a keyword: PostgreSQL does not parse it either.
    ("dr/**/op table victims", "unparsed", Unruled::AlwaysRefused),
    ("truncate victims", "deny", Unruled::Runs),
    (
        "TRUNCATE ONLY public.victims RESTART IDENTITY",
        "deny",
        Unruled::Runs,
    ),
    (
        "alter table victims add column x int",
        "deny",
        Unruled::Runs,
    ),
    ("grant select on victims to public", "deny", Unruled::Runs),
    (
        "create function f() returns int language sql begin atomic select 1; end",
        "deny",
        Unruled::Runs,
    ),
    // DELETE and UPDATE without WHERE, however they are wrapped.
    ("delete from victims", "require_where", Unruled::Runs),
    (
        "DELETE FROM victims -- where id = 1",
        "require_where",
        Unruled::Runs,
    ),
    ("update victims set id = 0", "require_where", Unruled::Runs),
    (
        "with d as (delete from victims returning *) select count(*) from d",
        "require_where",
        Unruled::Runs,
    ),
    (
        "explain analyze delete from victims",
        "require_where",
        Unruled::Runs,
    ),
    (
        "select 1 where exists (select 1); update victims set id = id + 1",
        "require_where",
        Unruled::Runs,
    ),
    // SQL the parse cannot see into.
    (
        "do $$ begin execute 'drop table victims'; end $$",
        "dynamic SQL",
        Unruled::Runs,
    ),
    (
        "do language plpgsql $x$ begin execute E'dr\\x6fp table victims'; end $x$",
        "dynamic SQL",
        Unruled::Runs,
    ),
    (
        "create function g() returns int language sql as 'delete from victims; select 1'",
        "dynamic SQL",
        Unruled::Runs,
    ),
    (
        "select query_to_xml('select id from victims', true, true, '')",
        "dynamic SQL",
        Unruled::Runs,
    ),
    // A table refused wherever it is named.
    ("select * from secrets", "deny_tables", Unruled::Runs),
    ("SELECT v FROM \"secrets\"", "deny_tables", Unruled::Runs),
    ("select * from public.secrets", "deny_tables", Unruled::Runs),
    (
        "select * from U&\"secr\\0065ts\"",
        "deny_tables",
        Unruled::Runs,
    ),
    ("table secrets", "deny_tables", Unruled::Runs),
    (
        "select * from (select v from secrets) s",
        "deny_tables",
        Unruled::Runs,
    ),
    (
        "with s as (select v from secrets) select * from s",
        "deny_tables",
        Unruled::Runs,
    ),
    (
        "select (select v from secrets limit 1) as harmless",
        "deny_tables",
        Unruled::Runs,
    ),
    (
        "select name from items where name in (select v from secrets)",
        "deny_tables",
        Unruled::Runs,
    ),
    (
        "select * from items, lateral (select v from secrets) x",
        "deny_tables",
        Unruled::Runs,
    ),
    // A function refused wherever it is called.
    (
        "select pg_terminate_backend(0)",
        "deny_functions",
        Unruled::Runs,
    ),
    (
        "select PG_CATALOG.\"pg_terminate_backend\"(0)",
        "deny_functions",
        Unruled::Runs,
    ),
    (
        "select * from pg_terminate_backend(0)",
        "deny_functions",
        Unruled::Runs,
    ),
    (
        "select pg_read_file('/etc/hostname')",
        "deny_functions",
        Unruled::ServerRefuses,
    ),
    // COPY to a program or a file (the server's own permission refuses it too).
    (
        "copy victims to program 'id'",
        "deny",
        Unruled::ServerRefuses,
    ),
    (
        "copy victims from '/etc/hostname'",
        "deny",
        Unruled::ServerRefuses,
    ),
    // Leaving the grant's role, for every role.
    ("set role writer", "role escape", Unruled::AlwaysRefused),
    (
        "SET LOCAL ROLE writer",
        "role escape",
        Unruled::AlwaysRefused,
    ),
    (
        "set session authorization default",
        "role escape",
        Unruled::AlwaysRefused,
    ),
    ("reset role", "role escape", Unruled::AlwaysRefused),
    (
        "select set_config('role', 'writer', false)",
        "role escape",
        Unruled::AlwaysRefused,
    ),
    (
        "select set_config(lower('ROLE'), 'writer', false)",
        "role escape",
        Unruled::AlwaysRefused,
    ),
    (
        "alter role current_user set search_path = shadow",
        "role escape",
        Unruled::AlwaysRefused,
    ),
    // Changing how the server reads what the relay judged.
    (
        "set standard_conforming_strings = off",
        "parser safety",
        Unruled::AlwaysRefused,
    ),
    (
        "set client_encoding = 'SJIS'",
        "parser safety",
        Unruled::AlwaysRefused,
    ),
    ("set names 'GBK'", "parser safety", Unruled::AlwaysRefused),
    // Text the server's grammar refuses: refused, never passed on.
    ("selec 1", "unparsed", Unruled::AlwaysRefused),
    (
        "alter role x password 'canary-secret",
        "unparsed",
        Unruled::AlwaysRefused,
    ),
];

/// What the role with rules runs: the same words as above, where the server reads
/// them as something harmless.
const ADMITTED: &[&str] = &[
    "select count(*) from victims",
    "select E'\\'; drop table victims; --'",
    "select $$; drop table victims; $$",
    "select 'drop table victims'",
    "-- drop table victims\nselect 1",
    "select name from items where name = 'secrets'",
    "delete from victims where id = 99",
    "update victims set id = id where false",
    "set statement_timeout = 5000",
    "set search_path = public",
    "select set_config('application_name', 'x', false)",
];

fn rules() -> SqlPolicy {
    SqlPolicy {
        deny: [
            "DROP",
            "TRUNCATE",
            "ALTER",
            "GRANT",
            "CREATE FUNCTION",
            "COPY PROGRAM",
            "COPY FILE",
        ]
        .map(String::from)
        .to_vec(),
        deny_tables: vec!["secrets".into()],
        deny_functions: vec!["pg_read_file".into(), "pg_terminate_backend".into()],
        ..SqlPolicy::default()
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Every spelling of a refused statement that PostgreSQL would execute is refused with
/// its rule; the session goes on; nothing it tried happened; each refusal is audited
/// by rule and hash (never its text) and is in the transcript.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_refused_statement_is_refused_by_its_rule() {
    spellings(Version::Pg15).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_on_postgresql_17() {
    spellings(Version::Pg17).await
}

async fn spellings(version: Version) {
    let s = setup(version, rules()).await;
    // Without rules, PostgreSQL does as the table says.
    let mut open = connect(&s, &password_for(&s, "open").await).await;
    for &(sql, rule, unruled) in ATTEMPTS {
        simple(&mut open, "begin").await.unwrap();
        let got = simple(&mut open, sql).await;
        simple(&mut open, "rollback").await.unwrap();
        match (unruled, got) {
            (Unruled::Runs, Ok(())) => {}
            (Unruled::ServerRefuses, Err((_, m))) if !m.starts_with("twokey") => {}
            (Unruled::AlwaysRefused, Err((code, m))) if code == "42501" => {
                assert!(m.contains(&format!("({rule})")), "{sql}: {m}");
            }
            (_, got) => panic!("{sql} without rules: expected {unruled:?}, got {got:?}"),
        }
    }
    sqlx::Connection::close(open).await.unwrap();

    let pw = password_for(&s, "read").await;
    let mut conn = connect(&s, &pw).await;
    for &(sql, rule, _) in ATTEMPTS {
        let (code, message) = simple(&mut conn, sql)
            .await
            .expect_err(&format!("{sql} should be refused"));
        assert_eq!(code, "42501", "{sql}: {message}");
        assert!(
            message.starts_with(&format!("twokey refused this statement ({rule}): ")),
            "{sql}: {message}"
        );
    }
    for sql in ADMITTED {
        simple(&mut conn, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql} should run: {e:?}"));
    }
    // The server read the admitted strings as the relay did.
    let v: String = sqlx::query_scalar("select E'\\'; drop table victims; --'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "'; drop table victims; --");

    // The extended protocol: refused at Parse (named and unnamed statements), and the
    // session's prepared statements go on working.
    for (sql, rule) in [
        ("delete from victims", "require_where"),
        ("select v from secrets where v <> $1", "deny_tables"),
        ("drop table victims", "deny"),
    ] {
        let mut q = sqlx::query(sql);
        if sql.contains("$1") {
            q = q.bind("x");
        }
        let (code, m) = database_error(q.execute(&mut conn).await.unwrap_err());
        assert_eq!(code, "42501");
        assert!(m.contains(&format!("({rule})")), "{sql}: {m}");
    }
    let n: i64 = sqlx::query_scalar("select count(*) from victims where id > $1")
        .bind(0)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 5);

    // A refusal fails the transaction it is in, as the server's own error would.
    simple(&mut conn, "begin; insert into victims values (7)")
        .await
        .unwrap();
    simple(&mut conn, "truncate victims").await.unwrap_err();
    let (code, _) = simple(&mut conn, "select 1").await.unwrap_err();
    assert_eq!(code, "25P02", "the transaction is aborted");
    simple(&mut conn, "commit").await.unwrap();
    sqlx::Connection::close(conn).await.unwrap();

    // Nothing tried happened.
    assert_eq!(
        s.cluster
            .admin("app", "select count(*), sum(id) from victims"),
        "5|15"
    );
    assert_eq!(
        s.cluster.admin(
            "app",
            "select count(*) from pg_proc where proname in ('f', 'g')"
        ),
        "0"
    );

    // Audited by rule and hash, never by text; and in the transcript.
    eventually("the sessions to close", async || {
        let all = s.sessions().await;
        all.len() == 2 && all.iter().all(|x| x.ended_at.is_some())
    })
    .await;
    let mut events = twokey::audit::recent(&s.app.state().db, None, 1000)
        .await
        .unwrap();
    events.sort_by_key(|e| e.seq);
    let refused: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| e.action == "statement.refused")
        .map(|e| {
            assert_eq!(e.actor, "relay");
            for text in ["victims;", "canary", "/etc/hostname", "writer'", "GBK"] {
                assert!(!e.details.contains(text), "{text} in {}", e.details);
            }
            serde_json::from_str(&e.details).unwrap()
        })
        .collect();
    let always = ATTEMPTS
        .iter()
        .filter(|a| a.2 == Unruled::AlwaysRefused)
        .count();
    assert_eq!(refused.len(), always + ATTEMPTS.len() + 3 + 1);
    let ruled = &refused[always..];
    for (e, &(sql, rule, _)) in ruled.iter().zip(ATTEMPTS) {
        assert_eq!(e["rule"], rule, "{sql}: {e}");
        assert_eq!(e["protocol"], "simple", "{sql}: {e}");
        assert_eq!(e["sql_sha256"], sha256_hex(sql), "{sql}: {e}");
    }
    let drop = &ruled[0];
    assert_eq!(drop["kinds"], json!(["DROP TABLE"]));
    assert_eq!(drop["tables"], json!(["victims"]));
    assert_eq!(ruled[ATTEMPTS.len()]["protocol"], "extended");
    let sessions = s.sessions().await;
    let mut refused_in_transcripts = 0;
    for row in sessions {
        let (_, entries) =
            twokey::recording::transcript::read(std::path::Path::new(&row.recording)).unwrap();
        for e in entries {
            if let twokey::recording::transcript::Entry::Statement(st) = e
                && st.sql == "drop table victims"
                && st.refused.as_deref() == Some("deny")
            {
                refused_in_transcripts += 1;
            }
        }
    }
    // Once by Query, once by Parse.
    assert_eq!(refused_in_transcripts, 2);
    s.app.assert_chain_ok().await;
}

/// A read-only role: refused what writes, and the session is read-only at the server
/// too, so a function that writes behind a SELECT is stopped there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_role_is_read_only_at_the_server_too() {
    let s = setup(
        Version::Pg17,
        SqlPolicy {
            read_only: true,
            ..SqlPolicy::default()
        },
    )
    .await;
    let mut conn = connect(&s, &password_for(&s, "read").await).await;
    let on: String = sqlx::query_scalar("show default_transaction_read_only")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(on, "on");
    for (sql, code) in [
        ("insert into victims values (6)", "42501"),
        ("set default_transaction_read_only = off", "42501"),
        ("begin read write", "42501"),
        ("select * from victims for update", "42501"),
        // What the parse cannot know writes: the server refuses it.
        ("select bump()", "25006"),
    ] {
        let (got, m) = simple(&mut conn, sql).await.unwrap_err();
        assert_eq!(got, code, "{sql}: {m}");
    }
    let n: i64 = sqlx::query_scalar("select count(*) from victims")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 5);
}

/// A fixed search_path: the session has it, and no way of changing it is let through,
/// so an unqualified name means what the role's rules meant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_search_path_holds() {
    let s = setup(
        Version::Pg15,
        SqlPolicy {
            search_path: Some("public".into()),
            deny_tables: vec!["shadow.*".into()],
            ..SqlPolicy::default()
        },
    )
    .await;
    let mut conn = connect(&s, &password_for(&s, "read").await).await;
    let path: String = sqlx::query_scalar("show search_path")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(path, "public");
    for sql in [
        "set search_path = shadow",
        "SET SEARCH_PATH TO shadow, public",
        "select set_config('search_path', 'shadow', false)",
        "select * from shadow.items",
    ] {
        let (code, m) = simple(&mut conn, sql).await.unwrap_err();
        assert_eq!(code, "42501", "{sql}: {m}");
    }
    let names: Vec<String> = sqlx::query_scalar("select name from items order by id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(names, ["a", "b", "c"]);
}

/// An encoding whose characters can hide a quote from the relay is refused at the
/// start, with what to use instead; psql's own `\encoding` is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_client_encoding_is_refused() {
    let s = setup(Version::Pg15, rules()).await;
    let pw = password_for(&s, "read").await;
    let mut c = s.psql_cmd(&pw, &["-c", "select 1"]);
    c.env("PGCLIENTENCODING", "SJIS");
    let err = refused(&client::output(c).await);
    assert!(
        err.contains("the client encoding \"SJIS\" is not allowed through the relay")
            && err.contains("use UTF8"),
        "{err}"
    );
    // psql reports the failed SET and goes on in UTF8.
    let out = client::output(s.psql_cmd(
        &pw,
        &["-c", "\\encoding BIG5", "-c", "show client_encoding"],
    ))
    .await;
    assert_eq!(ok(&out), "UTF8");
    let refusals = twokey::audit::recent(&s.app.state().db, None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "statement.refused" && e.details.contains("parser safety"))
        .count();
    assert_eq!(refusals, 1);
    let mut c = s.psql_cmd(&pw, &["-c", "select 2"]);
    c.env("PGCLIENTENCODING", "UTF8");
    assert_eq!(ok(&client::output(c).await), "2");
}

/// psql as an engineer sees it: the refusal names the rule with a hint, and the
/// session goes on to the next statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_shows_the_refusal_and_goes_on() {
    let s = setup(Version::Pg15, rules()).await;
    let pw = password_for(&s, "read").await;
    let script = s.files.path().join("session.sql");
    std::fs::write(
        &script,
        "select 1;\ndrop table victims;\nselect count(*) from victims;\n",
    )
    .unwrap();
    let mut c = s.psql_cmd(&pw, &["-v", "ON_ERROR_STOP=0", "-f"]);
    c.arg(&script);
    let out = client::output(c).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.lines().collect::<Vec<_>>(), ["1", "5"], "{stderr}");
    assert!(
        stderr.contains(
            "ERROR:  twokey refused this statement (deny): DROP TABLE is not allowed for this role"
        ) && stderr.contains("HINT:  the role of your grant does not allow it"),
        "{stderr}"
    );
    // pgbench's pipeline: the refusal ends the pipeline's implicit transaction, so the
    // INSERT before it is undone as on any error.
    let pipeline = s.files.path().join("pipeline.sql");
    std::fs::write(
        &pipeline,
        "\\startpipeline\ninsert into victims values (42);\ndrop table victims;\n\\endpipeline\n",
    )
    .unwrap();
    let mut c = Command::new("pgbench");
    c.args(["-n", "-M", "prepared", "-t", "1", "-c", "1", "-f"])
        .arg(&pipeline)
        .arg(s.conninfo(ALICE, "demo-db", "verify-full"))
        .env("PGPASSWORD", &pw);
    let out = client::output(c).await;
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("twokey refused this statement (deny)"),
        "{text}"
    );
    assert_eq!(s.cluster.admin("app", "select count(*) from victims"), "5");
    // The Policy page says what the role is held to.
    let (st, html) = s.app.browser(ALICE).await.get("/policy").await;
    assert_eq!(st, StatusCode::OK);
    for words in [
        "database roles: writer",
        "only through the relay; every statement judged and recorded",
        "refused: DROP, TRUNCATE, ALTER, GRANT, CREATE FUNCTION, COPY PROGRAM, COPY FILE",
        "tables refused wherever named: secrets",
        "functions refused wherever called: pg_read_file(), pg_terminate_backend()",
        "DELETE and UPDATE need a WHERE",
        "DO blocks and SQL in strings refused",
        "DO blocks and SQL in strings allowed",
    ] {
        assert!(html.contains(words), "{words} not in {html}");
    }
}

/// Masked columns through the relay: by the column's origin (so aliases, subqueries and
/// CTEs do not help), by name pattern, in text and binary results, through a view, in an
/// error's DETAIL and in the transcript; what would compute on a masked value is
/// refused. Without masks the same role's statements return the real values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_columns_stay_masked() {
    use twokey::config::{MaskMethod, MaskRule};
    let rule = |column: Option<&str>, name: Option<&str>, method| MaskRule {
        column: column.map(str::to_string),
        name: name.map(str::to_string),
        method,
    };
    let s = setup(
        Version::Pg15,
        SqlPolicy {
            mask: vec![
                rule(Some("people.ssn"), None, MaskMethod::Last4),
                rule(None, Some("*card*"), MaskMethod::Hash),
                rule(Some("public.people.salary"), None, MaskMethod::Full),
            ],
            ..SqlPolicy::default()
        },
    )
    .await;
    s.cluster.admin(
        "app",
        "CREATE TABLE people (id int, name text, ssn text UNIQUE, card text, salary int);
         INSERT INTO people VALUES (1, 'ann', '123-45-6789', '4111111111111111', 1000),
                                   (2, 'bob', '987-65-4321', '5500000000000004', 2000);
         GRANT SELECT, INSERT ON people TO writer;
         CREATE VIEW people_v AS SELECT id, upper(ssn) AS shout FROM people;
         GRANT SELECT ON people_v TO writer;",
    );
    // Without masks: the real values.
    let mut open = connect(&s, &password_for(&s, "open").await).await;
    let real: String = sqlx::query_scalar("select ssn from people where id = 1")
        .fetch_one(&mut open)
        .await
        .unwrap();
    assert_eq!(real, "123-45-6789");
    sqlx::Connection::close(open).await.unwrap();

    let pw = password_for(&s, "read").await;
    // psql: text results.
    let shown = ok(&s
        .psql(
            &pw,
            "select id, name, ssn, card, salary from people order by id",
        )
        .await);
    let rows: Vec<Vec<&str>> = shown.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows[0][..3], ["1", "ann", "****6789"], "{shown}");
    assert_eq!(rows[1][2], "****4321");
    assert!(
        rows[0][3].starts_with("h:") && rows[0][3] != rows[1][3],
        "{shown}"
    );
    assert_eq!(rows[0][4], "", "a masked number is NULL");
    for sql in [
        "select ssn as x from people where id = 1",
        "select p.ssn as \"SSN\" from people p where id = 1",
        "select s.ssn from (select id, ssn from people) s where s.id = 1",
        "with c as (select id, ssn from people) select ssn from c where id = 1",
        "select * from (select * from people) s where id = 1",
    ] {
        let out = ok(&s.psql(&pw, sql).await);
        assert!(
            out.contains("****6789") && !out.contains("123-45"),
            "{sql}: {out}"
        );
    }
    // A driver: binary results, prepared statements, the same masks and hashes.
    let mut conn = connect(&s, &pw).await;
    let (ssn, card, salary): (String, String, Option<i32>) =
        sqlx::query_as("select ssn as x, card, salary from people where id = $1")
            .bind(1)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!((ssn.as_str(), salary), ("****6789", None));
    assert_eq!(card, rows[0][3], "the hash is the same in text and binary");
    // A view reading a masked column is masked whole (the catalog says which columns
    // a view reads, not which of its own each becomes).
    let (id, shout): (Option<i32>, String) = sqlx::query_as("select id, shout from people_v")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!((id, shout.as_str()), (None, "****"));
    // What would compute on, compare or carry a masked value is refused.
    for sql in [
        "select lower(ssn) from people",
        "select ssn::text from people",
        "select substr(ssn, 1, 3) from people",
        "select id from people where ssn like '1%'",
        "select id from people order by ssn",
        "with c as (select lower(ssn) l from people) select l from c",
        "select x from (select ssn as x from people) s",
        "select to_json(p) from people p",
        "select (select ssn from people limit 1)",
        "copy people to stdout",
        "select md5(card) from people",
        "select id from people_v where shout like '1%'",
        "select ssn, id from people order by 1",
        "select p.to_jsonb from people p",
        "select s::text from (select ssn from people) s",
        "select ssn from people full join people x using (ssn)",
        "select id from people p where exists (select generate_series(1, (p.ssn like '12%')::int))",
        "select most_common_vals::text from pg_stats where tablename = 'people'",
        "select distinct ssn, id from people",
    ] {
        let (code, m) = simple(&mut conn, sql).await.unwrap_err();
        assert_eq!(code, "42501", "{sql}: {m}");
        assert!(m.contains("(mask)"), "{sql}: {m}");
    }
    // An error's DETAIL would quote the value: withheld.
    let e = sqlx::raw_sql("insert into people (id, ssn) values (9, '123-45-6789')")
        .execute(&mut conn)
        .await
        .unwrap_err();
    let d = e.as_database_error().unwrap();
    assert_eq!(d.code().as_deref(), Some("23505"));
    let pg = d
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .unwrap();
    assert!(
        pg.detail()
            .is_some_and(|d| d.contains("withheld") && !d.contains("6789")),
        "{:?}",
        pg.detail()
    );
    sqlx::Connection::close(conn).await.unwrap();

    // Nothing unmasked in the masked sessions' transcripts, nor in the audit.
    eventually("the sessions to close", async || {
        let all = s.sessions().await;
        all.len() == 8 && all.iter().all(|x| x.ended_at.is_some())
    })
    .await;
    let mut sessions = s.sessions().await;
    sessions.sort_by_key(|x| x.started_at);
    for row in &sessions[1..] {
        let text = std::fs::read_to_string(&row.recording).unwrap();
        assert!(text.contains("****6789"), "{text}");
        for real in ["123-45-6789", "4111111111111111", "987-65-4321", "1000"] {
            assert!(
                !text.contains(&format!("\"{real}\"")),
                "{real} in the transcript"
            );
        }
    }
    for e in twokey::audit::recent(&s.app.state().db, None, 1000)
        .await
        .unwrap()
    {
        assert!(!e.details.contains("6789"), "{}", e.details);
    }
}

/// Fail closed: a role that masks gets no session when its masks cannot be applied
/// (here the mask key is unreadable), and says so in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_masks_gets_no_session_without_its_masks() {
    let s = setup_on(Version::Pg15, |c| {
        std::fs::create_dir_all(&c.server.data_dir).unwrap();
        std::fs::write(c.server.data_dir.join("relay_mask_key"), "not a key").unwrap();
        let db = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-db")
            .unwrap();
        db.roles[0].sql.mask = vec![twokey::config::MaskRule {
            column: Some("secrets.v".into()),
            name: None,
            method: twokey::config::MaskMethod::Full,
        }];
    })
    .await;
    let id = common::relay_pg::granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let err = refused(&s.psql(&pw, "select 1").await);
    assert!(
        err.contains("twokey cannot mask this role's columns right now"),
        "{err}"
    );
}

/// The role's rules in the configuration as its file says now, changed by `f`.
fn rules_changed(s: &Setup, f: impl FnOnce(&mut SqlPolicy)) -> twokey::config::Config {
    s.app
        .config_with_roles("demo-db", |roles| f(&mut roles[0].sql))
}

/// A reload applies to live sessions: a statement prepared while the rules let it run
/// is refused at its next execution once they do not (and does not run), the session
/// goes on, and a file that does not check changes nothing. A change that a session
/// cannot take mid-way (a mask) ends it with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_statement_is_judged_by_the_rules_after_a_reload() {
    let s = setup(Version::Pg17, SqlPolicy::default()).await;
    let state = s.app.state().clone();
    let mut conn = connect(&s, &password_for(&s, "read").await).await;
    let delete = sqlx::Executor::prepare(&mut conn, "delete from victims where id = $1")
        .await
        .unwrap();
    let done = delete.query().bind(1).execute(&mut conn).await.unwrap();
    assert_eq!(done.rows_affected(), 1);

    // A file that does not check changes nothing, and says why.
    let bad = rules_changed(&s, |p| p.deny.push("DELET".into()));
    let err = twokey::server::reload(&state, bad).await.unwrap_err();
    assert!(err.to_string().contains("DELET"), "{err}");
    let done = delete.query().bind(2).execute(&mut conn).await.unwrap();
    assert_eq!(done.rows_affected(), 1, "the rules are as they were");

    // A second session keeps a DELETE at the server with SQL's PREPARE, which the relay
    // does not follow by name.
    let mut other = connect(&s, &password_for(&s, "read").await).await;
    simple(
        &mut other,
        "prepare later(int) as delete from victims where id = $1",
    )
    .await
    .unwrap();
    let denied = rules_changed(&s, |p| p.deny.push("DELETE".into()));
    let r = twokey::server::reload(&state, denied).await.unwrap();
    assert_eq!(r.reload.changed, vec!["demo-db/read".to_string()]);
    assert_eq!(r.ended_sessions, 0, "{}", r.summary());
    assert!(r.reload.needs_restart.is_empty(), "{}", r.summary());
    // The same prepared statement, bound and executed again: refused by the new rule.
    let e = delete.query().bind(3).execute(&mut conn).await.unwrap_err();
    let (code, message) = database_error(e);
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("(deny)"), "{message}");
    let n: i64 = sqlx::query_scalar("select count(*) from victims where id = 3")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        n, 1,
        "the refused DELETE did not run, and the session goes on"
    );
    // The Policy page shows the rules that run.
    assert!(
        state
            .config()
            .role("demo-db", "read")
            .unwrap()
            .1
            .sql
            .deny
            .contains(&"DELETE".to_string())
    );
    // The session that made a statement at the server runs nothing more: it is told
    // to connect again, and its DELETE never runs.
    for sql in ["execute later(4)", "select 1"] {
        let (code, message) = simple(&mut other, sql).await.unwrap_err();
        assert_eq!(code, "42501", "{sql}: {message}");
        assert!(message.contains("connect again"), "{message}");
    }
    sqlx::Connection::close(other).await.unwrap();
    eventually("the second session's end is recorded", async || {
        s.sessions()
            .await
            .iter()
            .filter(|x| x.ended_at.is_none())
            .count()
            == 1
    })
    .await;
    let n: i64 = sqlx::query_scalar("select count(*) from victims where id = 4")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let actions = s.app.audit_actions().await;
    assert_eq!(
        actions.iter().filter(|a| *a == "config.reloaded").count(),
        1
    );

    // A mask cannot be put on a session mid-way: the reload ends it, saying why.
    let masked = rules_changed(&s, |p| {
        p.deny.push("DELETE".into());
        p.mask = vec![twokey::config::MaskRule {
            column: Some("secrets.v".into()),
            name: None,
            method: twokey::config::MaskMethod::Full,
        }];
    });
    let r = twokey::server::reload(&state, masked).await.unwrap();
    assert_eq!(r.ended_sessions, 1, "{}", r.summary());
    let e = simple(&mut conn, "select 1").await;
    assert!(e.is_err(), "the session was ended");
    eventually("the session's end is recorded", async || {
        s.sessions().await.iter().any(|x| {
            x.end_reason
                .as_deref()
                .is_some_and(|r| r.contains("its role's rules changed"))
        })
    })
    .await;
    s.app.assert_chain_ok().await;
}
