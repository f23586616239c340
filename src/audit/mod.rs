//! The evidence plane: an append-only, hash-chained log of every decision.
//!
//! - [`chain`]: the pure hash chain and its verifier (no I/O);
//! - [`log`]: the one way to append an event ([`append`]), reading it back, and
//!   verifying the stored chain a page at a time, with their SQL;
//! - [`checkpoint`]: the signing key and the signed statement of the chain head (no
//!   I/O but the key file); [`signing`]: signing checkpoints of the stored chain;
//! - [`verify`]: verifying the database or an export, checkpoints and pins included;
//! - [`export`]: the JSONL export line format.
//!
//! The hash alone is unkeyed: whoever can write the database could recompute every
//! hash after an edit. [`checkpoint`] signs the chain head with a key kept outside the
//! database, so such a rewrite no longer matches a signed checkpoint.
//!
//! `store` never imports this module: the audit log sits on the store's connection
//! types, not the other way round. Never put a secret in `details`: the log is
//! exported to auditors and SIEMs.

pub mod chain;
pub mod checkpoint;
pub mod export;
pub mod log;
pub mod signing;
pub mod verify;

pub use chain::*;
pub use export::*;
pub use log::*;
