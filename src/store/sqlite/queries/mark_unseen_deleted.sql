-- Marks deleted, once, every live department of a source ($1) that neither the complete
-- listing $2 nor the listing it confirms ($3) saw, at the transaction's instant ($5), of
-- the scopes $4 (a JSON array; NULL: every scope) but those the mass-deletion guard
-- spared ($6, a JSON array). A department that comes back later is revived by the upsert.
UPDATE departments AS d
SET deleted_at = $5, last_changed_at = $5
WHERE d.source = $1
  AND d.deleted_at IS NULL
  AND ($4 IS NULL OR COALESCE(d.scope_id, '') IN (SELECT value FROM json_each($4)))
  AND COALESCE(d.scope_id, '') NOT IN (SELECT value FROM json_each(COALESCE($6, '[]')))
  AND NOT EXISTS (
      SELECT 1 FROM listing_seen s
      WHERE s.source = d.source AND s.listing_id = $2 AND s.external_id = d.external_id
  )
  AND NOT EXISTS (
      SELECT 1 FROM listing_seen s
      WHERE s.source = d.source AND s.listing_id = $3 AND s.external_id = d.external_id
  )
