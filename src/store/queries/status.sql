-- The body of both backends' status statement: one line per source of the names the
-- backend's first line lists (the configured ones, `$1`) and of any other the tables
-- know. Each "newest run such that" is a join on the run id a correlated subquery picks,
-- which both dialects can say.
    UNION SELECT source FROM sync_state
    UNION SELECT source FROM sync_runs
)
SELECT n.source,
       last_run.status          AS last_status,
       last_run.started_at      AS last_started_at,
       last_run.finished_at     AS last_finished_at,
       last_ok.finished_at      AS last_success_at,
       last_failure.error       AS last_error,
       last_failure.started_at  AS last_error_at,
       s.high_water_mark,
       (SELECT count(*) FILTER (WHERE state <> 'done') FROM sync_windows w
         WHERE w.source = n.source AND w.mode = 'incremental') AS windows_left,
       (SELECT count(*) FROM sync_windows w
         WHERE w.source = n.source AND w.mode = 'incremental') AS windows_planned,
       s.listing_cursor,
       s.reset_at,
       s.reset_reason,
       s.registered_at,
       (SELECT min(started_at) FROM sync_runs r WHERE r.source = n.source) AS first_run_at,
       (s.backfill_from IS NOT NULL)                 AS backfill_in_progress,
       (SELECT count(*) FROM departments d
         WHERE d.source = n.source AND d.deleted_at IS NULL)     AS live_rows,
       (SELECT count(*) FROM departments d
         WHERE d.source = n.source AND d.deleted_at IS NOT NULL) AS deleted_rows,
       (SELECT count(*) FROM rejected_records r WHERE r.source = n.source) AS rejected
FROM names n
LEFT JOIN sync_state s ON s.source = n.source
LEFT JOIN sync_runs last_run ON last_run.run_id = (
    SELECT run_id FROM sync_runs r
    WHERE r.source = n.source ORDER BY started_at DESC LIMIT 1)
LEFT JOIN sync_runs last_ok ON last_ok.run_id = (
    SELECT run_id FROM sync_runs r
    WHERE r.source = n.source AND status = 'succeeded' ORDER BY started_at DESC LIMIT 1)
LEFT JOIN sync_runs last_failure ON last_failure.run_id = (
    SELECT run_id FROM sync_runs r
    WHERE r.source = n.source AND status = 'failed' ORDER BY started_at DESC LIMIT 1)
ORDER BY n.source
