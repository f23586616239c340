-- Which relay a session went through: 'ssh' (an asciicast recording) or 'postgres' (a
-- JSONL transcript, one line per statement and its outcome).
ALTER TABLE relay_sessions ADD COLUMN protocol TEXT NOT NULL DEFAULT 'ssh';
