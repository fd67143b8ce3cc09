-- The signed originals: every accepted envelope's bytes as received (COSE_Sign1, signature
-- and all), compressed, so that each stored reading can be checked against what the hub
-- signed (`trialstream audit verify-readings`). Written in the transaction that stores the
-- envelope. A study may keep them for a set time (studies.originals_retention_days; null:
-- as long as the envelope row); `audit prune-originals` removes the older ones. Under a
-- withdrawal with the delete policy, the originals of envelopes whose readings are deleted
-- go with them: an original holds those readings' values.
CREATE TABLE envelope_originals (
    device_id   text NOT NULL,
    seq         bigint NOT NULL,
    received_at timestamptz NOT NULL,
    codec       text NOT NULL CHECK (codec IN ('zlib')),
    size        integer NOT NULL CHECK (size > 0),
    original    bytea NOT NULL,
    PRIMARY KEY (device_id, seq),
    FOREIGN KEY (device_id, seq) REFERENCES envelopes ON DELETE CASCADE
);
CREATE INDEX envelope_originals_received ON envelope_originals (received_at);

ALTER TABLE studies ADD COLUMN originals_retention_days integer
    CHECK (originals_retention_days > 0);
