//! Starting and stopping the server: database, sessions, listener, and the background
//! tasks (sweeper, outbox, database-login reconciler) that [`crate::tasks`] runs and drains.
//!
//! Tests call [`start`] with a listener on `127.0.0.1:0` and their own clock, exactly
//! as `twokey serve` does with the configured address and the wall clock.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_sessions::ExpiredDeletion;

use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::store::SessionStore;
use crate::tasks::Tasks;
use crate::{access, auth, store, web};

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    serve: JoinHandle<()>,
    tasks: Tasks,
    /// The SSH relay, when configured.
    pub relay: Option<crate::relay::Relay>,
}

impl Server {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, ends relay sessions (their recordings finalised and audited),
    /// finishes in-flight requests, then lets the background tasks finish the pass they
    /// are in (the sweeper, the outbox, the reconciler) and stops them.
    pub async fn stop(self) {
        if let Some(relay) = self.relay {
            relay.stop().await;
        }
        let _ = self.shutdown.send(true);
        let _ = self.serve.await;
        self.tasks.drain().await;
    }

    /// Waits until the server stops (for `serve`, until Ctrl-C).
    pub async fn wait(self) {
        let _ = self.serve.await;
    }
}

/// Every check a running server relies on, in this order: the config's own
/// ([`Config::validate`]), then the rules of the modules that use its values (`policy`,
/// `ca`, `dbcreds`), which `config` does not import. `serve`, `check-config` and `demo`
/// run it; the first refusal names its key.
pub fn check_config(config: &Config) -> std::result::Result<(), crate::config::ConfigError> {
    config.validate()?;
    crate::policy::check_config(config)?;
    crate::ca::check_config(config)?;
    crate::dbcreds::check_config(config)
}

/// Opens the database, runs migrations, and builds the shared state.
pub async fn open_state(config: Config, clock: Arc<dyn Clock>) -> Result<AppState> {
    if config.server.database_url.is_none() {
        std::fs::create_dir_all(&config.server.data_dir).map_err(|e| {
            Error::Internal(format!(
                "cannot create data dir {}: {e}",
                config.server.data_dir.display()
            ))
        })?;
    }
    let db = store::connect(config.database_url().expose()).await?;
    let state = AppState::new(config, db, clock)?;
    auth::sync_dev_users(&state).await?;
    Ok(state)
}

/// Starts serving on `listener`.
pub async fn start(
    mut config: Config,
    clock: Arc<dyn Clock>,
    listener: TcpListener,
) -> Result<Server> {
    // What the file said, before what starting learns is filled in: what a reload
    // compares a file with.
    let as_read = config.clone();
    if config.server.public_url.is_none()
        && let Ok(addr) = listener.local_addr()
    {
        // Links in messages need the address actually bound (port 0 in tests).
        config.server.public_url = Some(format!("http://{addr}"));
    }
    // The PostgreSQL relay's listener is bound first, so that what clients are told
    // (`relay_postgres_address`) names the port actually bound (port 0 in tests).
    let pg_listener = match config.relay.as_mut().and_then(|r| r.postgres.as_mut()) {
        Some(pg) => {
            let l = TcpListener::bind(&pg.listen).await.map_err(|e| {
                Error::Internal(format!(
                    "relay.postgres: cannot listen on {}: {e}",
                    pg.listen
                ))
            })?;
            if let Ok(a) = l.local_addr() {
                pg.listen = a.to_string();
            }
            Some(l)
        }
        None => None,
    };
    let state = open_state(config, clock).await?;
    state.set_config_as_read(as_read);
    // Relay sessions a crash left open are closed before anything is served.
    let relay_claim = crate::relay::claim_instance(&state).await?;
    check_db_targets(&state).await?;
    let sessions = store::session_store(&state.db).await?;
    let app = web::router(state.clone(), sessions.clone());
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("listener: {e}")))?;
    let (shutdown, mut rx) = watch::channel(false);
    let serve = tokio::spawn(async move {
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // With the peer address, for the per-address rate limits.
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "server stopped with an error");
        }
    });
    let mut tasks = Tasks::new();
    let st = state.clone();
    tasks.every(
        "sweeper",
        state.config().sweep_interval(),
        None,
        move || {
            let (state, sessions) = (st.clone(), sessions.clone());
            async move { sweep(&state, &sessions).await }
        },
    );
    if state.mailer.is_some() || state.slack.is_some() {
        let st = state.clone();
        tasks.every(
            "outbox",
            state.config().outbox_interval(),
            None,
            move || {
                let state = st.clone();
                async move {
                    if let Err(e) = crate::notify::deliver_due(&state).await {
                        tracing::warn!(error = %e, "outbox pass failed; will retry");
                    }
                }
            },
        );
    }
    if state
        .config()
        .resources
        .iter()
        .any(|r| r.manages_db_roles())
    {
        let st = state.clone();
        // The first pass is at once: a restart cleans up what a crash left.
        tasks.every(
            "reconciler",
            state.config().reconcile_interval(),
            Some(state.reconcile_now.clone()),
            move || {
                let state = st.clone();
                async move { reconcile(&state).await }
            },
        );
    }
    let relay = match state.config().relay.as_ref().map(|r| r.listen.clone()) {
        Some(listen) => {
            let listener = TcpListener::bind(&listen)
                .await
                .map_err(|e| Error::Internal(format!("relay: cannot listen on {listen}: {e}")))?;
            let relay =
                crate::relay::start(state.clone(), listener, pg_listener, relay_claim).await?;
            tracing::info!(addr = %relay.addr, "SSH relay listening");
            if let Some(pg) = relay.pg_addr {
                tracing::info!(addr = %pg, "PostgreSQL relay listening");
            }
            Some(relay)
        }
        None => None,
    };
    Ok(Server {
        addr,
        state,
        shutdown,
        serve,
        tasks,
        relay,
    })
}

/// Serializes reloads: each compares with what the one before applied.
static RELOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Applies `new` (the configuration file, read again) while the server runs: the
/// policy and every role of the resources it serves apply at once, and what needs a
/// restart is named ([`crate::config::reload`]). `new` is checked as `serve` checks a
/// file at start; a file that fails changes nothing. What it applies is audited
/// (`config.reloaded`) before it runs: a reload that cannot be audited changes nothing.
/// Live sessions go on under the new rules, judged from their next statement or
/// command, except those that must connect again ([`crate::relay::end_sessions_for_reload`]).
pub async fn reload(state: &AppState, new: Config) -> Result<Reloaded> {
    let _one_at_a_time = RELOADING.lock().await;
    check_config(&new).map_err(|e| Error::conflict(e.to_string()))?;
    let running = state.config();
    let as_read = state.config_as_read();
    let r = crate::config::reload(&running, &as_read, &new);
    check_config(&r.config).map_err(|e| Error::conflict(e.to_string()))?;
    // The file as applied: what still needs a restart stays as it was read, so the
    // next reload names it again.
    let applied = crate::config::reload(&as_read, &as_read, &new).config;
    if !r.applies_anything() {
        state.set_config_as_read(applied);
        return Ok(Reloaded {
            reload: r,
            ended_sessions: 0,
        });
    }
    let mut tx = store::begin_write(&state.db).await?;
    crate::audit::append(
        &mut tx,
        state.now_ms(),
        &crate::audit::NewEvent {
            actor: "system",
            action: "config.reloaded",
            subject: "config",
            details: serde_json::json!({
                "changed_roles": r.changed,
                "added_roles": r.added,
                "removed_roles": r.removed,
                "policy_changed": r.policy,
                "needs_restart": r.needs_restart,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    state.swap_config(r.config.clone(), applied);
    let ended_sessions = crate::relay::end_sessions_for_reload(state, &running, &r.config).await;
    Ok(Reloaded {
        reload: r,
        ended_sessions,
    })
}

/// What a reload did.
#[derive(Debug)]
pub struct Reloaded {
    pub reload: crate::config::Reload,
    /// Live sessions it ended.
    pub ended_sessions: usize,
}

impl Reloaded {
    /// One line for the log: what changed, what ended, what waits for a restart.
    pub fn summary(&self) -> String {
        let r = &self.reload;
        let mut parts = Vec::new();
        if !r.applies_anything() {
            parts.push("the policy is unchanged".to_string());
        }
        if r.policy {
            parts.push("[policy] changed".into());
        }
        for (what, list) in [
            ("changed", &r.changed),
            ("added", &r.added),
            ("removed", &r.removed),
        ] {
            if !list.is_empty() {
                parts.push(format!("roles {what}: {}", list.join(", ")));
            }
        }
        if self.ended_sessions > 0 {
            parts.push(format!(
                "{} live session(s) ended to connect again",
                self.ended_sessions
            ));
        }
        if !r.needs_restart.is_empty() {
            parts.push(format!(
                "not applied until a restart: {}",
                r.needs_restart.join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// One pass of the sweeper: expire requests, end grants, end held actions left by a
/// relay that is gone, checkpoint the audit chain when
/// due, delete expired browser sessions.
async fn sweep(state: &AppState, sessions: &SessionStore) {
    match access::sweep(state).await {
        Ok(s) if s != access::Swept::default() => {
            tracing::info!(
                expired = s.expired_requests,
                ended = s.ended_grants,
                "swept"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "sweep failed; will retry"),
    }
    match access::held::sweep(state).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(ended = n, "held actions swept"),
        Err(e) => tracing::warn!(error = %e, "held action sweep failed; will retry"),
    }
    // Periodic checkpoints ride on the sweeper (audit.checkpoint_interval).
    if let Err(e) = crate::audit::signing::checkpoint_if_due(state).await {
        tracing::error!(error = %e, "audit checkpoint failed; will retry");
    }
    if let Err(e) = sessions.delete_expired().await {
        tracing::warn!(error = %e, "session cleanup failed");
    }
}

/// One pass of the database-login reconciler.
async fn reconcile(state: &AppState) {
    match crate::dbcreds::reconcile(state).await {
        Ok(r) if r != crate::dbcreds::Reconciled::default() => {
            tracing::info!(
                dropped = r.dropped,
                failed = r.failed,
                "database logins reconciled"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "database reconcile failed; will retry"),
    }
}

/// Refuses to start when a database target's admin cannot end the logins twokey would
/// hand out there (revocation would silently fail); what only breaks issuing is logged.
/// A target that cannot be reached is logged too: the reconciler retries it.
async fn check_db_targets(state: &AppState) -> Result<()> {
    for r in state
        .config()
        .resources
        .iter()
        .filter(|r| r.manages_db_roles())
    {
        match crate::dbcreds::check_target(r).await {
            Ok(c) if !c.blocking.is_empty() => {
                return Err(Error::Internal(format!(
                    "resource {}: {}",
                    r.name,
                    c.blocking.join("; ")
                )));
            }
            Ok(c) => {
                for problem in c.issuance {
                    tracing::error!(resource = %r.name, "{problem}");
                }
            }
            Err(msg) => {
                tracing::warn!(resource = %r.name, error = %msg, "cannot check the database admin's privileges now");
            }
        }
    }
    Ok(())
}

/// Binds the configured address and starts.
pub async fn serve(config: Config, clock: Arc<dyn Clock>) -> Result<Server> {
    let addr = config
        .listen_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Internal(format!("cannot listen on {addr}: {e}")))?;
    start(config, clock, listener).await
}
