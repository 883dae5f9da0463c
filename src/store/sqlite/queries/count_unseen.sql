-- For a source ($1) and a complete listing ($2), possibly confirming an earlier one ($3),
-- per scope (scope_id, '' for none) of the scopes $4 (a JSON array; NULL: every scope):
-- the live rows neither listing saw, and the mass-deletion guard's bases over the whole
-- source and over the scope, from the first listing's clock (`started`) or from a
-- standing verdict's (see PostgreSQL's statement of the same name). $5 is the
-- transaction's instant (PostgreSQL's now()).
WITH started AS (
    SELECT COALESCE(
        (SELECT listing_started_at FROM sync_state
         WHERE source = $1 AND (listing_id = $2 OR listing_confirms IS NOT NULL)),
        $5) AS at
),
bases AS (
    SELECT started.at AS started,
           min(started.at, COALESCE((SELECT since FROM withheld_deletions
                                     WHERE source = $1 AND guard = 'source'),
                                    started.at)) AS source_base
    FROM started
)
SELECT COALESCE(d.scope_id, '') AS scope,
       count(*) FILTER (WHERE d.first_synced_at < b.source_base) AS source_live,
       count(*) FILTER (WHERE d.first_synced_at < min(b.started, COALESCE(w.since, b.started)))
           AS live,
       count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM listing_seen s
           WHERE s.source = d.source AND s.listing_id = $2 AND s.external_id = d.external_id
       ) AND ($3 IS NULL OR NOT EXISTS (
           SELECT 1 FROM listing_seen s
           WHERE s.source = d.source AND s.listing_id = $3 AND s.external_id = d.external_id
       ))) AS unseen,
       min(b.started) AS started
FROM departments d
CROSS JOIN bases b
LEFT JOIN withheld_deletions w
       ON w.source = $1 AND w.guard = 'scope' AND w.scope = COALESCE(d.scope_id, '')
WHERE d.source = $1 AND d.deleted_at IS NULL
  AND ($4 IS NULL OR COALESCE(d.scope_id, '') IN (SELECT value FROM json_each($4)))
GROUP BY 1
