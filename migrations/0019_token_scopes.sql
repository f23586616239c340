-- API tokens get scopes and their own end. `requests` files and reads one's own
-- requests and gets credentials for one's grants; `approve` decides others' requests.
-- Tokens made before this migration keep `requests` only: approving through the API
-- now needs a token made with `approve`. Their end is what it was (30 days after they
-- were made, the old default); `auth.token_ttl` still caps every token at
-- authentication, so its new shorter default ends them sooner.
ALTER TABLE api_tokens ADD COLUMN scopes TEXT NOT NULL DEFAULT 'requests';
ALTER TABLE api_tokens ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 0;
UPDATE api_tokens SET expires_at = created_at + 2592000000;
-- Who revoked a token from the web app (NULL for `twokey token revoke`).
ALTER TABLE api_tokens ADD COLUMN revoked_by TEXT REFERENCES users(id);
-- What the person confirming `twokey login` agreed the CLI's token may do.
ALTER TABLE cli_login_codes ADD COLUMN scopes TEXT NOT NULL DEFAULT 'requests';
