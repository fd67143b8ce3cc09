-- readings on TimescaleDB: a hypertable, compressed by participant and metric.
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
);
SELECT create_hypertable('readings', by_range('time', INTERVAL '7 days'));
CREATE INDEX readings_participant_metric_time ON readings (participant_id, metric, time DESC);
CREATE INDEX readings_device_seq ON readings (device_id, seq);
ALTER TABLE readings SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'participant_id, metric',
    timescaledb.compress_orderby = 'time DESC'
);
-- Compress chunks once no late data is expected for them (hubs backfill up to days).
SELECT add_compression_policy('readings', INTERVAL '14 days');
