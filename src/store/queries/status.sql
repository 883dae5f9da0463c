-- The body of both backends' status statement, after their first line, which lists the
-- configured names ($1) in their dialect: one line per source of those and of any other
-- the tables know. Each "newest run such that" is a correlated subquery on
-- sync_runs (source, started_at DESC); the departments are counted in one pass.
    UNION SELECT source FROM sync_state
    UNION SELECT DISTINCT source FROM sync_runs
),
counts AS (
    SELECT source,
           count(*) FILTER (WHERE deleted_at IS NULL)     AS live,
           count(*) FILTER (WHERE deleted_at IS NOT NULL) AS deleted
    FROM departments GROUP BY source
)
SELECT n.source,
       (SELECT status FROM sync_runs r WHERE r.source = n.source
         ORDER BY started_at DESC LIMIT 1)                        AS last_status,
       (SELECT started_at FROM sync_runs r WHERE r.source = n.source
         ORDER BY started_at DESC LIMIT 1)                        AS last_started_at,
       (SELECT finished_at FROM sync_runs r WHERE r.source = n.source
         ORDER BY started_at DESC LIMIT 1)                        AS last_finished_at,
       (SELECT finished_at FROM sync_runs r WHERE r.source = n.source AND status = 'succeeded'
         ORDER BY started_at DESC LIMIT 1)                        AS last_success_at,
       (SELECT error FROM sync_runs r WHERE r.source = n.source AND status = 'failed'
         ORDER BY started_at DESC LIMIT 1)                        AS last_error,
       (SELECT started_at FROM sync_runs r WHERE r.source = n.source AND status = 'failed'
         ORDER BY started_at DESC LIMIT 1)                        AS last_error_at,
       s.high_water_mark,
       (SELECT count(*) FILTER (WHERE state <> 'done') FROM sync_windows w
         WHERE w.source = n.source AND w.mode = 'incremental')   AS windows_left,
       (SELECT count(*) FROM sync_windows w
         WHERE w.source = n.source AND w.mode = 'incremental')   AS windows_planned,
       s.listing_cursor,
       s.reset_at,
       s.reset_reason,
       s.registered_at,
       (SELECT min(started_at) FROM sync_runs r WHERE r.source = n.source) AS first_run_at,
       (s.backfill_from IS NOT NULL)                              AS backfill_in_progress,
       COALESCE(c.live, 0)                                        AS live_rows,
       COALESCE(c.deleted, 0)                                     AS deleted_rows,
       (SELECT count(*) FROM rejected_records r WHERE r.source = n.source) AS rejected,
       l.holder                                                   AS lease_holder,
       l.fence                                                    AS lease_fence,
       l.expires_ms                                               AS lease_expires_ms,
       l.next_due_ms,
       -- The guard's verdicts that stand: the one over the whole source, else the sum of
       -- the scopes'.
       COALESCE((SELECT since FROM withheld_deletions w
                 WHERE w.source = n.source AND w.guard = 'source'),
                (SELECT min(since) FROM withheld_deletions w
                 WHERE w.source = n.source))                    AS withheld_since,
       COALESCE((SELECT would_delete FROM withheld_deletions w
                 WHERE w.source = n.source AND w.guard = 'source'),
                (SELECT CAST(sum(would_delete) AS BIGINT) FROM withheld_deletions w
                 WHERE w.source = n.source))                    AS withheld_would_delete,
       COALESCE((SELECT live FROM withheld_deletions w
                 WHERE w.source = n.source AND w.guard = 'source'),
                (SELECT CAST(sum(live) AS BIGINT) FROM withheld_deletions w
                 WHERE w.source = n.source))                    AS withheld_live,
       (SELECT count(*) FROM withheld_deletions w
         WHERE w.source = n.source AND w.guard = 'scope'
           AND NOT EXISTS (SELECT 1 FROM withheld_deletions o
                           WHERE o.source = n.source AND o.guard = 'source')) AS withheld_scopes
FROM names n
LEFT JOIN sync_state s ON s.source = n.source
LEFT JOIN source_leases l ON l.source = n.source
LEFT JOIN counts c ON c.source = n.source
ORDER BY n.source
