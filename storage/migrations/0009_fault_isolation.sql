-- Nothing an envelope claims may keep its refusal from being recorded.
--
-- The times a rejected envelope claimed, kept as it claimed them: milliseconds since the
-- epoch in an int8 store whatever the value, where a conversion to timestamptz of a hostile
-- one (the year 10946, 2^62 ms) fails and once stopped ingestion. first_time and last_time
-- stay for readers, filled only where the claimed time is one timestamptz can hold.
ALTER TABLE rejections ADD COLUMN first_ms bigint, ADD COLUMN last_ms bigint;
UPDATE rejections
   SET first_ms = (extract(epoch FROM first_time) * 1000)::bigint,
       last_ms = (extract(epoch FROM last_time) * 1000)::bigint;

-- How far back a hub may deliver data: readings, gaps and envelopes older than this before
-- their receipt are refused as implausible_time (a broken hub clock, not a late delivery).
ALTER TABLE studies
    ADD COLUMN backfill_days integer NOT NULL DEFAULT 365
        CHECK (backfill_days BETWEEN 1 AND 3650);

-- Messages whose handling failed for a reason that is neither a refusal of their content nor
-- an outage of the database (a fault in the gateway's own code, a message that keeps
-- killing a worker), counted by the SHA-256 of their bytes across restarts. A message
-- counted too often is acknowledged with a 'poison' rejection row: it can never hold a
-- worker again. A row is removed once its message is handled.
CREATE TABLE message_faults (
    envelope_sha256 bytea PRIMARY KEY,
    attempts        integer NOT NULL CHECK (attempts > 0),
    first_at        timestamptz NOT NULL DEFAULT now(),
    last_at         timestamptz NOT NULL DEFAULT now(),
    last_error      text
);
