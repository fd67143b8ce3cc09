-- readings on plain PostgreSQL: native range partitioning by time.
-- Partitions are created ahead by storage.partitions (and on demand for backfilled data).
CREATE TABLE readings (
    time           timestamptz NOT NULL,
    participant_id text NOT NULL,
    metric         text NOT NULL,
    value          double precision NOT NULL CHECK (value NOT IN ('NaN', 'Infinity', '-Infinity')),
    unit           text NOT NULL,
    device_id      text NOT NULL,
    seq            bigint NOT NULL,
    sensor         text NOT NULL,
    received_at    timestamptz NOT NULL,
    consent_id     bigint
) PARTITION BY RANGE (time);
CREATE INDEX readings_participant_metric_time ON readings (participant_id, metric, time DESC);
CREATE INDEX readings_device_seq ON readings (device_id, seq);
