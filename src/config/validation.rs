//! The config's own checks, walked section by section in one fixed order (so the first
//! refusal is always the same), with the ones across sections (OIDC and email need
//! `server.public_url`; demo sign-in only on loopback). Each refusal names the key and
//! what to do. It reads secret files only to check them; it never logs a secret. The
//! rules of `ca`, `dbcreds` and `policy` live in those modules.

use std::collections::HashSet;
use std::net::SocketAddr;

use super::duration::check_nonzero;
use super::{Config, ConfigError, MIN_MAX_RECORDING_BYTES, invalid};

impl Config {
    /// Checks every rule on the config's own values, section by section, across
    /// sections where one needs another (OIDC and email need `server.public_url`).
    /// The rules of `ca`, `dbcreds` and `policy` are theirs: `server::check_config`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server
            .listen
            .parse::<SocketAddr>()
            .map_err(|_| invalid("server.listen", "must be IP:PORT, e.g. \"127.0.0.1:8080\""))?;
        if let Some(url) = &self.server.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "server.public_url",
                "must start with http:// or https://",
            ));
        }
        for (i, p) in self.server.trusted_proxies.iter().enumerate() {
            if p.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(
                    format!("server.trusted_proxies[{i}]"),
                    format!("{p:?} is not an IP address (one proxy's, e.g. \"10.0.0.5\")"),
                ));
            }
        }
        check_nonzero("audit.checkpoint_interval", self.audit.checkpoint_interval)?;
        if self.audit.checkpoint_every == 0 {
            return Err(invalid("audit.checkpoint_every", "must be at least 1"));
        }
        if let Some(relay) = &self.relay {
            if relay.listen.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    "relay.listen",
                    format!("{:?} is not an address like 0.0.0.0:2222", relay.listen),
                ));
            }
            check_nonzero("relay.login_grace_time", relay.login_grace_time)?;
            check_nonzero("relay.idle_timeout", relay.idle_timeout)?;
            if relay.max_connections == 0 || relay.max_connections_per_ip == 0 {
                return Err(invalid(
                    "relay.max_connections",
                    "max_connections and max_connections_per_ip must be at least 1",
                ));
            }
            // A cap of (nearly) nothing would keep no output at all: refused, not
            // quietly taken as "record nothing".
            if relay.max_recording_bytes < MIN_MAX_RECORDING_BYTES {
                return Err(invalid(
                    "relay.max_recording_bytes",
                    format!(
                        "{} is too small: at least {MIN_MAX_RECORDING_BYTES} (64 KiB)",
                        relay.max_recording_bytes
                    ),
                ));
            }
            if let Some(pg) = &relay.postgres {
                if pg.listen.parse::<SocketAddr>().is_err() {
                    return Err(invalid(
                        "relay.postgres.listen",
                        format!("{:?} is not an address like 0.0.0.0:6432", pg.listen),
                    ));
                }
                if pg.tls_cert_file.is_some() != pg.tls_key_file.is_some() {
                    return Err(invalid(
                        "relay.postgres.tls_cert_file",
                        "tls_cert_file and tls_key_file go together",
                    ));
                }
                if pg.max_message_bytes < 64 << 10 {
                    return Err(invalid(
                        "relay.postgres.max_message_bytes",
                        "must be at least 65536 (64 KiB)",
                    ));
                }
            }
        }
        for r in &self.resources {
            if r.kind != super::ResourceKind::Postgres {
                if r.access.is_some() {
                    return Err(invalid(
                        format!("resource {}.access", r.name),
                        "applies to postgres resources only",
                    ));
                }
                continue;
            }
            if self.db_access(r) == super::DbAccess::Relay {
                if self.relay_postgres().is_none() {
                    return Err(invalid(
                        format!("resource {}.access", r.name),
                        "is \"relay\", but there is no [relay.postgres] section",
                    ));
                }
                // The relay logs in as the grant's own role, which twokey makes.
                if r.admin_user.is_none() {
                    return Err(invalid(
                        format!("resource {}.admin_user", r.name),
                        "is required for access through the relay (twokey makes each grant's login)",
                    ));
                }
            }
        }
        if let Some(slack) = &self.slack {
            slack.secrets()?;
            if slack.channel.trim().is_empty() {
                return Err(invalid(
                    "slack.channel",
                    "must name a channel, e.g. \"#access-requests\" or its id",
                ));
            }
            let team = &slack.team_id;
            if !(2..=32).contains(&team.len())
                || !team
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            {
                return Err(invalid(
                    "slack.team_id",
                    "must be the workspace's id, e.g. \"T0123ABCD\" (in Slack: workspace settings, or the team_id of any interaction)",
                ));
            }
            // Plain http only to loopback (tests): the bot token rides on every call.
            let api_ok = reqwest::Url::parse(&slack.api_base).is_ok_and(|u| {
                u.scheme() == "https" || (u.scheme() == "http" && u.host_str() == Some("127.0.0.1"))
            });
            if !api_ok {
                return Err(invalid(
                    "slack.api_base",
                    "must be https (http only for 127.0.0.1 in tests)",
                ));
            }
        }
        check_nonzero("policy.pending_ttl", self.policy.pending_ttl)?;
        check_nonzero("auth.session_idle_timeout", self.auth.session_idle_timeout)?;
        check_nonzero("auth.session_lifetime", self.auth.session_lifetime)?;
        check_nonzero("auth.token_ttl", self.auth.token_ttl)?;
        check_nonzero("auth.cli_token_ttl", self.auth.cli_token_ttl)?;
        if self.cli_token_ttl() > self.token_ttl() {
            return Err(invalid(
                "auth.cli_token_ttl",
                "must not be longer than auth.token_ttl, which caps every token",
            ));
        }
        check_nonzero("auth.groups_max_age", self.auth.groups_max_age)?;
        if let Some(oidc) = &self.auth.oidc {
            if !(oidc.issuer.starts_with("https://") || oidc.issuer.starts_with("http://")) {
                return Err(invalid("auth.oidc.issuer", "must be an http(s) URL"));
            }
            if oidc.client_id.trim().is_empty() {
                return Err(invalid("auth.oidc.client_id", "must not be empty"));
            }
            oidc.secret()?;
            if !oidc.scopes.iter().any(|s| s == "openid") {
                return Err(invalid("auth.oidc.scopes", "must include \"openid\""));
            }
            // Passing IdP group names through would let whoever may create or join a
            // group at the provider (often self-service) name themselves an approver
            // or admin here. The operator must say which groups mean what.
            if !oidc.groups_claim.is_empty() && oidc.group_map.is_empty() {
                return Err(invalid(
                    "auth.oidc.group_map",
                    format!(
                        "is required when groups come from the identity provider (groups_claim = {:?}): map each provider group to twokey groups, e.g. [auth.oidc.group_map] \"okta-sre\" = [\"engineers\"]; unmapped groups grant nothing. Set groups_claim = \"\" to take no groups from the provider",
                        oidc.groups_claim
                    ),
                ));
            }
            if self.server.public_url.is_none() {
                return Err(invalid(
                    "server.public_url",
                    "is required with auth.oidc: the provider redirects back to PUBLIC_URL/auth/oidc/callback",
                ));
            }
        }
        if let Some(email) = &self.email {
            if !email.from.contains('@') {
                return Err(invalid(
                    "email.from",
                    "must be an address, e.g. \"twokey <twokey@example.com>\"",
                ));
            }
            if !email.dev_mailbox && email.smtp_host.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    "email.smtp_host",
                    "is required unless dev_mailbox = true",
                ));
            }
            if email.dev_mailbox && !self.auth.dev_login {
                return Err(invalid(
                    "email.dev_mailbox",
                    "is for demos only: it needs auth.dev_login = true",
                ));
            }
            email.password()?;
            if self.server.public_url.is_none() && !email.dev_mailbox {
                return Err(invalid(
                    "server.public_url",
                    "is required with email: links in messages point there",
                ));
            }
        }
        if self.auth.dev_login && self.auth.dev_users.is_empty() {
            return Err(invalid(
                "auth.dev_users",
                "dev_login is on but no dev_users are listed",
            ));
        }
        let mut emails = HashSet::new();
        for (i, u) in self.auth.dev_users.iter().enumerate() {
            let key = format!("auth.dev_users[{i}].email");
            if !looks_like_email(&u.email) {
                return Err(invalid(
                    key,
                    format!("{:?} is not an email address", u.email),
                ));
            }
            if !emails.insert(u.email.to_lowercase()) {
                return Err(invalid(key, format!("{} is listed twice", u.email)));
            }
        }
        let mut names = HashSet::new();
        for (i, r) in self.resources.iter().enumerate() {
            let key = format!("resources[{i}]");
            check_name(&format!("{key}.name"), &r.name)?;
            if !names.insert(r.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("resource {:?} is declared twice", r.name),
                ));
            }
            if r.roles.is_empty() {
                return Err(invalid(
                    format!("{key}.roles"),
                    format!(
                        "resource {:?} has no roles; add [[resources.roles]]",
                        r.name
                    ),
                ));
            }
            let mut role_names = HashSet::new();
            for (j, role) in r.roles.iter().enumerate() {
                let key = format!("{key}.roles[{j}]");
                check_name(&format!("{key}.name"), &role.name)?;
                if !role_names.insert(role.name.as_str()) {
                    return Err(invalid(
                        format!("{key}.name"),
                        format!("role {:?} is declared twice on {:?}", role.name, r.name),
                    ));
                }
                if role.requester_groups.is_empty() {
                    return Err(invalid(
                        format!("{key}.requester_groups"),
                        "must list at least one group",
                    ));
                }
                if role.approver_groups.is_empty() {
                    return Err(invalid(
                        format!("{key}.approver_groups"),
                        "must list at least one group",
                    ));
                }
                if role.min_approvals == 0 {
                    return Err(invalid(
                        format!("{key}.min_approvals"),
                        "must be at least 1 (use break-glass for self-service)",
                    ));
                }
                if role.all_groups && (role.min_approvals as usize) < role.approver_groups.len() {
                    return Err(invalid(
                        format!("{key}.min_approvals"),
                        format!(
                            "all_groups needs one approver per group, so min_approvals must be at least {}",
                            role.approver_groups.len()
                        ),
                    ));
                }
                if let Some(ttl) = role.pending_ttl {
                    check_nonzero(&format!("{key}.pending_ttl"), ttl)?;
                }
                check_sql_policy(&format!("{key}.sql"), &role.sql)?;
                check_review(&key, r, role)?;
                let relayed = r.kind == super::ResourceKind::Postgres
                    && self.db_access(r) == super::DbAccess::Relay;
                if role.sql != crate::config::SqlPolicy::default() && !relayed {
                    return Err(invalid(
                        format!("{key}.sql"),
                        "statement rules hold only on a PostgreSQL resource reached through the relay ([relay.postgres], access = \"relay\"); here nothing would enforce them",
                    ));
                }
            }
            if let Some(addr) = &r.address
                && addr
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(invalid(format!("{key}.address"), "must be host:port"));
            }
            if let Some(hk) = &r.host_key
                && ssh_key::PublicKey::from_openssh(hk.trim()).is_err()
            {
                return Err(invalid(
                    format!("{key}.host_key"),
                    "must be an OpenSSH public key line, e.g. from /etc/ssh/ssh_host_ed25519_key.pub",
                ));
            }
        }
        Ok(())
    }

    /// What `serve` (and `check-config`) demand beyond [`Config::validate`]: demo
    /// sign-in (anyone signs in as anyone, admins included, with no password) only on a
    /// loopback address that no reverse proxy publishes. `twokey demo` does not call
    /// this: the demo is that, with a banner on every page.
    pub fn validate_for_serve(&self) -> Result<(), ConfigError> {
        if !self.auth.dev_login {
            return Ok(());
        }
        let listen_loopback = self
            .server
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !listen_loopback {
            return Err(invalid(
                "auth.dev_login",
                format!(
                    "demo sign-in lets anyone sign in as anyone: it is refused on server.listen = {:?}, which is not a loopback address; use `twokey demo`, listen on 127.0.0.1, or turn it off",
                    self.server.listen
                ),
            ));
        }
        // Behind a proxy the loopback listener is public after all: the public URL says.
        if let Some(url) = &self.server.public_url {
            let host = reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(invalid(
                    "auth.dev_login",
                    format!(
                        "demo sign-in lets anyone sign in as anyone: it is refused with server.public_url = {url:?}, which is not a loopback address; use `twokey demo` or turn it off"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn looks_like_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => !local.is_empty() && domain.contains('.') && !s.contains(' '),
        None => false,
    }
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{name:?} must be 1-64 characters of a-z, 0-9, '-', '_' or '.'"),
        ))
    }
}

/// A role's statement rules: each names something the relay can match, so a typo is
/// an error at start, not a rule that silently never applies.
/// A role's held actions: a wait that a person at a prompt can sit through, a count
/// its approver groups can meet, and review rules only where a relay enforces them.
fn check_review(
    key: &str,
    r: &super::ResourceConfig,
    role: &crate::config::RoleConfig,
) -> Result<(), ConfigError> {
    let wait = role.review.wait;
    if wait.is_zero() || wait > std::time::Duration::from_secs(3600) {
        return Err(invalid(
            format!("{key}.review.wait"),
            "must be more than 0 and at most 1h: the engineer's client waits that long",
        ));
    }
    if let Some(n) = role.review.approvals {
        if n == 0 {
            return Err(invalid(
                format!("{key}.review.approvals"),
                "must be at least 1: a held action is decided by someone other than its sender",
            ));
        }
        if role.all_groups && (n as usize) < role.approver_groups.len() {
            return Err(invalid(
                format!("{key}.review.approvals"),
                format!(
                    "all_groups needs one approver per group, so review.approvals must be at least {}",
                    role.approver_groups.len()
                ),
            ));
        }
    }
    if role.sql.allow_dynamic_sql
        && (!role.sql.review.is_empty() || !role.sql.review_tables.is_empty())
    {
        return Err(invalid(
            format!("{key}.sql.allow_dynamic_sql"),
            "cannot be true where statements are held for review (sql.review, sql.review_tables): the relay cannot see the statements a DO block or a function body runs, so they would run unheld",
        ));
    }
    if !role.review_commands.is_empty() && r.kind != super::ResourceKind::Ssh {
        return Err(invalid(
            format!("{key}.review_commands"),
            "holds SSH exec commands: only an SSH resource has them (for PostgreSQL use sql.review)",
        ));
    }
    for (i, c) in role.review_commands.iter().enumerate() {
        if c.trim().is_empty() || c.trim() == "*" {
            return Err(invalid(
                format!("{key}.review_commands[{i}]"),
                "must name a command (`*` alone would hold everything: use a role without exec instead)",
            ));
        }
    }
    Ok(())
}

fn check_sql_policy(key: &str, p: &crate::config::SqlPolicy) -> Result<(), ConfigError> {
    use crate::policy::sql::STATEMENT_VERBS;
    let kinds = p.deny.iter().map(|r| ("deny", r));
    for (i, (field, rule)) in kinds
        .enumerate()
        .chain(p.review.iter().map(|r| ("review", r)).enumerate())
    {
        let first = rule
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let words_ok = rule
            .split_whitespace()
            .all(|w| w.chars().all(|c| c.is_ascii_alphabetic()));
        if !STATEMENT_VERBS.contains(&first.as_str()) || !words_ok {
            return Err(invalid(
                format!("{key}.{field}[{i}]"),
                format!(
                    "{rule:?} is not a statement kind: start with one of {}, e.g. \"DROP\", \"COPY PROGRAM\", \"CREATE FUNCTION\"",
                    STATEMENT_VERBS.join(", ")
                ),
            ));
        }
    }
    let ident = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    };
    let tables = p.deny_tables.iter().map(|r| ("deny_tables", r));
    for (i, (field, rule)) in tables.enumerate().chain(
        p.review_tables
            .iter()
            .map(|r| ("review_tables", r))
            .enumerate(),
    ) {
        let k = format!("{key}.{field}[{i}]");
        let ok = match rule.split_once('.') {
            None => ident(rule),
            Some((schema, "*")) => ident(schema),
            Some((schema, table)) => ident(schema) && ident(table),
        };
        if !ok {
            return Err(invalid(
                k,
                format!("{rule:?} must be \"table\", \"schema.table\" or \"schema.*\""),
            ));
        }
        if rule.ends_with(".*") && p.search_path.is_none() {
            return Err(invalid(
                k,
                "a schema rule needs the role's search_path fixed (sql.search_path), so an unqualified name cannot reach the schema unseen",
            ));
        }
    }
    for (i, f) in p.deny_functions.iter().enumerate() {
        if !ident(f) {
            return Err(invalid(
                format!("{key}.deny_functions[{i}]"),
                format!("{f:?} must be a function's name, e.g. \"pg_read_file\""),
            ));
        }
    }
    for (i, m) in p.mask.iter().enumerate() {
        let k = format!("{key}.mask[{i}]");
        match (&m.column, &m.name) {
            (Some(c), None) => {
                let parts: Vec<&str> = c.split('.').collect();
                if !(2..=3).contains(&parts.len()) || !parts.iter().all(|s| ident(s)) {
                    return Err(invalid(
                        format!("{k}.column"),
                        format!("{c:?} must be \"table.column\" or \"schema.table.column\""),
                    ));
                }
            }
            (None, Some(n)) => {
                let ok = n.chars().any(|c| c != '*')
                    && n.chars()
                        .all(|c| c == '*' || c.is_ascii_alphanumeric() || c == '_' || c == '$');
                if !ok {
                    return Err(invalid(
                        format!("{k}.name"),
                        format!(
                            "{n:?} must be a column name, `*` standing for any characters, e.g. \"*ssn*\""
                        ),
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    k,
                    "give either column = \"table.column\" or name = \"pattern\"",
                ));
            }
        }
    }
    if let Some(path) = &p.search_path
        && (path.trim().is_empty() || !path.split(',').all(|s| ident(s.trim().trim_matches('"'))))
    {
        return Err(invalid(
            format!("{key}.search_path"),
            "must be a list of schemas, e.g. \"app, public\"",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, demo_config_toml};

    #[test]
    fn invalid_values_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "min_approvals = 1",
                "min_approvals = 0",
                "resources[0].roles[0].min_approvals",
            ),
            (
                "max_duration = \"4h\"",
                "max_duration = \"4 hours\"",
                "resources[0].roles[0].max_duration",
            ),
            (
                "approver_groups = [\"sre-leads\"]\nmin_approvals = 1",
                "approver_groups = []\nmin_approvals = 1",
                "resources[0].roles[0].approver_groups",
            ),
            (
                "listen = \"127.0.0.1:8080\"",
                "listen = \"localhost\"",
                "server.listen",
            ),
            (
                "name = \"demo-db\"",
                "name = \"demo db\"",
                "resources[0].name",
            ),
            (
                "name = \"demo-ssh\"",
                "name = \"demo-db\"",
                "resources[1].name",
            ),
            (
                "pending_ttl = \"24h\"",
                "pending_ttl = \"0s\"",
                "policy.pending_ttl",
            ),
            (
                "email = \"bob@example.com\"",
                "email = \"alice@example.com\"",
                "auth.dev_users[1].email",
            ),
            (
                "address = \"127.0.0.1:22\"",
                "address = \"127.0.0.1\"",
                "resources[1].address",
            ),
            (
                "address = \"127.0.0.1:22\"",
                "address = \"127.0.0.1:22\"\nhost_key = \"ssh-ed25519 nope\"",
                "resources[1].host_key",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { deny = [\"DELET\"] }",
                "resources[0].roles[0].sql.deny[0]",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { deny = [\"DROP\"] }",
                "resources[0].roles[0].sql",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { mask = [{ column = \"ssn\" }] }",
                "resources[0].roles[0].sql.mask[0].column",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { mask = [{ name = \"**\" }] }",
                "resources[0].roles[0].sql.mask[0].name",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { mask = [{ column = \"t.c\", name = \"c\" }] }",
                "resources[0].roles[0].sql.mask[0]",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { deny_tables = [\"audit.*\"] }",
                "resources[0].roles[0].sql.deny_tables[0]",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { deny_functions = [\"pg_read_file()\"] }",
                "resources[0].roles[0].sql.deny_functions[0]",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { search_path = \"app; drop\" }",
                "resources[0].roles[0].sql.search_path",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { review = [\"DELET\"] }",
                "resources[0].roles[0].sql.review[0]",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { review_tables = [\"a.b.c\"] }",
                "resources[0].roles[0].sql.review_tables[0]",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nsql = { review = [\"DELETE\"], allow_dynamic_sql = true }",
                "resources[0].roles[0].sql.allow_dynamic_sql",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nreview = { wait = \"2h\" }",
                "resources[0].roles[0].review.wait",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nreview = { approvals = 0 }",
                "resources[0].roles[0].review.approvals",
            ),
            (
                "min_approvals = 1",
                "min_approvals = 1\nreview_commands = [\"rm *\"]",
                "resources[0].roles[0].review_commands",
            ),
        ];
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        for (from, to, key) in cases {
            assert!(base.contains(from), "{from}");
            let text = base.replacen(from, to, 1);
            let err = Config::parse(&text, "t")
                .and_then(|c| c.validate())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(key), "{to}: {err}");
        }
    }
}
