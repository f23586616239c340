//! The CA's rules for the configuration: what an ssh role's certificates may say
//! (principals, extensions, forced command, source addresses). Run by
//! `server::check_config` after the config's own checks; it never reads a key.

use crate::config::{Config, ConfigError, ResourceKind, RoleConfig, invalid};

/// Checks every role of every ssh resource, naming the offending key.
pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    for (i, r) in config.resources.iter().enumerate() {
        if r.kind != ResourceKind::Ssh {
            continue;
        }
        for (j, role) in r.roles.iter().enumerate() {
            check_ssh_role(&format!("resources[{i}].roles[{j}]"), role)?;
        }
    }
    Ok(())
}

fn check_ssh_role(key: &str, role: &RoleConfig) -> Result<(), ConfigError> {
    if role.principals.is_empty() {
        return Err(invalid(
            format!("{key}.principals"),
            "an ssh role must list the logins its certificates are for, e.g. [\"deploy\"]",
        ));
    }
    if let Some(p) = role
        .principals
        .iter()
        .find(|p| !crate::ca::valid_principal(p))
    {
        return Err(invalid(
            format!("{key}.principals"),
            format!("{p:?} is not a login name (no wildcards, commas or spaces)"),
        ));
    }
    if let Some(e) = role
        .extensions
        .iter()
        .find(|e| !crate::ca::KNOWN_EXTENSIONS.contains(&e.as_str()))
    {
        return Err(invalid(
            format!("{key}.extensions"),
            format!(
                "unknown extension {e:?}; known: {}",
                crate::ca::KNOWN_EXTENSIONS.join(", ")
            ),
        ));
    }
    if role
        .force_command
        .as_deref()
        .is_some_and(|c| c.trim().is_empty() || c.contains('\n'))
    {
        return Err(invalid(
            format!("{key}.force_command"),
            "must be one non-empty line",
        ));
    }
    for a in &role.source_address {
        if !valid_cidr(a) {
            return Err(invalid(
                format!("{key}.source_address"),
                format!("{a:?} is not an address or CIDR, e.g. \"10.0.0.0/8\""),
            ));
        }
    }
    Ok(())
}

fn valid_cidr(s: &str) -> bool {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    bits.is_none_or(|b| b.parse::<u8>().is_ok_and(|n| n <= max))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, demo_config_toml};

    #[test]
    fn ssh_role_settings_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "principals = [\"admin\"]",
                "principals = []",
                "resources[1].roles[0].principals",
            ),
            (
                "principals = [\"admin\"]",
                "principals = [\"*\"]",
                "resources[1].roles[0].principals",
            ),
            (
                "principals = [\"admin\"]",
                "principals = [\"admin,root\"]",
                "resources[1].roles[0].principals",
            ),
            (
                "extensions = [\"permit-pty\"]",
                "extensions = [\"permit-anything\"]",
                "resources[1].roles[0].extensions",
            ),
            (
                "extensions = [\"permit-pty\"]",
                "extensions = [\"permit-pty\"]\nsource_address = [\"10.0.0.0/33\"]",
                "resources[1].roles[0].source_address",
            ),
            (
                "extensions = [\"permit-pty\"]",
                "extensions = [\"permit-pty\"]\nforce_command = \" \"",
                "resources[1].roles[0].force_command",
            ),
        ];
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        super::check_config(&Config::parse(&base, "t").unwrap()).unwrap();
        for (from, to, key) in cases {
            assert!(base.contains(from), "{from}");
            let text = base.replacen(from, to, 1);
            let c = Config::parse(&text, "t").unwrap();
            // The config's own checks pass: the refusal is the CA's.
            c.validate().unwrap();
            let err = super::check_config(&c).unwrap_err().to_string();
            assert!(err.starts_with(key), "{to}: {err}");
        }
    }
}
