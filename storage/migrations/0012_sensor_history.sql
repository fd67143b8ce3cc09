-- Sensor provenance over time. `sensors` holds one row per wearable, overwritten by each
-- report (battery, last seen); a replaced strap must not rewrite the provenance of the
-- readings taken before it, so every change of a wearable's description is kept here, from
-- the time the hub reported it. Readings are joined to the description valid at their own
-- time through the view `sensor_history` (docs/storage.md).

CREATE TABLE sensor_descriptions (
    description_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id      text NOT NULL REFERENCES devices,
    sensor         text NOT NULL,
    -- When the hub reported it: the sealing time of the envelope that carried the report (a
    -- report carries no time of its own). Rows migrated from `sensors` have its first_seen.
    reported_at    timestamptz NOT NULL,
    -- The envelope that carried it; null for rows migrated from `sensors`.
    seq            bigint,
    manufacturer   text,
    model          text,
    serial         text,
    firmware       text,
    hardware       text,
    recorded_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sensor_descriptions_sensor ON sensor_descriptions (device_id, sensor, reported_at);

-- What `sensors` held becomes the first description of each wearable.
INSERT INTO sensor_descriptions (device_id, sensor, reported_at, manufacturer, model, serial,
                                 firmware, hardware, recorded_at)
SELECT device_id, sensor, first_seen, manufacturer, model, serial, firmware, hardware, last_seen
FROM sensors
WHERE num_nonnulls(manufacturer, model, serial, firmware, hardware) > 0;

-- Each description with the span of reading times it describes: from its report to the next
-- report of the same wearable. The first description of a wearable also covers the readings
-- before it (valid_from -infinity): a hub reports a wearable once connected, so the readings
-- sealed with or before that first report can only have come from the wearable it describes.
CREATE VIEW sensor_history AS
SELECT description_id, device_id, sensor, reported_at, seq,
       CASE WHEN lag(description_id) OVER w IS NULL THEN '-infinity'::timestamptz
            ELSE reported_at END AS valid_from,
       coalesce(lead(reported_at) OVER w, 'infinity'::timestamptz) AS valid_to,
       manufacturer, model, serial, firmware, hardware
FROM sensor_descriptions
WINDOW w AS (PARTITION BY device_id, sensor ORDER BY reported_at, description_id);
