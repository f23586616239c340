-- Signed checkpoints of the audit chain head. Each says "event `seq` has hash `hash`",
-- signed (SSH signature, namespace twokey-audit-checkpoint) by the audit key, which is
-- kept outside the database. Whoever can write this database can recompute every hash
-- of the chain, but cannot make these signatures: `twokey audit verify` checks each.
-- Each checkpoint covers its own `audit.checkpoint` event, so removing a row shows too.
CREATE TABLE audit_checkpoints (
    seq             INTEGER PRIMARY KEY,
    hash            TEXT NOT NULL,
    ts              INTEGER NOT NULL,
    key_fingerprint TEXT NOT NULL,
    signature       TEXT NOT NULL
);
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
