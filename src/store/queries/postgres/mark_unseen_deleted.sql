-- Marks deleted, once, every live department of a source ($1) that neither the complete
-- listing $2 nor the listing it confirms ($3) saw. A department that comes back later is
-- revived by the upsert.
WITH seen AS (
    SELECT unnest(external_ids) AS external_id FROM listing_seen_pages
    WHERE source = $1 AND listing_id IN ($2, $3)
)
UPDATE departments d
SET deleted_at = now(), last_changed_at = now()
WHERE d.source = $1
  AND d.deleted_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM seen s WHERE s.external_id = d.external_id)
