-- A verdict of the mass-deletion guard that stands: see PostgreSQL's migration of the
-- same name.
CREATE TABLE withheld_deletions (
    source        TEXT    NOT NULL,
    guard         TEXT    NOT NULL CHECK (guard IN ('source', 'scope')),
    scope         TEXT    NOT NULL DEFAULT '',
    since         TEXT    NOT NULL,
    would_delete  INTEGER NOT NULL,
    live          INTEGER NOT NULL,
    updated_at    TEXT    NOT NULL,
    PRIMARY KEY (source, guard, scope)
);
