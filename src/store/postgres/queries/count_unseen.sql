-- For a source ($1) and a complete listing ($2), possibly confirming an earlier one ($3),
-- per scope (scope_id, '' for none) of the scopes $4 (NULL: every scope): the rows that
-- were live when the first listing began (the guard's base: rows the listings themselves
-- added do not dilute it), and the live rows neither listing saw.
--
-- EXCEPT, not a join or NOT EXISTS: the planner cannot know how many ids the listings'
-- arrays hold, and a nested loop over them is quadratic; a set difference is not.
WITH started AS (
    SELECT COALESCE(
        (SELECT listing_started_at FROM sync_state
         WHERE source = $1 AND (listing_id = $2 OR listing_confirms IS NOT NULL)),
        now()) AS at
),
unseen AS (
    SELECT external_id FROM departments WHERE source = $1 AND deleted_at IS NULL
    EXCEPT
    SELECT unnest(external_ids) FROM listing_seen_pages
    WHERE source = $1 AND listing_id = $2
    EXCEPT
    SELECT unnest(external_ids) FROM listing_seen_pages
    WHERE source = $1 AND listing_id = $3 AND $3 IS NOT NULL
)
SELECT COALESCE(d.scope_id, '')                                    AS scope,
       count(*) FILTER (WHERE d.first_synced_at < started.at)     AS live,
       count(u.external_id)                                        AS unseen
FROM departments d
CROSS JOIN started
LEFT JOIN unseen u ON u.external_id = d.external_id
WHERE d.source = $1 AND d.deleted_at IS NULL
  AND ($4::text[] IS NULL OR COALESCE(d.scope_id, '') = ANY($4::text[]))
GROUP BY 1
