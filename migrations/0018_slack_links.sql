-- Slack identity by explicit link: a Slack user (workspace + user id) acts as a twokey
-- user only after that user confirmed the link while signed in to twokey. The Slack
-- profile's email is no longer what names the twokey user.
CREATE TABLE slack_links (
    team_id       TEXT NOT NULL,
    slack_user_id TEXT NOT NULL,
    user_id       TEXT NOT NULL REFERENCES users(id),
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (team_id, slack_user_id),
    -- One Slack account per twokey user per workspace.
    UNIQUE (team_id, user_id)
);

-- One-time link tokens, handed to an unlinked Slack user in an ephemeral message. Only
-- the hash is kept; each is bound to the Slack user it was made for, works once and
-- for a few minutes. slack_email is what Slack's users.info said then (confirmed only).
CREATE TABLE slack_link_tokens (
    token_hash    TEXT PRIMARY KEY,
    team_id       TEXT NOT NULL,
    slack_user_id TEXT NOT NULL,
    slack_name    TEXT NOT NULL,
    slack_email   TEXT,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    used_at       INTEGER
);
CREATE INDEX slack_link_tokens_expiry ON slack_link_tokens(expires_at);
