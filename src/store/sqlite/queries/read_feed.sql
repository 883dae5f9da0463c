-- At most $6 versions after the place ($1, $2, $3) of the change feed (a position, a
-- source, an external id), before the horizon $4, of the sources $5 (a JSON array; NULL:
-- every source), in feed order: the order of the page transactions that wrote them, then
-- of source and id. With one writer at a time, every position below the clock's is
-- committed.
SELECT feed_position AS position, source, external_id, scope_id, name, is_active,
       parent_external_id, deleted, valid_from, valid_to, run_id, observed_at
FROM department_versions
WHERE feed_position >= $1
  AND (feed_position, source, external_id) > ($1, $2, $3)
  AND feed_position < $4
  AND ($5 IS NULL OR source IN (SELECT value FROM json_each($5)))
ORDER BY feed_position, source, external_id
LIMIT $6
