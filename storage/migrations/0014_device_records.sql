-- Stored records of a wearable (a glucose meter's memory), by the key the hub gives each one
-- (protocol v2 `record`: the meter's sequence number and the record's time). A participant's
-- record is stored once: a second copy (a hub that asks the meter again after a restart, a
-- replacement hub reading the same meter) is refused as duplicate_record. A record may give
-- readings of several metrics (a measurement and its context): each is stored once.
CREATE TABLE device_records (
    participant_id text NOT NULL REFERENCES participants,
    sensor         text NOT NULL,
    record_key     text NOT NULL,
    metric         text NOT NULL,
    -- The envelope whose reading stored it.
    device_id      text NOT NULL,
    seq            bigint NOT NULL,
    PRIMARY KEY (participant_id, sensor, record_key, metric)
);
