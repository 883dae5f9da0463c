-- For a source ($1) and a complete listing ($2), possibly confirming an earlier one ($3),
-- per scope (scope_id, '' for none) of the scopes $4 (a JSON array; NULL: every scope):
-- the rows that were live when the first listing began (the guard's base: rows the
-- listings themselves added do not dilute it), and the live rows neither listing saw.
-- $5 is the transaction's instant (PostgreSQL's now()).
WITH started AS (
    SELECT COALESCE(
        (SELECT listing_started_at FROM sync_state
         WHERE source = $1 AND (listing_id = $2 OR listing_confirms IS NOT NULL)),
        $5) AS at
)
SELECT COALESCE(d.scope_id, '') AS scope,
       count(*) FILTER (WHERE d.first_synced_at < started.at) AS live,
       count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM listing_seen s
           WHERE s.source = d.source AND s.listing_id = $2 AND s.external_id = d.external_id
       ) AND ($3 IS NULL OR NOT EXISTS (
           SELECT 1 FROM listing_seen s
           WHERE s.source = d.source AND s.listing_id = $3 AND s.external_id = d.external_id
       ))) AS unseen
FROM departments d, started
WHERE d.source = $1 AND d.deleted_at IS NULL
  AND ($4 IS NULL OR COALESCE(d.scope_id, '') IN (SELECT value FROM json_each($4)))
GROUP BY 1
