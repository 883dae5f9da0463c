-- Rows deleted by hand: see PostgreSQL's migration of the same name. SQLite compares
-- every row of a listing (it keeps no page digests), so a row deleted or edited by hand
-- comes back with the next complete listing already; what this adds is history: the
-- deleted row's current version ends now, and a deleted version, from now and ended at
-- once, takes the feed's next number (deptsync never deletes a row itself).
CREATE TRIGGER departments_deleted_by_hand AFTER DELETE ON departments
BEGIN
    UPDATE feed_clock SET position = position + 1 WHERE OLD.deleted_at IS NULL;
    INSERT INTO department_history (
        source, external_id, scope_id, name, is_active, parent_external_id, deleted,
        valid_from, valid_to, observed_at, feed_position)
    SELECT OLD.source, OLD.external_id, OLD.scope_id, OLD.name, OLD.is_active,
           OLD.parent_external_id, OLD.deleted_at IS NOT NULL, started, max(started, at),
           COALESCE(OLD.version_observed_at, OLD.first_synced_at), OLD.version_position
    FROM (SELECT COALESCE(OLD.version_from,
                          CASE WHEN OLD.source_updated_at <= OLD.first_synced_at
                               THEN OLD.source_updated_at
                               ELSE OLD.first_synced_at END) AS started,
                 strftime('%Y-%m-%dT%H:%M:%S', 'now') || substr(strftime('%f', 'now'), 3)
                     || '000Z' AS at);
    INSERT INTO department_history (
        source, external_id, scope_id, name, is_active, parent_external_id, deleted,
        valid_from, valid_to, observed_at, feed_position)
    SELECT OLD.source, OLD.external_id, OLD.scope_id, OLD.name, OLD.is_active,
           OLD.parent_external_id, 1, valid_to, valid_to, valid_to,
           (SELECT position FROM feed_clock)
    FROM department_history
    WHERE history_id = last_insert_rowid() AND OLD.deleted_at IS NULL;
END;
