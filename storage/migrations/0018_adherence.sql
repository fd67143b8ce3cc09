-- Adherence (docs/adherence.md): what the protocol expects each participant to collect, and
-- what arrived, per participant, metric and participant-local day.

-- A participant's arm of the study (null: the study has no arms, or none assigned yet).
ALTER TABLE participants
    ADD COLUMN arm text CHECK (arm ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$');

-- The protocol's schedule. A row applies to one metric from a local day on, for the whole
-- study (arm and participant null), an arm, or one participant (an override); for a given
-- participant, metric and day the most specific scope with a row in effect wins, and within
-- it the row with the latest effective_from. 'continuous': a stream expected at rate_hz for
-- wear_hours a day; 'spot': per_day measurements a day; 'none': nothing expected (an
-- override that exempts a participant or an arm).
CREATE TABLE collection_schedules (
    schedule_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    study_id       text NOT NULL REFERENCES studies,
    arm            text CHECK (arm ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$'),
    participant_id text REFERENCES participants,
    metric         text NOT NULL CHECK (metric ~ '^[a-z][a-z0-9_]{0,63}$'),
    effective_from date NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('continuous', 'spot', 'none')),
    rate_hz        double precision CHECK (rate_hz > 0 AND rate_hz <= 1000),
    wear_hours     double precision CHECK (wear_hours > 0 AND wear_hours <= 24),
    per_day        integer CHECK (per_day BETWEEN 1 AND 96),
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    recorded_by    text NOT NULL,
    CONSTRAINT collection_schedules_one_scope CHECK (arm IS NULL OR participant_id IS NULL),
    CONSTRAINT collection_schedules_kind_fields CHECK (
        CASE kind
            WHEN 'continuous' THEN rate_hz IS NOT NULL AND wear_hours IS NOT NULL AND per_day IS NULL
            WHEN 'spot' THEN per_day IS NOT NULL AND rate_hz IS NULL AND wear_hours IS NULL
            ELSE rate_hz IS NULL AND wear_hours IS NULL AND per_day IS NULL
        END),
    CONSTRAINT collection_schedules_unique
        UNIQUE NULLS NOT DISTINCT (study_id, arm, participant_id, metric, effective_from)
);

-- What each stored batch adds, written in the transaction that stores it (insert-only, so
-- concurrent batches never wait on each other): per participant, metric and 15-minute slot
-- (since the epoch; every UTC offset in use is a multiple of 15 minutes, so a slot lies in
-- one local day), the readings, those the device marked invalid, and a bitmap of the
-- slot's minutes that hold a usable reading. storage.adherence.refresh merges them.
CREATE TABLE adherence_deltas (
    participant_ids text[] NOT NULL,
    metrics         text[] NOT NULL,
    slots           bigint[] NOT NULL,
    readings        integer[] NOT NULL,
    invalid         integer[] NOT NULL,
    minutes         integer[] NOT NULL,
    CONSTRAINT adherence_deltas_aligned CHECK (
        cardinality(participant_ids) = cardinality(metrics)
        AND cardinality(metrics) = cardinality(slots)
        AND cardinality(slots) = cardinality(readings)
        AND cardinality(readings) = cardinality(invalid)
        AND cardinality(invalid) = cardinality(minutes))
);

CREATE TABLE adherence_slots (
    participant_id text NOT NULL,
    metric         text NOT NULL,
    slot           bigint NOT NULL,
    readings       integer NOT NULL,
    invalid        integer NOT NULL,
    minutes        integer NOT NULL CHECK (minutes BETWEEN 0 AND 32767),
    PRIMARY KEY (participant_id, metric, slot)
);

-- The slots summed by participant-local day (the zone valid at each slot's start).
CREATE TABLE adherence_days (
    participant_id text NOT NULL,
    metric         text NOT NULL,
    day            date NOT NULL,
    readings       integer NOT NULL,
    invalid        integer NOT NULL,
    worn_minutes   integer NOT NULL,
    computed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant_id, metric, day)
);
CREATE INDEX adherence_days_day ON adherence_days (day);

-- Participants whose days must be summed again from their slots (their time zone changed).
CREATE TABLE adherence_rebuilds (
    participant_id text PRIMARY KEY
);
