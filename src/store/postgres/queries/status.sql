-- One line per source: the configured ones ($1) and any other the tables know.
WITH names AS (
    SELECT unnest($1::text[]) AS source
    UNION SELECT source FROM sync_state
    UNION SELECT DISTINCT source FROM sync_runs
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
       COALESCE(counts.live, 0)                      AS live_rows,
       COALESCE(counts.deleted, 0)                   AS deleted_rows,
       (SELECT count(*) FROM rejected_records r WHERE r.source = n.source) AS rejected
FROM names n
LEFT JOIN sync_state s ON s.source = n.source
LEFT JOIN LATERAL (
    SELECT status, started_at, finished_at FROM sync_runs r
    WHERE r.source = n.source ORDER BY started_at DESC LIMIT 1
) last_run ON true
LEFT JOIN LATERAL (
    SELECT finished_at FROM sync_runs r
    WHERE r.source = n.source AND status = 'succeeded' ORDER BY started_at DESC LIMIT 1
) last_ok ON true
LEFT JOIN LATERAL (
    SELECT error, started_at FROM sync_runs r
    WHERE r.source = n.source AND status = 'failed' ORDER BY started_at DESC LIMIT 1
) last_failure ON true
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE deleted_at IS NULL)     AS live,
           count(*) FILTER (WHERE deleted_at IS NOT NULL) AS deleted
    FROM departments d WHERE d.source = n.source
) counts ON true
ORDER BY n.source
