-- When the service first had each source on its schedule: see PostgreSQL's migration of
-- the same name.
ALTER TABLE sync_state ADD COLUMN registered_at TEXT;
