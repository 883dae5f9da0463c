-- History: one row per version of a department per source, written in the same
-- transaction as the page that changed the department, and only when what deptsync
-- normalizes changed (name, active, parent, scope, deleted or not; not the raw record).
--
-- A version holds over [valid_from, valid_to): valid_to is NULL while it is current, and
-- each department has at most one current version. valid_from is the vendor's own update
-- time where the API gives one (Mews UpdatedUtc, Snapbooks updated_at) and it lies after
-- the previous version's start and no later than the commit; otherwise (Procurify and the
-- data API give none, a deletion is seen, not dated) the time of the commit that saw the
-- change. The next version's valid_from closes the previous one.
--
-- commit_xid is the id of the transaction that wrote the version: the change feed reads
-- versions in its order, and only up to the oldest transaction still running, so that a
-- transaction that began earlier and committed later is never skipped (see
-- `deptsync changes`).
CREATE TABLE department_versions (
    version_id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Ids compare byte by byte, as in departments (see 20261122000005_byte_order_ids).
    source              text        COLLATE "C" NOT NULL,
    external_id         text        COLLATE "C" NOT NULL,
    scope_id            text        COLLATE "C",
    name                text        NOT NULL,
    is_active           boolean     NOT NULL,
    parent_external_id  text        COLLATE "C",
    deleted             boolean     NOT NULL,
    valid_from          timestamptz NOT NULL,
    valid_to            timestamptz,
    run_id              uuid,                   -- the run that wrote it; NULL at the upgrade
    observed_at         timestamptz NOT NULL,   -- when deptsync committed it
    commit_xid          bigint      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    CHECK (valid_to IS NULL OR valid_to >= valid_from)
);

-- At most one current version per department; how a page finds the one it closes.
CREATE UNIQUE INDEX department_versions_current_idx
    ON department_versions (source, external_id) WHERE valid_to IS NULL;
-- One department's timeline; a source as of a date.
CREATE INDEX department_versions_timeline_idx
    ON department_versions (source, external_id, valid_from);
-- The change feed, in the order of the writing transactions' ids.
CREATE INDEX department_versions_feed_idx ON department_versions (commit_xid, version_id);

-- What each department of every source was at `at`: its live versions then. A version
-- holds from valid_from up to, not including, valid_to.
CREATE FUNCTION departments_as_of(at timestamptz)
RETURNS TABLE (
    source              text,
    external_id         text,
    scope_id            text,
    name                text,
    is_active           boolean,
    parent_external_id  text,
    valid_from          timestamptz,
    valid_to            timestamptz
)
LANGUAGE sql STABLE
AS $$
    SELECT v.source, v.external_id, v.scope_id, v.name, v.is_active, v.parent_external_id,
           v.valid_from, v.valid_to
    FROM department_versions v
    WHERE v.valid_from <= at AND (v.valid_to IS NULL OR v.valid_to > at) AND NOT v.deleted
$$;
