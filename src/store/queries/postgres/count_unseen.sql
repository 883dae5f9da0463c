-- For a source ($1) and a complete listing ($2), possibly confirming an earlier one ($3):
-- the rows that were live when the first listing began (the guard's base: rows the
-- listings themselves added do not dilute it), and the live rows neither listing saw.
--
-- Joins, not NOT EXISTS: inside an aggregate's FILTER a NOT EXISTS runs once per row,
-- and each run would read every id the listing saw.
WITH started AS (
    SELECT COALESCE(
        (SELECT listing_started_at FROM sync_state
         WHERE source = $1 AND (listing_id = $2 OR listing_confirms IS NOT NULL)),
        now()) AS at
),
seen AS (
    SELECT DISTINCT unnest(external_ids) AS external_id FROM listing_seen_pages
    WHERE source = $1 AND listing_id = $2
),
seen_before AS (
    SELECT DISTINCT unnest(external_ids) AS external_id FROM listing_seen_pages
    WHERE source = $1 AND listing_id = $3
)
SELECT count(*) FILTER (WHERE d.first_synced_at < started.at) AS live,
       count(*) FILTER (WHERE s.external_id IS NULL
                          AND ($3::uuid IS NULL OR b.external_id IS NULL)) AS unseen
FROM departments d
CROSS JOIN started
LEFT JOIN seen s ON s.external_id = d.external_id
LEFT JOIN seen_before b ON b.external_id = d.external_id
WHERE d.source = $1 AND d.deleted_at IS NULL
