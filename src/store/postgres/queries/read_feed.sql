-- At most $7 versions after the place ($1, $2, $3, $4) of the change feed (a position, a
-- source, an external id, a sequence), before the horizon $5, of the sources $6 (NULL:
-- every source), in feed order: the order of the transactions that wrote them
-- (feed_position), then of source and id, then of the department's versions of one
-- transaction (feed_seq). The horizon is the oldest transaction still running when the
-- reader began: every transaction before it has ended, so none can add a version there
-- later.
SELECT feed_position AS position, feed_seq AS seq, source, external_id, scope_id, name,
       is_active, parent_external_id, deleted, valid_from, valid_to,
       CAST(run_id AS TEXT) AS run_id, observed_at
FROM department_versions
WHERE feed_position >= $1
  AND (feed_position, source, external_id, feed_seq) > ($1, $2::text, $3::text, $4)
  AND feed_position < $5
  AND ($6::text[] IS NULL OR source = ANY($6::text[]))
ORDER BY feed_position, source, external_id, feed_seq
LIMIT $7
