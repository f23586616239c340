-- Stable identities: a user is (issuer, subject), shown by email. Demo users have
-- issuer 'dev' and their email as subject.
ALTER TABLE users ADD COLUMN issuer TEXT NOT NULL DEFAULT 'dev';
ALTER TABLE users ADD COLUMN subject TEXT;
UPDATE users SET subject = email WHERE subject IS NULL;
CREATE UNIQUE INDEX users_identity ON users(issuer, subject);
-- Sessions that signed in before this time (ms) are refused: an admin's
-- "force re-sign-in".
ALTER TABLE users ADD COLUMN sessions_valid_after INTEGER NOT NULL DEFAULT 0;
