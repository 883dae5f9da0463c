-- deptsync's tables. Timestamps are timestamptz; the vendor's own record is kept in raw.

-- One row per department per source: the SQL copy analysts query.
CREATE TABLE departments (
    source              text        NOT NULL,
    external_id         text        NOT NULL,   -- the vendor's id, as text
    scope_id            text,                   -- Mews EnterpriseId, Procurify branch, Snapbooks client account
    name                text        NOT NULL,
    is_active           boolean     NOT NULL,
    parent_external_id  text,
    source_created_at   timestamptz,
    source_updated_at   timestamptz,
    deleted_at          timestamptz,            -- set when a complete listing no longer has it
    raw                 jsonb       NOT NULL,   -- the record exactly as received
    first_synced_at     timestamptz NOT NULL DEFAULT now(),
    last_changed_at     timestamptz NOT NULL DEFAULT now(),
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
    source                      text PRIMARY KEY,
    -- Every update before this instant (less the lookback) has been read.
    high_water_mark             timestamptz,
    -- The incremental pass in progress: its window and the cursor of its next page.
    incremental_window_start    timestamptz,
    incremental_window_end      timestamptz,
    incremental_cursor          text,
    -- The backfill in progress: the range asked for (to NULL = until now) and where it stands.
    backfill_from               timestamptz,
    backfill_to                 timestamptz,
    backfill_window_start       timestamptz,
    backfill_window_end         timestamptz,
    backfill_cursor             text,
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    CHECK ((incremental_window_start IS NULL) = (incremental_window_end IS NULL)),
    CHECK ((backfill_window_start IS NULL) = (backfill_window_end IS NULL)),
    CHECK ((backfill_from IS NULL) = (backfill_window_start IS NULL))
);

-- One row per pass of one source.
CREATE TABLE sync_runs (
    run_id       uuid PRIMARY KEY,
    source       text        NOT NULL,
    mode         text        NOT NULL CHECK (mode IN ('incremental', 'backfill')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    status       text        NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    fetched      bigint      NOT NULL DEFAULT 0,
    inserted     bigint      NOT NULL DEFAULT 0,
    updated      bigint      NOT NULL DEFAULT 0,
    unchanged    bigint      NOT NULL DEFAULT 0,
    deleted      bigint      NOT NULL DEFAULT 0,
    rejected     bigint      NOT NULL DEFAULT 0,
    pages        bigint      NOT NULL DEFAULT 0,
    error        text
);

CREATE INDEX sync_runs_source_started_idx ON sync_runs (source, started_at DESC);

-- Records a vendor sent that cannot be stored as departments, kept instead of dropped.
-- payload is the record's JSON as text: jsonb (and text) refuse some of what a vendor
-- may send (a NUL character), and the JSON escape of it is plain text.
CREATE TABLE rejected_records (
    source        text        NOT NULL,
    external_id   text,
    reason        text        NOT NULL,
    payload       text        NOT NULL,
    payload_md5   text        GENERATED ALWAYS AS (md5(payload)) STORED,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    seen_at       timestamptz NOT NULL DEFAULT now(),
    times_seen    bigint      NOT NULL DEFAULT 1,
    PRIMARY KEY (source, payload_md5)
);
