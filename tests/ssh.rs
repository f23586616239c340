//! SSH certificates against a real OpenSSH `sshd` that trusts twokey's CA and reads
//! twokey's KRL: what a grant allows, what sshd refuses, and `ssh-keygen -Q` agreeing
//! with twokey about revocation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::Utc;
use common::sshd::{self, Sshd};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const CAROL: &str = "carol@example.com";
const DAVE: &str = "dave@example.com";

/// The demo policy with demo-ssh's certificates for the test user, plus two one-approver
/// roles: `quick`, and `elsewhere`, usable only from 10.0.0.0/8.
async fn start() -> common::TestApp {
    let login = sshd::login();
    let app = common::start_with(move |c| {
        let ssh = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-ssh")
            .unwrap();
        ssh.roles[0].principals = vec![login.clone()];
        let mut quick = ssh.roles[0].clone();
        quick.name = "quick".into();
        quick.min_approvals = 1;
        quick.require_ticket = false;
        let mut elsewhere = quick.clone();
        elsewhere.name = "elsewhere".into();
        elsewhere.source_address = vec!["10.0.0.0/8".into()];
        ssh.roles.push(quick);
        ssh.roles.push(elsewhere);
        c.validate().unwrap();
    })
    .await;
    // sshd checks validity against the wall clock.
    app.clock.set(Utc::now());
    app
}

/// Files and approves a one-approver request; returns its id.
async fn grant(app: &common::TestApp, role: &str, duration: &str) -> String {
    let id = app
        .api(ALICE)
        .await
        .file("demo-ssh", role, duration, None)
        .await;
    let (s, r) = app.api(BOB).await.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["status"], "approved");
    id
}

struct Keys {
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let key = sshd::keygen(dir.path(), "id_ed25519");
        Keys { dir, key }
    }

    fn public(&self) -> String {
        std::fs::read_to_string(self.key.with_extension("pub")).unwrap()
    }

    /// Writes a certificate where ssh looks for it.
    fn save_cert(&self, cert: &str, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{cert}\n")).unwrap();
        path
    }
}

async fn mint(app: &common::TestApp, who: &str, id: &str, key: &str) -> (StatusCode, Value) {
    app.api(who)
        .await
        .post(
            &format!("/requests/{id}/ssh-certificate"),
            json!({ "public_key": key }),
        )
        .await
}

async fn krl(app: &common::TestApp) -> Vec<u8> {
    let resp = reqwest::get(app.url("/api/v1/ca/krl")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.bytes().await.unwrap().to_vec()
}

async fn ca_line(app: &common::TestApp) -> String {
    reqwest::get(app.url("/api/v1/ca/ssh"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .trim()
        .to_string()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn describe(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout {}\nstderr {}",
        o.status,
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `ssh-keygen -L` of a certificate file.
fn inspect(cert: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    stdout(&out)
}

#[tokio::test]
async fn a_live_grant_gets_a_certificate_sshd_accepts_and_nothing_more() {
    let app = start().await;
    let sshd = Sshd::start(&ca_line(&app).await, "");
    let keys = Keys::new();
    let id = app
        .api(ALICE)
        .await
        .file("demo-ssh", "admin", "30m", Some("OPS-7"))
        .await;
    // Pending: no certificate yet.
    let (s, r) = mint(&app, ALICE, &id, &keys.public()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    assert!(r["message"].as_str().unwrap().contains("pending"), "{r}");
    app.api(BOB).await.act(&id, "approve").await;
    app.api(CAROL).await.act(&id, "approve").await;

    let (s, minted) = mint(&app, ALICE, &id, &keys.public()).await;
    assert_eq!(s, StatusCode::CREATED, "{minted}");
    let cert = keys.save_cert(
        minted["certificate"].as_str().unwrap(),
        "id_ed25519-cert.pub",
    );

    let out = sshd.ssh(&sshd::login(), &keys.key, &cert, "echo twokey-$((40+2))");
    assert!(out.status.success(), "{}\n{}", describe(&out), sshd.log());
    assert_eq!(stdout(&out).trim(), "twokey-42");

    // What the certificate says, read by OpenSSH itself.
    let (_, req) = app.api(ALICE).await.get(&format!("/requests/{id}")).await;
    let grant_id = req["grant"]["id"].as_str().unwrap();
    let ends = chrono::DateTime::parse_from_rfc3339(req["grant"]["ends_at"].as_str().unwrap())
        .unwrap()
        .timestamp() as u64;
    assert_eq!(minted["valid_before"].as_u64().unwrap(), ends);
    // Valid from exactly a minute before the (injected) moment of minting, which
    // the test holds still; comparing with the wall clock made this fail on a slow run.
    let minted_at = twokey::clock::Clock::now(&*app.clock).timestamp() as u64;
    let after = minted["valid_after"].as_u64().unwrap();
    assert_eq!(after + 60, minted_at, "{after} vs {minted_at}");
    let text = inspect(&cert);
    assert!(text.contains("user certificate"), "{text}");
    assert!(
        text.contains(&format!("Key ID: \"twokey:{grant_id}:{ALICE}\"")),
        "{text}"
    );
    assert!(
        text.contains(&format!("Serial: {}", minted["serial"].as_u64().unwrap())),
        "{text}"
    );
    let principals = text.split("Principals:").nth(1).unwrap();
    let principals: Vec<&str> = principals
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("                "))
        .map(str::trim)
        .collect();
    assert_eq!(principals, [sshd::login()]);
    let extensions = text.split("Extensions:").nth(1).unwrap();
    let extensions: Vec<&str> = extensions
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(extensions, ["permit-pty"], "{text}");
    assert!(text.contains("Critical Options: (none)"), "{text}");

    // Port forwarding is not among the extensions: sshd refuses it.
    let out = sshd.ssh_with(
        &sshd::login(),
        &keys.key,
        &cert,
        &["-W", "127.0.0.1:9"],
        "true",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("administratively prohibited"),
        "{}",
        describe(&out)
    );
    assert!(
        !out.status.success(),
        "port forward allowed: {}",
        describe(&out)
    );

    // The audit log names the serial and the key's fingerprint, and no key material.
    let events = twokey::audit::page(&app.state().db, 0, 1000).await.unwrap();
    let ev = events
        .iter()
        .find(|e| e.action == "ssh_certificate.minted")
        .unwrap();
    assert_eq!(ev.subject, grant_id);
    let details: Value = serde_json::from_str(&ev.details).unwrap();
    assert_eq!(
        details["serial"],
        minted["serial"].as_u64().unwrap().to_string()
    );
    assert_eq!(details["key_fingerprint"], minted["fingerprint"]);
    assert!(
        details["key_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("SHA256:")
    );
    assert!(!ev.details.contains("AAAA"), "{}", ev.details);
    app.assert_chain_ok().await;
}

#[tokio::test]
async fn sshd_refuses_expired_foreign_wrong_principal_and_wrong_source_certificates() {
    let app = start().await;
    let sshd = Sshd::start(&ca_line(&app).await, "");
    let keys = Keys::new();
    let me = sshd::login();

    // A good certificate first, so each refusal below is down to its one difference.
    let id = grant(&app, "quick", "30m").await;
    let (_, m) = mint(&app, ALICE, &id, &keys.public()).await;
    let good = keys.save_cert(m["certificate"].as_str().unwrap(), "good-cert.pub");
    let out = sshd.ssh(&me, &keys.key, &good, "true");
    assert!(out.status.success(), "{}\n{}", describe(&out), sshd.log());

    // Principal not in the certificate.
    let out = sshd.ssh("nobody", &keys.key, &good, "true");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        sshd.log()
            .contains("Certificate invalid: name is not a listed principal")
    );

    // Source address outside the role's 10.0.0.0/8.
    let id = grant(&app, "elsewhere", "30m").await;
    let (_, m) = mint(&app, ALICE, &id, &keys.public()).await;
    let elsewhere = keys.save_cert(m["certificate"].as_str().unwrap(), "elsewhere-cert.pub");
    assert!(inspect(&elsewhere).contains("source-address 10.0.0.0/8"));
    let out = sshd.ssh(&me, &keys.key, &elsewhere, "true");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        sshd.log()
            .contains("not from a permitted source address (127.0.0.1)")
    );

    // Expired: a grant that ran two hours ago, certificate minted while it was live.
    app.clock.set(Utc::now() - chrono::Duration::hours(2));
    let id = grant(&app, "quick", "30m").await;
    let (s, m) = mint(&app, ALICE, &id, &keys.public()).await;
    assert_eq!(s, StatusCode::CREATED, "{m}");
    app.clock.set(Utc::now());
    let expired = keys.save_cert(m["certificate"].as_str().unwrap(), "expired-cert.pub");
    let out = sshd.ssh(&me, &keys.key, &expired, "true");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(sshd.log().contains("Certificate invalid: expired"));
    // And twokey will not mint for it any more.
    let (s, r) = mint(&app, ALICE, &id, &keys.public()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");

    // Signed by another CA, with everything else right.
    let other = sshd::keygen(keys.dir.path(), "other_ca");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&other)
        .args(["-I", "forged", "-n", &me, "-V", "-5m:+1h"])
        .arg(keys.key.with_extension("pub"))
        .status()
        .unwrap();
    assert!(st.success());
    let forged = keys.dir.path().join("id_ed25519-cert.pub");
    let out = sshd.ssh(&me, &keys.key, &forged, "true");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        sshd.log()
            .contains(&format!("Failed publickey for {me} from 127.0.0.1")),
        "{}",
        sshd.log()
    );
    assert!(
        sshd.log().contains("ID forged (serial 0)"),
        "{}",
        sshd.log()
    );
}

#[tokio::test]
async fn revoking_a_grant_revokes_its_certificates_at_sshd() {
    let app = start().await;
    let sshd = Sshd::start(&ca_line(&app).await, "");
    let keys = Keys::new();
    let me = sshd::login();
    let id = grant(&app, "quick", "1h").await;
    let (_, m) = mint(&app, ALICE, &id, &keys.public()).await;
    let cert = keys.save_cert(m["certificate"].as_str().unwrap(), "cert.pub");
    let other_id = grant(&app, "quick", "1h").await;
    let (_, m2) = mint(&app, ALICE, &other_id, &keys.public()).await;
    let other_cert = keys.save_cert(m2["certificate"].as_str().unwrap(), "other-cert.pub");

    sshd.set_krl(&krl(&app).await);
    assert!(
        sshd.ssh(&me, &keys.key, &cert, "true").status.success(),
        "{}",
        sshd.log()
    );

    let (s, r) = app.api(BOB).await.act(&id, "revoke").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let list = krl(&app).await;
    // The KRL is public: it revokes by serial and names nobody.
    let has = |needle: &[u8]| list.windows(needle.len()).any(|w| w == needle);
    assert!(!has(ALICE.as_bytes()) && !has(b"example.com") && !has(b"twokey:"));
    let path = keys.dir.path().join("krl");
    std::fs::write(&path, &list).unwrap();
    assert_eq!(
        keygen_query(&path, &[cert.clone(), other_cert.clone()]),
        [true, false]
    );
    sshd.set_krl(&list);
    let out = sshd.ssh(&me, &keys.key, &cert, "true");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(sshd.log().contains("revoked"), "{}", sshd.log());
    // The other grant's certificate still works.
    assert!(
        sshd.ssh(&me, &keys.key, &other_cert, "true")
            .status
            .success()
    );
    // And no new certificate for the revoked grant.
    let (s, _) = mint(&app, ALICE, &id, &keys.public()).await;
    assert_eq!(s, StatusCode::CONFLICT);
}

/// `ssh-keygen -Q` on every certificate: which are revoked.
fn keygen_query(krl: &Path, certs: &[PathBuf]) -> Vec<bool> {
    let mut verdicts = Vec::new();
    for chunk in certs.chunks(250) {
        let out = Command::new("ssh-keygen")
            .arg("-Q")
            .arg("-f")
            .arg(krl)
            .args(chunk)
            .output()
            .unwrap();
        let text = stdout(&out);
        for cert in chunk {
            let line = text
                .lines()
                // "PATH (KEY ID): REVOKED" or "PATH (KEY ID): ok"
                .find(|l| l.starts_with(&format!("{} (", cert.display())))
                .unwrap_or_else(|| panic!("no verdict for {}: {}", cert.display(), describe(&out)));
            verdicts.push(match line.rsplit(": ").next().unwrap() {
                "REVOKED" => true,
                "ok" => false,
                other => panic!("unexpected verdict {other:?}"),
            });
        }
    }
    verdicts
}

#[tokio::test]
async fn ssh_keygen_agrees_with_twokey_on_a_thousand_certificates() {
    let app = start().await;
    let keys = Keys::new();
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;
    let mut certs = Vec::new();
    let mut expected = Vec::new();
    for g in 0..20 {
        let id = alice.file("demo-ssh", "quick", "1h", None).await;
        bob.act(&id, "approve").await;
        let mut batch = Vec::new();
        for _ in 0..50 {
            let (s, m) = alice
                .post(
                    &format!("/requests/{id}/ssh-certificate"),
                    json!({ "public_key": keys.public() }),
                )
                .await;
            assert_eq!(s, StatusCode::CREATED, "{m}");
            batch.push(m["certificate"].as_str().unwrap().to_string());
        }
        // Every third grant is revoked.
        let revoked = g % 3 == 0;
        if revoked {
            let (s, _) = bob.act(&id, "revoke").await;
            assert_eq!(s, StatusCode::OK);
        }
        for cert in batch {
            let n = certs.len();
            certs.push(keys.save_cert(&cert, &format!("c{n}-cert.pub")));
            expected.push(revoked);
        }
    }
    assert_eq!(certs.len(), 1000);
    let path = keys.dir.path().join("krl");
    std::fs::write(&path, krl(&app).await).unwrap();
    let verdicts = keygen_query(&path, &certs);
    assert_eq!(verdicts.len(), 1000);
    let disagree: Vec<usize> = (0..1000).filter(|i| verdicts[*i] != expected[*i]).collect();
    assert!(disagree.is_empty(), "ssh-keygen disagrees on {disagree:?}");
    assert_eq!(verdicts.iter().filter(|v| **v).count(), 7 * 50);
}

#[tokio::test]
async fn only_the_holder_of_a_live_ssh_grant_gets_a_certificate() {
    let app = start().await;
    let keys = Keys::new();
    let key = keys.public();
    let id = grant(&app, "quick", "30m").await;

    // Not the holder: the approver, an admin, another engineer.
    for who in [BOB, DAVE] {
        let (s, r) = mint(&app, who, &id, &key).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{who}: {r}");
    }
    // No token.
    let resp = common::http()
        .post(app.url(&format!("/api/v1/requests/{id}/ssh-certificate")))
        .json(&json!({ "public_key": key }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Bad keys and bad bodies: 422 naming the field.
    let rsa = keys.dir.path().join("rsa");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
        .arg(&rsa)
        .status()
        .unwrap();
    assert!(st.success());
    let weak = std::fs::read_to_string(rsa.with_extension("pub")).unwrap();
    let private = std::fs::read_to_string(&keys.key).unwrap();
    for (body, field, words) in [
        (json!({"public_key": weak}), "public_key", "2048-bit RSA"),
        (
            json!({"public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA"}),
            "public_key",
            "not an OpenSSH public key",
        ),
        (json!({"public_key": private}), "public_key", "private key"),
        (json!({"public_key": ""}), "public_key", "empty"),
        (json!({}), "public_key", "required"),
        (
            json!({"public_key": key, "principals": ["root"]}),
            "body",
            "unknown field",
        ),
    ] {
        let (s, r) = app
            .api(ALICE)
            .await
            .post(&format!("/requests/{id}/ssh-certificate"), body.clone())
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {r}");
        let f = &r["fields"][0];
        assert_eq!(f["field"], field, "{r}");
        assert!(f["message"].as_str().unwrap().contains(words), "{r}");
        // The refusal never echoes a private key back.
        assert!(!r.to_string().contains("PRIVATE KEY"), "{r}");
    }

    // A postgres resource has no certificates.
    let db = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "30m", None)
        .await;
    app.api(BOB).await.act(&db, "approve").await;
    let (s, r) = mint(&app, ALICE, &db, &key).await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");

    // Denied, and past the grant's end.
    let denied = app
        .api(ALICE)
        .await
        .file("demo-ssh", "quick", "30m", None)
        .await;
    app.api(BOB).await.act(&denied, "deny").await;
    let (s, _) = mint(&app, ALICE, &denied, &key).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = mint(&app, ALICE, &id, &key).await;
    assert_eq!(s, StatusCode::CREATED);
    app.clock.advance(chrono::Duration::minutes(31));
    let (s, r) = mint(&app, ALICE, &id, &key).await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    assert!(r["message"].as_str().unwrap().contains("ended"), "{r}");
    // Unknown request.
    let (s, _) = mint(&app, ALICE, "no-such-id", &key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // No refusal minted anything: only the one good certificate is recorded.
    let minted = app
        .audit_actions()
        .await
        .into_iter()
        .filter(|a| a == "ssh_certificate.minted")
        .count();
    assert_eq!(minted, 1);
}

#[tokio::test]
async fn the_holder_gets_a_certificate_from_the_request_page() {
    let app = start().await;
    let keys = Keys::new();
    let id = grant(&app, "quick", "30m").await;
    let page_path = format!("/requests/{id}");

    // Only the holder sees the form.
    let bob = app.browser(BOB).await;
    let (_, page) = bob.get(&page_path).await;
    assert!(!page.contains("ssh-cert-form"), "{page}");
    let alice = app.browser(ALICE).await;
    let (_, page) = alice.get(&page_path).await;
    assert!(page.contains("id=\"ssh-cert-form\""), "{page}");
    let csrf = common::csrf_in(&page).unwrap();

    let post = |b: &common::Browser, csrf: String, key: String| {
        let path = format!("/requests/{id}/ssh-certificate");
        let b = b.clone();
        async move {
            let resp = b
                .post(
                    &path,
                    &[("csrf", csrf.as_str()), ("public_key", key.as_str())],
                )
                .await;
            let status = resp.status();
            (status, resp.text().await.unwrap())
        }
    };
    let (status, page) = post(&alice, csrf.clone(), keys.public()).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("ssh-ed25519-cert-v01@openssh.com AAAA"),
        "{page}"
    );
    assert!(page.contains("Key id</dt><dd>twokey:"), "{page}");
    // What the page shows is a certificate OpenSSH reads, for this key.
    let start = page.find("ssh-ed25519-cert-v01@openssh.com").unwrap();
    let cert = &page[start..start + page[start..].find('<').unwrap()];
    let path = keys.save_cert(cert.trim(), "web-cert.pub");
    assert!(inspect(&path).contains(&format!("Principals: \n                {}", sshd::login())));

    // Forged CSRF, bad key, and someone else's grant: refused, nothing minted.
    let (status, _) = post(&alice, "forged".into(), keys.public()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, page) = post(&alice, csrf, "ssh-dss AAAA nonsense".into()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("not an OpenSSH public key"), "{page}");
    let (_, bob_page) = bob.get("/queue").await;
    let bob_csrf = common::csrf_in(&bob_page).unwrap();
    let (status, _) = post(&bob, bob_csrf, keys.public()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let minted = app
        .audit_actions()
        .await
        .into_iter()
        .filter(|a| a == "ssh_certificate.minted")
        .count();
    assert_eq!(minted, 1);
}

#[test]
fn revocation_by_serial_works_in_openssh() {
    use twokey::ca::krl::{Revoked, encode};
    let dir = tempfile::tempdir().unwrap();
    let ca = twokey::ca::Ca::load_or_create(&Default::default(), dir.path()).unwrap();
    let keys = Keys::new();
    let user = ssh_key::PublicKey::read_openssh_file(keys.key.with_extension("pub")).unwrap();
    let principals = vec!["deploy".to_string()];
    let extensions = vec!["permit-pty".to_string()];
    let cert = |serial: u64, key_id: &str| {
        let c = ca
            .sign(&twokey::ca::CertSpec {
                public_key: &user,
                serial,
                key_id,
                principals: &principals,
                valid_after: 1,
                valid_before: u64::MAX / 2,
                extensions: &extensions,
                force_command: None,
                source_address: None,
            })
            .unwrap();
        keys.save_cert(&c.to_openssh().unwrap(), &format!("s{serial}-cert.pub"))
    };
    let certs = [cert(5, "a"), cert(7, "b"), cert(1 << 40, "c"), cert(9, "d")];
    let check = |revoked: Revoked| {
        let path = keys.dir.path().join("krl");
        std::fs::write(&path, encode(ca.public_key(), &revoked, 1, 1).unwrap()).unwrap();
        keygen_query(&path, &certs)
    };
    let by_serial = Revoked {
        serials: vec![7, 1 << 40],
    };
    assert_eq!(check(by_serial), [false, true, true, false]);
    assert_eq!(check(Revoked::default()), [false, false, false, false]);
}
