-- At most $5 versions after the place ($1, $2) of the change feed, before the horizon $3,
-- of the sources $4 (a JSON array; NULL: every source), in feed order. With one writer at
-- a time, a version's id is its place: every id below the highest committed one is
-- committed too.
SELECT version_id AS position, version_id, source, external_id, scope_id, name, is_active,
       parent_external_id, deleted, valid_from, valid_to, run_id, observed_at
FROM department_versions
WHERE version_id >= $1 AND version_id > $2
  AND version_id < $3
  AND ($4 IS NULL OR source IN (SELECT value FROM json_each($4)))
ORDER BY version_id
LIMIT $5
