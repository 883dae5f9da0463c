-- What PostgreSQL's migrations 20261122000005 to 20261122000007 changed, so that both
-- stores keep the same tables and columns (a test compares them):
-- - byte-order ids (0005) are SQLite's default BINARY collation already;
-- - content digests and trusted listing pages (0006, 0007) are PostgreSQL's speed-ups.
--   SQLite's store compares every row in full, which is what a NULL `content_md5` means,
--   and trusts no listing page: `listing_page_digests` stays empty and `trusted_listing`
--   NULL. (PostgreSQL keeps `listing_seen` as one row per page, `listing_seen_pages`,
--   behind a view of the same name and columns as this table.)
-- The first migration calls `raw` "the record exactly as received": SQLite keeps it as
-- serde_json writes it (keys in order, no spaces), the same JSON value.
ALTER TABLE departments ADD COLUMN content_md5 BLOB;

CREATE TABLE listing_page_digests (
    source     TEXT NOT NULL,
    listing_id TEXT NOT NULL,
    page_md5   BLOB NOT NULL,
    PRIMARY KEY (source, page_md5, listing_id)
);

ALTER TABLE sync_state ADD COLUMN listing_rewrote INTEGER NOT NULL DEFAULT 0
    CHECK (listing_rewrote IN (0, 1));
ALTER TABLE sync_state ADD COLUMN trusted_listing TEXT;
