-- When the service first had each source on its schedule: `status` counts a source that
-- has never succeeded from then (or from its first run), so that a fresh install is not
-- stale before anything was due.
ALTER TABLE sync_state ADD COLUMN registered_at timestamptz;
