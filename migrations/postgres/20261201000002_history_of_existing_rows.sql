-- A database from before history gets a first version of every department at once, by
-- the rule every version follows: from the vendor's update time where there is one (and
-- it is no later than the row's last change), else from when deptsync first stored it. A
-- deleted department gets its live version, closed when it was deleted, and a deleted
-- one from then.
INSERT INTO department_versions (
    source, external_id, scope_id, name, is_active, parent_external_id, deleted,
    valid_from, valid_to, run_id, observed_at
)
SELECT d.source, d.external_id, d.scope_id, d.name, d.is_active, d.parent_external_id,
       false, f.valid_from,
       CASE WHEN d.deleted_at IS NOT NULL THEN GREATEST(d.deleted_at, f.valid_from) END,
       NULL, d.first_synced_at
FROM departments d
CROSS JOIN LATERAL (
    SELECT CASE WHEN d.source_updated_at <= d.last_changed_at THEN d.source_updated_at
                ELSE d.first_synced_at END AS valid_from
) f;

INSERT INTO department_versions (
    source, external_id, scope_id, name, is_active, parent_external_id, deleted,
    valid_from, valid_to, run_id, observed_at
)
SELECT v.source, v.external_id, v.scope_id, v.name, v.is_active, v.parent_external_id,
       true, v.valid_to, NULL, NULL, v.valid_to
FROM department_versions v
WHERE v.valid_to IS NOT NULL;
