-- SSH user certificates minted for grants. The certificate itself is not kept: what
-- revocation and the audit need is its serial, key id and window.
CREATE TABLE ssh_certificates (
    serial       INTEGER PRIMARY KEY,  -- random, non-zero, 63 bits
    grant_id     TEXT NOT NULL REFERENCES grants(id),
    user_id      TEXT NOT NULL REFERENCES users(id),
    key_id       TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    principals   TEXT NOT NULL,
    valid_after  INTEGER NOT NULL,     -- seconds since the epoch, as in the certificate
    valid_before INTEGER NOT NULL,
    created_at   INTEGER NOT NULL
);
CREATE INDEX ssh_certificates_grant ON ssh_certificates(grant_id);
CREATE INDEX ssh_certificates_valid ON ssh_certificates(valid_before);
