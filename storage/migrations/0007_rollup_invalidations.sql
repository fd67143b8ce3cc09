-- The hours whose rollups must be recomputed, written in the same transaction as what
-- changed them: one row per stored batch (its participants, metrics and hours) and one per
-- withdrawal that deleted readings. storage.views.refresh_rollups takes and clears them in
-- plain mode. Being transactional, it misses no batch, however late it commits, and reads
-- no readings but those of the hours it recomputes (the received_at scan it replaces read
-- every reading received in the last five minutes, every 30 seconds). TimescaleDB keeps its
-- own invalidation log for the continuous aggregate; there this table is only cleared.
CREATE TABLE rollup_invalidations (
    participant_ids text[] NOT NULL,
    metrics         text[] NOT NULL,
    hours           bigint[] NOT NULL, -- hours since 1970-01-01 00:00 UTC
    CONSTRAINT rollup_invalidations_aligned CHECK (
        cardinality(participant_ids) = cardinality(metrics)
        AND cardinality(metrics) = cardinality(hours))
);

-- What the last refresh by received_at may not have reached: recomputed by the next one.
INSERT INTO rollup_invalidations (participant_ids, metrics, hours)
SELECT array_agg(participant_id), array_agg(metric), array_agg(h)
FROM (
    SELECT DISTINCT r.participant_id, r.metric, floor(extract(epoch FROM r.time) / 3600)::bigint AS h
    FROM envelopes e JOIN readings r ON (r.device_id, r.seq) = (e.device_id, e.seq)
    WHERE e.received_at > (SELECT received_until FROM rollup_progress WHERE name = 'readings_1h')
        - interval '5 minutes'
) touched
HAVING count(*) > 0;

DROP TABLE rollup_progress;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialstream_app') THEN
        GRANT SELECT, INSERT, DELETE ON rollup_invalidations TO trialstream_app;
    END IF;
END
$$;
