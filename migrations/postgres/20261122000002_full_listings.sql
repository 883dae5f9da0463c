-- Full listings (Procurify, Snapbooks, the tenant data API): sources that can only list
-- everything, whose deletions are found by what a complete listing did not contain.

-- The listing in progress: the id its seen departments are recorded under, and the
-- cursor of its next page.
ALTER TABLE sync_state
    ADD COLUMN listing_id     uuid,
    ADD COLUMN listing_cursor text;

-- The departments each listing in progress has seen. Kept in the database (not in
-- memory) so that memory stays flat whatever the listing's size and an interrupted
-- listing can resume; kept apart from `departments` so that a pass where nothing changed
-- writes nothing there. Rows live only until their listing completes or is abandoned.
CREATE TABLE listing_seen (
    source      text NOT NULL,
    listing_id  uuid NOT NULL,
    external_id text NOT NULL,
    PRIMARY KEY (source, listing_id, external_id)
);
