-- The change feed's identity and what it has handed out, so that a token is read on from
-- only by the feed that handed it out, and only while every version it stands past is
-- still there.
--
-- feed_identity: one row. A token carries feed_id. A copy of the database (a dump
-- restored into another database, or over this one; a physical copy promoted on another
-- timeline) carries the row too, so the row also says where it was made: the database's
-- oid, this table's own oid (a restore creates the table anew) and the cluster's timeline.
-- When a reader finds them otherwise, the database is a copy: the feed takes a new id and
-- every older token is refused. handed_out is the highest horizon handed out, written in
-- the reader's own transaction, committed durably (synchronous_commit = on) before the
-- token is given: every version before it, and every transaction id, is then on disk, so
-- a crash can never leave a token ahead of the feed, whose ids the recovered server
-- would hand out again.
CREATE TABLE feed_identity (
    only_row      boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    feed_id       uuid    NOT NULL,
    database_oid  oid     NOT NULL,
    table_oid     oid     NOT NULL,
    timeline      integer NOT NULL,
    handed_out    bigint  NOT NULL DEFAULT 0
);
INSERT INTO feed_identity (feed_id, database_oid, table_oid, timeline)
SELECT gen_random_uuid(), d.oid, 'feed_identity'::regclass, c.timeline_id
FROM pg_database d, pg_control_checkpoint() c
WHERE d.datname = current_database();

-- What a retention trimmed: per source, the highest feed position of a version it
-- deleted. A reader whose token is not past it would miss versions, and is refused.
CREATE TABLE history_trimmed (
    source    text   COLLATE "C" PRIMARY KEY,
    position  bigint NOT NULL
);
