-- Rows repaired by hand: an operator deletes or edits rows of departments with SQL. The
-- next complete listing must give them back as the vendor has them, and the change feed
-- must say what happened; before this, a page exactly as the trusted listing saw it was
-- skipped by its digest, and a row deleted by hand stayed missing until that page changed
-- upstream (SQLite, which compares every row, gave it back at once).
--
-- deptsync's own writes of departments are a pass's page transactions, which say so
-- (SET LOCAL deptsync.writer = 'pass'); any other change is by hand. deptsync never
-- deletes a row (a listing marks deleted_at), so every DELETE is by hand.

-- An edited row's digest no longer tells what is stored: the next listing compares it.
CREATE FUNCTION departments_edited_by_hand() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.content_md5 := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER departments_edited_by_hand BEFORE UPDATE ON departments
FOR EACH ROW WHEN (current_setting('deptsync.writer', true) IS DISTINCT FROM 'pass')
EXECUTE FUNCTION departments_edited_by_hand();

-- A source changed by hand trusts no page digest until a listing has compared every row
-- again. The lease's row is locked first, so a page of the source being committed (which
-- holds it) is waited for and cannot trust a digest this change makes wrong.
--
-- A row deleted by hand ends its current version, as a listing's deletion would: the
-- version goes to department_history, ending now, and a deleted version, from now and
-- ended at once (no row holds the department any more), is written at this transaction's
-- place in the change feed, so that a reader learns of the deletion. When the department
-- comes back, its row starts anew.
CREATE FUNCTION departments_changed_by_hand() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    started timestamptz;
    ended timestamptz;
BEGIN
    PERFORM 1 FROM source_leases WHERE source = OLD.source FOR SHARE;
    DELETE FROM listing_page_digests WHERE source = OLD.source;
    IF TG_OP <> 'DELETE' THEN
        RETURN NULL;
    END IF;
    started := COALESCE(OLD.version_from,
        CASE WHEN OLD.source_updated_at <= OLD.first_synced_at THEN OLD.source_updated_at
             ELSE OLD.first_synced_at END);
    ended := GREATEST(now(), started);
    INSERT INTO department_history (
        source, external_id, scope_id, name, is_active, parent_external_id, deleted,
        valid_from, valid_to, observed_at, feed_position)
    VALUES (
        OLD.source, OLD.external_id, OLD.scope_id, OLD.name, OLD.is_active,
        OLD.parent_external_id, OLD.deleted_at IS NOT NULL, started, ended,
        COALESCE(OLD.version_observed_at, OLD.first_synced_at), OLD.version_position);
    IF OLD.deleted_at IS NULL THEN
        INSERT INTO department_history (
            source, external_id, scope_id, name, is_active, parent_external_id, deleted,
            valid_from, valid_to, observed_at, feed_position)
        VALUES (
            OLD.source, OLD.external_id, OLD.scope_id, OLD.name, OLD.is_active,
            OLD.parent_external_id, true, ended, ended, now(),
            pg_current_xact_id()::text::bigint);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER departments_changed_by_hand AFTER UPDATE OR DELETE ON departments
FOR EACH ROW WHEN (current_setting('deptsync.writer', true) IS DISTINCT FROM 'pass')
EXECUTE FUNCTION departments_changed_by_hand();

-- TRUNCATE fires no row trigger: it at least leaves no page digest trusted. (It writes
-- no history either; the README says to DELETE.)
CREATE FUNCTION departments_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM listing_page_digests;
    RETURN NULL;
END
$$;

CREATE TRIGGER departments_truncated AFTER TRUNCATE ON departments
FOR EACH STATEMENT EXECUTE FUNCTION departments_truncated();
