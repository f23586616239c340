//! dbcreds' rules for the configuration: a PostgreSQL resource twokey manages logins
//! on needs its address, database, admin role and password file, a TLS mode it knows,
//! and roles that say what a grant's login may do. Run by `server::check_config` after
//! the config's own checks; it never connects to a target (check-config does that).

use crate::config::{Config, ConfigError, invalid};

/// Checks every resource whose database logins twokey manages, naming the offending key.
pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    for (i, r) in config.resources.iter().enumerate() {
        let key = format!("resources[{i}]");
        for (j, role) in r.roles.iter().enumerate() {
            let key = format!("{key}.roles[{j}]");
            if r.manages_db_roles() {
                if role.db_roles.is_empty() && role.db_grants.is_empty() {
                    return Err(invalid(
                        format!("{key}.db_roles"),
                        "list the database roles a grant's login joins (or db_grants)",
                    ));
                }
                if let Some(g) = role.db_grants.iter().find(|g| !g.contains("{role}")) {
                    return Err(invalid(
                        format!("{key}.db_grants"),
                        format!("{g:?} must say {{role}} where the login goes"),
                    ));
                }
                if role.connection_limit < 1 {
                    return Err(invalid(
                        format!("{key}.connection_limit"),
                        "must be at least 1",
                    ));
                }
            }
        }
        if r.manages_db_roles() {
            // twokey owns the prefix: its own admin or a role it grants must never be
            // mistaken for a grant's login.
            let owned = r
                .admin_user
                .iter()
                .chain(r.reassign_owned_to.iter())
                .chain(r.roles.iter().flat_map(|role| role.db_roles.iter()));
            if let Some(n) = owned
                .into_iter()
                .find(|n| n.starts_with(crate::dbcreds::ROLE_PREFIX))
            {
                return Err(invalid(
                    format!("{key}.admin_user"),
                    format!("{n:?}: names starting with twokey_ are reserved for grants' logins"),
                ));
            }
            if r.address.is_none() {
                return Err(invalid(
                    format!("{key}.address"),
                    "is required: host:port of the database",
                ));
            }
            if r.database.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    format!("{key}.database"),
                    "is required with admin_user",
                ));
            }
            r.admin_password(&key)?;
            let tls = r.tls.as_deref().unwrap_or(crate::dbcreds::DEFAULT_TLS);
            if !matches!(tls, "disable" | "prefer" | "require" | "verify-full") {
                return Err(invalid(
                    format!("{key}.tls"),
                    "must be verify-full (the default), require, prefer or disable",
                ));
            }
            if let Some(ca) = &r.tls_ca_file {
                if tls == "disable" {
                    return Err(invalid(
                        format!("{key}.tls_ca_file"),
                        "has no effect with tls = \"disable\": remove one of them",
                    ));
                }
                let pem = std::fs::read_to_string(ca).map_err(|e| {
                    invalid(
                        format!("{key}.tls_ca_file"),
                        format!("cannot read {}: {e}", ca.display()),
                    )
                })?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(invalid(
                        format!("{key}.tls_ca_file"),
                        format!("{} holds no PEM certificate", ca.display()),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, demo_config_toml};

    #[test]
    fn postgres_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "x").unwrap();
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        let with = |resource_extra: &str, role_extra: &str| {
            let text = base
                .replacen(
                    "description = \"Demo PostgreSQL database\"",
                    &format!("description = \"Demo PostgreSQL database\"\n{resource_extra}"),
                    1,
                )
                .replacen(
                    "max_duration = \"4h\"",
                    &format!("max_duration = \"4h\"\n{role_extra}"),
                    1,
                );
            Config::parse(&text, "t")
                .and_then(|c| {
                    c.validate()?;
                    super::check_config(&c)
                })
                .map_err(|e| e.to_string())
        };
        let good = format!(
            "address = \"127.0.0.1:5432\"\ndatabase = \"app\"\nadmin_user = \"twokey\"\nadmin_password_file = {:?}",
            pw.display().to_string()
        );
        with(&good, "db_roles = [\"readonly\"]").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        with(
            &format!("{good}\ntls_ca_file = {:?}", ca.display().to_string()),
            "db_roles = [\"readonly\"]",
        )
        .unwrap();
        for (resource, role, key) in [
            (
                good.replace("database = \"app\"\n", ""),
                "db_roles = [\"r\"]",
                "resources[0].database",
            ),
            (
                good.replace("address = \"127.0.0.1:5432\"\n", ""),
                "db_roles = [\"r\"]",
                "resources[0].address",
            ),
            (
                format!("{good}\ntls = \"sometimes\""),
                "db_roles = [\"r\"]",
                "resources[0].tls",
            ),
            (
                format!("{good}\ntls_ca_file = \"/no/such/ca.pem\""),
                "db_roles = [\"r\"]",
                "resources[0].tls_ca_file",
            ),
            (
                // The password file is no certificate.
                format!("{good}\ntls_ca_file = {:?}", pw.display().to_string()),
                "db_roles = [\"r\"]",
                "resources[0].tls_ca_file",
            ),
            (
                format!(
                    "{good}\ntls = \"disable\"\ntls_ca_file = {:?}",
                    ca.display().to_string()
                ),
                "db_roles = [\"r\"]",
                "resources[0].tls_ca_file",
            ),
            (
                good.replace("pw\"", "absent\""),
                "db_roles = [\"r\"]",
                "resources[0].admin_password_file",
            ),
            (good.clone(), "", "resources[0].roles[0].db_roles"),
            (
                good.clone(),
                "db_grants = [\"GRANT SELECT ON t TO x\"]",
                "resources[0].roles[0].db_grants",
            ),
            (
                good.clone(),
                "db_roles = [\"r\"]\nconnection_limit = 0",
                "resources[0].roles[0].connection_limit",
            ),
        ] {
            let err = with(&resource, role).unwrap_err();
            assert!(err.starts_with(key), "{key}: {err}");
        }
    }
}
