-- Which twokey instance (its data dir's relay_instance id) relayed a session, so that a
-- restart closes only the sessions it left open itself; and whether a session was
-- closed that way (twokey stopped without ending it: a crash, kill -9, power loss).
ALTER TABLE relay_sessions ADD COLUMN relay_instance TEXT;
ALTER TABLE relay_sessions ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0;
