-- At most $5 versions after the place ($1, $2) of the change feed, before the horizon $3,
-- of the sources $4 (NULL: every source), in feed order: the order of the transactions
-- that wrote them (commit_xid), then of their writing. The horizon is the oldest
-- transaction still running when the reader began: every transaction before it has ended,
-- so none can add a version there later.
SELECT commit_xid AS position, version_id, source, external_id, scope_id, name, is_active,
       parent_external_id, deleted, valid_from, valid_to, CAST(run_id AS TEXT) AS run_id,
       observed_at
FROM department_versions
WHERE (commit_xid, version_id) > ($1, $2)
  AND commit_xid < $3
  AND ($4::text[] IS NULL OR source = ANY($4::text[]))
ORDER BY commit_xid, version_id
LIMIT $5
