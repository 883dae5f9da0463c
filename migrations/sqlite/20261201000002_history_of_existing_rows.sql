-- A database from before history gets a first version of every department at once: see
-- PostgreSQL's migration of the same name.
INSERT INTO department_versions (
    source, external_id, scope_id, name, is_active, parent_external_id, deleted,
    valid_from, valid_to, run_id, observed_at
)
SELECT source, external_id, scope_id, name, is_active, parent_external_id, 0,
       valid_from,
       CASE WHEN deleted_at IS NOT NULL THEN max(deleted_at, valid_from) END,
       NULL, first_synced_at
FROM (
    SELECT d.*,
           CASE WHEN d.source_updated_at <= d.last_changed_at THEN d.source_updated_at
                ELSE d.first_synced_at END AS valid_from
    FROM departments d
);

INSERT INTO department_versions (
    source, external_id, scope_id, name, is_active, parent_external_id, deleted,
    valid_from, valid_to, run_id, observed_at
)
SELECT source, external_id, scope_id, name, is_active, parent_external_id, 1,
       valid_to, NULL, NULL, valid_to
FROM department_versions
WHERE valid_to IS NOT NULL;
