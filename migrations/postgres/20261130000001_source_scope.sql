-- What a source's saved position is a position of: a fingerprint of the settings that
-- decide what the source reads (kind, base URL, the scopes it names, its start; never a
-- secret). A pass whose settings give another fingerprint drops the position and reads
-- again from `start` (or starts a new listing), and records when and why, for `status`.
-- Positions saved before this migration have none: their next pass reads from `start`
-- once, since nothing says which settings they were read with.
ALTER TABLE sync_state
    ADD COLUMN scope_fingerprint text,
    ADD COLUMN reset_at          timestamptz,
    ADD COLUMN reset_reason      text;
