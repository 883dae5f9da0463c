-- When a department last became live again: see PostgreSQL's migration of the same name.
ALTER TABLE departments ADD COLUMN live_since TEXT;
