-- Leases and the fleet's schedule: see PostgreSQL's migration of the same name.
CREATE TABLE source_leases (
    source       TEXT    PRIMARY KEY,
    holder       TEXT,
    fence        INTEGER NOT NULL DEFAULT 0,
    expires_ms   INTEGER,
    schedule     TEXT,
    next_due_ms  INTEGER,
    serving_ms   INTEGER,
    failures     INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX source_leases_due_idx ON source_leases (next_due_ms);

CREATE TABLE replicas (
    holder      TEXT    PRIMARY KEY,
    started_ms  INTEGER NOT NULL,
    seen_ms     INTEGER NOT NULL
);

ALTER TABLE sync_runs ADD COLUMN holder TEXT;
ALTER TABLE sync_runs ADD COLUMN fence INTEGER;
ALTER TABLE sync_runs ADD COLUMN due_at TEXT;
