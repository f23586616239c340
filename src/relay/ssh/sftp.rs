//! What an sftp session does to the target's files, read off the SFTP protocol
//! (draft-ietf-secsh-filexfer-02, version 3, as OpenSSH speaks it) as it passes: every
//! open (with its mode), write (bytes per file), remove, rename, setstat, mkdir, rmdir,
//! symlink and OpenSSH extension, with its paths, becomes one line for the recording.
//! File contents are counted, not recorded.
//!
//! It must never let a request pass that it could not read: a stream that does not
//! parse (a packet longer than [`MAX_PACKET`], a truncated field) is an error, and the
//! relay ends the session rather than relay requests it cannot record.

use std::collections::HashMap;

/// The longest SFTP packet accepted either way. OpenSSH's own limit is 256 KiB.
pub const MAX_PACKET: usize = 1 << 20;

/// SFTP's file attribute flags and open flags (filexfer-02 §5, §6.3).
const ATTR_SIZE: u32 = 0x1;
const ATTR_UIDGID: u32 = 0x2;
const ATTR_PERMISSIONS: u32 = 0x4;
const ATTR_ACMODTIME: u32 = 0x8;
const ATTR_EXTENDED: u32 = 0x8000_0000;

/// Splits a byte stream into SFTP packets (a `u32` length, then that many bytes).
#[derive(Default)]
struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    /// The packets `data` completes (each without its length prefix).
    fn feed(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut at = 0;
        while self.buf.len() - at >= 4 {
            let len = u32::from_be_bytes([
                self.buf[at],
                self.buf[at + 1],
                self.buf[at + 2],
                self.buf[at + 3],
            ]) as usize;
            if len == 0 || len > MAX_PACKET {
                return Err(format!("an sftp packet of {len} bytes"));
            }
            if self.buf.len() - at - 4 < len {
                break;
            }
            out.push(self.buf[at + 4..at + 4 + len].to_vec());
            at += 4 + len;
        }
        self.buf.drain(..at);
        Ok(out)
    }
}

/// A cursor over one packet's fields.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a truncated sftp packet".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// A path or name, shown as text (JSON-escaped in the recording).
    fn text(&mut self) -> Result<String, String> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }
    /// File attributes, as the parts a reviewer cares about: `mode 0644 uid 0 …`.
    fn attrs(&mut self) -> Result<String, String> {
        let flags = self.u32()?;
        let mut parts = Vec::new();
        if flags & ATTR_SIZE != 0 {
            parts.push(format!("size {}", self.u64()?));
        }
        if flags & ATTR_UIDGID != 0 {
            parts.push(format!("uid {} gid {}", self.u32()?, self.u32()?));
        }
        if flags & ATTR_PERMISSIONS != 0 {
            parts.push(format!("mode {:04o}", self.u32()? & 0o7777));
        }
        if flags & ATTR_ACMODTIME != 0 {
            parts.push(format!("atime {} mtime {}", self.u32()?, self.u32()?));
        }
        if flags & ATTR_EXTENDED != 0 {
            let n = self.u32()?;
            for _ in 0..n {
                let name = self.text()?;
                self.bytes()?;
                parts.push(format!("extended {name:?}"));
            }
        }
        Ok(parts.join(" "))
    }
}

/// One open file, from the server's handle for it.
struct Open {
    path: String,
    written: u64,
    writes: u64,
}

/// Both directions of one sftp session: requests from the engineer, and the server's
/// replies (for the handles that later writes name).
#[derive(Default)]
pub struct Sftp {
    requests: Framer,
    replies: Framer,
    /// Request id → the path it opens, until the server answers with a handle.
    opening: HashMap<u32, String>,
    /// Handle → the file it is.
    open: HashMap<Vec<u8>, Open>,
}

/// Open handles tracked at most; a client that never closes cannot grow memory.
const MAX_OPEN: usize = 4096;

fn with_handle(open: &HashMap<Vec<u8>, Open>, h: &[u8]) -> String {
    open.get(h)
        .map_or_else(|| format!("handle {}", hex::encode(h)), |o| o.path.clone())
}

impl Sftp {
    /// The lines to record for what the engineer sent in `data`, before it is passed
    /// on. An error means the stream cannot be read: the session must end.
    pub fn requests(&mut self, data: &[u8]) -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        for p in self.requests.feed(data)? {
            if let Some(line) = self.request(&p)? {
                lines.push(line);
            }
        }
        Ok(lines)
    }

    fn request(&mut self, p: &[u8]) -> Result<Option<String>, String> {
        let mut r = Reader(p);
        let kind = r.u8()?;
        if kind == 1 {
            // INIT: a version, no id.
            return Ok(Some(format!("sftp: version {}", r.u32()?)));
        }
        let id = r.u32()?;
        let line = match kind {
            3 => {
                let path = r.text()?;
                let flags = r.u32()?;
                let attrs = r.attrs()?;
                let mut mode = Vec::new();
                for (bit, name) in [
                    (0x1, "read"),
                    (0x2, "write"),
                    (0x4, "append"),
                    (0x8, "create"),
                    (0x10, "truncate"),
                    (0x20, "exclusive"),
                ] {
                    if flags & bit != 0 {
                        mode.push(name);
                    }
                }
                if self.opening.len() < MAX_OPEN {
                    self.opening.insert(id, path.clone());
                }
                let attrs = if attrs.is_empty() {
                    String::new()
                } else {
                    format!(" {attrs}")
                };
                format!("sftp: open {path:?} ({}){attrs}", mode.join(","))
            }
            4 => {
                let h = r.bytes()?.to_vec();
                match self.open.remove(&h) {
                    Some(o) if o.writes > 0 => format!(
                        "sftp: close {:?}: wrote {} bytes in {} writes",
                        o.path, o.written, o.writes
                    ),
                    Some(_) => return Ok(None),
                    None => return Ok(None),
                }
            }
            6 => {
                let h = r.bytes()?.to_vec();
                let offset = r.u64()?;
                let n = r.u32()? as u64;
                match self.open.get_mut(&h) {
                    Some(o) => {
                        o.written += n;
                        o.writes += 1;
                        // The first write says where it goes; the total comes at close.
                        if o.writes > 1 {
                            return Ok(None);
                        }
                        format!("sftp: write {:?} at offset {offset} ({n} bytes)", o.path)
                    }
                    None => format!(
                        "sftp: write to {} at offset {offset} ({n} bytes)",
                        hex::encode(&h)
                    ),
                }
            }
            9 => {
                let path = r.text()?;
                format!("sftp: setstat {path:?} {}", r.attrs()?)
            }
            10 => {
                let h = r.bytes()?;
                let path = with_handle(&self.open, h);
                format!("sftp: fsetstat {path:?} {}", r.attrs()?)
            }
            11 => format!("sftp: opendir {:?}", r.text()?),
            13 => format!("sftp: remove {:?}", r.text()?),
            14 => {
                let path = r.text()?;
                format!("sftp: mkdir {path:?} {}", r.attrs()?)
            }
            15 => format!("sftp: rmdir {:?}", r.text()?),
            18 => {
                let from = r.text()?;
                format!("sftp: rename {from:?} to {:?}", r.text()?)
            }
            20 => {
                // OpenSSH sends (target, link), the reverse of the draft's order.
                let a = r.text()?;
                format!("sftp: symlink {a:?} {:?}", r.text()?)
            }
            200 => {
                let name = r.text()?;
                match name.as_str() {
                    "posix-rename@openssh.com" => {
                        let from = r.text()?;
                        format!("sftp: rename {from:?} to {:?}", r.text()?)
                    }
                    "hardlink@openssh.com" => {
                        let from = r.text()?;
                        format!("sftp: hardlink {from:?} to {:?}", r.text()?)
                    }
                    "lsetstat@openssh.com" => {
                        let path = r.text()?;
                        format!("sftp: lsetstat {path:?} {}", r.attrs()?)
                    }
                    "fsync@openssh.com" => return Ok(None),
                    "copy-data" => {
                        let from = with_handle(&self.open, r.bytes()?);
                        let (offset, len) = (r.u64()?, r.u64()?);
                        let to = with_handle(&self.open, r.bytes()?);
                        format!(
                            "sftp: copy-data {from:?} (offset {offset}, {len} bytes) into {to:?} at offset {}",
                            r.u64()?
                        )
                    }
                    _ => format!("sftp: extended request {name:?}"),
                }
            }
            // Reads and lookups (read, lstat, fstat, readdir, realpath, stat,
            // readlink) change nothing and are not recorded one by one: the open says
            // which file is read.
            5 | 7 | 8 | 12 | 16 | 17 | 19 => return Ok(None),
            other => format!("sftp: request type {other}"),
        };
        Ok(Some(line))
    }

    /// Follows the server's replies for the handles it hands out. An error means the
    /// stream cannot be read: the session must end.
    pub fn replies(&mut self, data: &[u8]) -> Result<(), String> {
        for p in self.replies.feed(data)? {
            let mut r = Reader(&p);
            let kind = r.u8()?;
            if kind == 2 {
                continue; // VERSION
            }
            let id = r.u32()?;
            match kind {
                // HANDLE: the file an open asked for.
                102 => {
                    let h = r.bytes()?.to_vec();
                    if let Some(path) = self.opening.remove(&id)
                        && self.open.len() < MAX_OPEN
                    {
                        self.open.insert(
                            h,
                            Open {
                                path,
                                written: 0,
                                writes: 0,
                            },
                        );
                    }
                }
                // STATUS: an open that failed gets no handle.
                101 => {
                    self.opening.remove(&id);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Files still open when the session ends, with what was written to them.
    pub fn unclosed(&mut self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .open
            .drain()
            .filter(|(_, o)| o.writes > 0)
            .map(|(_, o)| {
                format!(
                    "sftp: {:?} left open: wrote {} bytes in {} writes",
                    o.path, o.written, o.writes
                )
            })
            .collect();
        lines.sort();
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut p = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(kind);
        p.extend_from_slice(body);
        p
    }

    fn s(v: &str) -> Vec<u8> {
        let mut out = (v.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(v.as_bytes());
        out
    }

    #[test]
    fn opens_writes_and_renames_are_read_with_their_paths() {
        let mut sftp = Sftp::default();
        let mut open = 7u32.to_be_bytes().to_vec();
        open.extend(s("/home/a/.ssh/authorized_keys"));
        open.extend(0x1au32.to_be_bytes()); // write, create, truncate
        open.extend(ATTR_PERMISSIONS.to_be_bytes());
        open.extend(0o100600u32.to_be_bytes());
        // Split mid-packet: nothing until it is whole.
        let p = packet(3, &open);
        assert!(sftp.requests(&p[..10]).unwrap().is_empty());
        assert_eq!(
            sftp.requests(&p[10..]).unwrap(),
            vec![
                "sftp: open \"/home/a/.ssh/authorized_keys\" (write,create,truncate) mode 0600"
                    .to_string()
            ]
        );
        let mut handle = 7u32.to_be_bytes().to_vec();
        handle.extend(s("h1"));
        sftp.replies(&packet(102, &handle)).unwrap();
        let mut write = 8u32.to_be_bytes().to_vec();
        write.extend(s("h1"));
        write.extend(0u64.to_be_bytes());
        write.extend(s("ssh-ed25519 AAAA"));
        let mut stream = packet(6, &write);
        stream.extend(packet(6, &write));
        let mut close = 9u32.to_be_bytes().to_vec();
        close.extend(s("h1"));
        stream.extend(packet(4, &close));
        let mut rename = 10u32.to_be_bytes().to_vec();
        rename.extend(s("a"));
        rename.extend(s("b"));
        stream.extend(packet(18, &rename));
        assert_eq!(
            sftp.requests(&stream).unwrap(),
            vec![
                "sftp: write \"/home/a/.ssh/authorized_keys\" at offset 0 (16 bytes)",
                "sftp: close \"/home/a/.ssh/authorized_keys\": wrote 32 bytes in 2 writes",
                "sftp: rename \"a\" to \"b\"",
            ]
        );
    }

    #[test]
    fn what_cannot_be_read_is_an_error_not_a_pass() {
        let mut sftp = Sftp::default();
        // Longer than any packet accepted.
        assert!(sftp.requests(&u32::MAX.to_be_bytes()).is_err());
        // A path whose length runs past the packet.
        let mut sftp = Sftp::default();
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend(1000u32.to_be_bytes());
        assert!(sftp.requests(&packet(13, &body)).is_err());
        // An empty packet.
        let mut sftp = Sftp::default();
        assert!(sftp.requests(&0u32.to_be_bytes()).is_err());
        // An unknown request is recorded, not ignored.
        let mut sftp = Sftp::default();
        assert_eq!(
            sftp.requests(&packet(99, &1u32.to_be_bytes())).unwrap(),
            vec!["sftp: request type 99"]
        );
    }
}
