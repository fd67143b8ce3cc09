-- A participant's time zone, with its history: participants travel and move. Each row is a
-- zone (an IANA name PostgreSQL knows) from a time on; the view gives each its span. Local
-- days (SDTM daily summaries) and local times (pages, SDTM dates with their offset) are
-- computed from the zone valid at each reading's own time. A participant without a row is
-- on UTC.
CREATE TABLE participant_time_zones (
    participant_id text NOT NULL REFERENCES participants,
    valid_from     timestamptz NOT NULL,
    time_zone      text NOT NULL CHECK (time_zone ~ '^[A-Za-z][A-Za-z0-9_+/-]{0,63}$'),
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    recorded_by    text NOT NULL,
    PRIMARY KEY (participant_id, valid_from)
);

-- Each zone with the span of times it is valid for; the first also covers the times before
-- it (-infinity), as the zone the participant was enrolled in.
CREATE VIEW participant_time_zone_history AS
SELECT participant_id, time_zone, recorded_at, recorded_by, valid_from AS set_from,
       CASE WHEN lag(valid_from) OVER w IS NULL THEN '-infinity'::timestamptz
            ELSE valid_from END AS valid_from,
       coalesce(lead(valid_from) OVER w, 'infinity'::timestamptz) AS valid_to
FROM participant_time_zones
WINDOW w AS (PARTITION BY participant_id ORDER BY valid_from);
