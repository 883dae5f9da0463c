-- Writes the departments of a page that may have changed, in one statement, and tells how
-- many were inserted and how many updated (the caller counts the rest as unchanged), and
-- how many rows it wrote in all.
--
-- For a full listing the caller has already set aside the rows whose content digest
-- matches the stored one; a NULL digest means "compare in full". A row is updated only when its content really differs (IS DISTINCT
-- FROM, so NULLs compare as values), and never replaced by a version whose
-- source_updated_at is older than the one stored: a late page or a backfill cannot roll a
-- department back. last_changed_at moves only with the content; a row written before
-- digests existed gets its digest without counting as a change.
--
-- Not INSERT ... ON CONFLICT: that locks every conflicting row, even one it then skips
-- (a write of the heap page and of WAL), and searches the index twice per row. Nothing
-- else writes a source's rows while its pass holds the source's lease; a row inserted
-- behind its back would fail the page (a unique violation), never corrupt it.
--
-- $1 source; $2..$10 one array per column, all of the same length, ids unique.
-- Each record is parsed as jsonb once, from its own text: casting the whole text[] to
-- jsonb[] first would build (and allocate) one more copy of the page.
WITH incoming AS (
    SELECT external_id, scope_id, name, is_active, parent_external_id,
           source_created_at, source_updated_at, raw_text::jsonb AS raw, content_md5
    FROM UNNEST($2::text[], $3::text[], $4::text[], $5::boolean[], $6::text[],
                $7::timestamptz[], $8::timestamptz[], $9::text[], $10::bytea[])
         AS t(external_id, scope_id, name, is_active, parent_external_id,
              source_created_at, source_updated_at, raw_text, content_md5)
),
-- One index lookup per row: stored or new.
compared AS (
    SELECT i.*, d.external_id IS NOT NULL AS stored
    FROM incoming i
    LEFT JOIN departments d ON d.source = $1 AND d.external_id = i.external_id
),
inserted AS (
    INSERT INTO departments (
        source, external_id, scope_id, name, is_active, parent_external_id,
        source_created_at, source_updated_at, raw, content_md5, deleted_at,
        first_synced_at, last_changed_at
    )
    SELECT $1, external_id, scope_id, name, is_active, parent_external_id,
           source_created_at, source_updated_at, raw, content_md5, NULL, now(), now()
    FROM compared
    WHERE NOT stored
    RETURNING 1
),
updated AS (
    UPDATE departments d SET
        scope_id           = i.scope_id,
        name               = i.name,
        is_active          = i.is_active,
        parent_external_id = i.parent_external_id,
        source_created_at  = i.source_created_at,
        source_updated_at  = i.source_updated_at,
        raw                = i.raw,
        content_md5        = i.content_md5,
        deleted_at         = NULL,
        -- Revived: live again from now (the guard's base counts from here).
        live_since         = CASE WHEN d.deleted_at IS NOT NULL THEN now()
                                  ELSE d.live_since END,
        last_changed_at    = CASE
            WHEN (d.scope_id, d.name, d.is_active, d.parent_external_id,
                  d.source_created_at, d.source_updated_at, d.raw, d.deleted_at)
                 IS DISTINCT FROM
                 (i.scope_id, i.name, i.is_active, i.parent_external_id,
                  i.source_created_at, i.source_updated_at, i.raw, NULL::timestamptz)
            THEN now() ELSE d.last_changed_at END
    FROM compared i
    WHERE i.stored
      AND d.source = $1 AND d.external_id = i.external_id
      AND ((d.scope_id, d.name, d.is_active, d.parent_external_id,
            d.source_created_at, d.source_updated_at, d.raw, d.deleted_at)
           IS DISTINCT FROM
           (i.scope_id, i.name, i.is_active, i.parent_external_id,
            i.source_created_at, i.source_updated_at, i.raw, NULL::timestamptz)
           OR d.content_md5 IS DISTINCT FROM i.content_md5)
      AND (d.source_updated_at IS NULL
           OR i.source_updated_at IS NULL
           OR i.source_updated_at >= d.source_updated_at)
    RETURNING d.last_changed_at = now() AS changed
)
SELECT (SELECT count(*) FROM inserted)                  AS inserted,
       (SELECT count(*) FROM updated WHERE changed)     AS updated,
       -- Rows written at all: with the inserted ones, every row sent unless some were
       -- older than what is stored.
       (SELECT count(*) FROM updated)                   AS touched
