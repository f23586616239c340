-- Slack notifications. The outbox gains the 'slack' channel (and the 'cancelled'
-- event, which updates a request's Slack message), whose recipient is a
-- channel rather than a person (recipient_id NULL), so uniqueness moves from the person
-- to the recipient. SQLite cannot alter a CHECK constraint: the table is rebuilt.
CREATE TABLE outbox_new (
    id              TEXT PRIMARY KEY,
    request_id      TEXT NOT NULL REFERENCES access_requests(id),
    kind            TEXT NOT NULL
                    CHECK (kind IN ('approval_needed', 'approved', 'denied', 'expired', 'revoked',
                                    'cancelled')),
    channel         TEXT NOT NULL CHECK (channel IN ('email', 'slack')),
    -- The person (email), or NULL for a Slack channel.
    recipient_id    TEXT REFERENCES users(id),
    -- An email address, or a Slack channel.
    recipient       TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'skipped')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER,
    UNIQUE (request_id, kind, channel, recipient)
);
INSERT INTO outbox_new
    SELECT id, request_id, kind, channel, recipient_id, recipient, status, attempts,
           next_attempt_at, last_error, created_at, sent_at
    FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_new RENAME TO outbox;
CREATE INDEX outbox_due ON outbox(status, next_attempt_at);

-- Where each request's Slack message is, to update it in place.
CREATE TABLE slack_messages (
    request_id TEXT PRIMARY KEY REFERENCES access_requests(id),
    channel    TEXT NOT NULL,
    ts         TEXT NOT NULL
);

-- Signatures of Slack interactions already handled, to refuse replays within the
-- 5-minute window Slack timestamps are accepted for.
CREATE TABLE slack_replays (
    signature_hash TEXT PRIMARY KEY,
    seen_at        INTEGER NOT NULL
);
