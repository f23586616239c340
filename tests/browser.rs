//! Every button and form in headless Chromium, each clicked and its effect checked:
//! alice files, bob approves, denies or revokes, alice cancels, gets database
//! credentials and an SSH certificate, an admin forces a re-sign-in, and everyone signs
//! in and out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::postgres::{self, Cluster};
use common::webdriver::Browser;
use reqwest::StatusCode;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const CAROL: &str = "carol@example.com";
const DAVE: &str = "dave@example.com";

/// Saves a screenshot when TWOKEY_SCREENSHOTS names a directory (for looking at pages).
async fn shot(b: &Browser, name: &str) {
    if let Ok(dir) = std::env::var("TWOKEY_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/{name}.png"), b.screenshot().await).unwrap();
    }
}

async fn sign_in(b: &Browser, base: &str, email: &str) {
    b.goto(&format!("{base}/login")).await;
    b.click_and_wait(&format!("button[id='login-{email}']"))
        .await;
    assert!(b.url().await.ends_with("/requests"), "signed in as {email}");
}

async fn sign_out(b: &Browser) {
    b.click_and_wait("form.signout button").await;
    assert!(b.url().await.ends_with("/login"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_files_bob_approves_alice_sees_the_grant() {
    let app = common::start().await;
    let base = app.server.url();
    let b = Browser::start().await;

    // 1. alice picks a role, then a duration the role allows, and files.
    sign_in(&b, &base, "alice@example.com").await;
    b.goto(&format!("{base}/requests/new")).await;
    shot(&b, "1-choose-role").await;
    b.click("#target option[value='demo-db/read']").await;
    b.click_and_wait("#choose-role").await;
    // Only durations up to the role's 4h maximum are offered.
    let form = b.source().await;
    assert!(
        form.contains("value=\"4h\"") && !form.contains("value=\"8h\""),
        "{form}"
    );
    b.click("#duration option[value='2h']").await;
    b.fill("#reason", "Rotate the host keys after the incident")
        .await;
    shot(&b, "1-new-request").await;
    b.click_and_wait("#submit-request").await;
    let detail = b.url().await;
    assert!(detail.contains("/requests/"), "{detail}");
    assert_eq!(b.text("#status").await, "pending");
    assert!(
        !b.exists("#approve").await,
        "no approve button on your own request"
    );
    assert!(b.exists("#own-request-note").await);
    shot(&b, "2-filed").await;
    sign_out(&b).await;

    // 2. bob finds it in his queue and approves with a comment.
    sign_in(&b, &base, "bob@example.com").await;
    b.goto(&format!("{base}/queue")).await;
    assert!(b.source().await.contains("Rotate the host keys"));
    b.click_and_wait("a.request-link").await;
    assert_eq!(b.url().await, detail);
    shot(&b, "3-approver-view").await;
    b.fill("#approve-comment", "ok for the incident").await;
    b.click_and_wait("#approve").await;
    assert_eq!(b.text("#status").await, "approved");
    sign_out(&b).await;

    // 3. alice sees the grant, its window and the timeline.
    sign_in(&b, &base, "alice@example.com").await;
    b.goto(&detail).await;
    assert_eq!(b.text("#grant-status").await, "active");
    let timeline = b.text("#timeline").await;
    for step in [
        "filed by alice@example.com",
        "approved by bob@example.com",
        "via web: ok for the incident",
        "granted",
    ] {
        assert!(
            timeline.contains(step),
            "timeline lacks {step:?}: {timeline}"
        );
    }
    b.set_window(390, 844).await;
    shot(&b, "4-grant-phone").await;
    b.goto(&format!("{base}/grants")).await;
    let left = b.text("td.left").await;
    assert!(left.contains("2h 0m left"), "{left}");
    b.quit().await;
    app.assert_chain_ok().await;
}

/// alice's request for `demo-db/read`, approved by bob through the API.
async fn approved_db_request(app: &common::TestApp) -> String {
    let id = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    let (s, r) = app.api(BOB).await.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_clicks_get_database_credentials_and_they_work() {
    let cluster = Cluster::start();
    let secrets = tempfile::tempdir().unwrap();
    let pw = secrets.path().join("pg-admin-password");
    // The admin the README tells operators to make (no superuser).
    std::fs::write(&pw, format!("{}\n", postgres::TWOKEY_ADMIN_PASSWORD)).unwrap();
    let port = cluster.port;
    let app = common::start_with(move |c| {
        let db = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-db")
            .unwrap();
        db.address = Some(format!("127.0.0.1:{port}"));
        db.database = Some("app".into());
        db.admin_user = Some(postgres::TWOKEY_ADMIN.into());
        db.admin_password_file = Some(pw);
        db.tls = Some("disable".into());
        db.reassign_owned_to = None;
        db.roles[0].db_roles = vec!["readonly".into()];
        c.validate().unwrap();
    })
    .await;
    // VALID UNTIL is checked by PostgreSQL against the wall clock.
    app.clock.set(chrono::Utc::now());
    let id = approved_db_request(&app).await;
    let base = app.server.url();
    let b = Browser::start().await;
    sign_in(&b, &base, ALICE).await;
    b.goto(&format!("{base}/requests/{id}")).await;
    b.click_and_wait("#get-db-credentials").await;
    shot(&b, "db-credentials").await;
    assert!(
        b.url()
            .await
            .ends_with(&format!("/requests/{id}/db-credentials")),
        "{}",
        b.url().await
    );
    assert!(
        b.source()
            .await
            .contains("Database credentials for demo-db"),
        "{}",
        b.source().await
    );
    let (host, db_port, db, user, password) = (
        b.text("#db-host").await,
        b.text("#db-port").await,
        b.text("#db-name").await,
        b.text("#db-user").await,
        b.text("#db-password").await,
    );
    assert_eq!(
        (host.as_str(), db_port.as_str(), db.as_str()),
        ("127.0.0.1", port.to_string().as_str(), "app")
    );
    assert!(
        !user.is_empty() && password.len() >= 20,
        "{user} {password}"
    );
    // The login on the page works against the real server, with what the role allows.
    let out = cluster.psql(&user, &password, "app", "SELECT count(*) FROM items");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    // The psql line carries the same login.
    let psql = b.text("#psql-url").await;
    assert!(
        psql.contains(&user) && psql.contains(&format!(":{port}/app")),
        "{psql}"
    );
    // Back on the request page, the login is listed (without its password).
    b.goto(&format!("{base}/requests/{id}")).await;
    let line = b.text("#db-credential").await;
    assert!(!line.contains(&password), "{line}");
    b.quit().await;
    app.assert_chain_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_says_revoked_with_when_and_by_whom_and_an_ended_one_says_ended() {
    let app = common::start().await;
    let base = app.server.url();
    let id = approved_db_request(&app).await;
    let b = Browser::start().await;

    // bob revokes in the browser, with a reason.
    sign_in(&b, &base, BOB).await;
    b.goto(&format!("{base}/requests/{id}")).await;
    assert_eq!(b.text("#status").await, "approved");
    assert_eq!(b.text("#grant-status").await, "active");
    b.fill("#revoke-comment", "incident over").await;
    app.clock.advance(chrono::Duration::minutes(5));
    b.click_and_wait("#revoke").await;
    assert!(b.url().await.ends_with(&format!("/requests/{id}")));
    shot(&b, "revoked").await;
    assert_eq!(b.text("#status").await, "revoked", "not a green approved");
    assert_eq!(b.text("#grant-status").await, "revoked");
    assert!(!b.exists("#revoke").await, "nothing left to revoke");
    let window = b.text("#grant-window").await;
    assert!(
        window.contains("revoked 2026-11-22 12:05:00 UTC by bob@example.com: incident over")
            && window.contains("planned end 2026-11-22 13:00:00 UTC"),
        "{window}"
    );
    sign_out(&b).await;

    // alice sees the same in My requests and on the page.
    sign_in(&b, &base, ALICE).await;
    let card = b.text("li.card").await;
    assert!(
        card.contains("revoked 2026-11-22 12:05:00 UTC by bob@example.com: incident over"),
        "{card}"
    );
    assert_eq!(b.text("li.card .status").await, "revoked");
    b.goto(&format!("{base}/requests/{id}")).await;
    assert_eq!(b.text("#status").await, "revoked");
    assert!(
        b.text("#status-note")
            .await
            .contains("revoked 2026-11-22 12:05:00 UTC by bob@example.com"),
    );

    // A grant that runs out: "ended" at its planned end, before and after the sweep.
    let id2 = approved_db_request(&app).await;
    app.clock.advance(chrono::Duration::hours(2));
    for swept in [false, true] {
        if swept {
            twokey::access::sweep(app.state()).await.unwrap();
        }
        b.goto(&format!("{base}/requests/{id2}")).await;
        assert_eq!(b.text("#status").await, "ended", "swept: {swept}");
        assert_eq!(b.text("#grant-status").await, "ended", "swept: {swept}");
        assert!(
            b.text("#grant-window").await.contains("ended 2026-11-22"),
            "swept: {swept}"
        );
        assert!(!b.exists("#get-db-credentials").await);
    }
    b.goto(&format!("{base}/requests")).await;
    let badges = b
        .script("return [...document.querySelectorAll('li.card .status')].map(e => e.innerText);")
        .await;
    assert_eq!(badges, serde_json::json!(["ended", "revoked"]));
    b.quit().await;
    app.assert_chain_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_and_cancel_buttons_decide_the_request() {
    let app = common::start().await;
    let base = app.server.url();
    let alice = app.api(ALICE).await;
    let denied = alice.file("demo-db", "read", "1h", None).await;
    let cancelled = alice.file("demo-db", "read", "1h", None).await;
    let b = Browser::start().await;

    sign_in(&b, &base, BOB).await;
    b.goto(&format!("{base}/requests/{denied}")).await;
    b.fill("#deny-comment", "use the replica").await;
    b.click_and_wait("#deny").await;
    assert_eq!(b.text("#status").await, "denied");
    assert!(!b.exists("#approve").await && !b.exists("#deny").await);
    assert!(
        b.text("#timeline")
            .await
            .contains("denied by bob@example.com via web: use the replica")
    );
    sign_out(&b).await;

    sign_in(&b, &base, ALICE).await;
    b.goto(&format!("{base}/requests/{cancelled}")).await;
    b.click_and_wait("#cancel").await;
    assert_eq!(b.text("#status").await, "cancelled");
    assert!(!b.exists("#cancel").await);
    assert!(
        b.text("#timeline")
            .await
            .contains("cancelled by alice@example.com")
    );
    // Nobody can act on it any more: it left bob's queue.
    sign_out(&b).await;
    sign_in(&b, &base, BOB).await;
    b.goto(&format!("{base}/queue")).await;
    assert!(!b.exists("a.request-link").await, "{}", b.source().await);
    b.quit().await;
    let actions = app.audit_actions().await;
    assert!(
        actions.contains(&"request.denied".to_string()),
        "{actions:?}"
    );
    assert!(
        actions.contains(&"request.cancelled".to_string()),
        "{actions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssh_certificate_form_gives_a_certificate_for_the_pasted_key() {
    let app = common::start().await;
    let base = app.server.url();
    let id = app
        .api(ALICE)
        .await
        .file("demo-ssh", "admin", "1h", Some("INC-7"))
        .await;
    for who in [BOB, CAROL] {
        let (s, r) = app.api(who).await.act(&id, "approve").await;
        assert_eq!(s, StatusCode::OK, "{r}");
    }
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("id_ed25519");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();

    let b = Browser::start().await;
    sign_in(&b, &base, ALICE).await;
    b.goto(&format!("{base}/requests/{id}")).await;
    b.fill("#public_key", public.trim()).await;
    b.click_and_wait("#get-certificate").await;
    shot(&b, "ssh-certificate").await;
    let page = b.source().await;
    let start = page.find("ssh-ed25519-cert-v01@openssh.com ").expect(&page);
    let end = start + page[start..].find(['<', '\n']).unwrap();
    let cert = page[start..end].trim().to_string();
    let cert_file = keys.path().join("id_ed25519-cert.pub");
    std::fs::write(&cert_file, format!("{cert}\n")).unwrap();
    let out = std::process::Command::new("ssh-keygen")
        .args(["-L", "-f"])
        .arg(&cert_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    // For the pasted key, with the role's principal, signed by twokey's CA.
    let fp = std::process::Command::new("ssh-keygen")
        .args(["-l", "-f"])
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout);
    let fp = fp.split_whitespace().nth(1).unwrap();
    assert!(
        listing.contains(&format!("Public key: ED25519-CERT {fp}")),
        "{listing}"
    );
    assert!(
        listing.contains("Principals: \n                admin"),
        "{listing}"
    );
    assert!(
        listing.contains(&app.state().ca.fingerprint()),
        "signed by twokey's CA: {listing}"
    );
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_clicks_force_re_sign_in_and_the_users_session_ends() {
    let app = common::start().await;
    let base = app.server.url();
    // alice is signed in elsewhere.
    let elsewhere = app.browser(ALICE).await;
    assert_eq!(elsewhere.get("/requests").await.0, StatusCode::OK);

    let b = Browser::start().await;
    sign_in(&b, &base, DAVE).await;
    b.goto(&format!("{base}/admin/users")).await;
    app.clock.advance(chrono::Duration::seconds(1));
    b.click_and_wait(&format!("button[id='reauth-{ALICE}']"))
        .await;
    assert!(b.url().await.ends_with("/admin/users"));
    assert_eq!(
        elsewhere.get("/requests").await.0,
        StatusCode::SEE_OTHER,
        "alice's session ended"
    );
    // dave's own session goes on.
    b.goto(&format!("{base}/requests")).await;
    assert!(b.url().await.ends_with("/requests"));
    b.quit().await;
    assert!(
        app.audit_actions()
            .await
            .contains(&"user.reauth_forced".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_out_ends_the_session_for_good() {
    let app = common::start().await;
    let base = app.server.url();
    let b = Browser::start().await;
    sign_in(&b, &base, ALICE).await;
    let cookie = b
        .script("return document.cookie;")
        .await
        .as_str()
        .unwrap_or_default()
        .to_string();
    // HttpOnly: pages cannot read the session cookie.
    assert!(!cookie.contains("twokey_session"), "{cookie}");
    sign_out(&b).await;
    b.goto(&format!("{base}/requests")).await;
    assert!(
        b.url().await.contains("/login?next=/requests"),
        "{}",
        b.url().await
    );
    b.quit().await;
}

/// A database session in Chromium: alice finds it on Sessions by its PostgreSQL badge,
/// clicks into it and reads a statement, an error's SQLSTATE, the kept rows and the
/// download link; at a phone's width nothing scrolls the page sideways, however long
/// the SQL or wide the result (those scroll inside their card).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_sessions_transcript_reads_in_chromium_and_fits_a_phone() {
    use common::transcripts::{self, a_bit_of_everything, rows};
    let app = common::start().await;
    let base = app.server.url();
    let long_sql = format!("select '{}' as x", "y".repeat(600));
    let wide: Vec<String> = (0..20).map(|i| format!("column_number_{i}")).collect();
    let wide_cols: Vec<&str> = wide.iter().map(String::as_str).collect();
    let wide_row: Vec<Option<&str>> = (0..20).map(|_| Some("a-rather-long-value")).collect();
    let mut entries = a_bit_of_everything();
    entries.push(rows(&long_sql, &wide_cols, vec![wide_row], 1));
    let pg = transcripts::pg_session(&app, entries).await;

    let b = Browser::start().await;
    sign_in(&b, &base, ALICE).await;
    b.goto(&format!("{base}/sessions")).await;
    let row = b.text(&format!("tr[id='session-{}']", pg.id)).await;
    assert!(row.contains("PostgreSQL"), "{row}");
    b.click_and_wait(&format!("tr[id='session-{}'] a", pg.id))
        .await;
    assert!(b.url().await.ends_with(&format!("/sessions/{}", pg.id)));
    shot(&b, "db-session").await;
    assert!(
        b.text("#stmt-1 pre.sql")
            .await
            .contains("insert into accounts (name, note) values ($1, $2)")
    );
    assert_eq!(b.text("#stmt-3 .sqlstate").await, "42P01");
    let result = b.text("#stmt-2 table.result").await;
    assert!(
        result.contains("alpha-row") && result.contains("beta-row"),
        "{result}"
    );
    assert!(b.text("#stmt-2").await.contains("3 more rows not kept"));
    assert_eq!(b.text("#statement-count").await, "6");
    assert!(
        b.text("#hash-verdict")
            .await
            .contains("matches the audit chain")
    );
    let href = b
        .script("return document.getElementById('download-transcript').href;")
        .await;
    assert_eq!(
        href.as_str().unwrap(),
        format!("{base}/sessions/{}/transcript", pg.id)
    );
    let download = b
        .script("return document.getElementById('download-transcript').getAttribute('download');")
        .await;
    assert_eq!(download, format!("{}.jsonl", pg.id).as_str());
    // What the link points at is the file (the page's CSP lets no script fetch it, so
    // it is fetched as alice outside the browser).
    let resp = app
        .browser(ALICE)
        .await
        .get_raw(href.as_str().unwrap().trim_start_matches(&base))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        std::fs::read(&pg.path).unwrap().as_slice()
    );

    b.set_window(390, 844).await;
    let fit = b
        .script("return [document.scrollingElement.scrollWidth, window.innerWidth, document.querySelector('#stmt-6 table.result').scrollWidth, document.querySelector('#stmt-6 table.result').clientWidth];")
        .await;
    let n = |i: usize| fit[i].as_f64().unwrap();
    assert!(n(1) <= 400.0, "the window is phone-sized: {fit}");
    assert!(n(0) <= n(1), "the page scrolls sideways at 390 px: {fit}");
    assert!(
        n(2) > n(3),
        "the wide result scrolls inside its card: {fit}"
    );
    shot(&b, "db-session-phone").await;
    b.quit().await;
}
