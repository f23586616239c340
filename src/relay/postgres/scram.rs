//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: the relay is the server
//! to psql and drivers, checking their proof against the verifier twokey stored, and the
//! client to the target, proving the grant's role password.
