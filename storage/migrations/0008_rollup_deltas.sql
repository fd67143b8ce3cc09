-- What each stored batch adds to the hourly rollups, written in the transaction that stores
-- it: per participant, metric and hour, the batch's count, sum, minimum and maximum.
-- storage.views.refresh_rollups takes and clears them in plain mode and merges them into
-- readings_1h, so a refresh reads only what arrived since the last one (recomputing whole
-- hours from their readings, as it did for every stored batch, read each touched hour's
-- readings again every 30 seconds). Hours a withdrawal deleted readings from are still
-- marked in rollup_invalidations and recomputed. TimescaleDB keeps its own invalidation log
-- for the continuous aggregate; there this table is only cleared.
CREATE TABLE rollup_deltas (
    participant_ids text[] NOT NULL,
    metrics         text[] NOT NULL,
    hours           bigint[] NOT NULL, -- hours since 1970-01-01 00:00 UTC
    counts          bigint[] NOT NULL,
    sums            double precision[] NOT NULL,
    mins            double precision[] NOT NULL,
    maxs            double precision[] NOT NULL,
    CONSTRAINT rollup_deltas_aligned CHECK (
        cardinality(participant_ids) = cardinality(metrics)
        AND cardinality(metrics) = cardinality(hours)
        AND cardinality(hours) = cardinality(counts)
        AND cardinality(counts) = cardinality(sums)
        AND cardinality(sums) = cardinality(mins)
        AND cardinality(mins) = cardinality(maxs))
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialstream_app') THEN
        GRANT SELECT, INSERT, DELETE ON rollup_deltas TO trialstream_app;
    END IF;
END
$$;
