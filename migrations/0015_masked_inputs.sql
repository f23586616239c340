-- Spans of input masked at a password prompt in a relay session's recording (each is
-- marked in the recording too). Shown on the session's page, so a reviewer sees how
-- much of what was typed is not in the clear.
ALTER TABLE relay_sessions ADD COLUMN masked_inputs INTEGER NOT NULL DEFAULT 0;
