//! A PostgreSQL cluster behind twokey's relay, as the README sets it up: TLS on both
//! sides (the relay's own certificate pinned, the target verified with verify-full),
//! the non-superuser admin making the grant's role, demo-db reached only through the
//! relay; with the grant and its relay password as alice gets them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};

use reqwest::StatusCode;
use serde_json::json;

use super::postgres::{self, Cluster, Version};
use super::psql as client;

pub const ALICE: &str = "alice@example.com";
pub const BOB: &str = "bob@example.com";

pub struct Setup {
    pub app: super::TestApp,
    pub cluster: Cluster,
    /// The relay's PostgreSQL address.
    pub pg: SocketAddr,
    /// The relay's certificate, as a client pins it.
    pub cert: PathBuf,
    /// Files of the test: the admin password, the pinned certificate, scripts.
    pub files: tempfile::TempDir,
}

/// A TLS cluster behind the relay: demo-db reached only through the relay, the target
/// verified (verify-full, the cluster's CA), its role `read` in `readonly`.
pub async fn setup_with(tweak: impl FnOnce(&mut twokey::config::Config) + Send + 'static) -> Setup {
    setup_on(Version::Pg15, tweak).await
}

pub async fn setup_on(
    version: Version,
    tweak: impl FnOnce(&mut twokey::config::Config) + Send + 'static,
) -> Setup {
    let cluster = Cluster::start_with(version, true);
    let files = tempfile::tempdir().unwrap();
    let pw = files.path().join("pg-admin-password");
    std::fs::write(&pw, format!("{}\n", postgres::TWOKEY_ADMIN_PASSWORD)).unwrap();
    let (port, ca) = (cluster.port, cluster.ca_file());
    let app = super::start_with(move |c| {
        c.relay = Some(twokey::config::RelayConfig {
            listen: "127.0.0.1:0".into(),
            postgres: Some(twokey::config::RelayPostgresConfig {
                listen: "127.0.0.1:0".into(),
                public_address: None,
                tls_cert_file: None,
                tls_key_file: None,
                tls_names: vec![],
                allow_plaintext: false,
                max_message_bytes: twokey::config::DEFAULT_MAX_PG_MESSAGE_BYTES,
            }),
            ..Default::default()
        });
        let db = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-db")
            .unwrap();
        db.address = Some(format!("127.0.0.1:{port}"));
        db.database = Some("app".into());
        db.admin_user = Some(postgres::TWOKEY_ADMIN.into());
        db.admin_password_file = Some(pw);
        db.tls = None;
        db.tls_ca_file = Some(ca);
        db.reassign_owned_to = None;
        db.access = None;
        db.roles[0].db_roles = vec!["readonly".into()];
        tweak(c);
        c.validate().unwrap();
    })
    .await;
    // VALID UNTIL is checked by PostgreSQL against the wall clock.
    app.clock.set(chrono::Utc::now());
    let pg = app.server.relay.as_ref().unwrap().pg_addr.unwrap();
    let cert = files.path().join("relay.pem");
    std::fs::write(&cert, &app.state().relay_pg.as_ref().unwrap().cert_pem).unwrap();
    Setup {
        app,
        cluster,
        pg,
        cert,
        files,
    }
}

pub async fn setup() -> Setup {
    setup_with(|_| {}).await
}

/// Alice asks for demo-db, Bob approves: the request id.
pub async fn granted(app: &super::TestApp) -> String {
    let id = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    let (s, r) = app.api(BOB).await.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    id
}

/// A relay password for the request's grant, as the holder gets it.
pub async fn relay_password(app: &super::TestApp, request_id: &str) -> String {
    let (s, r) = app
        .api(ALICE)
        .await
        .post(&format!("/requests/{request_id}/relay-login"), json!({}))
        .await;
    assert!(s.is_success(), "{s}: {r}");
    r["password"].as_str().unwrap().to_string()
}

impl Setup {
    /// libpq's connection string for the relay.
    pub fn conninfo(&self, user: &str, db: &str, sslmode: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={db} user={user} sslmode={sslmode} sslrootcert={} connect_timeout=10",
            self.pg.port(),
            self.cert.display()
        )
    }

    /// psql through the relay as alice on demo-db (verify-full), with `args`.
    pub fn psql_cmd(&self, password: &str, args: &[&str]) -> Command {
        client::command(
            &self.conninfo(ALICE, "demo-db", "verify-full"),
            password,
            args,
        )
    }

    /// psql through the relay as alice, running `sql`.
    pub async fn psql(&self, password: &str, sql: &str) -> Output {
        self.psql_as(ALICE, "demo-db", "verify-full", password, sql)
            .await
    }

    pub async fn psql_as(
        &self,
        user: &str,
        db: &str,
        sslmode: &str,
        password: &str,
        sql: &str,
    ) -> Output {
        client::output(client::command(
            &self.conninfo(user, db, sslmode),
            password,
            &["-c", sql],
        ))
        .await
    }

    /// sqlx's options for alice through the relay, its certificate pinned.
    pub fn sqlx(&self, password: &str) -> sqlx::postgres::PgConnectOptions {
        sqlx::postgres::PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.pg.port())
            .database("demo-db")
            .username(ALICE)
            .password(password)
            .ssl_mode(sqlx::postgres::PgSslMode::VerifyFull)
            .ssl_root_cert(&self.cert)
    }

    /// The sessions' rows.
    pub async fn sessions(&self) -> Vec<twokey::store::SessionRow> {
        twokey::store::sessions(&self.app.state().db, 1000)
            .await
            .unwrap()
    }
}
