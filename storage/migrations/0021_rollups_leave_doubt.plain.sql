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

-- The table is rebuilt from the readings (plain mode); what batches and withdrawals left to
-- merge is already in the readings, so it is cleared with it.
DELETE FROM rollup_deltas;
DELETE FROM rollup_invalidations;
DELETE FROM readings_1h;
INSERT INTO readings_1h (participant_id, metric, bucket, n, mean, min, max)
SELECT participant_id, metric, to_timestamp(floor(extract(epoch FROM time) / 3600) * 3600),
       count(*), avg(value), min(value), max(value)
FROM readings
WHERE NOT reading_in_doubt(flags)
GROUP BY 1, 2, 3;
