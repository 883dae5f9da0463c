-- For a source ($1) and a complete listing ($2), possibly confirming an earlier one ($3),
-- per scope (scope_id, '' for none) of the scopes $4 (a JSON array; NULL: every scope):
-- the live rows neither listing saw, the rows live when the first listing began, and,
-- where a verdict of the guard stands, the rows live when the first listing it refused
-- began and how many of them neither listing saw (see PostgreSQL's statement of the same
-- name). $5 is the transaction's instant (PostgreSQL's now()).
WITH started AS (
    SELECT COALESCE(
        (SELECT listing_started_at FROM sync_state
         WHERE source = $1 AND (listing_id = $2 OR listing_confirms IS NOT NULL)),
        $5) AS at
),
verdict AS (
    SELECT (SELECT since FROM withheld_deletions
            WHERE source = $1 AND guard = 'source') AS since
),
rows AS (
    SELECT d.scope_id, COALESCE(d.live_since, d.first_synced_at) AS live_from,
           NOT EXISTS (
               SELECT 1 FROM listing_seen s
               WHERE s.source = d.source AND s.listing_id = $2
                 AND s.external_id = d.external_id
           ) AND ($3 IS NULL OR NOT EXISTS (
               SELECT 1 FROM listing_seen s
               WHERE s.source = d.source AND s.listing_id = $3
                 AND s.external_id = d.external_id
           )) AS unseen
    FROM departments d
    WHERE d.source = $1 AND d.deleted_at IS NULL
      AND ($4 IS NULL OR COALESCE(d.scope_id, '') IN (SELECT value FROM json_each($4)))
)
SELECT COALESCE(r.scope_id, '')                                               AS scope,
       count(*) FILTER (WHERE r.unseen)                                       AS unseen,
       count(*) FILTER (WHERE r.live_from < s.at)                       AS live,
       min(s.at)                                                              AS started,
       min(v.since)                                                           AS source_since,
       count(*) FILTER (WHERE r.live_from < v.since)                    AS source_live,
       count(*) FILTER (WHERE r.unseen AND r.live_from < v.since)       AS source_missing,
       min(w.since)                                                           AS scope_since,
       count(*) FILTER (WHERE r.live_from < w.since)                    AS scope_live,
       count(*) FILTER (WHERE r.unseen AND r.live_from < w.since)       AS scope_missing
FROM rows r
CROSS JOIN started s
CROSS JOIN verdict v
LEFT JOIN withheld_deletions w
       ON w.source = $1 AND w.guard = 'scope' AND w.scope = COALESCE(r.scope_id, '')
GROUP BY 1
