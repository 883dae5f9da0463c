-- For a source ($1) and a complete listing ($2), possibly confirming an earlier one ($3),
-- per scope (scope_id, '' for none) of the scopes $4 (NULL: every scope): the live rows
-- neither listing saw (unseen), and the mass-deletion guard's bases, over the whole
-- source (source_live) and over the scope (live): the rows live when the first listing
-- began (`started`, its clock), or, while the guard withholds deletions
-- (withheld_deletions), when the first listing it refused began. Rows added since, by the
-- listings themselves or by anyone, never dilute a base.
--
-- EXCEPT, not a join or NOT EXISTS: the planner cannot know how many ids the listings'
-- arrays hold, and a nested loop over them is quadratic; a set difference is not.
WITH started AS (
    SELECT COALESCE(
        (SELECT listing_started_at FROM sync_state
         WHERE source = $1 AND (listing_id = $2 OR listing_confirms IS NOT NULL)),
        now()) AS at
),
bases AS (
    -- LEAST ignores NULL: no verdict stands, the listing's clock.
    SELECT started.at AS started,
           LEAST(started.at, (SELECT since FROM withheld_deletions
                              WHERE source = $1 AND guard = 'source')) AS source_base
    FROM started
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
SELECT COALESCE(d.scope_id, '')                                          AS scope,
       count(*) FILTER (WHERE d.first_synced_at < b.source_base)         AS source_live,
       count(*) FILTER (WHERE d.first_synced_at < LEAST(b.started, w.since)) AS live,
       count(u.external_id)                                              AS unseen,
       min(b.started)                                                    AS started
FROM departments d
CROSS JOIN bases b
LEFT JOIN withheld_deletions w
       ON w.source = $1 AND w.guard = 'scope' AND w.scope = COALESCE(d.scope_id, '')
LEFT JOIN unseen u ON u.external_id = d.external_id
WHERE d.source = $1 AND d.deleted_at IS NULL
  AND ($4::text[] IS NULL OR COALESCE(d.scope_id, '') = ANY($4::text[]))
GROUP BY 1
