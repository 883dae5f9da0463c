-- A verdict of the mass-deletion guard stands until a person confirms it or the missing
-- departments come back. Without it, the rows a refused listing inserted (a token of
-- another tenant, ids written another way) counted as live on the next pass and diluted
-- the guard: N unseen of 2N live is not more than half, and the old N were deleted a pass
-- later without anyone's confirmation.
--
-- One row per verdict: over the whole source (guard 'source') or over one scope (guard
-- 'scope', scope the scope_id, '' for none). `since` is when the first listing it refused
-- began: the guard's base stays the departments live then, pass after pass.
CREATE TABLE withheld_deletions (
    source        text        COLLATE "C" NOT NULL,
    guard         text        NOT NULL CHECK (guard IN ('source', 'scope')),
    scope         text        COLLATE "C" NOT NULL DEFAULT '',
    since         timestamptz NOT NULL,
    would_delete  bigint      NOT NULL,
    live          bigint      NOT NULL,
    updated_at    timestamptz NOT NULL,
    PRIMARY KEY (source, guard, scope)
);
