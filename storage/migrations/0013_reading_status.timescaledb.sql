-- What the device said about each reading (protocol v2): its flags (ingest.flags is their
-- registry: invalid, questionable or information) and, on a wearable shared by several
-- people, the device's user index. Both are null for a reading the device said nothing about,
-- which is every reading of a v1 hub.
-- The same CHECK constraints as in plain mode (same names). TimescaleDB accepts constraints
-- on columns added to a hypertable with compression enabled from 2.20 on, and enforces them
-- on rows written into compressed chunks; an older TimescaleDB refuses them, so there the
-- columns are added without, and the codec alone bounds them (at most 16 flags, a user of
-- 0-255).
DO $$
DECLARE
    version int[] := (SELECT (regexp_match(extversion, '^(\d+)\.(\d+)'))::int[]
                      FROM pg_extension WHERE extname = 'timescaledb');
BEGIN
    IF version >= ARRAY[2, 20] THEN
        ALTER TABLE readings
            ADD COLUMN flags text[] CONSTRAINT readings_flags_check
                CHECK (cardinality(flags) BETWEEN 1 AND 16),
            ADD COLUMN device_user smallint CONSTRAINT readings_device_user_check
                CHECK (device_user BETWEEN 0 AND 255);
    ELSE
        RAISE NOTICE 'TimescaleDB % refuses CHECK constraints on columns added to a compressed hypertable: readings.flags and readings.device_user are added without',
            array_to_string(version, '.');
        ALTER TABLE readings ADD COLUMN flags text[], ADD COLUMN device_user smallint;
    END IF;
END
$$;

-- The participant's user index on a shared wearable, as the hub paired it: readings of the
-- wearable's other users are refused (other_user). Null: not shared, or a v1 hub.
ALTER TABLE sensors ADD COLUMN paired_user smallint CHECK (paired_user BETWEEN 0 AND 254);

-- Whether alert rules judge readings the device marked invalid or questionable. Off by
-- default: a value the device itself doubts should not page a monitor; the readings are
-- stored and shown all the same, and the alert pages count what was skipped.
ALTER TABLE studies ADD COLUMN alerts_on_doubtful boolean NOT NULL DEFAULT false;

-- How many readings each rule did not judge because the device doubted them, per participant.
ALTER TABLE alert_state ADD COLUMN doubtful_skipped bigint NOT NULL DEFAULT 0;
