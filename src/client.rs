//! The engineer's side of the CLI: `login`, `request`, `status`, `ssh`, `psql` (and
//! `db-login`, in [`db_login`], for the PostgreSQL relay). It talks to a
//! twokey server over `/api/v1` with a token kept in the user's config dir (0600), and
//! never sees anyone else's secrets: `twokey ssh` gets a certificate for the user's own
//! key and hands it to the stock `ssh`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod db_login;
pub use db_login::{DbLoginArgs, db_login};

/// How long `twokey login` waits for the browser.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How often `--wait` asks the server.
const POLL: Duration = Duration::from_secs(2);

/// What `twokey login` saves.
#[derive(Serialize, Deserialize)]
pub struct Credentials {
    pub server: String,
    pub token: String,
}

/// `$TWOKEY_HOME`, else `$XDG_CONFIG_HOME/twokey`, else `~/.config/twokey`.
pub fn config_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("TWOKEY_HOME") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(d).join("twokey"));
    }
    match std::env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".config").join("twokey")),
        None => Err("cannot find a config dir: set TWOKEY_HOME or HOME".into()),
    }
}

fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Writes a file only its owner can read, replacing any earlier one atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn load_credentials() -> Result<Credentials, String> {
    let path = config_dir()?.join("credentials.toml");
    let text = std::fs::read_to_string(&path).map_err(|_| {
        "not signed in: run twokey login --server https://twokey.example.com".to_string()
    })?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn random_b64url(bytes: usize) -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// A signed-in API client.
struct Api {
    server: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(creds: Credentials) -> Result<Api, String> {
        Ok(Api {
            server: creds.server.trim_end_matches('/').to_string(),
            token: creds.token,
            http: http()?,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.server))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {}", self.server, e.without_url()))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err("your twokey sign-in has expired or was revoked: run twokey login".into());
        }
        Err(v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("the server answered {status}")))
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
}

fn http() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())
}

// ------------------------------------------------------------------ login

/// `twokey login`: browser confirmation handed back over a loopback redirect (or a
/// token on stdin for automation).
pub async fn login(
    server: &str,
    token_stdin: bool,
    open_browser: bool,
    approve: bool,
) -> Result<ExitCode, String> {
    let server = server.trim_end_matches('/').to_string();
    // The token rides on every call: plain http only to this machine.
    let ok = reqwest::Url::parse(&server).is_ok_and(|u| {
        u.scheme() == "https"
            || (u.scheme() == "http"
                && matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")))
    });
    if !ok {
        return Err("--server must be an https URL (http only for 127.0.0.1/localhost)".into());
    }
    let token = if token_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        line.trim().to_string()
    } else {
        browser_login(&server, open_browser, approve).await?
    };
    let api = Api::new(Credentials {
        server: server.clone(),
        token: token.clone(),
    })?;
    let me = api.get("/whoami").await?;
    let dir = config_dir()?;
    private_dir(&dir)?;
    let creds = toml::to_string(&Credentials {
        server: server.clone(),
        token,
    })
    .map_err(|e| e.to_string())?;
    write_private(&dir.join("credentials.toml"), creds.as_bytes())?;
    let scopes = me["scopes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!(
        "Signed in to {server} as {} (scopes: {scopes}; until {})",
        me["email"].as_str().unwrap_or("?"),
        me["token_expires_at"].as_str().unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}

async fn browser_login(server: &str, open_browser: bool, approve: bool) -> Result<String, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let state = random_b64url(24);
    let verifier = random_b64url(48);
    let challenge = crate::auth::pkce_challenge(&verifier);
    // Only `requests` unless asked: a stolen CLI token should not approve anything.
    let scope = if approve {
        "requests+approve"
    } else {
        "requests"
    };
    let url =
        format!("{server}/cli/login?port={port}&state={state}&challenge={challenge}&scope={scope}");
    eprintln!("Open this page to sign in (waiting up to 5 minutes):\n  {url}");
    if open_browser {
        for opener in ["xdg-open", "open"] {
            let spawned = std::process::Command::new(opener)
                .arg(&url)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
            if spawned.is_ok() {
                break;
            }
        }
    }
    let code = tokio::time::timeout(LOGIN_TIMEOUT, wait_for_code(&listener, &state))
        .await
        .map_err(|_| "no sign-in within 5 minutes".to_string())??;
    let resp = http()?
        .post(format!("{server}/api/v1/cli/token"))
        .json(&json!({ "code": code, "verifier": verifier }))
        .send()
        .await
        .map_err(|e| format!("cannot reach {server}: {}", e.without_url()))?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    match v["token"].as_str() {
        Some(t) if status.is_success() => Ok(t.to_string()),
        _ => Err(v["message"]
            .as_str()
            .unwrap_or("the server refused the sign-in")
            .to_string()),
    }
}

/// Serves the loopback redirect until one carries our `state`; returns its code.
async fn wait_for_code(listener: &tokio::net::TcpListener, state: &str) -> Result<String, String> {
    loop {
        let (mut sock, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 8192];
        let mut len = 0;
        // Read the request head, bounded.
        while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf[len..])).await {
                Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                Ok(Ok(n)) => len += n,
            }
        }
        let head = String::from_utf8_lossy(&buf[..len]).to_string();
        let target = head
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("GET "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or("");
        let query = target.strip_prefix("/callback?").unwrap_or("");
        let params: std::collections::HashMap<String, String> =
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
        let ok = params
            .get("state")
            .is_some_and(|s| crate::auth::secrets_equal(s, state))
            && params.contains_key("code");
        let body = if ok {
            "<!doctype html><title>twokey</title><p>Signed in. You can close this tab and return to the terminal.</p>"
        } else {
            "<!doctype html><title>twokey</title><p>This is twokey's sign-in listener; nothing to see here.</p>"
        };
        let resp = format!(
            "HTTP/1.1 {}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            if ok { "200 OK" } else { "404 Not Found" },
            body.len()
        );
        let _ = sock.write_all(resp.as_bytes()).await;
        let _ = sock.shutdown().await;
        if ok {
            return Ok(params.get("code").cloned().unwrap_or_default());
        }
    }
}

// ------------------------------------------------------------------ request, status

fn summary(r: &Value) -> String {
    let mut s = format!(
        "{} {}/{} — {}",
        r["id"].as_str().unwrap_or("?"),
        r["resource"].as_str().unwrap_or("?"),
        r["role"].as_str().unwrap_or("?"),
        r["status"].as_str().unwrap_or("?"),
    );
    match r["status"].as_str() {
        Some("pending") => s.push_str(&format!(
            " ({} of {} approvals from {})",
            r["approval_count"],
            r["required_approvals"],
            r["approver_groups"]
                .as_array()
                .map(|g| g
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        )),
        Some("approved") => {
            let g = &r["grant"];
            s.push_str(&format!(
                ", grant {} until {}",
                g["status"].as_str().unwrap_or("?"),
                g["ends_at"].as_str().unwrap_or("?")
            ));
        }
        Some("denied") => {
            if let Some(d) = r["approvals"]
                .as_array()
                .and_then(|a| a.iter().find(|a| a["decision"] == "deny"))
            {
                s.push_str(&format!(" by {}", d["approver"].as_str().unwrap_or("?")));
                if let Some(c) = d["comment"].as_str().filter(|c| !c.is_empty()) {
                    s.push_str(&format!(": {c}"));
                }
            }
        }
        _ => {}
    }
    s
}

/// Polls a request until it is no longer pending.
async fn wait_decided(api: &Api, id: &str) -> Result<Value, String> {
    let mut said = String::new();
    loop {
        let r = api.get(&format!("/requests/{id}")).await?;
        let line = summary(&r);
        if line != said {
            eprintln!("{line}");
            said = line;
        }
        if r["status"] != "pending" {
            return Ok(r);
        }
        tokio::time::sleep(POLL).await;
    }
}

pub struct RequestArgs {
    pub resource: String,
    pub role: String,
    pub duration: String,
    pub reason: String,
    pub ticket: Option<String>,
    pub wait: bool,
}

pub async fn request(a: RequestArgs) -> Result<ExitCode, String> {
    let api = Api::new(load_credentials()?)?;
    let r = api
        .post(
            "/requests",
            json!({"resource": a.resource, "role": a.role, "duration": a.duration,
                   "reason": a.reason, "ticket": a.ticket}),
        )
        .await?;
    println!("{}", summary(&r));
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let id = r["id"].as_str().unwrap_or_default();
    let r = wait_decided(&api, id).await?;
    Ok(if r["status"] == "approved" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn status() -> Result<ExitCode, String> {
    let api = Api::new(load_credentials()?)?;
    let me = api.get("/whoami").await?;
    let all = api.get("/requests").await?;
    let mine: Vec<&Value> = all["requests"]
        .as_array()
        .map(|v| v.iter().filter(|r| r["requester"] == me["email"]).collect())
        .unwrap_or_default();
    if mine.is_empty() {
        println!(
            "No requests yet. File one: twokey request RESOURCE --role ROLE --for 30m --reason \"…\""
        );
    }
    for r in mine {
        println!("{}", summary(r));
    }
    Ok(ExitCode::SUCCESS)
}

// ------------------------------------------------------------------ ssh

pub struct SshArgs {
    /// Connect through the relay at this `host:port` instead of to the target.
    pub relay: Option<String>,
    pub resource: String,
    pub role: Option<String>,
    pub wait: bool,
    pub key: Option<PathBuf>,
    pub command: Vec<String>,
}

/// The request whose grant is live for `resource`, or a message saying what to do.
async fn live_request(
    api: &Api,
    resource: &str,
    role: Option<&str>,
    wait: bool,
) -> Result<Value, String> {
    let me = api.get("/whoami").await?;
    let all = api.get("/requests").await?;
    let now = chrono::Utc::now();
    let mut mine: Vec<Value> = all["requests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| {
            r["requester"] == me["email"]
                && r["resource"] == resource
                && role.is_none_or(|role| r["role"] == role)
        })
        .collect();
    // Newest first.
    mine.sort_by(|a, b| b["created_at"].as_str().cmp(&a["created_at"].as_str()));
    let live = |r: &Value| {
        r["grant"]["status"] == "active"
            && r["grant"]["ends_at"]
                .as_str()
                .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
                .is_some_and(|e| e > now)
    };
    if let Some(r) = mine.iter().find(|r| live(r)) {
        return Ok(r.clone());
    }
    if let Some(p) = mine.iter().find(|r| r["status"] == "pending") {
        let id = p["id"].as_str().unwrap_or_default();
        if !wait {
            return Err(format!(
                "{}\nIt needs approval before you can connect; run again with --wait to wait for it.",
                summary(p)
            ));
        }
        let r = wait_decided(api, id).await?;
        if live(&r) {
            return Ok(r);
        }
        return Err(format!("{}: no access.", summary(&r)));
    }
    let hint = format!(
        "run: twokey request {resource} --role {} --for 30m --reason \"…\"",
        role.unwrap_or("ROLE")
    );
    match mine.first() {
        Some(r) if r["status"] == "denied" => Err(format!(
            "Your last request was denied: {}\nTo ask again, {hint}",
            summary(r)
        )),
        Some(r) if r["status"] == "approved" => Err(format!(
            "Your grant on {resource} has {} ({}).\nTo ask again, {hint}",
            if r["grant"]["status"] == "revoked" {
                "been revoked"
            } else {
                "ended"
            },
            r["id"].as_str().unwrap_or("?")
        )),
        _ => Err(format!(
            "You have no live grant for {resource}.\nTo get one, {hint}"
        )),
    }
}

/// The user's key: `--key`, else `~/.ssh/id_ed25519`, else one twokey makes under its
/// config dir. Returns the private key's path; the public key is beside it (`.pub`).
fn user_key(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(k) = explicit {
        return Ok(k);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let k = PathBuf::from(home).join(".ssh").join("id_ed25519");
        if k.exists() && k.with_extension("pub").exists() {
            return Ok(k);
        }
    }
    let dir = config_dir()?;
    let k = dir.join("id_ed25519");
    if k.exists() && k.with_extension("pub").exists() {
        return Ok(k);
    }
    private_dir(&dir)?;
    use ssh_key::getrandom::SysRng;
    use ssh_key::rand_core::UnwrapErr;
    let mut key = ssh_key::PrivateKey::random(&mut UnwrapErr(SysRng), ssh_key::Algorithm::Ed25519)
        .map_err(|e| format!("making a key: {e}"))?;
    key.set_comment("twokey");
    let pem = key
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(|e| format!("making a key: {e}"))?;
    write_private(&k, pem.as_bytes())?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| format!("making a key: {e}"))?;
    std::fs::write(k.with_extension("pub"), format!("{public}\n"))
        .map_err(|e| format!("{}: {e}", k.display()))?;
    eprintln!("Made a key for twokey at {}", k.display());
    Ok(k)
}

/// `twokey ssh`: a certificate for the live grant, then `exec ssh`.
pub async fn ssh(a: SshArgs) -> Result<ExitCode, String> {
    let api = Api::new(load_credentials()?)?;
    let req = live_request(&api, &a.resource, a.role.as_deref(), a.wait).await?;
    let id = req["id"].as_str().unwrap_or_default().to_string();
    let key = user_key(a.key.clone())?;
    let public = std::fs::read_to_string(key.with_extension("pub"))
        .map_err(|e| format!("{}.pub: {e}", key.display()))?;
    let minted = api
        .post(
            &format!("/requests/{id}/ssh-certificate"),
            json!({ "public_key": public.trim() }),
        )
        .await?;
    if let Some(relay) = &a.relay {
        // Pin the relay's host key as twokey itself reports it.
        let resp = api
            .http
            .get(format!("{}/api/v1/relay/host-key", api.server))
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {}", api.server, e.without_url()))?;
        if !resp.status().is_success() {
            return Err(format!("{} has no SSH relay", api.server));
        }
        let host_key = resp.text().await.map_err(|e| e.to_string())?;
        let (host, port) = relay
            .rsplit_once(':')
            .ok_or_else(|| format!("--relay {relay:?}: expected host:port"))?;
        // The relay checks the certificate and the grant; the engineer never learns
        // how it logs in to the target.
        return exec_ssh(
            &Destination {
                host,
                port,
                login: &a.resource,
                host_key: Some(host_key.trim()),
                pin_name: "relay",
                ciphers: Some(RELAY_CIPHERS),
            },
            &id,
            &key,
            &minted,
            &a.command,
            &format!("Connecting to {} through the relay at {relay}", a.resource),
        );
    }
    let Some(address) = minted["address"].as_str() else {
        return Err(format!(
            "{} has no address in twokey's config; ask an admin to set it",
            a.resource
        ));
    };
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{} has a bad address {address:?}", a.resource))?;
    let principal = minted["principals"][0]
        .as_str()
        .ok_or("the certificate names no login")?;
    exec_ssh(
        &Destination {
            host,
            port,
            login: principal,
            // Pinned by twokey's config: connect to nothing else.
            host_key: minted["host_key"].as_str().map(str::trim),
            pin_name: &a.resource,
            ciphers: None,
        },
        &id,
        &key,
        &minted,
        &a.command,
        &format!(
            "Connecting to {} as {principal} (certificate valid until the grant ends)",
            a.resource
        ),
    )
}

/// Where `twokey ssh` connects: a target, or the relay.
struct Destination<'a> {
    host: &'a str,
    port: &'a str,
    login: &'a str,
    /// The host key to pin; without one, the user's known_hosts decides.
    host_key: Option<&'a str>,
    /// Names the pinned known_hosts file under the config dir.
    pin_name: &'a str,
    /// The ciphers to offer, when not ssh's defaults.
    ciphers: Option<&'a str>,
}

/// Towards the relay, AES-GCM: with AES-NI it costs both ends the least CPU (1 GiB
/// through the relay here: 328 MiB/s, against about 270 with ssh's own choice among
/// what the relay offers; `TWOKEY_BENCH_CIPHER` in benches/relay.rs).
const RELAY_CIPHERS: &str = "aes256-gcm@openssh.com,aes128-gcm@openssh.com,aes256-ctr,aes128-ctr";

/// Saves the certificate beside twokey's other files (0600), pins the host key, and
/// replaces this process with `ssh`.
fn exec_ssh(
    to: &Destination<'_>,
    id: &str,
    key: &Path,
    minted: &Value,
    command: &[String],
    banner: &str,
) -> Result<ExitCode, String> {
    let dir = config_dir()?.join("certs");
    private_dir(&dir)?;
    let cert = dir.join(format!("{id}-cert.pub"));
    write_private(
        &cert,
        format!("{}\n", minted["certificate"].as_str().unwrap_or_default()).as_bytes(),
    )?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-o")
        .arg(format!("CertificateFile={}", cert.display()))
        .args(["-o", "IdentitiesOnly=yes", "-i"])
        .arg(key)
        .args(["-p", to.port]);
    if let Some(hk) = to.host_key {
        let kh = dir.join(format!("known_hosts-{}", to.pin_name));
        let pattern = if to.port == "22" {
            to.host.to_string()
        } else {
            format!("[{}]:{}", to.host, to.port)
        };
        write_private(&kh, format!("{pattern} {hk}\n").as_bytes())?;
        cmd.arg("-o")
            .arg(format!("UserKnownHostsFile={}", kh.display()))
            .args(["-o", "StrictHostKeyChecking=yes"]);
    }
    if let Some(ciphers) = to.ciphers {
        cmd.arg("-o").arg(format!("Ciphers={ciphers}"));
    }
    cmd.arg(format!("{}@{}", to.login, to.host));
    if !command.is_empty() {
        cmd.arg("--").args(command);
    }
    eprintln!("{banner}");
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(format!("cannot run ssh: {err}"))
}

pub struct PsqlArgs {
    pub resource: String,
    pub role: Option<String>,
    pub wait: bool,
    pub args: Vec<String>,
}

/// `twokey psql`: a login for the live grant, then `exec psql`. The password goes in
/// the environment (`PGPASSWORD`), not on the command line where `ps` would show it.
/// A resource reached through the relay (the request's `db_access`) gets a relay
/// password and psql connects to the relay; otherwise the grant's own login, directly.
pub async fn psql(a: PsqlArgs) -> Result<ExitCode, String> {
    let api = Api::new(load_credentials()?)?;
    let req = live_request(&api, &a.resource, a.role.as_deref(), a.wait).await?;
    if let Some(login) = db_login::relay_login_if_relay(&api, &req).await? {
        return db_login::exec_relay_psql(&a.resource, &login, &a.args);
    }
    let id = req["id"].as_str().unwrap_or_default().to_string();
    let c = api
        .post(&format!("/requests/{id}/db-credentials"), json!({}))
        .await?;
    let field = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    let host = field("host");
    let url = format!(
        "postgresql://{}@{}:{}/{}?sslmode={}",
        field("username"),
        if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        },
        c["port"],
        form_urlencoded::byte_serialize(field("database").as_bytes()).collect::<String>(),
        field("sslmode"),
    );
    eprintln!(
        "Connecting to {} as {} (the login ends with the grant at {})",
        a.resource,
        field("username"),
        field("expires_at")
    );
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("psql")
        .arg(url)
        .args(&a.args)
        .env("PGPASSWORD", field("password"))
        .exec();
    Err(format!("cannot run psql: {err}"))
}
