//! A throwaway PostgreSQL cluster on a loopback port (initdb + pg_ctl), with a database
//! `app` holding a readable table, a secret one, and roles to grant; stopped on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const ADMIN_PASSWORD: &str = "admin-pw-for-tests";

pub struct Cluster {
    pub port: u16,
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
}

/// Where `initdb` and `pg_ctl` are: on PATH, /usr/local/bin, or Debian's versioned dir.
fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        return p.parent().unwrap().to_path_buf();
    }
    for d in ["/usr/local/bin"] {
        if Path::new(d).join("initdb").exists() {
            return d.into();
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|d| d.join("initdb").exists())
        .expect("PostgreSQL server binaries (initdb): ./scripts/test installs them")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    pub fn start() -> Cluster {
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        // initdb refuses root: run the server as the postgres user then.
        let as_postgres = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
        let d = dir.path();
        std::fs::write(d.join("pwfile"), ADMIN_PASSWORD).unwrap();
        std::fs::create_dir(d.join("sock")).unwrap();
        if as_postgres {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(d)
                .status()
                .unwrap();
            assert!(st.success());
        }
        let port = free_port();
        let c = Cluster {
            port,
            dir,
            bin,
            as_postgres,
        };
        let out = c.run(
            "initdb",
            &[
                "-D",
                &c.path("data"),
                "-U",
                "postgres",
                "--pwfile",
                &c.path("pwfile"),
                "-A",
                "scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c log_statement=all",
            c.path("sock")
        );
        let out = c.run(
            "pg_ctl",
            &[
                "-D",
                &c.path("data"),
                "-l",
                &c.path("log"),
                "-o",
                &opts,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.log()
        );
        // (psql -c runs its statements in one transaction; CREATE DATABASE must be alone.)
        c.admin("postgres", "CREATE DATABASE app");
        c.admin(
            "postgres",
            "CREATE ROLE readonly NOLOGIN; CREATE ROLE \"read\"\"only; x\" NOLOGIN; CREATE ROLE keeper NOLOGIN;",
        );
        c.admin(
            "app",
            "CREATE TABLE items (id int, name text); INSERT INTO items VALUES (1,'a'),(2,'b'),(3,'c');
             CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('s3cret');
             GRANT USAGE ON SCHEMA public TO readonly, \"read\"\"only; x\";
             GRANT SELECT ON items TO readonly, \"read\"\"only; x\";",
        );
        c
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).stdin(Stdio::null()).output().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Runs SQL as the superuser; panics on error.
    pub fn admin(&self, db: &str, sql: &str) -> String {
        let out = self.psql("postgres", ADMIN_PASSWORD, db, sql);
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `psql` over TCP as `user`; unaligned, tuples only, stop at the first error.
    pub fn psql(&self, user: &str, password: &str, db: &str, sql: &str) -> Output {
        self.psql_cmd(user, password, db, sql).output().unwrap()
    }

    pub fn psql_cmd(&self, user: &str, password: &str, db: &str, sql: &str) -> Command {
        let mut c = Command::new("psql");
        c.args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                db,
            ])
            .args(["-c", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        c
    }

    /// The twokey-made roles that exist now.
    pub fn twokey_roles(&self) -> Vec<String> {
        let out = self.admin(
            "postgres",
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'twokey\\_%' ORDER BY 1",
        );
        out.lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.path("data"), "-m", "immediate", "stop"],
        );
    }
}
