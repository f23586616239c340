//! twokey: just-in-time access with separation of duties enforced where the
//! connection flows.
//!
//! A tour, following a request through the code:
//! - [`config`] reads the TOML policy: resources, roles, who requests and approves.
//! - [`policy`] holds the pure rules (no I/O): may this person request, approve, see?
//!   Its [`policy::status`] names every state (request, grant, decision…) as an enum.
//! - [`web`] serves pages and `/api/v1`; its extractors are the permission checks.
//! - [`auth`] knows who is asking: demo sign-in, sessions, CSRF, API tokens.
//! - [`access`] runs the state machine `pending → approved | denied | cancelled |
//!   expired`, grants `active → ended | revoked`, each transition one conditional
//!   UPDATE plus its audit event in one transaction.
//! - [`ca`] signs SSH user certificates for live grants and writes the KRL.
//! - [`dbcreds`] makes and drops the PostgreSQL logins of grants.
//! - [`relay`] is the SSH relay: admits live grants only, records, cuts at the end.
//! - [`notify`] delivers the outbox (email) and mints single-use action links.
//! - [`store`] holds the SQL, one file per aggregate (users, tokens, requests, grants,
//!   outbox, credentials, sessions, host keys…); [`audit`] is the evidence plane: the
//!   pure chain, [`audit::append`] (the one way to add an event), paged verification,
//!   signed checkpoints and the export. [`keyfile`] writes and checks private key files.
//! - [`server`] wires it together; [`cli`] is the command line, [`client`] the
//!   engineer's commands (`login`, `request`, `status`, `ssh`) that call the API.

#![forbid(unsafe_code)]

pub mod access;
pub mod audit;
pub mod auth;
pub mod ca;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod dbcreds;
pub mod error;
pub mod keyfile;
pub mod notify;
pub mod policy;
pub mod relay;
pub mod server;
pub mod state;
pub mod store;
pub mod web;

pub use error::{Error, Result};
