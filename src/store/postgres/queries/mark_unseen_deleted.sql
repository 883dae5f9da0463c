-- Marks deleted, once, every live department of a source ($1) that neither the complete
-- listing $2 nor the listing it confirms ($3) saw, of the scopes $4 (NULL: every scope)
-- but those the mass-deletion guard spared ($6). A department that comes back later is
-- revived by the upsert. (EXCEPT: see count_unseen.sql.)
UPDATE departments d
SET deleted_at = now(), last_changed_at = now()
WHERE d.source = $1
  AND d.deleted_at IS NULL
  AND ($4::text[] IS NULL OR COALESCE(d.scope_id, '') = ANY($4::text[]))
  AND NOT COALESCE(d.scope_id, '') = ANY(COALESCE($6::text[], '{}'))
  AND d.external_id IN (
      SELECT external_id FROM departments WHERE source = $1 AND deleted_at IS NULL
      EXCEPT
      SELECT unnest(external_ids) FROM listing_seen_pages
      WHERE source = $1 AND listing_id IN ($2, $3)
  )
