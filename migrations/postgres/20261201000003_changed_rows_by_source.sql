-- A page's commit finds the departments it changed (to write their versions) by its
-- instant and its source: one index holding both, rather than one of them and a scan. The
-- instant first, so that "what changed since T" keeps its index.
DROP INDEX departments_last_changed_idx;
CREATE INDEX departments_last_changed_idx ON departments (last_changed_at, source);
