-- Marks deleted, once, every live department of a source (?1) that neither the complete
-- listing ?2 nor the listing it confirms (?3) saw, at the transaction's instant (?4). A
-- department that comes back later is revived by the upsert.
UPDATE departments AS d
SET deleted_at = ?4, last_changed_at = ?4
WHERE d.source = ?1
  AND d.deleted_at IS NULL
  AND NOT EXISTS (
      SELECT 1 FROM listing_seen s
      WHERE s.source = d.source AND s.listing_id = ?2 AND s.external_id = d.external_id
  )
  AND NOT EXISTS (
      SELECT 1 FROM listing_seen s
      WHERE s.source = d.source AND s.listing_id = ?3 AND s.external_id = d.external_id
  )
