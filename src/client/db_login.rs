//! The engineer's side of the PostgreSQL relay: `twokey db-login` prints a relay
//! password for a live grant (once) with where to connect, and `twokey psql` on a
//! resource reached through the relay gets one and runs psql against the relay.
//!
//! The relay's certificate is saved under the config dir and pinned (`sslmode =
//! verify-full`, `sslrootcert`); the password goes to psql only in its environment
//! (`PGPASSWORD`), never on a command line where `ps` would show it, and is never
//! written to a file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{Value, json};

use super::{Api, config_dir, live_request, load_credentials, private_dir};

pub struct DbLoginArgs {
    pub resource: String,
    pub role: Option<String>,
    pub wait: bool,
}

/// `twokey db-login`: a relay password for the live grant, printed once.
pub async fn db_login(a: DbLoginArgs) -> Result<ExitCode, String> {
    let api = Api::new(load_credentials()?)?;
    let req = live_request(&api, &a.resource, a.role.as_deref(), a.wait).await?;
    if req["db_access"] == "direct" {
        return Err(format!(
            "{} is reached directly, not through twokey's relay: run twokey psql {}",
            a.resource, a.resource
        ));
    }
    let login = relay_login(&api, &req).await?;
    let field = |k: &str| login[k].as_str().unwrap_or_default().to_string();
    let cert = save_relay_cert(&login)?;
    println!(
        "Relay login for {} (until {}; shown once — getting another replaces it):",
        a.resource,
        field("expires_at")
    );
    println!("  host      {}", field("host"));
    println!("  port      {}", login["port"]);
    println!("  dbname    {}", field("database"));
    println!("  user      {}", field("user"));
    println!("  password  {}", field("password"));
    println!("  sslmode   verify-full");
    println!("  sslrootcert {}", cert.display());
    println!("psql \"{}\"", conninfo(&login, &cert));
    println!(
        "The relay's certificate (SHA-256 {}) is saved at {}",
        field("fingerprint"),
        cert.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Asks the server for a relay password for the grant of `req`.
async fn relay_login(api: &Api, req: &Value) -> Result<Value, String> {
    let id = req["id"].as_str().unwrap_or_default();
    api.post(&format!("/requests/{id}/relay-login"), json!({}))
        .await
}

/// The connection string for psql, with the saved certificate's path.
fn conninfo(login: &Value, cert: &Path) -> String {
    let field = |k: &str| login[k].as_str().unwrap_or_default().to_string();
    crate::dbcreds::conninfo(&[
        ("host", &field("host")),
        ("port", &login["port"].to_string()),
        ("dbname", &field("database")),
        ("user", &field("user")),
        ("sslmode", "verify-full"),
        ("sslrootcert", &cert.display().to_string()),
    ])
}

/// Writes the relay's certificate as `twokey-relay-<host>.pem` in the config dir
/// (0644: it is public), replacing an earlier one atomically.
fn save_relay_cert(login: &Value) -> Result<PathBuf, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let pem = login["sslrootcert_pem"]
        .as_str()
        .filter(|p| p.contains("BEGIN CERTIFICATE"))
        .ok_or("the server sent no relay certificate")?;
    let host = cert_name(login["host"].as_str().unwrap_or_default());
    let dir = config_dir()?;
    private_dir(&dir)?;
    let path = dir.join(format!("twokey-relay-{host}.pem"));
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(pem.as_bytes())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// A host as part of a file name: letters, digits, `.` and `-`; anything else `_`.
fn cert_name(host: &str) -> String {
    let name: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        format!("_{name}")
    } else {
        name
    }
}

/// `twokey psql` on a resource reached through the relay: a relay password, the
/// relay's certificate saved, then `exec psql` against the relay.
pub(super) fn exec_relay_psql(
    resource: &str,
    login: &Value,
    args: &[String],
) -> Result<ExitCode, String> {
    let cert = save_relay_cert(login)?;
    eprintln!(
        "Connecting to {resource} through twokey's relay at {}:{} as {} (recorded; until {})",
        login["host"].as_str().unwrap_or_default(),
        login["port"],
        login["user"].as_str().unwrap_or_default(),
        login["expires_at"].as_str().unwrap_or_default(),
    );
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("psql")
        .arg(conninfo(login, &cert))
        .args(args)
        .env("PGPASSWORD", login["password"].as_str().unwrap_or_default())
        .exec();
    Err(format!("cannot run psql: {err}"))
}

/// For `twokey psql`: the relay login when the request's resource is reached through
/// the relay (the server says so in the request's `db_access`), else `None`.
pub(super) async fn relay_login_if_relay(api: &Api, req: &Value) -> Result<Option<Value>, String> {
    if req["db_access"] != "relay" {
        return Ok(None);
    }
    relay_login(api, req).await.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_file_names_keep_only_safe_characters() {
        for (host, want) in [
            ("relay.example.com", "relay.example.com"),
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "__1"),
            ("../../etc/passwd", "_.._.._etc_passwd"),
            ("", "_"),
            (".hidden", "_.hidden"),
        ] {
            assert_eq!(cert_name(host), want, "{host}");
        }
    }

    #[test]
    fn the_psql_conninfo_names_the_saved_certificate_and_no_password() {
        let login = json!({"host": "relay.example.com", "port": 6432, "database": "prod-db",
            "user": "alice@example.com", "password": "p4ss"});
        assert_eq!(
            conninfo(
                &login,
                Path::new("/home/a/.config/twokey/twokey-relay-x.pem")
            ),
            "host=relay.example.com port=6432 dbname=prod-db user=alice@example.com \
             sslmode=verify-full sslrootcert=/home/a/.config/twokey/twokey-relay-x.pem"
        );
        assert!(
            conninfo(&login, Path::new("/tmp/my certs/x.pem"))
                .ends_with("sslrootcert='/tmp/my certs/x.pem'")
        );
    }
}
