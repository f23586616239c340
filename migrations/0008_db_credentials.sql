-- Database logins made for grants on PostgreSQL resources. The password is never
-- stored: it is shown once and only its SCRAM verifier reaches the target.
CREATE TABLE db_credentials (
    grant_id   TEXT PRIMARY KEY REFERENCES grants(id),
    resource   TEXT NOT NULL,
    role_name  TEXT NOT NULL UNIQUE,
    -- 'creating': being made now (the reconciler leaves it alone while the grant is
    -- live); 'active': the role exists on the target; 'dropped': it is gone; 'error':
    -- it was never made (last_error says why).
    status     TEXT NOT NULL CHECK (status IN ('creating', 'active', 'dropped', 'error')),
    issued     INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    dropped_at INTEGER
);
CREATE INDEX db_credentials_status ON db_credentials(status, resource);
