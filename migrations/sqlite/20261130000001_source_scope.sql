-- What a source's saved position is a position of, and when it was last dropped: see
-- PostgreSQL's migration of the same name.
ALTER TABLE sync_state ADD COLUMN scope_fingerprint TEXT;
ALTER TABLE sync_state ADD COLUMN reset_at TEXT;
ALTER TABLE sync_state ADD COLUMN reset_reason TEXT;
