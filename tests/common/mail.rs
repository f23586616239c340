//! A real SMTP server with a readable inbox: npm `maildev` on loopback ports,
//! killed on drop; can be stopped and started again on the same ports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct MailDev {
    child: Option<Child>,
    pub smtp_port: u16,
    pub web_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl MailDev {
    /// Reserves ports without starting (to begin "down").
    pub fn reserve() -> MailDev {
        MailDev {
            child: None,
            smtp_port: free_port(),
            web_port: free_port(),
        }
    }

    pub async fn start() -> MailDev {
        let mut m = MailDev::reserve();
        m.up().await;
        m
    }

    pub async fn up(&mut self) {
        let root = env!("CARGO_MANIFEST_DIR");
        let bin = format!("{root}/node_modules/maildev/bin/maildev");
        assert!(
            std::path::Path::new(&bin).exists(),
            "maildev is missing: run ./scripts/test (npm ci)"
        );
        let child = Command::new("node")
            .arg(bin)
            .args([
                "--smtp",
                &self.smtp_port.to_string(),
                "--web",
                &self.web_port.to_string(),
            ])
            .args(["--ip", "127.0.0.1", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start maildev");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let web = reqwest::get(format!("http://127.0.0.1:{}/email", self.web_port)).await;
            let smtp = std::net::TcpStream::connect(("127.0.0.1", self.smtp_port));
            if web.is_ok_and(|r| r.status().is_success()) && smtp.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "maildev did not start within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every message received, oldest first.
    pub async fn emails(&self) -> Vec<Value> {
        reqwest::get(format!("http://127.0.0.1:{}/email", self.web_port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits (bounded) until at least `n` messages arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mails = self.emails().await;
            if mails.len() >= n {
                return mails;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} messages arrived",
                mails.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for MailDev {
    fn drop(&mut self) {
        self.down();
    }
}

/// The recipient address of a maildev message.
pub fn to(mail: &Value) -> String {
    mail["to"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The URL after `label` in a message's text part (e.g. "Approve:").
pub fn link(text: &str, label: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .expect(label);
    line.trim_start()[label.len()..].trim().to_string()
}
