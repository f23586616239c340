//! twokey: just-in-time access with separation of duties enforced where the
//! connection flows.
//!
//! A tour by the four planes of `DESIGN.md`, following a request through the code.
//!
//! **Approval plane** — who may ask, who may say yes.
//! - [`config`] reads the TOML policy (one file per section, secrets as
//!   [`config::Secret`]); [`policy`] holds the pure rules (no I/O) and, in
//!   [`policy::status`], every state (request, grant, decision…) as an enum.
//! - [`web`] serves pages (one file per page group, each with its `router()`), `/api/v1`
//!   and Slack's button clicks; its extractors are the permission checks. [`auth`] knows
//!   who is asking: OIDC and demo sign-in, sessions, CSRF, scoped API tokens.
//! - [`access`] runs the state machine `pending → approved | denied | cancelled |
//!   expired`, grants `active → ended | revoked`, and held actions (`access::held`:
//!   `pending → approved → ran | denied | expired | withdrawn`), each transition one
//!   conditional UPDATE plus its audit event in one transaction.
//! - [`notify`] delivers the outbox (email, Slack messages) and mints single-use
//!   action links.
//!
//! **Credential plane** — what an approved grant mints.
//! - [`ca`] signs SSH user certificates for live grants and writes the KRL.
//! - [`dbcreds`] makes and drops the PostgreSQL logins of grants.
//!
//! **Data plane** — the only way in.
//! - [`relay`]: a protocol-neutral core (admission, live sessions and the one cut
//!   watcher, limits, session lifecycle) under the SSH layer `relay::ssh` and the
//!   PostgreSQL layer `relay::postgres`; it admits live grants only and cuts at the
//!   end.
//! - [`recording`] writes the hashed session recordings (asciicast v2) and PostgreSQL
//!   transcripts (JSONL) the relay makes.
//!
//! **Evidence plane** — what an auditor checks.
//! - [`audit`]: the pure hash chain, [`audit::append`] (the one way to add an event),
//!   paged verification, signed checkpoints and the export.
//!
//! Underneath: [`store`] holds the SQL, one file per aggregate (users, tokens, requests,
//! grants, outbox, slack, credentials, sessions, host keys); [`state`] is what every
//! handler and task shares; [`tasks`] runs the background passes and drains them on
//! stop; [`keyfile`] writes and checks private key files; [`clock`] is injected;
//! [`error`] is the one domain error. [`server`] wires it together; [`cli`] is the
//! command line, [`client`] the engineer's commands (`login`, `request`, `status`,
//! `ssh`) that call the API.

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
pub mod recording;
pub mod relay;
pub mod server;
pub mod state;
pub mod store;
pub mod tasks;
pub mod web;

pub use error::{Error, Result};
