-- The wearable a gap concerns (protocol v2): a strap out of range is not a cuff out of range.
-- Null for a gap of the whole hub (its clock, its outbox) and for every gap of a v1 hub.
ALTER TABLE gaps ADD COLUMN sensor text;
