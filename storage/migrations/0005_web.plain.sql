-- People on the web: sign-in sessions, and the hourly rollups the pages read (plain mode:
-- a summary table that storage.views.refresh_rollups keeps up to date incrementally).

-- A session is known by the SHA-256 of its cookie token: the database never holds a token
-- that would let its reader sign in.
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

-- Hourly statistics per participant and metric (the pages' "last days").
CREATE TABLE readings_1h (
    participant_id text NOT NULL,
    metric         text NOT NULL,
    bucket         timestamptz NOT NULL,
    n              bigint NOT NULL,
    mean           double precision NOT NULL,
    min            double precision NOT NULL,
    max            double precision NOT NULL,
    PRIMARY KEY (participant_id, metric, bucket)
);

-- How far refresh_rollups has read the envelopes, by their received_at.
CREATE TABLE rollup_progress (
    name           text PRIMARY KEY,
    received_until timestamptz NOT NULL
);
INSERT INTO rollup_progress (name, received_until) VALUES ('readings_1h', '1970-01-01 00:00:00+00');

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialstream_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON web_sessions, readings_1h, rollup_progress
            TO trialstream_app;
    END IF;
END
$$;
