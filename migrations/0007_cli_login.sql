-- `twokey login`: a one-time code handed to the CLI over a loopback redirect after the
-- user confirms in the browser. Only the code's hash is kept, bound to the user and to
-- the CLI's PKCE challenge, so a code seen by anyone else is worthless.
CREATE TABLE cli_login_codes (
    code_hash  TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id),
    challenge  TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
);
