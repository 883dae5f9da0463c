-- deptsync's tables on SQLite: the same tables, columns, keys, checks and indexes as the
-- PostgreSQL schema after migrations/postgres/20261122000001..20261122000004, in SQLite's
-- types. One migration gives that final schema at once: there were no SQLite databases
-- before it. A later change to the schema gets a migration in both directories.
--
-- Types:
-- - timestamps are TEXT, RFC 3339 in UTC with six fractional digits
--   ("2024-05-01T12:00:00.000000Z"), written by deptsync itself; one fixed width keeps
--   text order the same as time order, so comparisons and ORDER BY work on the text;
-- - JSON is TEXT (SQLite's json functions read it);
-- - uuids are TEXT in their hyphenated form;
-- - booleans are INTEGER 0 or 1.
--
-- The defaults write the same timestamp form, for rows written by hand; deptsync binds
-- every timestamp itself, one instant per transaction as PostgreSQL's now().

-- One row per department per source: the SQL copy analysts query.
CREATE TABLE departments (
    source              TEXT    NOT NULL,
    external_id         TEXT    NOT NULL,   -- the vendor's id, as text
    scope_id            TEXT,               -- Mews EnterpriseId, Procurify branch, Snapbooks client account
    name                TEXT    NOT NULL,
    is_active           INTEGER NOT NULL CHECK (is_active IN (0, 1)),
    parent_external_id  TEXT,
    source_created_at   TEXT,
    source_updated_at   TEXT,
    deleted_at          TEXT,               -- set when two complete listings no longer have it
    raw                 TEXT    NOT NULL,   -- the record exactly as received (JSON)
    first_synced_at     TEXT    NOT NULL
        DEFAULT (strftime('%Y-%m-%dT%H:%M:%S', 'now') || substr(strftime('%f', 'now'), 3) || '000Z'),
    last_changed_at     TEXT    NOT NULL
        DEFAULT (strftime('%Y-%m-%dT%H:%M:%S', 'now') || substr(strftime('%f', 'now'), 3) || '000Z'),
    PRIMARY KEY (source, external_id)
);

-- "Departments of this enterprise / branch / client account".
CREATE INDEX departments_scope_idx ON departments (source, scope_id);
-- "What changed since T" (downstream incremental readers).
CREATE INDEX departments_last_changed_idx ON departments (last_changed_at);
-- Children of a department.
CREATE INDEX departments_parent_idx ON departments (source, parent_external_id)
    WHERE parent_external_id IS NOT NULL;
-- Live rows are what most queries want; the deleted ones are few.
CREATE INDEX departments_deleted_idx ON departments (source) WHERE deleted_at IS NOT NULL;

-- What each source needs to resume. Written in the same transaction as the page it follows.
CREATE TABLE sync_state (
    source              TEXT NOT NULL PRIMARY KEY,
    -- Every update before this instant (less the lookback) has been read.
    high_water_mark     TEXT,
    -- The backfill in progress: the range asked for (to NULL = until now).
    backfill_from       TEXT,
    backfill_to         TEXT,
    updated_at          TEXT NOT NULL
        DEFAULT (strftime('%Y-%m-%dT%H:%M:%S', 'now') || substr(strftime('%f', 'now'), 3) || '000Z'),
    -- The full listing in progress: the id its seen departments are recorded under, and
    -- the cursor of its next page.
    listing_id          TEXT,
    listing_cursor      TEXT,
    -- The complete listing whose missing departments a second listing must confirm.
    listing_confirms    TEXT,
    -- When the first listing of the chain began: the mass-deletion guard compares with
    -- the rows live then, not with rows the listing itself added.
    listing_started_at  TEXT,
    -- The instant each windowed pass in progress reads up to (an incremental pass's next
    -- high-water mark); its windows are in sync_windows.
    incremental_until   TEXT,
    backfill_until      TEXT,
    CHECK ((backfill_from IS NULL) = (backfill_until IS NULL))
);

-- One row per pass of one source.
CREATE TABLE sync_runs (
    run_id       TEXT    NOT NULL PRIMARY KEY,
    source       TEXT    NOT NULL,
    mode         TEXT    NOT NULL CHECK (mode IN ('incremental', 'backfill')),
    started_at   TEXT    NOT NULL
        DEFAULT (strftime('%Y-%m-%dT%H:%M:%S', 'now') || substr(strftime('%f', 'now'), 3) || '000Z'),
    finished_at  TEXT,
    status       TEXT    NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    fetched      INTEGER NOT NULL DEFAULT 0,
    inserted     INTEGER NOT NULL DEFAULT 0,
    updated      INTEGER NOT NULL DEFAULT 0,
    unchanged    INTEGER NOT NULL DEFAULT 0,
    deleted      INTEGER NOT NULL DEFAULT 0,
    rejected     INTEGER NOT NULL DEFAULT 0,
    pages        INTEGER NOT NULL DEFAULT 0,
    error        TEXT
);

CREATE INDEX sync_runs_source_started_idx ON sync_runs (source, started_at DESC);

-- Records a vendor sent that cannot be stored as departments, kept instead of dropped.
-- payload is the record's JSON as text. SQLite has no md5(), so deptsync computes
-- payload_md5 (the lowercase hex MD5 of payload, as PostgreSQL's generated column holds)
-- when it writes the row.
CREATE TABLE rejected_records (
    source        TEXT    NOT NULL,
    external_id   TEXT,
    reason        TEXT    NOT NULL,
    payload       TEXT    NOT NULL,
    payload_md5   TEXT    NOT NULL,
    first_seen_at TEXT    NOT NULL
        DEFAULT (strftime('%Y-%m-%dT%H:%M:%S', 'now') || substr(strftime('%f', 'now'), 3) || '000Z'),
    seen_at       TEXT    NOT NULL
        DEFAULT (strftime('%Y-%m-%dT%H:%M:%S', 'now') || substr(strftime('%f', 'now'), 3) || '000Z'),
    times_seen    INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (source, payload_md5)
);

-- The departments each listing in progress has seen. Kept in the database (not in
-- memory) so that memory stays flat whatever the listing's size and an interrupted
-- listing can resume; kept apart from `departments` so that a pass where nothing changed
-- writes nothing there. Rows live only until their listing completes or is abandoned.
CREATE TABLE listing_seen (
    source      TEXT NOT NULL,
    listing_id  TEXT NOT NULL,
    external_id TEXT NOT NULL,
    PRIMARY KEY (source, listing_id, external_id)
) WITHOUT ROWID;

-- The windows of each windowed pass in progress, pending, in progress at a cursor, or
-- done, written in the same transaction as each page.
CREATE TABLE sync_windows (
    source       TEXT NOT NULL,
    mode         TEXT NOT NULL CHECK (mode IN ('incremental', 'backfill')),
    window_start TEXT NOT NULL,
    window_end   TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'in_progress', 'done')),
    cursor       TEXT,       -- the next page of a window in progress
    PRIMARY KEY (source, mode, window_start),
    CHECK (window_start < window_end),
    CHECK ((state = 'in_progress') = (cursor IS NOT NULL))
);
