//! Clients run as child processes from async tests: `psql` with a libpq connection
//! string, the twokey CLI with its own home directory, each waited for off the runtime's
//! threads; their outcome read as success or refusal; and bounded polling. Nothing here
//! waits without a bound or reads a password back out of a process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `psql` on a libpq connection string with `password`: unaligned, tuples only, quiet,
/// stopping at the first error; `args` follow (`-c SQL`, `-v ...`).
pub fn command(conninfo: &str, password: &str, args: &[&str]) -> Command {
    let mut c = Command::new("psql");
    c.args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", conninfo])
        .args(args)
        .env("PGPASSWORD", password)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs `c` to its end on a blocking thread.
pub async fn output(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

/// Waits for a spawned child (its output piped) on a blocking thread.
pub async fn wait(child: Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

/// The trimmed stdout of a process that must have succeeded (else its stderr).
#[track_caller]
pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The stderr of a process that must have failed (else its stdout).
#[track_caller]
pub fn refused(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Waits (bounded, 20 s) until `f` holds.
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The twokey CLI as an engineer runs it, with a home directory of its own (where
/// `twokey login` keeps the server and token).
pub struct Cli {
    home: tempfile::TempDir,
}

impl Cli {
    pub fn new() -> Cli {
        Cli {
            home: tempfile::tempdir().unwrap(),
        }
    }

    /// Runs `twokey ARGS`, with `stdin` written to it when given.
    pub fn run(&self, args: &[&str], stdin: Option<String>) -> impl Future<Output = Output> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twokey"));
        cmd.args(args)
            .env("TWOKEY_HOME", self.home.path())
            .env("HOME", self.home.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        async move {
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut child = cmd.spawn().unwrap();
                if let Some(s) = stdin {
                    child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
                }
                child.wait_with_output().unwrap()
            })
            .await
            .unwrap()
        }
    }
}
