-- A recording that reached [relay] max_recording_bytes: what came after was counted in
-- bytes_in/bytes_out, not recorded. Shown on the session's page.
ALTER TABLE relay_sessions ADD COLUMN recording_truncated INTEGER NOT NULL DEFAULT 0;
