-- History: one row per version of a department per source. See PostgreSQL's migration of
-- the same name for what a version is and when valid_from starts.
--
-- SQLite has one writer at a time and never reuses a version_id (AUTOINCREMENT): the
-- change feed reads versions in version_id order, and PostgreSQL's commit_xid has no use
-- here.
CREATE TABLE department_versions (
    version_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    source              TEXT    NOT NULL,
    external_id         TEXT    NOT NULL,
    scope_id            TEXT,
    name                TEXT    NOT NULL,
    is_active           INTEGER NOT NULL CHECK (is_active IN (0, 1)),
    parent_external_id  TEXT,
    deleted             INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    valid_from          TEXT    NOT NULL,
    valid_to            TEXT,
    run_id              TEXT,               -- the run that wrote it; NULL at the upgrade
    observed_at         TEXT    NOT NULL,   -- when deptsync committed it
    CHECK (valid_to IS NULL OR valid_to >= valid_from)
);

CREATE UNIQUE INDEX department_versions_current_idx
    ON department_versions (source, external_id) WHERE valid_to IS NULL;
CREATE INDEX department_versions_timeline_idx
    ON department_versions (source, external_id, valid_from);
