//! twokey: just-in-time access with separation of duties enforced where the
//! connection flows.
//!
//! A tour, following a request through the code:
//! - [`config`] reads the TOML policy into values, one file per section: durations
//!   parsed at load, secrets in [`config::Secret`]; [`server::check_config`] adds the
//!   checks `ca`, `dbcreds` and `policy` own.
//! - [`policy`] holds the pure rules (no I/O): may this person request, approve, see?
//! - [`web`] serves pages (one file per page group, each with its `router()`),
//!   `/api/v1` and Slack's button clicks; its extractors are the permission checks.
//! - [`auth`] knows who is asking: demo sign-in, sessions, CSRF, API tokens.
//! - [`access`] runs the state machine `pending → approved | denied | cancelled |
//!   expired`, grants `active → ended | revoked`, each transition one conditional
//!   UPDATE plus its audit event in one transaction.
//! - [`ca`] signs SSH user certificates for live grants and writes the KRL.
//! - [`dbcreds`] makes and drops the PostgreSQL logins of grants.
//! - [`relay`] is the data plane: a protocol-neutral core (admission, live sessions and
//!   the one cut watcher, limits, session lifecycle) under the SSH layer `relay::ssh`;
//!   it admits live grants only and cuts at the end.
//! - [`recording`] writes the hashed session recordings (asciicast v2) the relay makes.
//! - [`notify`] delivers the outbox (email, Slack messages) and mints single-use
//!   action links.
//! - [`store`] holds every SQL statement; [`audit`] the hash chain and its verifier.
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
pub mod notify;
pub mod policy;
pub mod recording;
pub mod relay;
pub mod server;
pub mod state;
pub mod store;
pub mod tasks;
pub mod web;

pub use error::{Error, Result};
