-- The change feed's identity and what it has handed out, so that a token is read on from
-- only by the feed that handed it out, and only while every version it stands past is
-- still there.
--
-- feed_identity: one row. A token carries feed_id. A copy of the database (a dump
-- restored into another database, or over this one, on this server or another; a
-- physical copy promoted on a new timeline) carries the row too, so the row also says
-- where it was made: the cluster's system identifier, the database's oid and the
-- timeline of the WAL being written (feed_home()), and this table's own oid, which a
-- restore makes anew (the row's tableoid). When a reader finds them otherwise, the database is a copy: the feed takes a
-- new id and every older token is refused. handed_out is the highest horizon handed out,
-- written in the reader's own transaction, committed durably (synchronous_commit = on)
-- before the token is given: every version before it, and every transaction id, is then
-- on disk, so a crash can never leave a token ahead of the feed, whose ids the recovered
-- server would hand out again.
CREATE TABLE feed_identity (
    only_row           boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    feed_id            uuid    NOT NULL,
    system_identifier  bigint  NOT NULL,
    database_oid       oid     NOT NULL,
    table_oid          oid     NOT NULL,
    timeline           integer NOT NULL,
    handed_out         bigint  NOT NULL DEFAULT 0
);
CREATE FUNCTION feed_home(
    OUT system_identifier bigint, OUT database_oid oid, OUT timeline integer)
LANGUAGE sql STABLE AS $$
    SELECT s.system_identifier, d.oid,
           ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::integer
    FROM pg_control_system() s, pg_database d
    WHERE d.datname = current_database()
$$;

INSERT INTO feed_identity (feed_id, system_identifier, database_oid, table_oid, timeline)
SELECT gen_random_uuid(), h.system_identifier, h.database_oid,
       'feed_identity'::regclass, h.timeline
FROM feed_home() h;

-- What a retention trimmed: per source, the highest feed position of a version it
-- deleted. A reader whose token is not past it would miss versions, and is refused.
CREATE TABLE history_trimmed (
    source    text   COLLATE "C" PRIMARY KEY,
    position  bigint NOT NULL
);
