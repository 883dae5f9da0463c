-- At most $7 versions after the place ($1, $2, $3, $4) of the change feed (a position, a
-- source, an external id, a sequence), before the horizon $5, of the sources $6 (a JSON
-- array; NULL: every source), in feed order: the order of the page transactions that
-- wrote them, then of source and id, then of the department's versions of one
-- transaction. With one writer at a time, every position up to the clock's is committed.
SELECT feed_position AS position, feed_seq AS seq, source, external_id, scope_id, name,
       is_active, parent_external_id, deleted, valid_from, valid_to, run_id, observed_at
FROM department_versions
WHERE feed_position >= $1
  AND (feed_position, source, external_id, feed_seq) > ($1, $2, $3, $4)
  AND feed_position < $5
  AND ($6 IS NULL OR source IN (SELECT value FROM json_each($6)))
ORDER BY feed_position, source, external_id, feed_seq
LIMIT $7
