-- Held actions: one statement (with its parameters) or one command that a relay holds
-- until other people approve it. The relay keeps the exact bytes in memory and runs
-- them at most once; this row is what the approvers see and decide, bound to those
-- bytes by their SHA-256. It ends as 'ran' (run once), 'denied', 'expired' (not
-- decided within the role's review.wait) or 'withdrawn' (the session ended first).
CREATE TABLE held_actions (
    id                 TEXT PRIMARY KEY,
    session_id         TEXT NOT NULL REFERENCES relay_sessions(id),
    grant_id           TEXT NOT NULL REFERENCES grants(id),
    requester_id       TEXT NOT NULL REFERENCES users(id),
    resource           TEXT NOT NULL,
    role               TEXT NOT NULL,
    protocol           TEXT NOT NULL CHECK (protocol IN ('postgres', 'ssh')),
    -- The statement's text, or the command line.
    action             TEXT NOT NULL,
    -- JSON array: each parameter as text (null for NULL), as the relay read it.
    params             TEXT NOT NULL,
    action_sha256      TEXT NOT NULL,
    -- JSON: what the relay parsed, e.g. {"kinds": ["DELETE"], "tables": ["orders"]}.
    parse              TEXT NOT NULL,
    -- Which rule held it, in words.
    why                TEXT NOT NULL,
    required_approvals INTEGER NOT NULL CHECK (required_approvals > 0),
    status             TEXT NOT NULL
                       CHECK (status IN ('pending', 'approved', 'denied', 'expired', 'withdrawn', 'ran')),
    created_at         INTEGER NOT NULL,
    expires_at         INTEGER NOT NULL,
    decided_at         INTEGER,
    ran_at             INTEGER
);
CREATE INDEX held_actions_status ON held_actions(status, expires_at);
CREATE INDEX held_actions_session ON held_actions(session_id);

-- One decision per approver per held action, whatever the channel.
CREATE TABLE held_decisions (
    id              TEXT PRIMARY KEY,
    held_id         TEXT NOT NULL REFERENCES held_actions(id),
    approver_id     TEXT NOT NULL REFERENCES users(id),
    decision        TEXT NOT NULL CHECK (decision IN ('approve', 'deny')),
    comment         TEXT,
    channel         TEXT NOT NULL,
    approver_groups TEXT NOT NULL, -- JSON array: the role's approver groups held at decision time
    created_at      INTEGER NOT NULL,
    UNIQUE (held_id, approver_id)
);

-- The outbox learns about held actions: 'held_needed' asks the role's approvers to
-- decide one (held_id names it; '' for messages about the request itself). SQLite
-- cannot alter a CHECK constraint: the table is rebuilt.
CREATE TABLE outbox_new (
    id              TEXT PRIMARY KEY,
    request_id      TEXT NOT NULL REFERENCES access_requests(id),
    held_id         TEXT NOT NULL DEFAULT '',
    kind            TEXT NOT NULL
                    CHECK (kind IN ('approval_needed', 'approved', 'denied', 'expired', 'revoked',
                                    'cancelled', 'held_needed')),
    channel         TEXT NOT NULL CHECK (channel IN ('email', 'slack')),
    recipient_id    TEXT REFERENCES users(id),
    recipient       TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'skipped')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER,
    UNIQUE (request_id, held_id, kind, channel, recipient)
);
INSERT INTO outbox_new
    (id, request_id, kind, channel, recipient_id, recipient, status, attempts,
     next_attempt_at, last_error, created_at, sent_at)
    SELECT id, request_id, kind, channel, recipient_id, recipient, status, attempts,
           next_attempt_at, last_error, created_at, sent_at
    FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_new RENAME TO outbox;
CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
