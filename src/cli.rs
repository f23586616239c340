//! The command line: server commands (`demo`, `serve`, `check-config`), admin
//! commands (`token`, `audit`, `ca`), and the engineer's commands (`login`, `request`,
//! `status`, `ssh`, `psql`, in [`crate::client`]). Errors print as one line and a non-zero exit.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use crate::clock::SystemClock;
use crate::config::{Config, demo_config_toml};
use crate::{audit, auth, server, store};

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
    /// Verify the hash chain; names the first bad event.
    Verify {
        /// Verify an exported JSONL file instead of the database (offline).
        #[arg(long)]
        file: Option<PathBuf>,
    },
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
            let config = load(&cli.config)?;
            run_server(config).await
        }
        Command::CheckConfig { offline } => {
            let config = load(&cli.config)?;
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
            command: TokenCommand::Create { user, label },
        } => {
            let state = open(&cli.config).await?;
            let token = auth::create_api_token(&state, &user, &label)
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
        } => crate::client::login(&server, token_stdin, !no_browser).await,
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
            command: AuditCommand::Verify { file: Some(file) },
        } => verify_file(&file),
        Command::Audit {
            command: AuditCommand::Verify { file: None },
        } => {
            let state = open(&cli.config).await?;
            let result = store::verify_audit(&state.db)
                .await
                .map_err(|e| describe(&e))?;
            Ok(report(result))
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
    Config::load(path).map_err(|e| e.to_string())
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
    config.validate().map_err(|e| e.to_string())?;
    if !config.auth.dev_login {
        return Err(format!(
            "{}: auth.dev_login must be true for the demo",
            path.display()
        ));
    }
    run_server(config).await
}

async fn run_server(config: Config) -> Result<ExitCode, String> {
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
    // Ctrl-C, or SIGTERM from a service manager: stop cleanly either way, so live
    // relay sessions are ended and their recordings finalised.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch for SIGTERM: {e}"))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("Shutting down");
    srv.stop().await;
    Ok(ExitCode::SUCCESS)
}

fn report(result: Result<audit::ChainOk, audit::ChainBreak>) -> ExitCode {
    match result {
        Ok(ok) => {
            println!("OK: {} events, head {}", ok.events, ok.head);
            ExitCode::SUCCESS
        }
        Err(b) => {
            println!("FAIL: first bad event is seq {}: {}", b.seq, b.reason);
            ExitCode::FAILURE
        }
    }
}

fn verify_file(path: &Path) -> Result<ExitCode, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let lines = std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(n, l)| {
            let l = l.map_err(|e| format!("line {}: {e}", n + 1))?;
            audit::parse_export_line(&l).map_err(|e| format!("line {}: {e}", n + 1))
        });
    let result = audit::verify(lines)?;
    Ok(report(result))
}

async fn export(state: &crate::state::AppState, output: Option<&Path>) -> Result<ExitCode, String> {
    let mut out: Box<dyn Write> = match output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut after = 0;
    let mut count = 0u64;
    loop {
        let page = store::audit_page(&state.db, after, 5000)
            .await
            .map_err(|e| describe(&e))?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for ev in &page {
            writeln!(out, "{}", ev.to_export_line()).map_err(|e| e.to_string())?;
            count += 1;
        }
    }
    out.flush().map_err(|e| e.to_string())?;
    eprintln!("exported {count} events");
    Ok(ExitCode::SUCCESS)
}
