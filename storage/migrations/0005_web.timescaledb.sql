-- People on the web: sign-in sessions, and the hourly rollups the pages read (TimescaleDB:
-- a continuous aggregate with real-time aggregation, refreshed by a policy).

CREATE TABLE web_sessions (
    token_sha256 bytea PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users,
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    idle_expires_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    ended_at     timestamptz,
    ended_reason text
);
CREATE INDEX web_sessions_user ON web_sessions (user_id) WHERE ended_at IS NULL;

CREATE MATERIALIZED VIEW readings_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT participant_id,
       metric,
       time_bucket(INTERVAL '1 hour', time) AS bucket,
       count(*) AS n,
       avg(value) AS mean,
       min(value) AS min,
       max(value) AS max
FROM readings
GROUP BY participant_id, metric, time_bucket(INTERVAL '1 hour', time)
WITH NO DATA;

-- Hubs backfill up to days: keep re-materialising the last week, every 10 minutes; the
-- newest hours come from real-time aggregation.
SELECT add_continuous_aggregate_policy('readings_1h',
    start_offset => INTERVAL '7 days',
    end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '10 minutes');

-- Kept for the same shape in both modes; TimescaleDB's policy does the work here.
CREATE TABLE rollup_progress (
    name           text PRIMARY KEY,
    received_until timestamptz NOT NULL
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialstream_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON web_sessions, rollup_progress TO trialstream_app;
        GRANT SELECT ON readings_1h TO trialstream_app;
    END IF;
END
$$;
