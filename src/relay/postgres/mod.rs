//! The PostgreSQL relay: psql, pgbench and any driver connect here (`host=RELAY
//! port=6432 dbname=RESOURCE user=EMAIL`) with the relay password of a live grant; the
//! relay logs in to the target as the grant's own role with a password no person sees,
//! relays the protocol message by message, writes the session's transcript, and cuts
//! the session when its grant ends.
//!
//! A tour of the room:
//! - [`tls`]: the relay's own certificate (made at first start or configured), the
//!   client side of TLS to the target, and the stream that is either.
//! - [`scram`]: SCRAM-SHA-256, as the server to clients (against the stored verifier)
//!   and as the client to the target.
//! - [`wire`]: the protocol's packets and messages, framed with a size bound.
//! - [`tracker`]: follows both directions and writes the transcript.
//!
//! It must never let a message reach the target before the grant is admitted, never
//! hand the engineer the target's credential, and never pass a message it cannot
//! frame: it fails closed.

pub mod scram;
pub mod tls;
pub mod tracker;
pub mod wire;
