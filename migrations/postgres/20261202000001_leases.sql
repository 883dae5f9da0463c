-- Leases and the fleet's schedule (see src/store/lease.rs). One row per source that a
-- service schedules or a command leased. Instants here are the database's clock in
-- milliseconds since the epoch, so that every replica reads one clock, and both stores
-- say the lease's statements with one text.
CREATE TABLE source_leases (
    source       text    PRIMARY KEY,
    -- The process that holds the lease (`host:pid:id`), NULL when free.
    holder       text,
    -- Incremented by every new holder: a page commits only while its holder's fence is
    -- still this one.
    fence        bigint  NOT NULL DEFAULT 0,
    -- When the lease lapses unless renewed (a pass renews it with every page and every
    -- third of its time to live).
    expires_ms   bigint,
    -- The schedule `next_due_ms` was computed from, and when the fleet runs the source
    -- next (NULL: no service schedules it).
    schedule     text,
    next_due_ms  bigint,
    -- The firing the holder's pass serves (NULL for a manual sync's lease).
    serving_ms   bigint,
    -- Passes failed in a row: a failing source's next passes back off.
    failures     bigint  NOT NULL DEFAULT 0
);

CREATE INDEX source_leases_due_idx ON source_leases (next_due_ms);

-- The service processes (replicas) alive: each writes its row whenever it looks for
-- due sources, so that each takes its share of them.
CREATE TABLE replicas (
    holder      text   PRIMARY KEY,
    started_ms  bigint NOT NULL,
    seen_ms     bigint NOT NULL
);

-- Which process ran each pass, under which fence, and the firing of its source's
-- schedule it served (NULL for a manual sync).
ALTER TABLE sync_runs ADD COLUMN holder text;
ALTER TABLE sync_runs ADD COLUMN fence bigint;
ALTER TABLE sync_runs ADD COLUMN due_at timestamptz;
