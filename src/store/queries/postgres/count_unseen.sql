-- For a source ($1) and a complete listing ($2), possibly confirming an earlier one ($3):
-- the rows that were live when the first listing began (the guard's base: rows the
-- listings themselves added do not dilute it), and the live rows neither listing saw.
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
       count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM seen s WHERE s.external_id = d.external_id
       ) AND ($3::uuid IS NULL OR NOT EXISTS (
           SELECT 1 FROM seen_before s WHERE s.external_id = d.external_id
       ))) AS unseen
FROM departments d, started
WHERE d.source = $1 AND d.deleted_at IS NULL
