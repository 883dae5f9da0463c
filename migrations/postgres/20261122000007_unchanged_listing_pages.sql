-- A page of a full listing that is exactly as the last complete listing saw it costs one
-- digest lookup, not one index lookup per row (the benchmark's second Procurify pass).

-- One row per page of a listing whose departments are all stored as the page has them:
-- a digest of its ids and their contents. A complete listing's pages are trusted by the
-- next listing, and every other listing's rows are deleted when it completes; an
-- abandoned listing leaves no page trusted. A page whose digest the trusted listing has
-- is not looked up row by row.
CREATE TABLE listing_page_digests (
    source     text COLLATE "C" NOT NULL,
    listing_id uuid  NOT NULL,
    page_md5   bytea NOT NULL,
    PRIMARY KEY (source, page_md5, listing_id)
);

-- Whether the listing in progress has rewritten a stored department. One that rewrote
-- none cannot have met the same id twice with different contents, so its digests are
-- trusted without checking its ids for repeats; one that did trusts no page after that.
ALTER TABLE sync_state ADD COLUMN listing_rewrote boolean NOT NULL DEFAULT false;

-- The complete listing whose page digests the next listing trusts (NULL: none).
ALTER TABLE sync_state ADD COLUMN trusted_listing uuid;
