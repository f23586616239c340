//! The PostgreSQL wire protocol (version 3.0), as much as the relay needs: the untyped
//! packets before startup (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage),
//! typed message framing with a size bound, the few messages the relay itself writes,
//! and readers for the fields of the messages it looks into.
//!
//! Every length is checked before it is used: a malformed or oversized message is an
//! error, never a panic or an allocation the peer chose.

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The protocol version the relay speaks on both sides.
pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// The largest packet accepted before startup (PostgreSQL's own bound is 10,000).
pub const MAX_STARTUP: usize = 10_000;

/// A protocol error: what was wrong, in words for the peer and the log.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error("a message of {size} bytes is over the relay's bound of {max}")]
    TooLarge { size: usize, max: usize },
}

fn invalid(s: impl Into<String>) -> WireError {
    WireError::Invalid(s.into())
}

/// A packet before startup: its code and the rest.
pub struct Untyped {
    pub code: u32,
    pub body: Vec<u8>,
}

/// Reads one untyped packet (length, code, body).
pub async fn read_untyped<R: AsyncRead + Unpin>(r: &mut R) -> Result<Untyped, WireError> {
    let len = r.read_u32().await? as usize;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(invalid(format!("a startup packet of {len} bytes")));
    }
    let code = r.read_u32().await?;
    let mut body = vec![0u8; len - 8];
    r.read_exact(&mut body).await?;
    Ok(Untyped { code, body })
}

/// The parameters of a StartupMessage, in order.
pub fn startup_params(body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut f = Fields::new(body);
    let mut out = Vec::new();
    loop {
        let name = f.cstr()?;
        if name.is_empty() {
            break;
        }
        let value = f.cstr()?;
        out.push((name.to_string(), value.to_string()));
    }
    if !f.rest().is_empty() {
        return Err(invalid("bytes after the startup parameters"));
    }
    Ok(out)
}

/// A StartupMessage with these parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(0);
    b.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(&mut b, k);
        put_cstr(&mut b, v);
    }
    b.put_u8(0);
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b.to_vec()
}

/// A CancelRequest for a backend key.
pub fn cancel_request(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(8 + 4 + secret.len() as u32);
    b.put_u32(CANCEL_REQUEST);
    b.put_i32(pid);
    b.put_slice(secret);
    b.to_vec()
}

/// Where the next complete typed message in `buf` ends, if it is all there: its type
/// and total size (type byte and length included). Errs on a bad or oversized length.
pub fn frame(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(invalid(format!("a length of {len}")));
    }
    if len > max {
        return Err(WireError::TooLarge { size: len, max });
    }
    let total = 1 + len;
    Ok((buf.len() >= total).then_some((buf[0], total)))
}

/// Reads one whole typed message into `buf` (which may already hold some bytes) and
/// splits it off: (type, body).
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(u8, BytesMut), WireError> {
    loop {
        if let Some((t, total)) = frame(buf, max)? {
            let mut m = buf.split_to(total);
            m.advance(5);
            return Ok((t, m));
        }
        buf.reserve(8192);
        if r.read_buf(buf).await? == 0 {
            return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// A typed message.
pub fn message(t: u8, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + body.len());
    b.push(t);
    b.extend_from_slice(&(4 + body.len() as u32).to_be_bytes());
    b.extend_from_slice(body);
    b
}

/// An ErrorResponse (or NoticeResponse, `t = b'N'`): severity, SQLSTATE, message, and
/// an optional hint.
pub fn error_response(severity: &str, code: &str, text: &str, hint: Option<&str>) -> Vec<u8> {
    notice_or_error(b'E', severity, code, text, hint)
}

pub fn notice_or_error(
    t: u8,
    severity: &str,
    code: &str,
    text: &str,
    hint: Option<&str>,
) -> Vec<u8> {
    let mut b = BytesMut::new();
    for (k, v) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', text),
    ] {
        b.put_u8(k);
        put_cstr(&mut b, v);
    }
    if let Some(h) = hint {
        b.put_u8(b'H');
        put_cstr(&mut b, h);
    }
    b.put_u8(0);
    message(t, &b)
}

/// An Authentication message: its code and data.
pub fn authentication(code: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + data.len());
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(data);
    message(b'R', &b)
}

/// A NegotiateProtocolVersion: the newest minor version the relay speaks (0) and the
/// protocol options it does not know.
pub fn negotiate_protocol_version(unknown: &[String]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(0);
    b.put_u32(unknown.len() as u32);
    for o in unknown {
        put_cstr(&mut b, o);
    }
    message(b'v', &b)
}

/// A BackendKeyData (protocol 3.0: a 4-byte secret).
pub fn backend_key_data(pid: i32, secret: &[u8; 4]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8);
    b.extend_from_slice(&pid.to_be_bytes());
    b.extend_from_slice(secret);
    message(b'K', &b)
}

fn put_cstr(b: &mut BytesMut, s: &str) {
    // A NUL inside would end the string early: what the relay writes never holds one.
    b.put_slice(s.replace('\0', "").as_bytes());
    b.put_u8(0);
}

/// A reader over a message's fields.
pub struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Fields { buf }
    }

    /// A NUL-terminated string (UTF-8).
    pub fn cstr(&mut self) -> Result<&'a str, WireError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| invalid("a string without its end"))?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| invalid("a string that is not UTF-8"))?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| invalid("too short"))?;
        self.buf = rest;
        Ok(b)
    }

    pub fn i16(&mut self) -> Result<i16, WireError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, WireError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(self.i32()? as u32)
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(invalid("too short"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    /// A length-prefixed value (Int32 length, -1 for NULL).
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let n = self.i32()?;
        if n == -1 {
            return Ok(None);
        }
        let n = usize::try_from(n).map_err(|_| invalid("a negative length"))?;
        Ok(Some(self.take(n)?))
    }

    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

/// The fields of an ErrorResponse or NoticeResponse: (severity, code, message).
pub fn error_fields(body: &[u8]) -> (String, String, String) {
    let (mut sev, mut code, mut msg) = (String::new(), String::new(), String::new());
    let mut f = Fields::new(body);
    while let Ok(k) = f.u8() {
        if k == 0 {
            break;
        }
        let Ok(v) = f.cstr() else { break };
        match k {
            b'V' => sev = v.to_string(),
            b'S' if sev.is_empty() => sev = v.to_string(),
            b'C' => code = v.to_string(),
            b'M' => msg = v.to_string(),
            _ => {}
        }
    }
    (sev, code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_found_bounded_and_checked() {
        let m = message(b'Q', b"select 1\0");
        assert_eq!(frame(&m, 1 << 20).unwrap(), Some((b'Q', m.len())));
        assert_eq!(frame(&m[..m.len() - 1], 1 << 20).unwrap(), None);
        assert_eq!(frame(&m[..3], 1 << 20).unwrap(), None);
        assert!(matches!(frame(&m, 4), Err(WireError::TooLarge { .. })));
        assert!(frame(&[b'Q', 0, 0, 0, 3], 100).is_err(), "a length under 4");
        assert!(frame(&[b'Q', 0xff, 0xff, 0xff, 0xff], 1 << 30).is_err());
    }

    #[test]
    fn startup_parameters_read_back() {
        let m = startup_message(&[("user", "alice@example.com"), ("database", "prod-db")]);
        let p = startup_params(&m[8..]).unwrap();
        assert_eq!(
            p,
            [
                ("user".to_string(), "alice@example.com".to_string()),
                ("database".to_string(), "prod-db".to_string())
            ]
        );
        assert!(startup_params(b"user\0alice").is_err(), "no end");
        assert!(startup_params(b"user\0\xff\0\0").is_err(), "not UTF-8");
    }

    #[test]
    fn fields_never_read_past_the_end() {
        let mut f = Fields::new(&[0, 0, 0, 9, 1, 2]);
        assert!(f.value().is_err());
        let mut f = Fields::new(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(f.value().unwrap(), None);
        let mut f = Fields::new(&[0x80, 0, 0, 0]);
        assert!(f.value().is_err(), "negative length other than -1");
        let e = error_response("FATAL", "28P01", "no", Some("hint"));
        assert_eq!(
            error_fields(&e[5..]),
            ("FATAL".into(), "28P01".into(), "no".into())
        );
    }
}
