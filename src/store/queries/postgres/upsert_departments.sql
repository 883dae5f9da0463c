-- Upserts one page of departments in one statement and tells how each row landed.
--
-- A row is written only when its content differs (IS DISTINCT FROM, so NULLs compare as
-- values), and never replaced by a version whose source_updated_at is older than the one
-- stored: a late page or a backfill cannot roll a department back. last_changed_at moves
-- only with the content. Rows that need no write are set aside before the INSERT (`needed`):
-- ON CONFLICT DO UPDATE locks every conflicting row, even one its WHERE then skips, and a
-- row lock is a write (of the heap page, and of WAL): a pass where nothing changed must
-- write nothing. The same conditions stay on the UPDATE for a row that changed between the
-- two. Rows that were skipped come back from neither branch and are counted as unchanged
-- by the caller.
--
-- $1 source, $2..$9 one array per column, all of the same length, ids unique.
WITH incoming AS (
    SELECT *
    FROM UNNEST($2::text[], $3::text[], $4::text[], $5::boolean[], $6::text[],
                $7::timestamptz[], $8::timestamptz[], $9::jsonb[])
         AS t(external_id, scope_id, name, is_active, parent_external_id,
              source_created_at, source_updated_at, raw)
),
needed AS (
    SELECT i.*
    FROM incoming i
    LEFT JOIN departments d ON d.source = $1 AND d.external_id = i.external_id
    WHERE d.external_id IS NULL
       OR ((d.scope_id, d.name, d.is_active, d.parent_external_id,
            d.source_created_at, d.source_updated_at, d.raw, d.deleted_at)
           IS DISTINCT FROM
           (i.scope_id, i.name, i.is_active, i.parent_external_id,
            i.source_created_at, i.source_updated_at, i.raw, NULL::timestamptz)
           AND (d.source_updated_at IS NULL
                OR i.source_updated_at IS NULL
                OR i.source_updated_at >= d.source_updated_at))
),
written AS (
    INSERT INTO departments AS d (
        source, external_id, scope_id, name, is_active, parent_external_id,
        source_created_at, source_updated_at, raw, deleted_at, first_synced_at, last_changed_at
    )
    SELECT $1, external_id, scope_id, name, is_active, parent_external_id,
           source_created_at, source_updated_at, raw, NULL, now(), now()
    FROM needed
    ON CONFLICT (source, external_id) DO UPDATE SET
        scope_id           = EXCLUDED.scope_id,
        name               = EXCLUDED.name,
        is_active          = EXCLUDED.is_active,
        parent_external_id = EXCLUDED.parent_external_id,
        source_created_at  = EXCLUDED.source_created_at,
        source_updated_at  = EXCLUDED.source_updated_at,
        raw                = EXCLUDED.raw,
        deleted_at         = NULL,
        last_changed_at    = now()
    WHERE (d.scope_id, d.name, d.is_active, d.parent_external_id,
           d.source_created_at, d.source_updated_at, d.raw, d.deleted_at)
          IS DISTINCT FROM
          (EXCLUDED.scope_id, EXCLUDED.name, EXCLUDED.is_active, EXCLUDED.parent_external_id,
           EXCLUDED.source_created_at, EXCLUDED.source_updated_at, EXCLUDED.raw, NULL::timestamptz)
      AND (d.source_updated_at IS NULL
           OR EXCLUDED.source_updated_at IS NULL
           OR EXCLUDED.source_updated_at >= d.source_updated_at)
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted)     AS inserted,
       count(*) FILTER (WHERE NOT inserted) AS updated
FROM written
