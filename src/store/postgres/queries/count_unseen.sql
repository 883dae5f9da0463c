-- For a source ($1) and a complete listing ($2), possibly confirming an earlier one ($3),
-- per scope (scope_id, '' for none) of the scopes $4 (NULL: every scope): the live rows
-- neither listing saw (unseen), and the rows live when the first listing began (live,
-- from its clock, started: live since their first sync, or since a listing revived them). Where a verdict of the mass-deletion guard stands over the
-- whole source (withheld_deletions, since source_since) or over the scope (since
-- scope_since): the rows live when the first listing it refused began (source_live,
-- scope_live), and how many of those neither listing saw (source_missing,
-- scope_missing). Which base the guard counts is checkpoint.rs's to decide.
--
-- EXCEPT, not a join or NOT EXISTS: the planner cannot know how many ids the listings'
-- arrays hold, and a nested loop over them is quadratic; a set difference is not.
WITH started AS (
    SELECT COALESCE(
        (SELECT listing_started_at FROM sync_state
         WHERE source = $1 AND (listing_id = $2 OR listing_confirms IS NOT NULL)),
        now()) AS at
),
verdict AS (
    SELECT (SELECT since FROM withheld_deletions
            WHERE source = $1 AND guard = 'source') AS since
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
SELECT COALESCE(d.scope_id, '')                                              AS scope,
       count(u.external_id)                                                  AS unseen,
       count(*) FILTER (WHERE COALESCE(d.live_since, d.first_synced_at) < s.at)                      AS live,
       min(s.at)                                                             AS started,
       min(v.since)                                                          AS source_since,
       count(*) FILTER (WHERE COALESCE(d.live_since, d.first_synced_at) < v.since)                   AS source_live,
       count(u.external_id) FILTER (WHERE COALESCE(d.live_since, d.first_synced_at) < v.since)      AS source_missing,
       min(w.since)                                                          AS scope_since,
       count(*) FILTER (WHERE COALESCE(d.live_since, d.first_synced_at) < w.since)                   AS scope_live,
       count(u.external_id) FILTER (WHERE COALESCE(d.live_since, d.first_synced_at) < w.since)      AS scope_missing
FROM departments d
CROSS JOIN started s
CROSS JOIN verdict v
LEFT JOIN withheld_deletions w
       ON w.source = $1 AND w.guard = 'scope' AND w.scope = COALESCE(d.scope_id, '')
LEFT JOIN unseen u ON u.external_id = d.external_id
WHERE d.source = $1 AND d.deleted_at IS NULL
  AND ($4::text[] IS NULL OR COALESCE(d.scope_id, '') = ANY($4::text[]))
GROUP BY 1
