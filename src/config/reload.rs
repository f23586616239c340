//! What a reload of the configuration file takes while the server runs: the policy
//! (`[policy]`, and every role of the resources it already serves) applies at once;
//! everything else (listeners, the database, sign-in, the CA, notifications, the relay,
//! the audit key, a resource's own connection settings, resources added or removed)
//! holds until a restart and is named so the operator knows. A resource whose own
//! settings changed keeps its roles too until the restart: they may have been written
//! for its new settings.
//!
//! It compares the new file with the file as it was last read, not with the running
//! configuration: a server fills in what it learned by starting (the ports it bound, the
//! URL it serves at), and that is no change of the file.

use super::{Config, ResourceConfig, RoleConfig};

/// What a reload applies, and what it leaves for a restart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reload {
    /// The configuration to run: the running one with the new policy.
    pub config: Config,
    /// Roles whose settings changed, as `resource/role`.
    pub changed: Vec<String>,
    /// Roles the new file adds, as `resource/role`.
    pub added: Vec<String>,
    /// Roles the new file no longer has, as `resource/role`.
    pub removed: Vec<String>,
    /// Whether `[policy]` changed.
    pub policy: bool,
    /// Keys the new file changes that take effect only at a restart.
    pub needs_restart: Vec<String>,
}

impl Reload {
    /// Whether the reload changes what runs.
    pub fn applies_anything(&self) -> bool {
        self.policy
            || !(self.changed.is_empty() && self.added.is_empty() && self.removed.is_empty())
    }
}

/// The reload of `new` into a server running `running`, whose file said `as_read`.
pub fn reload(running: &Config, as_read: &Config, new: &Config) -> Reload {
    let mut r = Reload {
        config: running.clone(),
        ..Reload::default()
    };
    let sections: [(&str, bool); 7] = [
        ("server", new.server == as_read.server),
        ("auth", new.auth == as_read.auth),
        ("email", new.email == as_read.email),
        ("slack", new.slack == as_read.slack),
        ("ca", new.ca == as_read.ca),
        ("relay", new.relay == as_read.relay),
        ("audit", new.audit == as_read.audit),
    ];
    r.needs_restart = sections
        .iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name.to_string())
        .collect();
    if new.policy != running.policy {
        r.policy = true;
        r.config.policy = new.policy.clone();
    }
    for old in &as_read.resources {
        if !new.resources.iter().any(|n| n.name == old.name) {
            r.needs_restart
                .push(format!("resources.{} (removed)", old.name));
        }
    }
    for n in &new.resources {
        let Some(old) = as_read.resources.iter().find(|o| o.name == n.name) else {
            r.needs_restart
                .push(format!("resources.{} (added)", n.name));
            continue;
        };
        // Its roles may have been written for its new settings (direct access, say):
        // they wait for the restart with them.
        if own_settings(old) != own_settings(n) {
            r.needs_restart
                .push(format!("resources.{} (and its roles)", n.name));
            continue;
        }
        let Some(run) = r.config.resources.iter_mut().find(|x| x.name == n.name) else {
            continue;
        };
        roles_diff(
            &n.name,
            &run.roles,
            &n.roles,
            &mut r.changed,
            &mut r.added,
            &mut r.removed,
        );
        run.roles = n.roles.clone();
        run.description = n.description.clone();
    }
    r
}

/// A resource's settings without its roles and description: what only a restart
/// applies.
fn own_settings(r: &ResourceConfig) -> ResourceConfig {
    ResourceConfig {
        roles: Vec::new(),
        description: String::new(),
        ..r.clone()
    }
}

fn roles_diff(
    resource: &str,
    old: &[RoleConfig],
    new: &[RoleConfig],
    changed: &mut Vec<String>,
    added: &mut Vec<String>,
    removed: &mut Vec<String>,
) {
    for o in old {
        match new.iter().find(|n| n.name == o.name) {
            None => removed.push(format!("{resource}/{}", o.name)),
            Some(n) if n != o => changed.push(format!("{resource}/{}", o.name)),
            Some(_) => {}
        }
    }
    for n in new {
        if !old.iter().any(|o| o.name == n.name) {
            added.push(format!("{resource}/{}", n.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::demo_config_toml;

    fn demo() -> Config {
        Config::parse(
            &demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x")),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn an_unchanged_file_changes_nothing_though_the_server_filled_in_its_ports() {
        let as_read = demo();
        let mut running = as_read.clone();
        running.server.public_url = Some("http://127.0.0.1:41234".into());
        let r = reload(&running, &as_read, &as_read.clone());
        assert!(!r.applies_anything());
        assert!(r.needs_restart.is_empty(), "{:?}", r.needs_restart);
        assert_eq!(r.config, running, "what the server learned is kept");
    }

    #[test]
    fn roles_and_policy_apply_and_the_rest_waits_for_a_restart() {
        let as_read = demo();
        let mut running = as_read.clone();
        running.server.public_url = Some("http://127.0.0.1:41234".into());
        let mut new = as_read.clone();
        new.server.listen = "127.0.0.1:9999".into();
        new.auth.dev_login = !new.auth.dev_login;
        new.policy.pending_ttl = std::time::Duration::from_secs(60);
        let db = new
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-db")
            .unwrap();
        db.description = "a new description".into();
        db.roles[0].sql.deny.push("TRUNCATE".into());
        let db_role = db.roles[0].name.clone();
        let mut extra = db.roles[0].clone();
        extra.name = "extra".into();
        db.roles.push(extra.clone());
        let ssh = new
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-ssh")
            .unwrap();
        // Its own settings change: its roles wait for the restart with them.
        ssh.address = Some("elsewhere:22".into());
        ssh.roles.push(RoleConfig {
            name: "waits".into(),
            ..ssh.roles[0].clone()
        });
        new.resources.push(ResourceConfig {
            name: "brand-new".into(),
            ..new.resources[0].clone()
        });

        let r = reload(&running, &as_read, &new);
        assert_eq!(r.changed, vec![format!("demo-db/{db_role}")]);
        assert_eq!(r.added, vec!["demo-db/extra".to_string()]);
        assert!(r.removed.is_empty());
        assert!(r.policy);
        assert_eq!(
            r.needs_restart,
            vec![
                "server",
                "auth",
                "resources.demo-ssh (and its roles)",
                "resources.brand-new (added)"
            ]
        );
        // Applied: the roles, the description, the policy. Kept: everything else,
        // including what the server filled in.
        let run = |name: &str| r.config.resources.iter().find(|x| x.name == name).unwrap();
        assert_eq!(run("demo-db").roles.len(), 2);
        assert!(
            run("demo-db").roles[0]
                .sql
                .deny
                .contains(&"TRUNCATE".to_string())
        );
        assert_eq!(run("demo-db").description, "a new description");
        let was = |name: &str| running.resources.iter().find(|x| x.name == name).unwrap();
        assert_eq!(run("demo-ssh"), was("demo-ssh"));
        assert_eq!(
            r.config.policy.pending_ttl,
            std::time::Duration::from_secs(60)
        );
        assert_eq!(r.config.server, running.server);
        assert_eq!(r.config.auth, running.auth);
        assert!(!r.config.resources.iter().any(|r| r.name == "brand-new"));
    }

    #[test]
    fn a_resource_dropped_from_the_file_is_served_until_a_restart() {
        let as_read = demo();
        let mut new = as_read.clone();
        let gone = new.resources.remove(0).name;
        let r = reload(&as_read, &as_read, &new);
        assert_eq!(r.needs_restart, vec![format!("resources.{gone} (removed)")]);
        assert!(!r.applies_anything());
        assert_eq!(r.config.resources, as_read.resources);
    }
}
