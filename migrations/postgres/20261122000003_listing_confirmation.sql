-- A department is deleted only when missing from two complete listings in a row: page
-- numbers shift when records come and go while a listing is read, and one listing alone
-- cannot prove a department gone.
ALTER TABLE sync_state
    -- The complete listing whose missing departments a second listing must confirm.
    ADD COLUMN listing_confirms   uuid,
    -- When the first listing of the chain began: the mass-deletion guard compares with the
    -- rows live then, not with rows the listing itself added.
    ADD COLUMN listing_started_at timestamptz;
