//! A throwaway OpenSSH `sshd` on a loopback port that trusts twokey's user CA and reads
//! twokey's KRL, plus helpers to make keys and run the real `ssh` client against it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The login the tests use: whoever runs them (sshd can only switch to other users
/// as root, and a non-root sshd logs in as itself).
pub fn login() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Makes an Ed25519 key pair; returns the private key's path.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success(), "ssh-keygen failed");
    path
}

impl Sshd {
    /// Starts sshd trusting `ca_line` (a `TrustedUserCAKeys` line) and reading the KRL
    /// from `krl` (written by the caller; an empty KRL file is fine).
    pub fn start(ca_line: &str, extra_config: &str) -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: ./scripts/test installs openssh-server"
        );
        // Privilege separation directory (Debian's sshd wants it when run as root).
        let _ = std::fs::create_dir_all("/run/sshd");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(d, "host_key");
        std::fs::write(d.join("ca.pub"), format!("{ca_line}\n")).unwrap();
        std::fs::write(d.join("krl"), b"").unwrap();
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             TrustedUserCAKeys {d}/ca.pub\nRevokedKeys {d}/krl\nAuthorizedKeysFile none\n\
             UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\n\
             LogLevel VERBOSE\nMaxStartups 100\nSubsystem sftp internal-sftp\n{extra_config}\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let sshd = Sshd { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                sshd.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sshd
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Replaces the KRL sshd reads (it rereads it on every authentication).
    pub fn set_krl(&self, krl: &[u8]) {
        let tmp = self.dir.path().join("krl.tmp");
        std::fs::write(&tmp, krl).unwrap();
        std::fs::rename(tmp, self.dir.path().join("krl")).unwrap();
    }

    pub fn host_key_line(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("host_key.pub"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `known_hosts` pinning this sshd's host key.
    pub fn known_hosts(&self) -> PathBuf {
        let path = self.dir.path().join("known_hosts");
        std::fs::write(
            &path,
            format!("[127.0.0.1]:{} {}\n", self.port, self.host_key_line()),
        )
        .unwrap();
        path
    }

    /// Runs `ssh` as `user` with `key` and its certificate; returns the output.
    pub fn ssh(&self, user: &str, key: &Path, cert: &Path, command: &str) -> Output {
        self.ssh_with(user, key, cert, &[], command)
    }

    /// Like [`Sshd::ssh`], with extra `ssh` arguments (`-L …`).
    pub fn ssh_with(
        &self,
        user: &str,
        key: &Path,
        cert: &Path,
        extra: &[&str],
        command: &str,
    ) -> Output {
        Command::new("ssh")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "IdentitiesOnly=yes"])
            .args(extra)
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.known_hosts().display()
            ))
            .arg("-o")
            .arg(format!("CertificateFile={}", cert.display()))
            .arg("-i")
            .arg(key)
            .args(["-p", &self.port.to_string()])
            .arg(format!("{user}@127.0.0.1"))
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}
