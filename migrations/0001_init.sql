-- twokey schema, SQLite. Times are milliseconds since the Unix epoch (UTC).

CREATE TABLE users (
    id           TEXT PRIMARY KEY,
    email        TEXT NOT NULL UNIQUE COLLATE NOCASE,
    display_name TEXT NOT NULL,
    created_at   INTEGER NOT NULL
);

-- Current group membership, replaced at each sign-in; decisions read it at decision time.
CREATE TABLE user_groups (
    user_id    TEXT NOT NULL REFERENCES users(id),
    group_name TEXT NOT NULL,
    synced_at  INTEGER NOT NULL,
    PRIMARY KEY (user_id, group_name)
);

-- Personal API tokens: only the SHA-256 of the token is kept.
CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users(id),
    token_hash   TEXT NOT NULL UNIQUE,
    label        TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);

CREATE TABLE access_requests (
    id            TEXT PRIMARY KEY,
    requester_id  TEXT NOT NULL REFERENCES users(id),
    resource      TEXT NOT NULL,
    role          TEXT NOT NULL,
    duration_secs INTEGER NOT NULL CHECK (duration_secs > 0),
    reason        TEXT NOT NULL,
    ticket        TEXT,
    status        TEXT NOT NULL
                  CHECK (status IN ('pending', 'approved', 'denied', 'cancelled', 'expired')),
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    decided_at    INTEGER
);
CREATE INDEX access_requests_status ON access_requests(status, expires_at);
CREATE INDEX access_requests_requester ON access_requests(requester_id, created_at);

-- One decision per approver per request, whatever the channel.
CREATE TABLE approvals (
    id              TEXT PRIMARY KEY,
    request_id      TEXT NOT NULL REFERENCES access_requests(id),
    approver_id     TEXT NOT NULL REFERENCES users(id),
    decision        TEXT NOT NULL CHECK (decision IN ('approve', 'deny')),
    comment         TEXT,
    channel         TEXT NOT NULL,
    approver_groups TEXT NOT NULL, -- JSON array: the role's approver groups held at decision time
    created_at      INTEGER NOT NULL,
    UNIQUE (request_id, approver_id)
);

CREATE TABLE grants (
    id          TEXT PRIMARY KEY,
    request_id  TEXT NOT NULL UNIQUE REFERENCES access_requests(id),
    user_id     TEXT NOT NULL REFERENCES users(id),
    resource    TEXT NOT NULL,
    role        TEXT NOT NULL,
    starts_at   INTEGER NOT NULL,
    ends_at     INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('active', 'ended', 'revoked')),
    ended_at    INTEGER,
    ended_by    TEXT REFERENCES users(id),
    end_comment TEXT
);
CREATE INDEX grants_status ON grants(status, ends_at);

-- The hash-chained audit log. Append-only: the triggers refuse UPDATE and DELETE, and
-- `twokey audit verify` catches whoever gets around them.
CREATE TABLE audit_events (
    seq       INTEGER PRIMARY KEY,
    ts        INTEGER NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
