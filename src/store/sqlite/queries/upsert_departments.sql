-- Upserts one page of departments in one statement (SQLite).
--
-- The same rule as PostgreSQL's: a row is written only when its content differs (IS NOT
-- compares NULLs as values), and never replaced by a version whose source_updated_at is
-- older than the one stored: a late page or a backfill cannot roll a department back.
-- last_changed_at moves only with the content. SQLite cannot tell an inserted row from an
-- updated one in RETURNING, so the caller counts the ids that existed before the statement:
-- every new id is inserted, and the statement's other changes are updates.
--
-- $1 source, $2 the transaction's instant, $3 the page as a JSON array of objects (ids
-- unique; timestamps in the stored text form; raw the record's JSON as a JSON string,
-- stored as that very text: `->>` reads a string's text unchanged, where `->` would have
-- SQLite's JSON printer rewrite the record, and a change of printer would make every row
-- look changed).
WITH incoming AS (
    SELECT value ->> 'external_id'        AS external_id,
           value ->> 'scope_id'           AS scope_id,
           value ->> 'name'               AS name,
           value ->> 'is_active'          AS is_active,
           value ->> 'parent_external_id' AS parent_external_id,
           value ->> 'source_created_at'  AS source_created_at,
           value ->> 'source_updated_at'  AS source_updated_at,
           value ->> 'raw'                AS raw
    FROM json_each($3)
)
INSERT INTO departments AS d (
    source, external_id, scope_id, name, is_active, parent_external_id,
    source_created_at, source_updated_at, raw, deleted_at, first_synced_at, last_changed_at,
    version_position
)
SELECT $1, external_id, scope_id, name, is_active, parent_external_id,
       source_created_at, source_updated_at, raw, NULL, $2, $2,
       -- A new department's first version: this transaction's place in the feed, the
       -- clock's next (taken when the page commits). A stored one's versions are the
       -- trigger's (migrations/sqlite/*_history.sql).
       (SELECT position + 1 FROM feed_clock)
FROM incoming
WHERE true -- SQLite's parser needs a WHERE before ON CONFLICT when inserting from a SELECT
ON CONFLICT (source, external_id) DO UPDATE SET
    scope_id           = excluded.scope_id,
    name               = excluded.name,
    is_active          = excluded.is_active,
    parent_external_id = excluded.parent_external_id,
    source_created_at  = excluded.source_created_at,
    source_updated_at  = excluded.source_updated_at,
    raw                = excluded.raw,
    deleted_at         = NULL,
    -- Revived: live again from now (the guard's base counts from here).
    live_since         = CASE WHEN d.deleted_at IS NOT NULL THEN $2 ELSE d.live_since END,
    last_changed_at    = $2
WHERE (d.scope_id, d.name, d.is_active, d.parent_external_id,
       d.source_created_at, d.source_updated_at, d.raw, d.deleted_at)
      IS NOT
      (excluded.scope_id, excluded.name, excluded.is_active, excluded.parent_external_id,
       excluded.source_created_at, excluded.source_updated_at, excluded.raw, NULL)
  AND (d.source_updated_at IS NULL
       OR excluded.source_updated_at IS NULL
       OR excluded.source_updated_at >= d.source_updated_at)
