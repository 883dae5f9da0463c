-- When a department last became live again: set when a listing revives it after a
-- deletion (NULL: live since its first sync). The mass-deletion guard's base is the rows
-- live before a listing began; a revived row's first_synced_at may be years old, and
-- counting it there let the departments a listing revived dilute the guard: a vendor that
-- flaps between two tenants behind one URL would have each deleted in turn.
ALTER TABLE departments ADD COLUMN live_since timestamptz;
