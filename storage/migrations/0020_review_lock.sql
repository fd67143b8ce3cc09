-- Review and lock (docs/review.md).
--
-- A sign-off: an investigator or monitor signs that they reviewed a participant's data over
-- a period (an e-signature: re-authenticated, with its meaning). Data arriving later for that
-- period marks it outdated, and review_changes says what arrived, envelope by envelope.
CREATE TABLE review_signoffs (
    signoff_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    participant_id text NOT NULL REFERENCES participants,
    from_time      timestamptz NOT NULL,
    to_time        timestamptz NOT NULL,
    meaning        text NOT NULL CHECK (length(meaning) BETWEEN 1 AND 200),
    signer         text NOT NULL,
    signer_name    text NOT NULL,
    signer_role    text NOT NULL,
    signed_at      timestamptz NOT NULL DEFAULT now(),
    -- The readings of the period when it was signed.
    readings       bigint NOT NULL,
    outdated_at    timestamptz,
    CONSTRAINT review_signoffs_span CHECK (from_time < to_time)
);
CREATE INDEX review_signoffs_participant ON review_signoffs (participant_id, from_time);

CREATE TABLE review_changes (
    signoff_id  bigint NOT NULL REFERENCES review_signoffs,
    device_id   text NOT NULL,
    seq         bigint NOT NULL,
    readings    integer NOT NULL,
    first_time  timestamptz NOT NULL,
    last_time   timestamptz NOT NULL,
    -- When they were stored: on arrival, or when the lock that held them was lifted.
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX review_changes_signoff ON review_changes (signoff_id);

-- A lock: a study's period closed to new data (a database lock before an analysis). Late
-- readings for it are refused with their own reason (period_locked), or held for an unlock,
-- as the study says. An unlock is signed like the lock.
ALTER TABLE studies ADD COLUMN late_data_policy text NOT NULL DEFAULT 'refuse'
    CHECK (late_data_policy IN ('refuse', 'hold'));

CREATE TABLE period_locks (
    lock_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    study_id      text NOT NULL REFERENCES studies,
    from_time     timestamptz NOT NULL,
    to_time       timestamptz NOT NULL,
    reason        text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    locked_by     text NOT NULL,
    locked_at     timestamptz NOT NULL DEFAULT now(),
    unlocked_by   text,
    unlocked_at   timestamptz,
    unlock_reason text CHECK (length(unlock_reason) BETWEEN 1 AND 500),
    CONSTRAINT period_locks_span CHECK (from_time < to_time),
    CONSTRAINT period_locks_unlock CHECK (
        (unlocked_at IS NULL) = (unlocked_by IS NULL)
        AND (unlocked_at IS NULL) = (unlock_reason IS NULL))
);
CREATE INDEX period_locks_study ON period_locks (study_id) WHERE unlocked_at IS NULL;

-- Readings that arrived for a locked period of a study that holds late data: stored here,
-- not in readings, until the lock is lifted (then copied into readings, released_at set).
CREATE TABLE held_readings (
    lock_id        bigint NOT NULL REFERENCES period_locks,
    time           timestamptz NOT NULL,
    participant_id text NOT NULL,
    metric         text NOT NULL,
    value          double precision NOT NULL,
    unit           text NOT NULL,
    device_id      text NOT NULL,
    seq            bigint NOT NULL,
    sensor         text NOT NULL,
    received_at    timestamptz NOT NULL,
    consent_id     bigint,
    -- The reading's flags, comma-separated (codes never hold a comma).
    flags          text,
    device_user    smallint,
    released_at    timestamptz
);
CREATE INDEX held_readings_lock ON held_readings (lock_id) WHERE released_at IS NULL;
