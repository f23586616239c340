-- Relay passwords: what an engineer gives the PostgreSQL relay (user = their email,
-- dbname = the resource) to use a live grant. Stored only as the SCRAM-SHA-256
-- verifier PostgreSQL itself would store (salt, iterations, StoredKey, ServerKey), so
-- neither this table nor a backup of it lets anyone log in. One per grant: issuing
-- another replaces it. It is worth nothing once the grant is no longer live.
CREATE TABLE relay_db_logins (
    grant_id   TEXT PRIMARY KEY REFERENCES grants(id),
    verifier   TEXT NOT NULL,
    issued_at  INTEGER NOT NULL
);
