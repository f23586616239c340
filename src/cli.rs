//! The command line: server commands (`demo`, `serve`, `check-config`), admin
//! commands (`token`, `audit`, `ca`), and the engineer's commands (`login`, `request`,
//! `status`, `ssh`, `psql`, `db-login`, in [`crate::client`]). Errors print as one line
//! and a non-zero exit.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use crate::clock::SystemClock;
use crate::config::{Config, demo_config_toml};
use crate::{audit, auth, server};

#[derive(Parser, Debug)]
#[command(
    name = "twokey",
    version,
    about = "Just-in-time access with separation of duties"
)]
pub struct Cli {
    /// The TOML config file.
    #[arg(
        long,
        global = true,
        env = "TWOKEY_CONFIG",
        default_value = "twokey.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run on the embedded default (SQLite, demo sign-in) with a demo policy.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        #[arg(long, default_value = "./twokey-demo")]
        data_dir: PathBuf,
    },
    /// Serve with the given config.
    Serve,
    /// Check a config file, and each database target's admin privileges on the live
    /// target, and exit.
    CheckConfig {
        /// Check the file only, without connecting to database targets.
        #[arg(long)]
        offline: bool,
    },
    /// Create or upgrade the database schema and exit (`serve` also does this).
    Migrate,
    /// Personal API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The SSH user certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Sign this computer's twokey CLI in (browser confirmation), saving a token under
    /// the config dir ($TWOKEY_HOME, or ~/.config/twokey) with mode 0600.
    Login {
        /// The twokey server, e.g. https://twokey.example.com.
        #[arg(long, env = "TWOKEY_SERVER")]
        server: String,
        /// Read an API token from standard input instead of signing in in a browser.
        #[arg(long)]
        token_stdin: bool,
        /// Print the sign-in URL without trying to open a browser.
        #[arg(long)]
        no_browser: bool,
        /// Also ask for the `approve` scope (deciding other people's requests). Without
        /// it the token can only file and follow your own requests and get credentials.
        #[arg(long)]
        approve: bool,
    },
    /// Ask for access: a role on a resource, for a time, with a reason.
    Request {
        resource: String,
        #[arg(long)]
        role: String,
        /// How long, e.g. 30m or 2h (up to the role's maximum).
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        ticket: Option<String>,
        /// Wait until it is approved or denied.
        #[arg(long)]
        wait: bool,
    },
    /// Your requests and grants.
    Status,
    /// psql to a database resource with a login for your live grant.
    Psql {
        resource: String,
        /// Which role's grant, when you have several on the resource.
        #[arg(long)]
        role: Option<String>,
        /// Wait for a pending request to be decided.
        #[arg(long)]
        wait: bool,
        /// Arguments for psql (after `--`), e.g. `-- -c 'select 1'`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A relay password for your live grant on a database reached through twokey's
    /// PostgreSQL relay, printed once, and the relay's certificate saved.
    DbLogin {
        resource: String,
        /// Which role's grant, when you have several on the resource.
        #[arg(long)]
        role: Option<String>,
        /// Wait for a pending request to be decided.
        #[arg(long)]
        wait: bool,
    },
    /// SSH to a resource with a certificate for your live grant.
    Ssh {
        resource: String,
        /// Which role's grant, when you have several on the resource.
        #[arg(long)]
        role: Option<String>,
        /// Wait for a pending request to be decided.
        #[arg(long)]
        wait: bool,
        /// Your private key (default ~/.ssh/id_ed25519, else one twokey makes).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Go through twokey's SSH relay at HOST:PORT.
        #[arg(long, env = "TWOKEY_RELAY")]
        relay: Option<String>,
        /// A command to run instead of a shell (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Print the CA's public key: the line for sshd's `TrustedUserCAKeys`.
    PublicKey,
    /// Print the relay's upstream CA public key: the only CA targets behind the relay
    /// should trust (`TrustedUserCAKeys`), so engineers cannot bypass the relay.
    UpstreamPublicKey,
    /// Write the key revocation list (binary) for sshd's `RevokedKeys`.
    Krl {
        /// Write here (atomically: sshd never reads half a file) instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a new API token for a user (shown once; only its hash is kept).
    Create {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "cli")]
        label: String,
        /// What the token may do: `requests` (own requests and credentials), `approve`
        /// (decide others' requests), or `requests,approve`.
        #[arg(long, default_value = "requests")]
        scope: String,
        /// How long it works, e.g. `12h`; at most (and by default) `auth.token_ttl`.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Revoke every API token of a user.
    Revoke {
        #[arg(long)]
        user: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify the hash chain and its signed checkpoints; names the first bad event.
    Verify {
        /// Verify an exported JSONL file instead of the database (offline).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Accept signatures only by this key (a file with the line `twokey audit
        /// public-key` printed). Repeatable. With --file it replaces the key the file
        /// names; on the database it is accepted beside the server's (after a rotation).
        #[arg(long = "public-key", value_name = "FILE")]
        public_keys: Vec<PathBuf>,
        /// Fail unless event SEQ still has HASH (a head printed by an earlier verify).
        #[arg(long, value_name = "SEQ:HASH")]
        expect_head: Option<audit::checkpoint::HeadPin>,
    },
    /// Sign a checkpoint of the chain head now (the server also does every minute).
    Checkpoint,
    /// Print the public key that checkpoints are signed with (for --public-key).
    PublicKey,
    /// Write every event, oldest first.
    Export {
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Write here instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

/// Runs a command; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("twokey: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Demo { listen, data_dir } => demo(&listen, &data_dir).await,
        Command::Serve => {
            let path = cli.config.clone();
            let reread = move || {
                let config = load(&path)?;
                config.validate_for_serve().map_err(|e| e.to_string())?;
                Ok(config)
            };
            run_server(reread()?, reread).await
        }
        Command::CheckConfig { offline } => {
            let config = load(&cli.config)?;
            config.validate_for_serve().map_err(|e| e.to_string())?;
            if !offline {
                check_db_targets(&config).await?;
            }
            println!(
                "{}: OK ({} resources, {} roles)",
                cli.config.display(),
                config.resources.len(),
                config
                    .resources
                    .iter()
                    .map(|r| r.roles.len())
                    .sum::<usize>()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let state = open(&cli.config).await?;
            println!("database schema is up to date");
            drop(state);
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    user,
                    label,
                    scope,
                    ttl,
                },
        } => {
            let scopes =
                auth::scopes::Scopes::parse(&scope).map_err(|e| format!("--scope: {e}"))?;
            let ttl = ttl
                .map(|t| crate::policy::parse_duration(&t).map_err(|e| format!("--ttl: {e}")))
                .transpose()?;
            let state = open(&cli.config).await?;
            let token = auth::create_scoped_token(&state, &user, &label, &scopes, ttl)
                .await
                .map_err(|e| describe(&e))?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command: TokenCommand::Revoke { user },
        } => {
            let state = open(&cli.config).await?;
            let n = auth::revoke_api_tokens(&state, &user)
                .await
                .map_err(|e| describe(&e))?;
            println!("revoked {n} token(s) of {user}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Login {
            server,
            token_stdin,
            no_browser,
            approve,
        } => crate::client::login(&server, token_stdin, !no_browser, approve).await,
        Command::Request {
            resource,
            role,
            duration,
            reason,
            ticket,
            wait,
        } => {
            crate::client::request(crate::client::RequestArgs {
                resource,
                role,
                duration,
                reason,
                ticket,
                wait,
            })
            .await
        }
        Command::Status => crate::client::status().await,
        Command::Psql {
            resource,
            role,
            wait,
            args,
        } => {
            crate::client::psql(crate::client::PsqlArgs {
                resource,
                role,
                wait,
                args,
            })
            .await
        }
        Command::DbLogin {
            resource,
            role,
            wait,
        } => {
            crate::client::db_login(crate::client::DbLoginArgs {
                resource,
                role,
                wait,
            })
            .await
        }
        Command::Ssh {
            resource,
            role,
            wait,
            key,
            relay,
            command,
        } => {
            crate::client::ssh(crate::client::SshArgs {
                relay,
                resource,
                role,
                wait,
                key,
                command,
            })
            .await
        }
        Command::Ca {
            command: CaCommand::PublicKey,
        } => {
            let state = open(&cli.config).await?;
            println!("{}", state.ca.public_key_line());
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command: CaCommand::UpstreamPublicKey,
        } => {
            let state = open(&cli.config).await?;
            let Some(relay) = &state.relay else {
                return Err("the relay is off: add a [relay] section to the config".into());
            };
            println!("{}", relay.upstream_ca.public_key_line());
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command: CaCommand::Krl { output },
        } => {
            let state = open(&cli.config).await?;
            let krl = crate::access::ssh::current_krl(&state)
                .await
                .map_err(|e| describe(&e))?;
            match output {
                Some(path) => write_atomically(&path, &krl)?,
                None => std::io::stdout()
                    .lock()
                    .write_all(&krl)
                    .map_err(|e| e.to_string())?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    public_keys,
                    expect_head,
                },
        } => {
            let mut keys = Vec::new();
            for path in &public_keys {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--public-key {}: {e}", path.display()))?;
                keys.push(
                    audit::checkpoint::parse_public_key(&text)
                        .map_err(|e| format!("--public-key {}: {e}", path.display()))?,
                );
            }
            match file {
                Some(file) => verify_file(&file, &keys, expect_head.as_ref()),
                None => {
                    let state = open(&cli.config).await?;
                    // The server's own key is always accepted; pinned ones are old keys.
                    keys.insert(0, state.audit_key.public_key().clone());
                    let result =
                        audit::checkpoint::verify_db(&state.db, &keys, expect_head.as_ref())
                            .await
                            .map_err(|e| describe(&e))?;
                    Ok(report(result, true))
                }
            }
        }
        Command::Audit {
            command: AuditCommand::Checkpoint,
        } => {
            let state = open(&cli.config).await?;
            match audit::signing::checkpoint(&state, "command")
                .await
                .map_err(|e| describe(&e))?
            {
                Some(cp) => println!("checkpoint at seq {}: head {}:{}", cp.seq, cp.seq, cp.hash),
                None => println!("the audit log is empty: nothing to sign"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::PublicKey,
        } => {
            let state = open(&cli.config).await?;
            println!("{}", state.audit_key.public_key_line());
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command:
                AuditCommand::Export {
                    format: ExportFormat::Jsonl,
                    output,
                },
        } => {
            let state = open(&cli.config).await?;
            export(&state, output.as_deref()).await
        }
    }
}

/// Writes beside the target and renames over it, so a reader sees the old or the new
/// file, never a half-written one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("twokey-tmp");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn describe(e: &crate::Error) -> String {
    match e {
        crate::Error::Invalid(fields) => fields
            .iter()
            .map(|f| format!("{}: {}", f.field, f.message))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// `check-config` against the live database targets: one line per target, then an
/// error listing every problem with its fix.
async fn check_db_targets(config: &Config) -> Result<(), String> {
    let mut problems = Vec::new();
    for r in config.resources.iter().filter(|r| r.manages_db_roles()) {
        match crate::dbcreds::check_target(r).await {
            Ok(c) if c.is_ok() => println!(
                "resource {}: admin_user can create and drop logins (PostgreSQL {}.{}{})",
                r.name,
                c.version / 10000,
                c.version % 10000,
                if c.superuser {
                    "; it is a superuser, more than twokey needs"
                } else {
                    ""
                }
            ),
            Ok(c) => problems.extend(
                c.blocking
                    .into_iter()
                    .chain(c.issuance)
                    .map(|p| format!("resource {}: {p}", r.name)),
            ),
            Err(msg) => problems.push(format!("resource {}: {msg}", r.name)),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn load(path: &Path) -> Result<Config, String> {
    let config = Config::read(path).map_err(|e| e.to_string())?;
    server::check_config(&config).map_err(|e| e.to_string())?;
    Ok(config)
}

async fn open(path: &Path) -> Result<crate::state::AppState, String> {
    let config = load(path)?;
    server::open_state(config, Arc::new(SystemClock))
        .await
        .map_err(|e| describe(&e))
}

async fn demo(listen: &str, data_dir: &Path) -> Result<ExitCode, String> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let path = data_dir.join("twokey.toml");
    if path.exists() {
        eprintln!("Using the existing {}", path.display());
    } else {
        std::fs::write(&path, demo_config_toml(listen, &data_dir))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("Wrote {}", path.display());
    }
    let mut config = load(&path)?;
    config.server.listen = listen.to_string();
    server::check_config(&config).map_err(|e| e.to_string())?;
    if !config.auth.dev_login {
        return Err(format!(
            "{}: auth.dev_login must be true for the demo",
            path.display()
        ));
    }
    let listen = listen.to_string();
    let reread = move || {
        let mut config = load(&path)?;
        config.server.listen = listen.clone();
        Ok(config)
    };
    run_server(config, reread).await
}

/// SIGHUPs, taken one at a time.
static RELOADS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Serves until Ctrl-C or SIGTERM; on SIGHUP, reads the file again (`reread`) and
/// reloads what it can ([`server::reload`]), saying on stderr what it applied and what
/// waits for a restart. A file that does not check changes nothing.
async fn run_server(
    config: Config,
    reread: impl Fn() -> Result<Config, String> + Send + Sync + 'static,
) -> Result<ExitCode, String> {
    // Ctrl-C, or SIGTERM from a service manager: stop cleanly either way, so live
    // relay sessions are ended and their recordings finalised. SIGHUP reloads. Watched
    // from the start: a signal before the server is up waits, never kills.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch for SIGTERM: {e}"))?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("cannot watch for SIGHUP: {e}"))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| format!("cannot watch for Ctrl-C: {e}"))?;
    let demo_users: Vec<String> = config
        .auth
        .dev_users
        .iter()
        .map(|u| format!("{} ({})", u.email, u.groups.join(", ")))
        .collect();
    let dev = config.auth.dev_login;
    let srv = server::serve(config, Arc::new(SystemClock))
        .await
        .map_err(|e| describe(&e))?;
    let mut banner = format!("twokey is serving at {}\n", srv.url());
    if let Some(relay) = &srv.relay {
        banner.push_str(&format!("SSH relay listening on {}\n", relay.addr));
    }
    if dev {
        banner.push_str("Demo sign-in is ON. Sign in as one of:\n");
        for u in demo_users {
            banner.push_str(&format!("  {u}\n"));
        }
    }
    // One write, errors ignored: a server must not die because whoever started it
    // stopped reading its standard output (println! panics on a closed pipe).
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(banner.as_bytes()).and_then(|_| out.flush());
    drop(out);
    let reread = Arc::new(reread);
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                // In a task of its own: a reload waiting on the store never holds up
                // a stop.
                let (state, reread) = (srv.state.clone(), reread.clone());
                tokio::spawn(async move {
                    // One at a time, each reading the file under the lock: a slower
                    // reload never applies an older file after a newer one.
                    let _one = RELOADS.lock().await;
                    let outcome = match reread() {
                        Ok(new) => server::reload(&state, new).await.map_err(|e| describe(&e)),
                        Err(e) => Err(e),
                    };
                    // Written with errors ignored: a closed stderr must not stop a
                    // server (eprintln! panics on it).
                    let line = match outcome {
                        Ok(done) => {
                            tracing::info!(summary = %done.summary(), "configuration reloaded");
                            format!("Reloaded: {}\n", done.summary())
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "configuration reload refused");
                            format!("Reload refused, nothing changed: {e}\n")
                        }
                    };
                    let _ = std::io::stderr().lock().write_all(line.as_bytes());
                });
            }
        }
    }
    let _ = std::io::stderr().lock().write_all(b"Shutting down\n");
    srv.stop().await;
    Ok(ExitCode::SUCCESS)
}

fn report(
    result: Result<audit::checkpoint::Verified, audit::checkpoint::Failure>,
    key_pinned: bool,
) -> ExitCode {
    match result {
        Ok(v) => {
            let head_seq = v.chain.events;
            let mut line = format!(
                "OK: {} events, head {head_seq}:{}",
                v.chain.events, v.chain.head
            );
            match (v.checkpoint, &v.key) {
                (Some(seq), key) => {
                    line.push_str(&format!("; signed checkpoint at seq {seq}"));
                    if let Some(key) = key {
                        line.push_str(&format!(" by {key}"));
                    }
                    let newer = head_seq.saturating_sub(seq as u64);
                    if newer > 0 {
                        line.push_str(&format!("; {newer} newer event(s) not signed yet"));
                    }
                }
                (None, _) if head_seq > 0 => line.push_str("; no signed checkpoint yet"),
                (None, _) => {}
            }
            if !key_pinned {
                line.push_str(
                    "\nThe key was not pinned: compare it with `twokey audit public-key` on the server, or pass --public-key",
                );
            }
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            println!("FAIL: {f}");
            ExitCode::FAILURE
        }
    }
}

fn verify_file(
    path: &Path,
    keys: &[ssh_key::PublicKey],
    pin: Option<&audit::checkpoint::HeadPin>,
) -> Result<ExitCode, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let lines = std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(n, l)| {
            let l = l.map_err(|e| format!("line {}: {e}", n + 1))?;
            audit::parse_export_line(&l).map_err(|e| format!("line {}: {e}", n + 1))
        });
    let result = audit::checkpoint::verify_export(lines, keys, pin)?;
    Ok(report(result, !keys.is_empty()))
}

async fn export(state: &crate::state::AppState, output: Option<&Path>) -> Result<ExitCode, String> {
    // The file is made only once the closing checkpoint is signed.
    let open = || -> Result<Box<dyn Write>, String> {
        Ok(match output {
            Some(p) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
            )),
            None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
        })
    };
    let done = audit::export::write(state, open)
        .await
        .map_err(|e| match e {
            audit::export::ExportError::Store(e) => describe(&e),
            audit::export::ExportError::Open(e) => e,
            audit::export::ExportError::Io(e) => e.to_string(),
        })?;
    eprintln!(
        "exported {} events, closing checkpoint at seq {}, signed by {}",
        done.events,
        done.end_seq,
        state.audit_key.fingerprint()
    );
    Ok(ExitCode::SUCCESS)
}
