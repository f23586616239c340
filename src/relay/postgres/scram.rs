//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: the relay is the server
//! to psql and drivers, checking their proof against the verifier twokey stored, and the
//! client to the target, proving the grant's role password.
//!
//! Only the messages' contents live here (the `data` of SASLInitialResponse,
//! AuthenticationSASLContinue and friends); framing them is the relay's job. The relay
//! offers `SCRAM-SHA-256` only, never `-PLUS`, so channel binding is refused.
//!
//! It must never put a password, a proof or a key into an error or a log, never compare
//! a proof or a signature other than in constant time, and never tell an unknown user
//! from a known one on the wire (see [`Verifier::decoy`]).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SASL mechanism name, as sent in AuthenticationSASL and SASLInitialResponse.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// The iterations of the verifiers the relay makes (PostgreSQL's default, and what
/// `crate::dbcreds` uses), and so of the decoys for unknown users.
pub const ITERATIONS: u32 = 4096;
/// The fewest iterations accepted from a target: RFC 7677's minimum.
pub const MIN_ITERATIONS: u32 = 4096;
/// The most iterations accepted from a target, so a hostile server cannot make the
/// relay burn seconds of CPU per login.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// The longest SCRAM message accepted, either side. PostgreSQL's are under 200 bytes.
pub const MAX_MESSAGE_BYTES: usize = 2048;
/// Random bytes in a nonce, as PostgreSQL (SCRAM_RAW_NONCE_LEN); 24 base64 characters.
const NONCE_BYTES: usize = 18;
/// Salt bytes of a decoy: as long as those `crate::dbcreds` makes.
const DECOY_SALT_BYTES: usize = 16;

/// Why a SCRAM exchange failed, in words an engineer can act on. None holds a
/// password, a proof, a key or a nonce.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// The stored verifier is not PostgreSQL's `SCRAM-SHA-256$…` form.
    #[error("the stored SCRAM verifier is malformed ({0})")]
    BadVerifier(&'static str),
    /// A message was not SCRAM as RFC 5802 writes it.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// A message was longer than [`MAX_MESSAGE_BYTES`].
    #[error("SCRAM message too long ({0} bytes; at most {MAX_MESSAGE_BYTES})")]
    TooLong(usize),
    /// The client wants channel binding (`p=`), which the relay does not offer.
    #[error(
        "the client asked for SCRAM channel binding (SCRAM-SHA-256-PLUS), which the relay \
         does not offer; connect with channel_binding=prefer or disable"
    )]
    ChannelBindingUnsupported,
    /// The client named an authorization identity (`a=`).
    #[error("the relay does not accept a SCRAM authorization identity (a=)")]
    Authzid,
    /// A mandatory extension (`m=`) the relay does not know.
    #[error("SCRAM mandatory extensions (m=) are not supported")]
    Extension,
    /// The final message's `c=` is not the first message's gs2 header.
    #[error("SCRAM channel binding (c=) does not match the first message")]
    ChannelBindingMismatch,
    /// The final message's nonce is not this exchange's.
    #[error("SCRAM nonce does not match this exchange")]
    NonceMismatch,
    /// The proof did not verify (wrong password, or no such login): one message for
    /// both, so the answer does not tell which.
    #[error("password authentication failed")]
    AuthFailed,
    /// The target's nonce does not extend the one the relay sent.
    #[error("the database's SCRAM nonce does not extend the relay's")]
    ServerNonce,
    /// The target asks for an iteration count outside the accepted range.
    #[error(
        "the database asks for {0} SCRAM iterations; the relay accepts {MIN_ITERATIONS} to \
         {MAX_ITERATIONS}"
    )]
    Iterations(u64),
    /// The target's signature does not verify: it does not know the role's verifier.
    #[error(
        "the database's SCRAM signature does not verify (it is not the server that holds \
         the role's password)"
    )]
    ServerSignature,
    /// The target ended the exchange with `e=`.
    #[error("the database refused the SCRAM exchange: {0}")]
    Server(String),
    /// A step was taken before the one it follows.
    #[error("SCRAM messages out of order")]
    OutOfOrder,
}

impl ScramError {
    /// The SQLSTATE PostgreSQL gives this failure when it is the server: `28P01` for a
    /// proof that does not verify, `0A000` for an authorization identity, `08P01` for a
    /// message that breaks the protocol; `XX000` for a bad stored verifier and for what
    /// only the client side (the relay to a target) meets.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ScramError::AuthFailed => "28P01",
            ScramError::Authzid => "0A000",
            ScramError::Malformed(_)
            | ScramError::TooLong(_)
            | ScramError::ChannelBindingUnsupported
            | ScramError::Extension
            | ScramError::ChannelBindingMismatch
            | ScramError::NonceMismatch
            | ScramError::OutOfOrder => "08P01",
            ScramError::BadVerifier(_)
            | ScramError::ServerNonce
            | ScramError::Iterations(_)
            | ScramError::ServerSignature
            | ScramError::Server(_) => "XX000",
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes a key of any length: new_from_slice cannot fail.
    let mut m = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

fn unb64(s: &str, what: &'static str) -> Result<Vec<u8>, ScramError> {
    STANDARD.decode(s).map_err(|_| ScramError::Malformed(what))
}

fn key32(s: &str) -> Result<[u8; 32], ScramError> {
    STANDARD
        .decode(s)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or(ScramError::BadVerifier("a key is not 32 bytes of base64"))
}

fn new_nonce() -> String {
    b64(&rand::random::<[u8; NONCE_BYTES]>())
}

/// A message as text: bounded, UTF-8.
fn text(msg: &[u8]) -> Result<&str, ScramError> {
    if msg.len() > MAX_MESSAGE_BYTES {
        return Err(ScramError::TooLong(msg.len()));
    }
    std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))
}

/// A nonce is printable ASCII without a comma (RFC 5802 §7).
fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// The value of attribute `name` (`name=value`), or an error naming it.
fn attr<'a>(part: Option<&'a str>, name: char, what: &'static str) -> Result<&'a str, ScramError> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or(ScramError::Malformed(what))
}

/// A stored SCRAM-SHA-256 verifier: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
    /// False for a decoy: no proof is ever accepted against it.
    genuine: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys let someone impersonate the server or attack the password offline.
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Reads PostgreSQL's stored form (what [`crate::dbcreds::scram_verifier`] makes).
    pub fn parse(s: &str) -> Result<Verifier, ScramError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::BadVerifier(
                "it does not start with SCRAM-SHA-256$",
            ))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(ScramError::BadVerifier("no $ before the keys"))?;
        let (iter, salt) = params
            .split_once(':')
            .ok_or(ScramError::BadVerifier("no iterations:salt"))?;
        let iterations: u32 =
            iter.parse()
                .ok()
                .filter(|i| *i > 0)
                .ok_or(ScramError::BadVerifier(
                    "iterations is not a positive number",
                ))?;
        let salt = STANDARD
            .decode(salt)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or(ScramError::BadVerifier("the salt is not base64"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(ScramError::BadVerifier("no StoredKey:ServerKey"))?;
        Ok(Verifier {
            iterations,
            salt,
            stored_key: key32(stored)?,
            server_key: key32(server)?,
            genuine: true,
        })
    }

    /// A stand-in for a login that does not exist (an unknown user, no relay password):
    /// its salt is derived from `server_secret` and `user`, so asking twice for the same
    /// unknown user shows the same salt, as for a real one, and its iterations are
    /// [`ITERATIONS`]. No proof is ever accepted against it.
    pub fn decoy(server_secret: &[u8], user: &str) -> Verifier {
        // Why: an answer that differed for unknown users (an error, a fresh random salt
        // each time) would let anyone list who holds a relay login.
        let salt = hmac(
            server_secret,
            &[b"twokey scram decoy salt\0", user.as_bytes()],
        );
        Verifier {
            iterations: ITERATIONS,
            salt: salt[..DECOY_SALT_BYTES].to_vec(),
            stored_key: hmac(
                server_secret,
                &[b"twokey scram decoy stored\0", user.as_bytes()],
            ),
            server_key: hmac(
                server_secret,
                &[b"twokey scram decoy server\0", user.as_bytes()],
            ),
            genuine: false,
        }
    }

    /// The PBKDF2 iterations of this verifier.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }
}

/// A secret made once per process, for decoys when the caller has none of its own.
fn process_secret() -> &'static [u8; 32] {
    static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    SECRET.get_or_init(rand::random)
}

/// The relay's side of one exchange with a client, between its first and final message.
pub struct ServerExchange {
    verifier: Verifier,
    /// The client's first message without the gs2 header.
    client_first_bare: String,
    server_first: String,
    /// The gs2 header, as `c=` must echo it (base64).
    gs2_header_b64: String,
    /// Client nonce + server nonce.
    nonce: String,
}

impl std::fmt::Debug for ServerExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerExchange").finish_non_exhaustive()
    }
}

impl ServerExchange {
    /// Reads the client-first-message (SASLInitialResponse's data) and returns the
    /// server-first-message (AuthenticationSASLContinue's data).
    ///
    /// `verifier` is the login's; `None` (no such login) answers exactly as for one —
    /// with a decoy salt from a per-process secret and [`ITERATIONS`] — and then fails
    /// at [`ServerExchange::finish`]. A caller that knows the user and has a lasting
    /// secret should pass `Some(&Verifier::decoy(secret, user))` instead, so the salt
    /// shown for an unknown user is also the same across restarts and differs by user.
    pub fn start(
        verifier: Option<&Verifier>,
        client_first: &[u8],
    ) -> Result<(ServerExchange, Vec<u8>), ScramError> {
        Self::start_with_nonce(verifier, client_first, new_nonce())
    }

    fn start_with_nonce(
        verifier: Option<&Verifier>,
        client_first: &[u8],
        server_nonce: String,
    ) -> Result<(ServerExchange, Vec<u8>), ScramError> {
        let msg = text(client_first)?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg
            .split_once(',')
            .ok_or(ScramError::Malformed("no gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBindingUnsupported),
            _ => return Err(ScramError::Malformed("unknown channel-binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no gs2 header"))?;
        if !authzid.is_empty() {
            return Err(if authzid.starts_with("a=") {
                ScramError::Authzid
            } else {
                ScramError::Malformed("bad authorization identity field")
            });
        }
        let gs2_header = &msg[..msg.len() - bare.len()];
        let mut parts = bare.split(',');
        let first = parts.next();
        if first.is_some_and(|p| p.starts_with("m=")) {
            return Err(ScramError::Extension);
        }
        // PostgreSQL's clients send `n=` empty: the user is the startup message's, so
        // whatever is here is ignored.
        attr(first, 'n', "no username (n=)")?;
        let client_nonce = attr(parts.next(), 'r', "no nonce (r=)")?;
        if !valid_nonce(client_nonce) {
            return Err(ScramError::Malformed("the nonce is not printable"));
        }
        let verifier = verifier
            .cloned()
            .unwrap_or_else(|| Verifier::decoy(process_secret(), ""));
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            b64(&verifier.salt),
            verifier.iterations
        );
        let reply = server_first.clone().into_bytes();
        Ok((
            ServerExchange {
                verifier,
                client_first_bare: bare.to_string(),
                server_first,
                gs2_header_b64: b64(gs2_header.as_bytes()),
                nonce,
            },
            reply,
        ))
    }

    /// Reads the client-final-message (SASLResponse's data) and, only when its proof
    /// verifies, returns the server-final-message (`v=…`, AuthenticationSASLFinal's
    /// data).
    pub fn finish(self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = text(client_final)?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof (p=)"))?;
        let mut parts = without_proof.split(',');
        let cbind = attr(parts.next(), 'c', "no channel binding (c=)")?;
        let nonce = attr(parts.next(), 'r', "no nonce (r=)")?;
        let proof = unb64(proof, "the proof is not base64")?;
        let proof: [u8; 32] = proof
            .try_into()
            .map_err(|_| ScramError::Malformed("the proof is not 32 bytes"))?;
        // Why: a `c=` other than the first message's gs2 header is a downgrade attempt
        // (or a confused client); a foreign nonce is a replay of another exchange.
        if cbind != self.gs2_header_b64 {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if !bool::from(nonce.as_bytes().ct_eq(self.nonce.as_bytes())) {
            return Err(ScramError::NonceMismatch);
        }
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let v = &self.verifier;
        let client_signature = hmac(&v.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        // Constant time, and a decoy fails after the same work as a wrong password.
        let ok = stored.ct_eq(&v.stored_key) & subtle::Choice::from(u8::from(v.genuine));
        if !bool::from(ok) {
            return Err(ScramError::AuthFailed);
        }
        let server_signature = hmac(&v.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", b64(&server_signature)).into_bytes())
    }
}

/// The relay's side of one exchange with a target, as its client.
pub struct ClientExchange {
    /// Dropped once the proof is made.
    password: Option<String>,
    client_nonce: String,
    client_first_bare: String,
    /// The server signature to expect, once the final message is made.
    expected: Option<[u8; 32]>,
}

impl std::fmt::Debug for ClientExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientExchange").finish_non_exhaustive()
    }
}

impl ClientExchange {
    /// Starts an exchange proving `password`; returns the client-first-message
    /// (SASLInitialResponse's data): `n,,n=,r=<nonce>`, with the empty user libpq sends
    /// (PostgreSQL takes the user from the startup message).
    ///
    /// The password is used as its bytes: PostgreSQL SASLpreps it, which leaves the
    /// printable ASCII of twokey's own passwords unchanged.
    pub fn new(password: &str) -> (ClientExchange, Vec<u8>) {
        Self::with_nonce(password, "", new_nonce())
    }

    fn with_nonce(password: &str, user: &str, client_nonce: String) -> (ClientExchange, Vec<u8>) {
        let client_first_bare = format!("n={user},r={client_nonce}");
        let msg = format!("n,,{client_first_bare}").into_bytes();
        (
            ClientExchange {
                password: Some(password.to_string()),
                client_nonce,
                client_first_bare,
                expected: None,
            },
            msg,
        )
    }

    /// Reads the server-first-message (AuthenticationSASLContinue's data) and returns
    /// the client-final-message with the proof (SASLResponse's data).
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let server_first = text(msg)?;
        let mut parts = server_first.split(',');
        let first = parts.next();
        if first.is_some_and(|p| p.starts_with("m=")) {
            return Err(ScramError::Extension);
        }
        let nonce = attr(first, 'r', "no nonce (r=)")?;
        let salt = unb64(
            attr(parts.next(), 's', "no salt (s=)")?,
            "the salt is not base64",
        )?;
        let iterations = attr(parts.next(), 'i', "no iterations (i=)")?;
        let iterations: u64 = iterations
            .parse()
            .map_err(|_| ScramError::Malformed("iterations is not a number"))?;
        // Why: the nonce must carry ours, or this answer belongs to another exchange
        // (a replay); the server's part must be there, or it added no freshness.
        if !valid_nonce(nonce)
            || nonce.len() <= self.client_nonce.len()
            || !nonce.starts_with(&self.client_nonce)
        {
            return Err(ScramError::ServerNonce);
        }
        if salt.is_empty() {
            return Err(ScramError::Malformed("the salt is empty"));
        }
        let iterations = match u32::try_from(iterations) {
            Ok(i) if (MIN_ITERATIONS..=MAX_ITERATIONS).contains(&i) => i,
            _ => return Err(ScramError::Iterations(iterations)),
        };
        let password = self.password.take().ok_or(ScramError::OutOfOrder)?;
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
        drop(password);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, &[b"Server Key"]);
        // gs2 header `n,,` in base64 is `biws`.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(client_signature) {
            *p ^= s;
        }
        self.expected = Some(hmac(&server_key, &[auth_message.as_bytes()]));
        Ok(format!("{without_proof},p={}", b64(&proof)).into_bytes())
    }

    /// Reads the server-final-message (AuthenticationSASLFinal's data) and checks the
    /// server's signature: only the holder of the role's verifier can make it.
    pub fn server_final(&self, msg: &[u8]) -> Result<(), ScramError> {
        let msg = text(msg)?;
        let expected = self.expected.ok_or(ScramError::OutOfOrder)?;
        if let Some(e) = msg.strip_prefix("e=") {
            // The server's words (e.g. `invalid-proof`), cut to printable ASCII.
            let e: String = e
                .chars()
                .take_while(|c| *c != ',')
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(100)
                .collect();
            return Err(ScramError::Server(e));
        }
        let v = attr(msg.split(',').next(), 'v', "no verifier (v=) or error (e=)")?;
        let got = unb64(v, "the server signature is not base64")?;
        if !bool::from(got.as_slice().ct_eq(&expected)) {
            return Err(ScramError::ServerSignature);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> Verifier {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        Verifier::parse(&crate::dbcreds::scram_verifier("pencil", &salt, 4096)).unwrap()
    }

    fn verifier(password: &str) -> Verifier {
        Verifier::parse(&crate::dbcreds::scram_verifier(
            password,
            b"0123456789abcdef",
            4096,
        ))
        .unwrap()
    }

    /// A whole exchange: the client's password against `v`; the server's result.
    fn login(v: Option<&Verifier>, password: &str) -> Result<(), ScramError> {
        let (mut c, first) = ClientExchange::new(password);
        let (s, server_first) = ServerExchange::start(v, &first)?;
        let fin = c.server_first(&server_first)?;
        let server_final = s.finish(&fin)?;
        c.server_final(&server_final)
    }

    #[test]
    fn the_client_side_gives_rfc_7677s_test_vector() {
        let (mut c, first) =
            ClientExchange::with_nonce("pencil", "user", "rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(first, RFC_CLIENT_FIRST.as_bytes());
        let fin = c.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(fin).unwrap(), RFC_CLIENT_FINAL);
        c.server_final(RFC_SERVER_FINAL.as_bytes()).unwrap();
        // One bit off in the server's signature: refused.
        let bad = RFC_SERVER_FINAL.replace("6rri", "6rrj");
        assert_eq!(
            c.server_final(bad.as_bytes()),
            Err(ScramError::ServerSignature)
        );
    }

    #[test]
    fn the_server_side_gives_rfc_7677s_test_vector() {
        let v = rfc_verifier();
        let (s, server_first) = ServerExchange::start_with_nonce(
            Some(&v),
            RFC_CLIENT_FIRST.as_bytes(),
            RFC_SERVER_NONCE.into(),
        )
        .unwrap();
        assert_eq!(String::from_utf8(server_first).unwrap(), RFC_SERVER_FIRST);
        let fin = s.finish(RFC_CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(fin).unwrap(), RFC_SERVER_FINAL);
    }

    #[test]
    fn the_client_and_the_server_agree_on_the_right_password_only() {
        let v = verifier("correct horse");
        assert_eq!(login(Some(&v), "correct horse"), Ok(()));
        assert_eq!(login(Some(&v), "correct hors"), Err(ScramError::AuthFailed));
        assert_eq!(login(Some(&v), ""), Err(ScramError::AuthFailed));
    }

    #[test]
    fn no_login_looks_like_a_login_and_always_fails() {
        let real = verifier("pw");
        let (_, with_login) = ServerExchange::start(Some(&real), b"n,,n=,r=abc").unwrap();
        let (_, without) = ServerExchange::start(None, b"n,,n=,r=abc").unwrap();
        let shape = |m: &[u8]| {
            let m = String::from_utf8(m.to_vec()).unwrap();
            let p: Vec<String> = m
                .split(',')
                .map(|a| format!("{}{}", &a[..2], a.len()))
                .collect();
            p
        };
        // The same attributes, of the same lengths, and the same iterations.
        assert_eq!(shape(&with_login), shape(&without));
        assert!(String::from_utf8(without).unwrap().ends_with(",i=4096"));
        assert_eq!(login(None, "pw"), Err(ScramError::AuthFailed));
        assert_eq!(login(None, ""), Err(ScramError::AuthFailed));

        // A decoy shows the same salt for the same user every time, another for another
        // user, and accepts no password, not even its own derivation's.
        let a = Verifier::decoy(b"server secret", "alice@example.com");
        let b = Verifier::decoy(b"server secret", "alice@example.com");
        let c = Verifier::decoy(b"server secret", "bob@example.com");
        assert_eq!(a.salt, b.salt);
        assert_ne!(a.salt, c.salt);
        assert_eq!(a.salt.len(), real.salt.len());
        assert_eq!(login(Some(&a), "pw"), Err(ScramError::AuthFailed));
        assert!(format!("{a:?}").contains("iterations"));
        assert!(!format!("{a:?}").contains("key"));
    }

    #[test]
    fn a_proof_is_refused_when_tampered_or_not_for_this_exchange() {
        let v = verifier("pw");
        let run = |tweak: &dyn Fn(String) -> String| {
            let (mut c, first) = ClientExchange::new("pw");
            let (s, sf) = ServerExchange::start(Some(&v), &first).unwrap();
            let fin = String::from_utf8(c.server_first(&sf).unwrap()).unwrap();
            s.finish(tweak(fin).as_bytes())
        };
        assert!(run(&|m| m).is_ok());
        // A flipped proof byte.
        let flip = |m: String| {
            let (head, p) = m.rsplit_once(",p=").unwrap();
            let mut p = STANDARD.decode(p).unwrap();
            p[0] ^= 1;
            format!("{head},p={}", STANDARD.encode(p))
        };
        assert_eq!(run(&flip), Err(ScramError::AuthFailed));
        // Another nonce (as a replay from another exchange would carry).
        let renonce = |m: String| m.replacen(",r=", ",r=X", 1);
        assert_eq!(run(&renonce), Err(ScramError::NonceMismatch));
        // c= that claims channel binding was used, or not the gs2 header at all.
        assert_eq!(
            run(&|m| m.replacen("c=biws", "c=eSws", 1)),
            Err(ScramError::ChannelBindingMismatch)
        );
        // A proof of the wrong length, or not base64.
        assert_eq!(
            run(&|m| format!("{},p=AAAA", m.rsplit_once(",p=").unwrap().0)),
            Err(ScramError::Malformed("the proof is not 32 bytes"))
        );
        assert_eq!(
            run(&|m| format!("{},p=!!", m.rsplit_once(",p=").unwrap().0)),
            Err(ScramError::Malformed("the proof is not base64"))
        );
        assert_eq!(
            run(&|m| m.rsplit_once(",p=").unwrap().0.to_string()),
            Err(ScramError::Malformed("no proof (p=)"))
        );
    }

    #[test]
    fn a_client_that_says_y_must_echo_y() {
        let v = verifier("pw");
        let (s, sf) = ServerExchange::start(Some(&v), b"y,,n=,r=abcdef").unwrap();
        let (mut c, _) = ClientExchange::with_nonce("pw", "", "abcdef".into());
        let fin = String::from_utf8(c.server_first(&sf).unwrap()).unwrap();
        // The client here wrote `biws` (n,,), not `eSws` (y,,): refused.
        assert_eq!(
            s.finish(fin.as_bytes()),
            Err(ScramError::ChannelBindingMismatch)
        );
    }

    #[test]
    fn bad_client_first_messages_are_refused() {
        let v = verifier("pw");
        let cases: &[(&[u8], ScramError)] = &[
            (
                b"p=tls-server-end-point,,n=,r=abc",
                ScramError::ChannelBindingUnsupported,
            ),
            (b"n,a=alice,n=,r=abc", ScramError::Authzid),
            (b"n,,m=ext,n=,r=abc", ScramError::Extension),
            (
                b"x,,n=,r=abc",
                ScramError::Malformed("unknown channel-binding flag"),
            ),
            (b"n,,r=abc", ScramError::Malformed("no username (n=)")),
            (b"n,,n=", ScramError::Malformed("no nonce (r=)")),
            (
                b"n,,n=,r=",
                ScramError::Malformed("the nonce is not printable"),
            ),
            (
                b"n,,n=,r=a b",
                ScramError::Malformed("the nonce is not printable"),
            ),
            (b"n", ScramError::Malformed("no gs2 header")),
            (b"n,", ScramError::Malformed("no gs2 header")),
            (b"", ScramError::Malformed("no gs2 header")),
            (b"n,,n=,r=\xff\xfe", ScramError::Malformed("not UTF-8")),
            (
                b"n,x,n=,r=abc",
                ScramError::Malformed("bad authorization identity field"),
            ),
        ];
        for (msg, want) in cases {
            assert_eq!(
                ServerExchange::start(Some(&v), msg).map(|_| ()).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
        let huge = format!("n,,n=,r={}", "a".repeat(MAX_MESSAGE_BYTES));
        assert_eq!(
            ServerExchange::start(Some(&v), huge.as_bytes()).map(|_| ()),
            Err(ScramError::TooLong(huge.len()))
        );
        // The user in n= is ignored: anything there is fine.
        assert!(ServerExchange::start(Some(&v), b"n,,n=*,r=abc").is_ok());
    }

    #[test]
    fn bad_client_final_messages_are_refused() {
        let v = verifier("pw");
        let cases: &[(&[u8], ScramError)] = &[
            (b"", ScramError::Malformed("no proof (p=)")),
            (b",p=AAAA", ScramError::Malformed("no channel binding (c=)")),
            (b"c=biws,p=AAAA", ScramError::Malformed("no nonce (r=)")),
            (b"c=biws,r=abc,p=\xff", ScramError::Malformed("not UTF-8")),
        ];
        for (msg, want) in cases {
            let (s, _) = ServerExchange::start(Some(&v), b"n,,n=,r=abc").unwrap();
            assert_eq!(
                s.finish(msg).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    #[test]
    fn bad_server_messages_are_refused() {
        let nonce = "rOprNGfwEbeRWgbNEkqO";
        let cases: &[(&str, ScramError)] = &[
            (
                "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4095",
                ScramError::Iterations(4095),
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=10000001",
                ScramError::Iterations(10_000_001),
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999999",
                ScramError::Iterations(99_999_999_999),
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1",
                ScramError::Malformed("iterations is not a number"),
            ),
            (
                "r=somebodyelsesnoncexyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                ScramError::ServerNonce,
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                ScramError::ServerNonce,
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOxyz,s=***,i=4096",
                ScramError::Malformed("the salt is not base64"),
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOxyz,s=,i=4096",
                ScramError::Malformed("the salt is empty"),
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOxyz,i=4096",
                ScramError::Malformed("no salt (s=)"),
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==",
                ScramError::Malformed("no iterations (i=)"),
            ),
            (
                "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                ScramError::Malformed("no nonce (r=)"),
            ),
            (
                "m=x,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                ScramError::Extension,
            ),
        ];
        for (msg, want) in cases {
            let (mut c, _) = ClientExchange::with_nonce("pencil", "", nonce.into());
            assert_eq!(c.server_first(msg.as_bytes()).as_ref(), Err(want), "{msg}");
        }
        let (mut c, _) = ClientExchange::with_nonce("pencil", "", nonce.into());
        assert_eq!(
            c.server_first(&[0xff; 10]),
            Err(ScramError::Malformed("not UTF-8"))
        );
        assert_eq!(c.server_final(b"v=AAAA"), Err(ScramError::OutOfOrder));
        c.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(
            c.server_first(RFC_SERVER_FIRST.as_bytes()),
            Err(ScramError::OutOfOrder)
        );
        assert_eq!(
            c.server_final(b"e=invalid-proof"),
            Err(ScramError::Server("invalid-proof".into()))
        );
        assert_eq!(
            c.server_final(b"v=***"),
            Err(ScramError::Malformed("the server signature is not base64"))
        );
        assert_eq!(c.server_final(b"v=AAAA"), Err(ScramError::ServerSignature));
        assert_eq!(
            c.server_final(b"x=1"),
            Err(ScramError::Malformed("no verifier (v=) or error (e=)"))
        );
    }

    #[test]
    fn verifiers_are_read_as_postgres_stores_them() {
        let v = rfc_verifier();
        assert_eq!(v.iterations(), 4096);
        assert_eq!(v.salt, STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap());
        let good = crate::dbcreds::scram_verifier("pw", b"salt", 4096);
        let (keys_at, _) = good.rsplit_once('$').unwrap();
        let cases = [
            ("md5abc", "it does not start with SCRAM-SHA-256$"),
            ("SCRAM-SHA-256$4096:c2FsdA==", "no $ before the keys"),
            ("SCRAM-SHA-256$4096$a:b", "no iterations:salt"),
            (
                "SCRAM-SHA-256$x:c2FsdA==$a:b",
                "iterations is not a positive number",
            ),
            (
                "SCRAM-SHA-256$0:c2FsdA==$a:b",
                "iterations is not a positive number",
            ),
            ("SCRAM-SHA-256$4096:!!$a:b", "the salt is not base64"),
            ("SCRAM-SHA-256$4096:$a:b", "the salt is not base64"),
            ("SCRAM-SHA-256$4096:c2FsdA==$AAAA", "no StoredKey:ServerKey"),
            (
                "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
                "a key is not 32 bytes of base64",
            ),
        ];
        for (s, why) in cases {
            assert_eq!(
                Verifier::parse(s).map(|_| ()),
                Err(ScramError::BadVerifier(why)),
                "{s}"
            );
        }
        assert!(Verifier::parse(&good).is_ok());
        assert!(Verifier::parse(&format!("{keys_at}$x:y")).is_err());
    }

    #[test]
    fn errors_never_carry_the_password_or_the_proof() {
        let v = verifier("hunter2-secret");
        let (mut c, first) = ClientExchange::new("wrong-secret");
        let (s, sf) = ServerExchange::start(Some(&v), &first).unwrap();
        let fin = String::from_utf8(c.server_first(&sf).unwrap()).unwrap();
        let proof = fin.rsplit_once(",p=").unwrap().1.to_string();
        let e = s.finish(fin.as_bytes()).unwrap_err().to_string();
        assert_eq!(e, "password authentication failed");
        assert!(!e.contains(&proof) && !e.contains("secret"));
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn each_refusal_has_postgres_sqlstate() {
        let cases = [
            (ScramError::AuthFailed, "28P01"),
            (ScramError::Authzid, "0A000"),
            (ScramError::ChannelBindingUnsupported, "08P01"),
            (ScramError::Malformed("x"), "08P01"),
            (ScramError::TooLong(5000), "08P01"),
            (ScramError::NonceMismatch, "08P01"),
            (ScramError::ChannelBindingMismatch, "08P01"),
            (ScramError::Extension, "08P01"),
            (ScramError::OutOfOrder, "08P01"),
            (ScramError::BadVerifier("x"), "XX000"),
            (ScramError::ServerSignature, "XX000"),
            (ScramError::ServerNonce, "XX000"),
            (ScramError::Iterations(1), "XX000"),
            (ScramError::Server("e".into()), "XX000"),
        ];
        for (e, code) in cases {
            assert_eq!(e.sqlstate(), code, "{e}");
        }
    }
}
