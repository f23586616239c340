-- A recording that could not be written in full (a full disk, say): the session was
-- ended there. Shown on the session's page.
ALTER TABLE relay_sessions ADD COLUMN recording_failed INTEGER NOT NULL DEFAULT 0;
