//! The workflow in headless Chromium: alice files, bob approves, alice sees the grant.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::webdriver::Browser;

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
