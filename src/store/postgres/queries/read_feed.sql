-- At most $6 versions after the place ($1, $2, $3) of the change feed (a position, a
-- source, an external id), before the horizon $4, of the sources $5 (NULL: every source),
-- in feed order: the order of the transactions that wrote them (feed_position), then of
-- source and id (a department has one version per transaction). The horizon is the oldest
-- transaction still running when the reader began: every transaction before it has ended,
-- so none can add a version there later.
SELECT feed_position AS position, source, external_id, scope_id, name, is_active,
       parent_external_id, deleted, valid_from, valid_to, CAST(run_id AS TEXT) AS run_id,
       observed_at
FROM department_versions
WHERE feed_position >= $1
  AND (feed_position, source, external_id) > ($1, $2::text, $3::text)
  AND feed_position < $4
  AND ($5::text[] IS NULL OR source = ANY($5::text[]))
ORDER BY feed_position, source, external_id
LIMIT $6
