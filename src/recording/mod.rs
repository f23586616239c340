//! The evidence of what passed through the relay: session recordings, hashed as they
//! are written so that their SHA-256 and size go into the audit chain when a session
//! closes (an edited recording is then detectable).
//!
//! A tour of the room:
//! - [`hashed`]: the writer under every recording (hash and byte count of exactly what
//!   reached the file), and [`hash_file`] for a recording left behind by a crash.
//! - [`asciicast`]: the terminal format, asciicast v2, with its output cap and the
//!   bounded masking at password prompts ([`mask`]).
//! - [`transcript`]: the PostgreSQL relay's JSONL transcript (one line per statement
//!   and its outcome), a second format on the same hashed writer and the same rule that
//!   what the engineer sends is always recorded.
//!
//! This room knows files and formats only: it must never import the relay (the relay
//! imports it), the store or the application state; whoever opens a recording hands it
//! the directory, the cap and the time. Nothing a session does may switch its record off
//! (DESIGN.md invariant 8).

pub mod asciicast;
pub mod hashed;
pub mod mask;
pub mod transcript;

pub use asciicast::{Finished, Recorder, with};
pub use hashed::hash_file;
pub use mask::MASK_CAP;
