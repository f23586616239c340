-- Durable notifications: a row is written in the same transaction as the event that
-- causes it; a worker delivers it with retries. The row holds the intent, not the
-- message: action links are minted at delivery, so no usable token rests here.
CREATE TABLE outbox (
    id              TEXT PRIMARY KEY,
    request_id      TEXT NOT NULL REFERENCES access_requests(id),
    kind            TEXT NOT NULL
                    CHECK (kind IN ('approval_needed', 'approved', 'denied', 'expired', 'revoked')),
    channel         TEXT NOT NULL CHECK (channel IN ('email')),
    recipient_id    TEXT NOT NULL REFERENCES users(id),
    recipient       TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'skipped')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER,
    UNIQUE (request_id, kind, channel, recipient_id)
);
CREATE INDEX outbox_due ON outbox(status, next_attempt_at);

-- Single-use action links: only the SHA-256 of the token is kept.
CREATE TABLE action_tokens (
    token_hash  TEXT PRIMARY KEY,
    request_id  TEXT NOT NULL REFERENCES access_requests(id),
    approver_id TEXT NOT NULL REFERENCES users(id),
    action      TEXT NOT NULL CHECK (action IN ('approve', 'deny')),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
);

-- The demo's mailbox page (email.dev_mailbox = true): what would have been sent.
CREATE TABLE dev_mailbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id  TEXT NOT NULL UNIQUE,
    recipient  TEXT NOT NULL,
    subject    TEXT NOT NULL,
    body_text  TEXT NOT NULL,
    body_html  TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
