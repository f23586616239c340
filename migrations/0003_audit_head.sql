-- The newest (seq, hash) of the audit chain, written in the same transaction as each
-- event. Deleting the newest events leaves a shorter chain that verifies on its own;
-- this row tells `audit verify` how long the chain was. It only moves forward.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
SELECT 1, seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1;
CREATE TRIGGER audit_head_forward_only BEFORE UPDATE ON audit_head
WHEN NEW.seq <= OLD.seq
BEGIN SELECT RAISE(ABORT, 'audit_head only moves forward'); END;
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
BEGIN SELECT RAISE(ABORT, 'audit_head is permanent'); END;
