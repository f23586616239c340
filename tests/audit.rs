//! Signed checkpoints of the audit chain, through the real binary and database: an
//! attacker who can write the database (and recompute every hash), or who edits an
//! export, is caught; an operator can pin the key and a head they saw earlier.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::{Connection, SqliteConnection};
use twokey::audit::{GENESIS, event_hash};

fn twokey(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twokey"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("TWOKEY_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}{}", stdout(o), stderr(o));
    stdout(o)
}

#[track_caller]
fn fails(o: &Output, want: &str) {
    assert!(!o.status.success(), "passed: {}", stdout(o));
    let all = format!("{}{}", stdout(o), stderr(o));
    assert!(all.contains(want), "wanted {want:?} in: {all}");
}

/// A data dir with 14 audited decisions made through the real server (stopped after).
async fn populated() -> (tempfile::TempDir, PathBuf) {
    let app = common::start().await;
    let alice = app.api("alice@example.com").await;
    let bob = app.api("bob@example.com").await;
    for _ in 0..3 {
        let id = alice.file("demo-db", "read", "1h", None).await;
        bob.act(&id, "approve").await;
    }
    let common::TestApp { server, dir, .. } = app;
    server.stop().await;
    let config = dir.path().join("twokey.toml");
    std::fs::write(
        &config,
        twokey::config::demo_config_toml("127.0.0.1:0", dir.path()),
    )
    .unwrap();
    (dir, config)
}

/// A copy of the data dir (database and audit key) for one attack.
fn copy_setup(from: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "twokey.db",
        "twokey.db-wal",
        "twokey.db-shm",
        "audit_signing_key",
    ] {
        let src = from.parent().unwrap().join(f);
        if src.exists() {
            std::fs::copy(&src, dir.path().join(f)).unwrap();
        }
    }
    let config = dir.path().join("twokey.toml");
    std::fs::write(
        &config,
        twokey::config::demo_config_toml("127.0.0.1:0", dir.path()),
    )
    .unwrap();
    (dir, config)
}

async fn db(config: &Path) -> SqliteConnection {
    let url = format!(
        "sqlite://{}",
        config.parent().unwrap().join("twokey.db").display()
    );
    let mut conn = SqliteConnection::connect(&url).await.unwrap();
    // An attacker with write access to the file gets around the triggers first.
    for t in [
        "audit_events_no_update",
        "audit_events_no_delete",
        "audit_head_forward_only",
        "audit_head_no_delete",
        "audit_checkpoints_no_update",
        "audit_checkpoints_no_delete",
    ] {
        sqlx::query(&format!("DROP TRIGGER IF EXISTS {t}"))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    conn
}

type Row = (i64, i64, String, String, String, String);

/// Edits one event's actor and recomputes every hash from there on, and the recorded
/// head: the hash chain alone verifies again afterwards.
async fn rewrite_and_rehash(config: &Path, seq: i64, actor: &str) {
    let mut conn = db(config).await;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, ts, actor, action, subject, details FROM audit_events ORDER BY seq",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut prev = GENESIS.to_string();
    for (s, ts, a, action, subject, details) in rows {
        let a = if s == seq { actor.to_string() } else { a };
        let hash = event_hash(&prev, s, ts, &a, &action, &subject, &details);
        sqlx::query("UPDATE audit_events SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?")
            .bind(&a)
            .bind(&prev)
            .bind(&hash)
            .bind(s)
            .execute(&mut conn)
            .await
            .unwrap();
        prev = hash;
    }
    sqlx::query("UPDATE audit_head SET hash = ? WHERE id = 1")
        .bind(&prev)
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// The head `audit verify` printed, as SEQ:HASH.
fn head_of(verify_out: &str) -> String {
    verify_out
        .split("head ")
        .nth(1)
        .and_then(|r| r.split(|c: char| c == ';' || c.is_whitespace()).next())
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_database_rewrite_that_recomputes_every_hash_is_caught_by_the_signed_checkpoint() {
    let (_keep, config) = populated().await;
    let out = ok(&twokey(&config, &["audit", "checkpoint"]));
    assert!(out.starts_with("checkpoint at seq 15:"), "{out}");
    // Once the head is signed, asking again signs nothing new.
    let again = ok(&twokey(&config, &["audit", "checkpoint"]));
    assert_eq!(again, out);
    let out = ok(&twokey(&config, &["audit", "verify"]));
    assert!(
        out.starts_with("OK: 15 events, head 15:")
            && out.contains("signed checkpoint at seq 15 by SHA256:"),
        "{out}"
    );
    let pinned = head_of(&out);
    let early = {
        let mut conn = db(&config).await;
        let h: String = sqlx::query_scalar("SELECT hash FROM audit_events WHERE seq = 10")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        format!("10:{h}")
    };
    ok(&twokey(
        &config,
        &["audit", "verify", "--expect-head", &pinned],
    ));
    ok(&twokey(
        &config,
        &["audit", "verify", "--expect-head", &early],
    ));

    // The attack: an event edited and every hash after it recomputed.
    let (_d, copy) = copy_setup(&config);
    rewrite_and_rehash(&copy, 3, "mallory@example.com").await;
    // The unkeyed chain and its recorded head are fooled on their own...
    let state = twokey::server::open_state(
        twokey::config::Config::load(&copy).unwrap(),
        std::sync::Arc::new(twokey::clock::SystemClock),
    )
    .await
    .unwrap();
    assert!(
        twokey::audit::verify_chain(&state.db)
            .await
            .unwrap()
            .is_ok()
    );
    state.db.close().await;
    // ...the signed checkpoint is not.
    fails(
        &twokey(&copy, &["audit", "verify"]),
        "FAIL: checkpoint at seq 15: event 15 does not match the signed head",
    );
    // Nor does the server sign the rewritten chain.
    fails(
        &twokey(&copy, &["audit", "checkpoint"]),
        "refusing to sign a checkpoint",
    );
    fails(
        &twokey(&copy, &["audit", "export"]),
        "refusing to sign a checkpoint",
    );
    // An operator's pinned head catches it too.
    fails(
        &twokey(&copy, &["audit", "verify", "--expect-head", &early]),
        "FAIL",
    );

    // Covering the rewrite by editing the checkpoint's hash breaks its signature.
    let (_d, copy) = copy_setup(&config);
    rewrite_and_rehash(&copy, 3, "mallory@example.com").await;
    let mut conn = db(&copy).await;
    sqlx::query(
        "UPDATE audit_checkpoints SET hash = (SELECT hash FROM audit_events WHERE seq = 15)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    fails(
        &twokey(&copy, &["audit", "verify"]),
        "FAIL: checkpoint at seq 15: the signature does not verify",
    );

    // Deleting the checkpoint row: its `audit.checkpoint` event is left without it.
    let (_d, copy) = copy_setup(&config);
    rewrite_and_rehash(&copy, 3, "mallory@example.com").await;
    let mut conn = db(&copy).await;
    sqlx::query("DELETE FROM audit_checkpoints")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    fails(
        &twokey(&copy, &["audit", "verify"]),
        "FAIL: checkpoint at seq 15: event records a checkpoint whose signed head is missing",
    );
    fails(&twokey(&copy, &["audit", "checkpoint"]), "refusing to sign");

    // Re-signing with another key (a second data dir's own key) is refused.
    let (other_keep, other) = copy_setup(&config);
    std::fs::remove_file(other_keep.path().join("audit_signing_key")).unwrap();
    let mut conn = db(&other).await;
    sqlx::query("DELETE FROM audit_checkpoints")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_events WHERE seq = 15")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE audit_head SET seq = 14, hash = (SELECT hash FROM audit_events WHERE seq = 14)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    rewrite_and_rehash(&other, 3, "mallory@example.com").await;
    ok(&twokey(&other, &["audit", "checkpoint"]));
    let (_d, copy) = copy_setup(&config);
    let foreign: (i64, String, i64, String, String) = {
        let mut conn = db(&other).await;
        let r = sqlx::query_as(
            "SELECT seq, hash, ts, key_fingerprint, signature FROM audit_checkpoints",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        r
    };
    // The attacker's database: their rewritten chain with their own checkpoint.
    std::fs::copy(
        other_keep.path().join("twokey.db"),
        copy.parent().unwrap().join("twokey.db"),
    )
    .unwrap();
    for f in ["twokey.db-wal", "twokey.db-shm"] {
        let _ = std::fs::remove_file(copy.parent().unwrap().join(f));
        if other_keep.path().join(f).exists() {
            std::fs::copy(other_keep.path().join(f), copy.parent().unwrap().join(f)).unwrap();
        }
    }
    assert_eq!(foreign.0, 15);
    fails(
        &twokey(&copy, &["audit", "verify"]),
        "FAIL: checkpoint at seq 15: signed by SHA256:",
    );
    fails(
        &twokey(&copy, &["audit", "verify"]),
        "which is not the accepted key",
    );

    // Deleting the newest events and moving the recorded head back: the checkpoint
    // covers a seq beyond the end.
    let (_d, copy) = copy_setup(&config);
    let mut conn = db(&copy).await;
    sqlx::query("DELETE FROM audit_events WHERE seq >= 14")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE audit_head SET seq = 13, hash = (SELECT hash FROM audit_events WHERE seq = 13)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    fails(
        &twokey(&copy, &["audit", "verify"]),
        "FAIL: checkpoint at seq 15: it covers seq 15 but the chain ends at seq 13",
    );
    fails(
        &twokey(&copy, &["audit", "verify", "--expect-head", &pinned]),
        "FAIL",
    );

    // A pinned head that does not match is refused on an untampered database.
    let wrong = format!("10:{}", "0".repeat(64));
    fails(
        &twokey(&config, &["audit", "verify", "--expect-head", &wrong]),
        "FAIL: pinned head: event 10 does not have the pinned hash",
    );
    fails(
        &twokey(
            &config,
            &[
                "audit",
                "verify",
                "--expect-head",
                &format!("99:{}", "0".repeat(64)),
            ],
        ),
        "FAIL: pinned head: seq 99 is beyond the end of the chain",
    );
    fails(
        &twokey(&config, &["audit", "verify", "--expect-head", "10"]),
        "is not SEQ:HASH",
    );
    // And the untampered database still passes.
    ok(&twokey(&config, &["audit", "verify"]));
}

/// Lines of an export, and helpers to rewrite them as an attacker would.
fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_lines(path: &Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// Edits an event in an export and recomputes every event hash after it, then points
/// every checkpoint line at the new hashes (keeping or replacing their signatures).
fn rewrite_export(lines: &mut [serde_json::Value], seq: i64, actor: &str) {
    let mut prev = GENESIS.to_string();
    let mut by_seq = std::collections::HashMap::new();
    for l in lines.iter_mut() {
        if l.get("seq").is_none() {
            continue;
        }
        let s = l["seq"].as_i64().unwrap();
        if s == seq {
            l["actor"] = actor.into();
        }
        let hash = event_hash(
            &prev,
            s,
            l["ts"].as_i64().unwrap(),
            l["actor"].as_str().unwrap(),
            l["action"].as_str().unwrap(),
            l["subject"].as_str().unwrap(),
            l["details"].as_str().unwrap(),
        );
        l["prev_hash"] = prev.clone().into();
        l["hash"] = hash.clone().into();
        by_seq.insert(s, hash.clone());
        prev = hash;
    }
    for l in lines.iter_mut() {
        for key in ["checkpoint", "export_end"] {
            if let Some(cp) = l.get_mut(key) {
                let s = cp["seq"].as_i64().unwrap();
                cp["hash"] = by_seq[&s].clone().into();
            }
        }
    }
}

/// Signs a statement as an attacker with their own key, using stock ssh-keygen.
fn ssh_sign(dir: &Path, key: &Path, namespace: &str, seq: i64, hash: &str, ts: i64) -> String {
    let msg = dir.join("msg");
    std::fs::write(
        &msg,
        format!("twokey audit head v1\nseq {seq}\nhash {hash}\nts {ts}\n"),
    )
    .unwrap();
    let _ = std::fs::remove_file(dir.join("msg.sig"));
    let out = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", namespace, "-f"])
        .arg(key)
        .arg(&msg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::read_to_string(dir.join("msg.sig")).unwrap()
}

#[tokio::test]
async fn an_export_cut_off_forged_or_signed_by_another_key_fails_offline() {
    let (keep, config) = populated().await;
    let dir = keep.path();
    let pubkey = dir.join("audit.pub");
    std::fs::write(&pubkey, ok(&twokey(&config, &["audit", "public-key"]))).unwrap();
    let server_key = std::fs::read_to_string(&pubkey).unwrap();
    assert!(server_key.starts_with("ssh-ed25519 "), "{server_key}");

    // Two checkpoints in the file: one asked for, then one at export.
    ok(&twokey(&config, &["audit", "checkpoint"]));
    ok(&twokey(
        &config,
        &["token", "create", "--user", "alice@example.com"],
    ));
    let export = dir.join("audit.jsonl");
    let out = twokey(
        &config,
        &["audit", "export", "--output", export.to_str().unwrap()],
    );
    ok(&out);
    assert!(
        stderr(&out).contains("closing checkpoint at seq 17"),
        "{}",
        stderr(&out)
    );
    let all = lines(&export);
    // 17 events, checkpoints after events 15 and 17, and the closing statement.
    assert_eq!(all.len(), 20);
    assert_eq!(all[15]["checkpoint"]["seq"], 15);
    assert_eq!(all[18]["checkpoint"]["seq"], 17);
    assert_eq!(all[19]["export_end"]["seq"], 17);
    assert_eq!(
        all[19]["export_end"]["public_key"].as_str().unwrap(),
        server_key.trim()
    );
    assert_eq!(all[16]["action"], "token.created");
    assert_eq!(all[17]["action"], "audit.checkpoint");
    let details = all[17]["details"].as_str().unwrap();
    assert!(details.contains("\"reason\":\"export\""), "{details}");
    // A second export of the same head is the same file (nothing new is signed).
    assert_eq!(
        stdout(&twokey(&config, &["audit", "export"])),
        std::fs::read_to_string(&export).unwrap()
    );
    // The signatures are standard SSH signatures: stock ssh-keygen checks them too.
    let cp = &all[18]["checkpoint"];
    std::fs::write(dir.join("cp.sig"), cp["signature"].as_str().unwrap()).unwrap();
    let check = Command::new("ssh-keygen")
        .args([
            "-Y",
            "check-novalidate",
            "-n",
            "twokey-audit-checkpoint",
            "-s",
        ])
        .arg(dir.join("cp.sig"))
        .stdin(
            std::fs::File::open({
                let m = dir.join("cp.msg");
                std::fs::write(
                    &m,
                    format!(
                        "twokey audit head v1\nseq {}\nhash {}\nts {}\n",
                        cp["seq"],
                        cp["hash"].as_str().unwrap(),
                        cp["ts"]
                    ),
                )
                .unwrap();
                m
            })
            .unwrap(),
        )
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));

    let verify = |file: &Path, extra: &[&str]| {
        let mut args = vec!["audit", "verify", "--file", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        twokey(&config, &args)
    };
    let pin = ["--public-key", pubkey.to_str().unwrap()];
    // Untampered: passes, with the key pinned or not (then it says so).
    let out = ok(&verify(&export, &[]));
    assert!(out.starts_with("OK: 17 events, head 17:"), "{out}");
    assert!(out.contains("not pinned"), "{out}");
    let out = ok(&verify(&export, &pin));
    assert!(
        !out.contains("not pinned") && out.contains("signed checkpoint at seq 17"),
        "{out}"
    );
    let head = head_of(&out);
    ok(&verify(&export, &[pin[0], pin[1], "--expect-head", &head]));

    let file = dir.join("attacked.jsonl");
    // Cut off: the closing line gone, then whole tail gone, then cut after checkpoint 15
    // (a file that ends in a valid checkpoint, but not the export's closing one).
    for keep_lines in [19, 18, 16, 10] {
        write_lines(&file, &all[..keep_lines]);
        fails(
            &verify(&file, &pin),
            "FAIL: the export's closing checkpoint is missing",
        );
    }
    // Events cut out before the closing line.
    let mut cut = all[..15].to_vec();
    cut.push(all[19].clone());
    write_lines(&file, &cut);
    fails(
        &verify(&file, &pin),
        "FAIL: the export's closing checkpoint covers seq 17 but the file's events end at seq 15",
    );

    // Rewritten and rehashed, checkpoint hashes moved along: the signatures fail.
    let mut forged = all.clone();
    rewrite_export(&mut forged, 3, "mallory@example.com");
    write_lines(&file, &forged);
    fails(&verify(&file, &pin), "the signature does not verify");
    fails(&verify(&file, &[]), "the signature does not verify");

    // Re-signed with the attacker's own key (stock ssh-keygen), their key in the file.
    let attacker = dir.join("attacker");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&attacker)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let attacker_pub = std::fs::read_to_string(dir.join("attacker.pub")).unwrap();
    for l in forged.iter_mut() {
        for (key, ns) in [
            ("checkpoint", "twokey-audit-checkpoint"),
            ("export_end", "twokey-audit-export"),
        ] {
            if let Some(cp) = l.get_mut(key) {
                let sig = ssh_sign(
                    dir,
                    &attacker,
                    ns,
                    cp["seq"].as_i64().unwrap(),
                    cp["hash"].as_str().unwrap(),
                    cp["ts"].as_i64().unwrap(),
                );
                cp["signature"] = sig.into();
                cp["public_key"] = attacker_pub.trim().into();
            }
        }
    }
    write_lines(&file, &forged);
    // Consistent in itself, so only pinning tells: unpinned it shows the other key...
    let out = ok(&verify(&file, &[]));
    assert!(out.contains("not pinned"), "{out}");
    // ...pinned to the server's key it fails.
    fails(
        &verify(&file, &pin),
        "FAIL: the export's closing checkpoint: signed by SHA256:",
    );
    fails(&verify(&file, &pin), "which is not the accepted key");
    // Claiming the server's key while signed by another is refused as the file is read.
    for l in forged.iter_mut() {
        if let Some(cp) = l.get_mut("export_end") {
            cp["public_key"] = server_key.trim().into();
        }
    }
    write_lines(&file, &forged);
    fails(
        &verify(&file, &[]),
        "its public_key is not the key that made its signature",
    );

    // A signature byte flipped on an otherwise untouched file.
    let mut flipped = all.clone();
    let sig = flipped[19]["export_end"]["signature"]
        .as_str()
        .unwrap()
        .to_string();
    let body: Vec<&str> = sig.lines().collect();
    // The last base64 line holds the tail of the signature bytes (not the key).
    let tail = body[body.len() - 2];
    let mut mid = tail.to_string();
    let c = mid.remove(2);
    mid.insert(2, if c == 'A' { 'B' } else { 'A' });
    let sig = sig.replacen(tail, &mid, 1);
    flipped[19]["export_end"]["signature"] = sig.into();
    write_lines(&file, &flipped);
    fails(
        &verify(&file, &pin),
        "FAIL: the export's closing checkpoint: the signature does not verify",
    );

    // A pinned head that the file does not hold.
    fails(
        &verify(
            &export,
            &["--expect-head", &format!("12:{}", "a".repeat(64))],
        ),
        "FAIL: pinned head: event 12 does not have the pinned hash",
    );
    fails(
        &verify(
            &export,
            &["--expect-head", &format!("40:{}", "a".repeat(64))],
        ),
        "FAIL: pinned head: seq 40 is beyond the end",
    );
    // A bad --public-key file is a clear error.
    std::fs::write(dir.join("bad.pub"), "not a key").unwrap();
    fails(
        &verify(
            &export,
            &["--public-key", dir.join("bad.pub").to_str().unwrap()],
        ),
        "is not an OpenSSH public key line",
    );
}

#[tokio::test]
async fn the_worker_signs_checkpoints_by_time_and_by_count() {
    let app = common::start_with(|c| c.audit.checkpoint_every = 3).await;
    let state = app.state().clone();
    let alice = app.api("alice@example.com").await;
    // First one at once: there is none yet.
    let first = twokey::audit::signing::checkpoint_if_due(&state)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.seq, 2);
    assert!(
        twokey::audit::signing::checkpoint_if_due(&state)
            .await
            .unwrap()
            .is_none()
    );
    // Two events: neither a minute nor three events yet.
    alice.file("demo-db", "read", "1h", None).await;
    app.api("bob@example.com").await;
    assert!(
        twokey::audit::signing::checkpoint_if_due(&state)
            .await
            .unwrap()
            .is_none()
    );
    // A minute later it is due.
    app.clock.advance(chrono::Duration::seconds(60));
    let second = twokey::audit::signing::checkpoint_if_due(&state)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.seq, 5);
    // Three events later it is due without the clock moving.
    for _ in 0..2 {
        alice.file("demo-db", "read", "1h", None).await;
    }
    assert!(
        twokey::audit::signing::checkpoint_if_due(&state)
            .await
            .unwrap()
            .is_none()
    );
    alice.file("demo-db", "read", "1h", None).await;
    let third = twokey::audit::signing::checkpoint_if_due(&state)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(third.seq, 9);
    let keys = [state.audit_key.public_key().clone()];
    let v = twokey::audit::checkpoint::verify_db(&state.db, &keys, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((v.chain.events, v.checkpoint), (9, Some(9)));
    assert_eq!(
        app.audit_actions()
            .await
            .iter()
            .filter(|a| *a == "audit.checkpoint")
            .count(),
        3
    );
    // The admin audit page reports the signed checkpoint.
    let admin = app.browser("dave@example.com").await;
    let (status, html) = admin.get("/audit").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert!(html.contains("signed checkpoint at seq 9"), "{html}");
    app.server.stop().await;
}

#[tokio::test]
async fn the_background_sweeper_makes_checkpoints() {
    let app =
        common::start_with(|c| c.server.sweep_interval = std::time::Duration::from_millis(20))
            .await;
    app.api("alice@example.com").await;
    // Bounded wait for the worker's first pass.
    let mut found = false;
    for _ in 0..250 {
        if app
            .audit_actions()
            .await
            .iter()
            .any(|a| a == "audit.checkpoint")
        {
            found = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(found, "no checkpoint from the worker within 5 s");
    app.server.stop().await;
}
