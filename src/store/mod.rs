//! All SQL lives here, so another backend changes nothing else: one file per
//! aggregate, each owning the SQL of its tables.
//!
//! - [`users`]: identities, users, groups, [`load_actor`];
//! - [`tokens`]: API tokens and CLI sign-in codes;
//! - [`requests`]: access requests and their approvals;
//! - [`grants`]: grants and what makes one live;
//! - [`held`]: held actions and the decisions on them;
//! - [`outbox`]: the outbox, action tokens, the dev mailbox, Slack message refs;
//! - [`slack`]: Slack account links, link tokens, the interaction replay guard;
//! - [`credentials`]: SSH certificates and database logins;
//! - [`sessions`]: relay sessions; [`host_keys`]: target host keys;
//! - [`relay_logins`]: the PostgreSQL relay's passwords, as SCRAM verifiers.
//!
//! This file keeps only the connection (`connect`, `ping`, `begin_write`, the session
//! store), the `Db`/`Conn`/`Tx` types and `new_id`, and re-exports every aggregate
//! (`pub use`), so callers keep writing `store::foo`.
//!
//! Functions that take part in a business step take a `&mut Conn` so the caller holds
//! one transaction for the whole step. State changes are conditional UPDATEs whose
//! `rows_affected()` the caller checks. Write transactions start with
//! `BEGIN IMMEDIATE` ([`begin_write`]) so SQLite serialises them from their first
//! statement: the read-check-write inside cannot be raced.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};

use crate::error::Result;

pub mod credentials;
pub mod grants;
pub mod held;
pub mod host_keys;
pub mod outbox;
pub mod relay_logins;
pub mod requests;
pub mod sessions;
pub mod slack;
pub mod tokens;
pub mod users;

pub use credentials::*;
pub use grants::*;
pub use held::*;
pub use host_keys::*;
pub use outbox::*;
pub use relay_logins::*;
pub use requests::*;
pub use sessions::*;
pub use slack::*;
pub use tokens::*;
pub use users::*;

pub type Db = SqlitePool;
pub type Conn = SqliteConnection;
pub type Tx = Transaction<'static, Sqlite>;

/// Opens (creating if needed) the database and runs the embedded migrations.
pub async fn connect(url: &str) -> Result<Db> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    let db = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await?;
    sqlx::migrate!("./migrations").run(&db).await?;
    Ok(db)
}

/// The browser-session store, in the same database.
pub type SessionStore = tower_sessions_sqlx_store::SqliteStore;

/// Makes the session store, creating its table if needed.
pub async fn session_store(db: &Db) -> Result<SessionStore> {
    let store = SessionStore::new(db.clone());
    store.migrate().await?;
    Ok(store)
}

/// Whether the database answers (for `/healthz`).
pub async fn ping(db: &Db) -> Result<()> {
    sqlx::query("SELECT 1").execute(db).await?;
    Ok(())
}

/// Starts a write transaction that holds SQLite's write lock from its first statement.
pub async fn begin_write(db: &Db) -> Result<Tx> {
    Ok(db.begin_with("BEGIN IMMEDIATE").await?)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
