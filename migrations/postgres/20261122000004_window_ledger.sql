-- Windowed passes read several update-time windows at once, so one position per pass no
-- longer says where a pass stands: every window it planned is kept in a ledger, pending,
-- in progress at a cursor, or done, and written in the same transaction as each page.

CREATE TABLE sync_windows (
    source       text        NOT NULL,
    mode         text        NOT NULL CHECK (mode IN ('incremental', 'backfill')),
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    state        text        NOT NULL CHECK (state IN ('pending', 'in_progress', 'done')),
    cursor       text,       -- the next page of a window in progress
    PRIMARY KEY (source, mode, window_start),
    CHECK (window_start < window_end),
    CHECK ((state = 'in_progress') = (cursor IS NOT NULL))
);

-- The instant each pass in progress reads up to (an incremental pass's next high-water mark).
ALTER TABLE sync_state
    ADD COLUMN incremental_until timestamptz,
    ADD COLUMN backfill_until    timestamptz;

-- A pass interrupted before this migration resumes where it stood.
INSERT INTO sync_windows (source, mode, window_start, window_end, state, cursor)
SELECT source, 'incremental', incremental_window_start, incremental_window_end,
       CASE WHEN incremental_cursor IS NULL THEN 'pending' ELSE 'in_progress' END,
       incremental_cursor
FROM sync_state WHERE incremental_window_start IS NOT NULL;
INSERT INTO sync_windows (source, mode, window_start, window_end, state, cursor)
SELECT source, 'backfill', backfill_window_start, backfill_window_end,
       CASE WHEN backfill_cursor IS NULL THEN 'pending' ELSE 'in_progress' END,
       backfill_cursor
FROM sync_state WHERE backfill_window_start IS NOT NULL;
UPDATE sync_state SET incremental_until = incremental_window_end,
                      backfill_until = backfill_window_end;

-- Dropping the columns drops the checks that named them.
ALTER TABLE sync_state
    DROP COLUMN incremental_window_start,
    DROP COLUMN incremental_window_end,
    DROP COLUMN incremental_cursor,
    DROP COLUMN backfill_window_start,
    DROP COLUMN backfill_window_end,
    DROP COLUMN backfill_cursor,
    ADD CHECK ((backfill_from IS NULL) = (backfill_until IS NULL));
