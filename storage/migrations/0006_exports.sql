-- Export jobs: exports asked for through the API run in the background; the requester polls
-- their state. The request is kept as asked; who asked is re-checked when the job runs.

CREATE TABLE export_jobs (
    job_id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind           text NOT NULL CHECK (kind IN ('parquet', 'fhir', 'sdtm')),
    study_id       text NOT NULL REFERENCES studies,
    participant_id text REFERENCES participants,
    from_time      timestamptz,
    to_time        timestamptz,
    requested_by   text NOT NULL,
    state          text NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued', 'running', 'done', 'failed')),
    submitted_at   timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    heartbeat_at   timestamptz,
    finished_at    timestamptz,
    rows_written   bigint NOT NULL DEFAULT 0 CHECK (rows_written >= 0),
    output_dir     text,
    -- [{"path", "sha256", "bytes", "rows"}] of a finished job.
    files          jsonb,
    error          text,
    CONSTRAINT export_jobs_window CHECK (from_time IS NULL OR to_time IS NULL OR from_time < to_time),
    CONSTRAINT export_jobs_done CHECK (state <> 'done' OR (files IS NOT NULL AND output_dir IS NOT NULL)),
    CONSTRAINT export_jobs_failed CHECK (state <> 'failed' OR error IS NOT NULL)
);
CREATE INDEX export_jobs_queued ON export_jobs (submitted_at) WHERE state = 'queued';
CREATE INDEX export_jobs_requester ON export_jobs (requested_by, submitted_at DESC);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialstream_app') THEN
        GRANT SELECT, INSERT, UPDATE ON export_jobs TO trialstream_app;
    END IF;
END
$$;
