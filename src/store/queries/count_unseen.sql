-- The live departments of a source ($1), and how many of them the complete listing $2
-- did not see.
SELECT count(*) AS live,
       count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM listing_seen s
           WHERE s.source = d.source AND s.listing_id = $2 AND s.external_id = d.external_id
       )) AS unseen
FROM departments d
WHERE d.source = $1 AND d.deleted_at IS NULL
