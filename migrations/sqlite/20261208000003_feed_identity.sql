-- The change feed's identity and what it has handed out: see PostgreSQL's migration of
-- the same name. A reader's transaction commits with synchronous = FULL, which syncs the
-- whole write-ahead log to disk, the pages' commits before it included.
CREATE TABLE feed_identity (
    only_row    INTEGER PRIMARY KEY CHECK (only_row = 1),
    feed_id     TEXT    NOT NULL,
    handed_out  INTEGER NOT NULL DEFAULT 0
);
-- A version 4 uuid from SQLite's random bytes.
INSERT INTO feed_identity (only_row, feed_id)
SELECT 1, lower(substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3) || '-'
               || substr('89ab', 1 + (abs(random()) % 4), 1) || substr(h, 18, 3) || '-'
               || substr(h, 21, 12))
FROM (SELECT hex(randomblob(16)) AS h);

CREATE TABLE history_trimmed (
    source    TEXT    PRIMARY KEY,
    position  INTEGER NOT NULL
);
