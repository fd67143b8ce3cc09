-- Hourly rollups leave out the readings the device put in doubt, as alert rules and the
-- daily summaries already do: an hour's mean, minimum and maximum on a chart are those of
-- the readings the device stood by. The doubted readings are still stored, shown and
-- exported one by one.

-- Whether the device put a reading in doubt: one of its flags is of class invalid or
-- questionable (ingest/flags.py IN_DOUBT; tests/storage/test_rollups_doubt.py keeps the two
-- the same: a flag added there needs a migration that replaces this function).
CREATE FUNCTION reading_in_doubt(flags text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(flags && ARRAY[
        'body_movement', 'calibration_ongoing', 'cuff_loose', 'demonstration',
        'early_estimate', 'equipment_malfunction', 'erratic_signal', 'general_device_fault',
        'improper_position', 'inadequate_signal', 'intermediate', 'invalid_measurement',
        'low_perfusion', 'measurement_ongoing', 'measurement_unavailable', 'no_sensor_contact',
        'nonpulsatile_signal', 'poor_signal', 'questionable_measurement', 'questionable_pulse',
        'read_interrupted', 'sample_size_insufficient', 'sensor_disconnected', 'sensor_displaced',
        'sensor_interference', 'sensor_malfunction', 'sensor_unconnected_to_user',
        'signal_processing_irregularity', 'strip_insertion_error', 'strip_type_incorrect',
        'temperature_too_high', 'temperature_too_low', 'testing', 'unknown_sensor'
    ]::text[], false);

-- A continuous aggregate's query cannot be altered: it is made again, with the same policy.
-- Until the policy has materialised it, real-time aggregation answers from the readings.
DROP MATERIALIZED VIEW readings_1h;

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
WHERE NOT reading_in_doubt(flags)
GROUP BY participant_id, metric, time_bucket(INTERVAL '1 hour', time)
WITH NO DATA;

SELECT add_continuous_aggregate_policy('readings_1h',
    start_offset => INTERVAL '7 days',
    end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '10 minutes');

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialstream_app') THEN
        GRANT SELECT ON readings_1h TO trialstream_app;
    END IF;
END
$$;
