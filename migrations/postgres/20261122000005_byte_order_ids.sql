-- Ids are opaque: compare them byte by byte (collation "C"). That is what a vendor's id
-- means, and it is many times cheaper than the database's language-aware collation in the
-- indexes every page probes (the benchmark's profile showed strcoll on the hot path).
-- Names keep the database's collation, for people sorting them.
ALTER TABLE departments
    ALTER COLUMN source             TYPE text COLLATE "C",
    ALTER COLUMN external_id        TYPE text COLLATE "C",
    ALTER COLUMN scope_id           TYPE text COLLATE "C",
    ALTER COLUMN parent_external_id TYPE text COLLATE "C";

ALTER TABLE listing_seen
    ALTER COLUMN source      TYPE text COLLATE "C",
    ALTER COLUMN external_id TYPE text COLLATE "C";
