-- History: every version of every department, and a change feed over them. See
-- PostgreSQL's migration of the same name for what a version is and when it starts.
--
-- SQLite has one writer at a time: feed_position is the number of the page transaction
-- that wrote the version, counted in feed_clock: a page's transaction writes its versions
-- at the clock's next number, and moves the clock there as it commits, when it wrote any.
-- Every position up to the clock's is committed.

CREATE TABLE feed_clock (
    only_row  INTEGER PRIMARY KEY CHECK (only_row = 1),
    position  INTEGER NOT NULL
);
INSERT INTO feed_clock (only_row, position) VALUES (1, 1);

ALTER TABLE departments ADD COLUMN version_from TEXT;
ALTER TABLE departments ADD COLUMN version_position INTEGER NOT NULL DEFAULT 1;
ALTER TABLE departments ADD COLUMN version_observed_at TEXT;

CREATE INDEX departments_version_position_idx ON departments (version_position);

CREATE TABLE department_history (
    history_id          INTEGER PRIMARY KEY,
    source              TEXT    NOT NULL,
    external_id         TEXT    NOT NULL,
    scope_id            TEXT,
    name                TEXT    NOT NULL,
    is_active           INTEGER NOT NULL CHECK (is_active IN (0, 1)),
    parent_external_id  TEXT,
    deleted             INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    valid_from          TEXT    NOT NULL,
    valid_to            TEXT    NOT NULL,
    observed_at         TEXT    NOT NULL,
    feed_position       INTEGER NOT NULL,
    CHECK (valid_to >= valid_from)
);
CREATE INDEX department_history_timeline_idx
    ON department_history (source, external_id, valid_from);
CREATE INDEX department_history_feed_idx
    ON department_history (feed_position, source, external_id, history_id);

CREATE VIEW department_versions AS
SELECT v.*,
       (SELECT r.run_id FROM sync_runs r
        WHERE r.source = v.source AND r.started_at <= v.observed_at
        ORDER BY r.started_at DESC LIMIT 1) AS run_id
FROM (
    SELECT source, external_id, scope_id, name, is_active, parent_external_id, deleted,
           valid_from, valid_to, observed_at, feed_position, history_id AS feed_seq
    FROM department_history
    UNION ALL
    SELECT source, external_id, scope_id, name, is_active, parent_external_id,
           deleted_at IS NOT NULL,
           COALESCE(version_from,
                    CASE WHEN source_updated_at <= first_synced_at THEN source_updated_at
                         ELSE first_synced_at END),
           NULL, COALESCE(version_observed_at, first_synced_at), version_position,
           9223372036854775807
    FROM departments
) v;

-- Closes the current version of a department whose update changed what a version holds:
-- the old one goes to department_history, ending where the new one starts. The
-- transaction's instant is the row's new last_changed_at (every change sets it).
CREATE TRIGGER departments_new_version
AFTER UPDATE OF scope_id, name, is_active, parent_external_id, deleted_at ON departments
WHEN (OLD.scope_id, OLD.name, OLD.is_active, OLD.parent_external_id, OLD.deleted_at IS NULL)
     IS NOT
     (NEW.scope_id, NEW.name, NEW.is_active, NEW.parent_external_id, NEW.deleted_at IS NULL)
BEGIN
    INSERT INTO department_history (
        source, external_id, scope_id, name, is_active, parent_external_id, deleted,
        valid_from, valid_to, observed_at, feed_position)
    SELECT OLD.source, OLD.external_id, OLD.scope_id, OLD.name, OLD.is_active,
           OLD.parent_external_id, OLD.deleted_at IS NOT NULL, started,
           CASE WHEN NEW.deleted_at IS NULL AND NEW.source_updated_at > started
                     AND NEW.source_updated_at <= NEW.last_changed_at
                THEN NEW.source_updated_at
                WHEN NEW.last_changed_at > started THEN NEW.last_changed_at
                ELSE started END,
           COALESCE(OLD.version_observed_at, OLD.first_synced_at), OLD.version_position
    FROM (SELECT COALESCE(OLD.version_from,
                          CASE WHEN OLD.source_updated_at <= OLD.first_synced_at
                               THEN OLD.source_updated_at
                               ELSE OLD.first_synced_at END) AS started);
    UPDATE departments
    SET version_from = (SELECT valid_to FROM department_history
                        WHERE history_id = last_insert_rowid()),
        version_position = (SELECT position + 1 FROM feed_clock),
        version_observed_at = NEW.last_changed_at
    WHERE source = NEW.source AND external_id = NEW.external_id;
END;

-- A first version's start depends on the vendor's update time, which the next update may
-- move: an update that opens no version keeps it as it was.
CREATE TRIGGER departments_keep_version_start
AFTER UPDATE OF source_updated_at ON departments
WHEN OLD.version_from IS NULL
     AND (OLD.scope_id, OLD.name, OLD.is_active, OLD.parent_external_id, OLD.deleted_at IS NULL)
         IS
         (NEW.scope_id, NEW.name, NEW.is_active, NEW.parent_external_id, NEW.deleted_at IS NULL)
BEGIN
    UPDATE departments
    SET version_from = CASE WHEN OLD.source_updated_at <= OLD.first_synced_at
                            THEN OLD.source_updated_at ELSE OLD.first_synced_at END
    WHERE source = NEW.source AND external_id = NEW.external_id;
END;

-- A database from before history starts it at once: see PostgreSQL's migration.
INSERT INTO department_history (
    source, external_id, scope_id, name, is_active, parent_external_id, deleted,
    valid_from, valid_to, observed_at, feed_position)
SELECT source, external_id, scope_id, name, is_active, parent_external_id, 0,
       min(CASE WHEN source_updated_at <= last_changed_at THEN source_updated_at
                ELSE first_synced_at END, deleted_at),
       deleted_at,
       -- Written now, as far as the change feed and a retention are concerned.
       strftime('%Y-%m-%dT%H:%M:%S', 'now') || substr(strftime('%f', 'now'), 3) || '000Z', 1
FROM departments
WHERE deleted_at IS NOT NULL;

UPDATE departments
SET version_from = CASE WHEN deleted_at IS NOT NULL THEN deleted_at
                        WHEN source_updated_at <= last_changed_at THEN source_updated_at
                        ELSE first_synced_at END,
    version_observed_at = COALESCE(deleted_at, first_synced_at);
