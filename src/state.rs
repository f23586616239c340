//! What every handler and background task shares: config, database, clock, metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::clock::{Clock, to_millis};
use crate::config::Config;
use crate::store::Db;

#[derive(Clone)]
pub struct AppState {
    /// The configuration as it runs: read with [`AppState::config`], swapped whole by a
    /// reload ([`crate::server::reload`]).
    config: Arc<LiveConfig>,
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// The OpenID Connect provider, when configured.
    pub oidc: Option<Arc<crate::auth::oidc::Oidc>>,
    /// Where notifications go, when email is configured.
    pub mailer: Option<Arc<crate::notify::email::Mailer>>,
    /// Slack, when configured.
    pub slack: Option<Arc<crate::notify::slack::client::Slack>>,
    /// The SSH user CA.
    pub ca: Arc<crate::ca::Ca>,
    /// Signs checkpoints of the audit chain head (a key outside the database).
    pub audit_key: Arc<crate::audit::checkpoint::Signer>,
    /// Wakes the database-login reconciler (a grant ended or was revoked).
    pub reconcile_now: Arc<tokio::sync::Notify>,
    /// The SSH relay's host key and upstream CA, when the relay is on.
    pub relay: Option<Arc<crate::relay::ssh::RelayKeys>>,
    /// Relay sessions open right now.
    pub live_sessions: Arc<crate::relay::live::LiveSessions>,
    /// The PostgreSQL relay's TLS certificate, when `[relay.postgres]` is on.
    pub relay_pg: Option<Arc<crate::relay::postgres::tls::ServerTls>>,
    /// Seals the cookies of visitors who are not signed in.
    pub sealer: Arc<crate::auth::sealed::Sealer>,
    /// Per-address rate limits.
    pub limiter: Arc<crate::web::limit::bucket::Limiter>,
}

impl AppState {
    pub fn new(config: Config, db: Db, clock: Arc<dyn Clock>) -> crate::Result<Self> {
        let oidc = match &config.auth.oidc {
            Some(o) => Some(Arc::new(crate::auth::oidc::Oidc::new(
                o,
                config.oidc_redirect_url(),
            )?)),
            None => None,
        };
        let mailer = match &config.email {
            Some(e) => Some(Arc::new(crate::notify::email::Mailer::new(e)?)),
            None => None,
        };
        let slack = match &config.slack {
            Some(s) => Some(Arc::new(crate::notify::slack::client::Slack::new(s)?)),
            None => None,
        };
        let ca = Arc::new(crate::ca::Ca::load_or_create(
            &config.ca,
            &config.server.data_dir,
        )?);
        let audit_key = Arc::new(crate::audit::checkpoint::Signer::load_or_create(
            &config.audit,
            &config.ca,
            &config.server.data_dir,
        )?);
        let relay = match &config.relay {
            Some(r) => Some(Arc::new(crate::relay::ssh::RelayKeys::load(
                r,
                &config.ca,
                &config.server.data_dir,
            )?)),
            None => None,
        };
        let relay_pg = match config.relay_postgres() {
            Some(pg) => {
                let names = crate::relay::postgres::tls::default_names(
                    config.relay_postgres_address().as_deref(),
                    &pg.tls_names,
                );
                Some(Arc::new(
                    crate::relay::postgres::tls::ServerTls::load_or_create(
                        pg,
                        &config.server.data_dir,
                        &names,
                    )?,
                ))
            }
            None => None,
        };
        let sealer = Arc::new(crate::auth::sealed::Sealer::load_or_create(
            &config.server.data_dir,
        )?);
        Ok(Self {
            sealer,
            limiter: Arc::default(),
            live_sessions: Arc::default(),
            relay,
            relay_pg,
            reconcile_now: Arc::new(tokio::sync::Notify::new()),
            ca,
            audit_key,
            mailer,
            slack,
            config: Arc::new(LiveConfig::new(config)),
            db,
            clock,
            metrics: Arc::new(Metrics::default()),
            oidc,
        })
    }

    /// The configuration as it runs now. Each call may see a newer one after a reload:
    /// what must hold together is read from one call's value.
    pub fn config(&self) -> Arc<Config> {
        self.config.running.borrow().clone()
    }

    /// Follows the running configuration: each reload marks it changed.
    pub fn config_updates(&self) -> watch::Receiver<Arc<Config>> {
        self.config.running.subscribe()
    }

    /// The configuration as its file said at start or at the last reload, before the
    /// server filled in what it learned by starting (the ports it bound): what a
    /// reload compares the file with.
    pub fn config_as_read(&self) -> Config {
        self.config
            .as_read
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Runs `config` from now on, and remembers `as_read` as what its file said.
    pub(crate) fn swap_config(&self, config: Config, as_read: Config) {
        if let Ok(mut r) = self.config.as_read.lock() {
            *r = as_read;
        }
        self.config.running.send_replace(Arc::new(config));
    }

    /// Remembers what the file said before the server filled in what it learned.
    pub(crate) fn set_config_as_read(&self, as_read: Config) {
        if let Ok(mut r) = self.config.as_read.lock() {
            *r = as_read;
        }
    }

    /// Now, in the database's unit (ms since the epoch).
    pub fn now_ms(&self) -> i64 {
        to_millis(self.clock.now())
    }
}

/// The running configuration and what its file said.
struct LiveConfig {
    running: watch::Sender<Arc<Config>>,
    as_read: std::sync::Mutex<Config>,
}

impl LiveConfig {
    fn new(config: Config) -> LiveConfig {
        LiveConfig {
            as_read: std::sync::Mutex::new(config.clone()),
            running: watch::Sender::new(Arc::new(config)),
        }
    }
}

/// Counters exported at `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub requests_created: AtomicU64,
    pub approvals: AtomicU64,
    pub denials: AtomicU64,
    pub cancellations: AtomicU64,
    pub expirations: AtomicU64,
    pub grants_started: AtomicU64,
    pub grants_ended: AtomicU64,
    pub grants_revoked: AtomicU64,
    pub refusals: AtomicU64,
    pub http_requests: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text format, with the two gauges read from the store.
    pub fn render(&self, pending: i64, live_grants: i64) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 10] = [
            (
                "twokey_requests_created_total",
                "Access requests filed.",
                &self.requests_created,
            ),
            (
                "twokey_approvals_total",
                "Approvals recorded.",
                &self.approvals,
            ),
            ("twokey_denials_total", "Requests denied.", &self.denials),
            (
                "twokey_cancellations_total",
                "Requests cancelled by their requester.",
                &self.cancellations,
            ),
            (
                "twokey_expirations_total",
                "Pending requests that expired.",
                &self.expirations,
            ),
            (
                "twokey_grants_started_total",
                "Grants started.",
                &self.grants_started,
            ),
            (
                "twokey_grants_ended_total",
                "Grants that reached their end.",
                &self.grants_ended,
            ),
            (
                "twokey_grants_revoked_total",
                "Grants revoked.",
                &self.grants_revoked,
            ),
            (
                "twokey_refusals_total",
                "Actions refused (403/409).",
                &self.refusals,
            ),
            (
                "twokey_http_requests_total",
                "HTTP requests served.",
                &self.http_requests,
            ),
        ];
        for (name, help, c) in counters {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                c.load(Ordering::Relaxed)
            ));
        }
        out.push_str(&format!(
            "# HELP twokey_pending_requests Requests awaiting a decision.\n# TYPE twokey_pending_requests gauge\ntwokey_pending_requests {pending}\n"
        ));
        out.push_str(&format!(
            "# HELP twokey_live_grants Grants live now.\n# TYPE twokey_live_grants gauge\ntwokey_live_grants {live_grants}\n"
        ));
        out
    }
}
