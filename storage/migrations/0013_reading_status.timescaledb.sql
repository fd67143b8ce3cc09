-- What the device said about each reading (protocol v2): its flags (ingest.flags is their
-- registry: invalid, questionable or information) and, on a wearable shared by several
-- people, the device's user index. Both are null for a reading the device said nothing about,
-- which is every reading of a v1 hub.
-- On a hypertable with compression, columns are added without constraints (TimescaleDB
-- refuses constraints there); the codec bounds both (at most 16 flags, a user of 0-255).
ALTER TABLE readings ADD COLUMN flags text[];
ALTER TABLE readings ADD COLUMN device_user smallint;

-- The participant's user index on a shared wearable, as the hub paired it: readings of the
-- wearable's other users are refused (other_user). Null: not shared, or a v1 hub.
ALTER TABLE sensors ADD COLUMN paired_user smallint CHECK (paired_user BETWEEN 0 AND 254);

-- Whether alert rules judge readings the device marked invalid or questionable. Off by
-- default: a value the device itself doubts should not page a monitor; the readings are
-- stored and shown all the same, and the alert pages count what was skipped.
ALTER TABLE studies ADD COLUMN alerts_on_doubtful boolean NOT NULL DEFAULT false;

-- How many readings each rule did not judge because the device doubted them, per participant.
ALTER TABLE alert_state ADD COLUMN doubtful_skipped bigint NOT NULL DEFAULT 0;
