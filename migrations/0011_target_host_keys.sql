-- Host keys the relay has seen on targets whose config pins none. The relay connects
-- only to a key an admin confirmed (status 'confirmed', at most one per resource);
-- any other key it sees is recorded 'pending' and the session is refused.
CREATE TABLE target_host_keys (
    id            TEXT PRIMARY KEY,
    resource      TEXT NOT NULL,
    address       TEXT NOT NULL,
    public_key    TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'confirmed', 'rejected', 'replaced')),
    first_seen_at INTEGER NOT NULL,
    decided_by    TEXT,
    decided_at    INTEGER,
    UNIQUE (resource, fingerprint)
);
CREATE UNIQUE INDEX target_host_keys_one_confirmed ON target_host_keys(resource)
    WHERE status = 'confirmed';
