//! The configuration `twokey demo` writes: demo sign-in, four users, two resources.
//! Never for real users: demo sign-in needs no password.

use std::path::Path;

/// The configuration `twokey demo` writes and runs with.
pub fn demo_config_toml(listen: &str, data_dir: &Path) -> String {
    let data_dir = toml::Value::String(data_dir.display().to_string());
    format!(
        r#"# Written by `twokey demo`. Edit and run `twokey serve --config <this file>`.
# Demo sign-in needs no password: never turn it on for real users.

[server]
listen = "{listen}"
data_dir = {data_dir}

[auth]
dev_login = true
admin_groups = ["admins"]

[[auth.dev_users]]
email = "alice@example.com"
name = "Alice (requester)"
groups = ["engineers"]

[[auth.dev_users]]
email = "bob@example.com"
name = "Bob (approver)"
groups = ["sre-leads"]

[[auth.dev_users]]
email = "carol@example.com"
name = "Carol (approver)"
groups = ["sre-leads"]

[[auth.dev_users]]
email = "dave@example.com"
name = "Dave (admin)"
groups = ["admins"]

[email]
from = "twokey demo <twokey@example.com>"
# Messages land in the built-in mailbox page (/dev/mailbox) instead of SMTP.
dev_mailbox = true

[policy]
pending_ttl = "24h"

[[resources]]
name = "demo-db"
kind = "postgres"
description = "Demo PostgreSQL database"

[[resources.roles]]
name = "read"
description = "Read-only access"
requester_groups = ["engineers", "admins"]
approver_groups = ["sre-leads"]
min_approvals = 1
max_duration = "4h"

[[resources]]
name = "demo-ssh"
kind = "ssh"
description = "Demo SSH host"
address = "127.0.0.1:22"

[[resources.roles]]
name = "admin"
description = "Root shell"
requester_groups = ["engineers", "admins"]
approver_groups = ["sre-leads"]
min_approvals = 2
max_duration = "1h"
require_ticket = true
# Certificates for this role log in as "admin", with a terminal and nothing else.
principals = ["admin"]
extensions = ["permit-pty"]
"#
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::super::Config;
    use super::demo_config_toml;

    fn demo() -> Config {
        Config::parse(
            &demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x")),
            "demo",
        )
        .unwrap()
    }

    #[test]
    fn demo_config_is_valid() {
        let c = demo();
        c.validate().unwrap();
        assert!(c.auth.dev_login);
        let (_, role) = c.role("demo-ssh", "admin").unwrap();
        assert_eq!(role.min_approvals, 2);
        assert!(role.require_ticket);
        assert_eq!(role.max_duration(), Duration::from_secs(3600));
    }

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../twokey.example.toml");
        Config::parse(text, "twokey.example.toml")
            .unwrap()
            .validate()
            .unwrap();
    }
}
