-- For a source ($1) and a complete listing ($2), possibly confirming an earlier one ($3):
-- the rows that were live when the first listing began (the guard's base: rows the
-- listings themselves added do not dilute it), and the live rows neither listing saw.
WITH started AS (
    SELECT COALESCE(
        (SELECT listing_started_at FROM sync_state
         WHERE source = $1 AND (listing_id = $2 OR listing_confirms IS NOT NULL)),
        now()) AS at
)
SELECT count(*) FILTER (WHERE d.first_synced_at < started.at) AS live,
       count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM listing_seen s
           WHERE s.source = d.source AND s.listing_id = $2 AND s.external_id = d.external_id
       ) AND ($3::uuid IS NULL OR NOT EXISTS (
           SELECT 1 FROM listing_seen s
           WHERE s.source = d.source AND s.listing_id = $3 AND s.external_id = d.external_id
       ))) AS unseen
FROM departments d, started
WHERE d.source = $1 AND d.deleted_at IS NULL
