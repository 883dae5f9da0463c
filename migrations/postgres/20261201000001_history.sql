-- History: every version of every department, and a change feed over them.
--
-- A version is what deptsync normalizes (scope, name, active, parent, deleted or not) over
-- [valid_from, valid_to). The current version of a department is its row in departments
-- (the version_* columns say when it started, which transaction wrote it, and when it was
-- committed); a department's earlier versions are rows of department_history, each
-- written by the database when an update of departments changes what a version holds (the
-- trigger below), in the same transaction. A new department costs no row but its own: a
-- first sync writes what it wrote before. department_versions shows both as one table.
--
-- When a version starts: the vendor's own update time where the API gives one (Mews
-- UpdatedUtc, Snapbooks updated_at), if it lies after the previous version's start and no
-- later than the commit; otherwise (Procurify and the data API give none, a deletion is
-- seen rather than dated) the time of the commit that saw the change, never before the
-- previous version's start.
--
-- feed_position is the id of the transaction that wrote the version: the change feed reads
-- versions in its order, and only below the oldest transaction still running, so that a
-- transaction that began earlier and committed later is never skipped.

-- The current version of each department. version_from NULL: its first version, from the
-- vendor's update time (when no later than its first sync) or its first sync.
ALTER TABLE departments
    ADD COLUMN version_from        timestamptz,
    ADD COLUMN version_position    bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    ADD COLUMN version_observed_at timestamptz;

-- The change feed's order of current versions.
CREATE INDEX departments_version_position_idx ON departments (version_position);

-- The versions that ended.
CREATE TABLE department_history (
    history_id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Ids compare byte by byte, as in departments (see 20261122000005_byte_order_ids).
    source              text        COLLATE "C" NOT NULL,
    external_id         text        COLLATE "C" NOT NULL,
    scope_id            text        COLLATE "C",
    name                text        NOT NULL,
    is_active           boolean     NOT NULL,
    parent_external_id  text        COLLATE "C",
    deleted             boolean     NOT NULL,
    valid_from          timestamptz NOT NULL,
    valid_to            timestamptz NOT NULL,
    observed_at         timestamptz NOT NULL,   -- when deptsync committed it (the upgrade's, for
                                                -- versions from before history)
    feed_position       bigint      NOT NULL,   -- the transaction that wrote it
    CHECK (valid_to >= valid_from)
);
-- One department's timeline; a source as of a date.
CREATE INDEX department_history_timeline_idx
    ON department_history (source, external_id, valid_from);
-- The change feed.
CREATE INDEX department_history_feed_idx
    ON department_history (feed_position, source, external_id, history_id);

-- Every version: the ended ones and the current ones. run_id is the run that wrote it:
-- the source's run under way when it was committed (a source's runs never overlap; the
-- comparison in sync_runs' collation, so that its index serves it). feed_seq orders the
-- versions of one department that one transaction wrote (an upgrade writes two for a
-- deleted department): the ended ones in their order, the current one last.
CREATE VIEW department_versions AS
SELECT v.*,
       (SELECT r.run_id FROM sync_runs r
        WHERE r.source = v.source COLLATE "default" AND r.started_at <= v.observed_at
        ORDER BY r.started_at DESC LIMIT 1) AS run_id
FROM (
    SELECT source, external_id, scope_id, name, is_active, parent_external_id, deleted,
           valid_from, valid_to, observed_at, feed_position, history_id AS feed_seq
    FROM department_history
    UNION ALL
    SELECT source, external_id, scope_id, name, is_active, parent_external_id,
           deleted_at IS NOT NULL,
           COALESCE(version_from,
                    CASE WHEN source_updated_at <= first_synced_at THEN source_updated_at
                         ELSE first_synced_at END),
           NULL, COALESCE(version_observed_at, first_synced_at), version_position,
           9223372036854775807
    FROM departments
) v;

-- Closes the current version of a department whose update changes what a version holds:
-- the old one goes to department_history, ending where the new one starts.
CREATE FUNCTION departments_new_version() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    started timestamptz := COALESCE(OLD.version_from,
        CASE WHEN OLD.source_updated_at <= OLD.first_synced_at THEN OLD.source_updated_at
             ELSE OLD.first_synced_at END);
    starts timestamptz;
BEGIN
    -- A first version's start depends on the vendor's update time, which the next update
    -- may move: it is kept as it was.
    IF OLD.version_from IS NULL THEN
        NEW.version_from := started;
    END IF;
    IF (OLD.scope_id, OLD.name, OLD.is_active, OLD.parent_external_id, OLD.deleted_at IS NULL)
       IS NOT DISTINCT FROM
       (NEW.scope_id, NEW.name, NEW.is_active, NEW.parent_external_id, NEW.deleted_at IS NULL)
    THEN
        RETURN NEW;   -- the same version
    END IF;
    starts := CASE
        WHEN NEW.deleted_at IS NULL AND NEW.source_updated_at > started
             AND NEW.source_updated_at <= now() THEN NEW.source_updated_at
        WHEN now() > started THEN now()
        ELSE started END;
    INSERT INTO department_history (
        source, external_id, scope_id, name, is_active, parent_external_id, deleted,
        valid_from, valid_to, observed_at, feed_position)
    VALUES (
        OLD.source, OLD.external_id, OLD.scope_id, OLD.name, OLD.is_active,
        OLD.parent_external_id, OLD.deleted_at IS NOT NULL, started, starts,
        COALESCE(OLD.version_observed_at, OLD.first_synced_at), OLD.version_position);
    NEW.version_from := starts;
    NEW.version_position := pg_current_xact_id()::text::bigint;
    NEW.version_observed_at := now();
    PERFORM set_config('deptsync.versions',
        (COALESCE(NULLIF(current_setting('deptsync.versions', true), ''), '0')::bigint + 1)::text,
        true);
    RETURN NEW;
END
$$;

CREATE TRIGGER departments_new_version BEFORE UPDATE ON departments
FOR EACH ROW EXECUTE FUNCTION departments_new_version();

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

-- A database from before history starts it at once: the current version of each
-- department from the vendor's update time where there is one (and it is no later than
-- the row's last change), else from when deptsync first stored it; a deleted department's
-- current version is deleted from when it was, after a live one.
INSERT INTO department_history (
    source, external_id, scope_id, name, is_active, parent_external_id, deleted,
    valid_from, valid_to, observed_at, feed_position)
SELECT source, external_id, scope_id, name, is_active, parent_external_id, false,
       LEAST(f.valid_from, deleted_at), deleted_at,
       -- Written now, as far as the change feed and a retention are concerned: no reader
       -- has had it yet.
       now(), version_position
FROM departments
CROSS JOIN LATERAL (
    SELECT CASE WHEN source_updated_at <= last_changed_at THEN source_updated_at
                ELSE first_synced_at END AS valid_from
) f
WHERE deleted_at IS NOT NULL;

ALTER TABLE departments DISABLE TRIGGER departments_new_version;
UPDATE departments
SET version_from = CASE WHEN deleted_at IS NOT NULL THEN deleted_at
                        WHEN source_updated_at <= last_changed_at THEN source_updated_at
                        ELSE first_synced_at END,
    version_observed_at = COALESCE(deleted_at, first_synced_at);
ALTER TABLE departments ENABLE TRIGGER departments_new_version;
