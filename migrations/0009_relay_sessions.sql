-- Sessions through the SSH relay: who, which grant, when, how much, and the recording
-- (its path under the data dir, size and SHA-256, also in the audit chain).
CREATE TABLE relay_sessions (
    id              TEXT PRIMARY KEY,
    grant_id        TEXT NOT NULL REFERENCES grants(id),
    user_email      TEXT NOT NULL,
    resource        TEXT NOT NULL,
    peer            TEXT,
    started_at      INTEGER NOT NULL,
    ended_at        INTEGER,
    end_reason      TEXT,
    bytes_in        INTEGER NOT NULL DEFAULT 0,
    bytes_out       INTEGER NOT NULL DEFAULT 0,
    recording       TEXT NOT NULL,
    recording_bytes INTEGER,
    recording_sha256 TEXT
);
CREATE INDEX relay_sessions_started ON relay_sessions(started_at);
