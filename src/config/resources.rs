//! The `[policy]` section and the `[[resources]]` with their `[[resources.roles]]`:
//! what may be asked for, by whom, approved by whom, for how long. It holds the values
//! only; the rules that apply them are in `policy`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration::{duration_setting, optional_duration_setting};
use super::{ConfigError, Secret, invalid};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// How long a request may wait for approval before it expires.
    #[serde(default = "default_pending_ttl", with = "duration_setting")]
    pub pending_ttl: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            pending_ttl: default_pending_ttl(),
        }
    }
}

fn default_pending_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Ssh,
    Postgres,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Ssh => "ssh",
            ResourceKind::Postgres => "postgres",
        })
    }
}

/// How engineers reach a PostgreSQL resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbAccess {
    /// Only through the PostgreSQL relay: the engineer gets a relay password bound to
    /// the grant; the relay logs in to the target as the grant's role, with a password
    /// no person ever sees. No target password is ever handed out.
    Relay,
    /// Straight to the target with the grant's own login and password, shown once.
    Direct,
}

impl fmt::Display for DbAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DbAccess::Relay => "relay",
            DbAccess::Direct => "direct",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    pub name: String,
    pub kind: ResourceKind,
    #[serde(default)]
    pub description: String,
    /// Where engineers connect: `host:port` (`twokey ssh` uses it).
    #[serde(default)]
    pub address: Option<String>,
    /// The SSH host's public key (`ssh-ed25519 AAAA…`), pinned by `twokey ssh` and the
    /// relay. Without it the relay trusts only a key an admin confirmed (web: Host keys).
    #[serde(default)]
    pub host_key: Option<String>,
    /// PostgreSQL: the database grants log in to.
    #[serde(default)]
    pub database: Option<String>,
    /// PostgreSQL: the role twokey administers the target as (it creates and drops
    /// the per-grant roles: CREATEROLE and the grants the README lists; checked
    /// against the live target at start-up and by `check-config`).
    #[serde(default)]
    pub admin_user: Option<String>,
    /// PostgreSQL: a file holding the admin role's password.
    #[serde(default)]
    pub admin_password_file: Option<PathBuf>,
    /// PostgreSQL: TLS of twokey's admin connection: `verify-full` (default: the
    /// certificate must be signed by a trusted CA and name the host), `require`
    /// (encrypted, server not verified), `prefer` or `disable`.
    #[serde(default)]
    pub tls: Option<String>,
    /// PostgreSQL: a PEM file of the CA(s) that sign the target's certificate, trusted
    /// beside the public web CAs (libpq's `sslrootcert`).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PostgreSQL: at a grant's end, objects its role created go to this role
    /// (`REASSIGN OWNED`); without it they are dropped with the role (`DROP OWNED`).
    #[serde(default)]
    pub reassign_owned_to: Option<String>,
    /// PostgreSQL: `"relay"` or `"direct"`; default `"relay"` when `[relay.postgres]`
    /// is configured, else `"direct"` (see [`crate::config::Config::db_access`]).
    #[serde(default)]
    pub access: Option<DbAccess>,
    #[serde(default)]
    pub roles: Vec<RoleConfig>,
}

impl ResourceConfig {
    /// The admin password, read from its file.
    pub fn admin_password(&self, key: &str) -> Result<Secret, ConfigError> {
        let Some(p) = &self.admin_password_file else {
            return Err(invalid(format!("{key}.admin_password_file"), "is required"));
        };
        Secret::from_file(&format!("{key}.admin_password_file"), p)
    }

    /// Whether twokey manages database logins for this resource.
    pub fn manages_db_roles(&self) -> bool {
        self.kind == ResourceKind::Postgres && self.admin_user.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Groups whose members may ask for this role.
    pub requester_groups: Vec<String>,
    /// Groups whose members may approve it.
    pub approver_groups: Vec<String>,
    /// Distinct approvers needed.
    #[serde(default = "one")]
    pub min_approvals: u32,
    /// When true, every listed approver group must be represented among the approvers.
    #[serde(default)]
    pub all_groups: bool,
    /// Longest grant, e.g. `"4h"`.
    #[serde(with = "duration_setting")]
    pub max_duration: Duration,
    /// Overrides `policy.pending_ttl` for this role.
    #[serde(default, with = "optional_duration_setting")]
    pub pending_ttl: Option<Duration>,
    #[serde(default)]
    pub require_ticket: bool,
    /// Fewest characters a reason may have (after trimming).
    #[serde(default = "default_reason_min")]
    pub reason_min_chars: usize,
    /// SSH: the logins a certificate is valid for (never empty, never a wildcard).
    #[serde(default)]
    pub principals: Vec<String>,
    /// SSH: certificate extensions allowed (default `["permit-pty"]`).
    #[serde(default = "default_extensions")]
    pub extensions: Vec<String>,
    /// SSH: the only command the certificate may run.
    #[serde(default)]
    pub force_command: Option<String>,
    /// SSH: addresses (CIDR) the certificate may be used from.
    #[serde(default)]
    pub source_address: Vec<String>,
    /// PostgreSQL: existing roles the grant's login becomes a member of (`IN ROLE`).
    #[serde(default)]
    pub db_roles: Vec<String>,
    /// PostgreSQL: statements run when the login is created, with `{role}` standing for
    /// its quoted name, e.g. `"GRANT SELECT ON public.orders TO {role}"`. Written by the
    /// admin who writes this file; no user input ever reaches them.
    #[serde(default)]
    pub db_grants: Vec<String>,
    /// PostgreSQL: most concurrent connections of the login.
    #[serde(default = "default_connection_limit")]
    pub connection_limit: i32,
    /// SSH relay: exec commands refused for this role (`*` matches anything), e.g.
    /// `["rm -rf *", "shutdown*"]`. Interactive shells cannot be held to this.
    #[serde(default)]
    pub blocked_commands: Vec<String>,
    /// SSH relay: exec commands held until another person approves that exact
    /// command (`*` matches anything), e.g. `["systemctl restart *"]`.
    #[serde(default)]
    pub review_commands: Vec<String>,
    /// How a held action (a statement or command held for review) is approved.
    #[serde(default)]
    pub review: ReviewPolicy,
    /// PostgreSQL relay: how many rows of each result the session's transcript keeps
    /// (the count of all rows is always kept).
    #[serde(default = "default_transcript_rows")]
    pub transcript_rows: usize,
    /// PostgreSQL relay: what statements this role may run (`[resources.roles.sql]`).
    #[serde(default)]
    pub sql: SqlPolicy,
}

/// PostgreSQL relay: a role's statement rules, judged on PostgreSQL's own parse of every
/// statement (see `policy::sql`). Some refusals hold whatever is written here: text that
/// does not parse, and leaving the grant's database role.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SqlPolicy {
    /// Admit only what cannot write; the session is also made read-only at the database.
    pub read_only: bool,
    /// Statement kinds refused, by their first words: `"DROP"`, `"TRUNCATE"`,
    /// `"CREATE FUNCTION"`, `"COPY PROGRAM"`, `"COPY FILE"`…
    pub deny: Vec<String>,
    /// Tables refused wherever a statement names them: `"secrets"` (any schema),
    /// `"public.secrets"`, `"audit.*"` (needs `search_path`).
    pub deny_tables: Vec<String>,
    /// Functions refused wherever a statement calls them, e.g. `"pg_read_file"`.
    pub deny_functions: Vec<String>,
    /// `DELETE` and `UPDATE` need a `WHERE` (default true).
    pub require_where: bool,
    /// Allow what the relay cannot see into: `DO` blocks, function bodies in strings,
    /// functions that run SQL text (default false: refused).
    pub allow_dynamic_sql: bool,
    /// Fixes the session's search_path (the client's and `SET search_path` are refused).
    pub search_path: Option<String>,
    /// Columns whose values never reach the client (nor the transcript) as they are.
    pub mask: Vec<MaskRule>,
    /// Statement kinds held until another person approves that exact statement, by
    /// their first words as in `deny`: `"DELETE"`, `"UPDATE"`, `"ALTER TABLE"`.
    pub review: Vec<String>,
    /// Tables whose every statement is held for approval, written as in `deny_tables`.
    pub review_tables: Vec<String>,
}

/// How the role's held actions are decided: by its approver groups, as its requests
/// are, by this many distinct people (never the one who sent it), within `wait`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReviewPolicy {
    /// Distinct approvers a held action needs (default: the role's `min_approvals`).
    pub approvals: Option<u32>,
    /// How long the engineer's statement or command waits for its decision before it
    /// is refused (default `"10m"`, at most `"1h"`).
    #[serde(with = "duration_setting")]
    pub wait: Duration,
}

impl Default for ReviewPolicy {
    fn default() -> Self {
        ReviewPolicy {
            approvals: None,
            wait: Duration::from_secs(600),
        }
    }
}

/// One masking rule: a column by table, or every column whose name matches.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MaskRule {
    /// `"table.column"` (any schema) or `"schema.table.column"`.
    pub column: Option<String>,
    /// A column-name pattern, `*` for any run of characters: `"*ssn*"`, `"card_*"`.
    pub name: Option<String>,
    #[serde(default)]
    pub method: MaskMethod,
}

/// How a masked value is shown.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskMethod {
    /// `****`.
    #[default]
    Full,
    /// `****` and the last four characters.
    Last4,
    /// A keyed hash, the same for the same value (so rows can still be told apart
    /// and joined by eye), not reversible without twokey's key.
    Hash,
}

impl Default for SqlPolicy {
    fn default() -> Self {
        SqlPolicy {
            read_only: false,
            deny: Vec::new(),
            deny_tables: Vec::new(),
            deny_functions: Vec::new(),
            require_where: true,
            allow_dynamic_sql: false,
            search_path: None,
            mask: Vec::new(),
            review: Vec::new(),
            review_tables: Vec::new(),
        }
    }
}

fn default_transcript_rows() -> usize {
    20
}

fn default_connection_limit() -> i32 {
    5
}

fn default_extensions() -> Vec<String> {
    vec!["permit-pty".into()]
}

fn one() -> u32 {
    1
}
fn default_reason_min() -> usize {
    3
}

impl RoleConfig {
    pub fn max_duration(&self) -> Duration {
        self.max_duration
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, demo_config_toml};

    #[test]
    fn all_groups_needs_enough_approvals() {
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        let text = base.replacen(
            "approver_groups = [\"sre-leads\"]\nmin_approvals = 1",
            "approver_groups = [\"sre-leads\", \"dbas\"]\nall_groups = true\nmin_approvals = 1",
            1,
        );
        let err = Config::parse(&text, "t").unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
    }
}
