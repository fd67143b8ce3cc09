-- Alerts: rule definitions completed, what each rule knows per participant, the alert
-- lifecycle's columns, an append-only feed of alert events, and an outbox for MQTT.

-- How long an alert may stay unacknowledged before it escalates (NULL: never), per study;
-- a rule's own escalate_after_s wins over it.
ALTER TABLE studies ADD COLUMN alert_escalation_s integer CHECK (alert_escalation_s > 0);

ALTER TABLE alert_rules
    -- Neighbouring breaching readings further apart than this break a sustained condition.
    ADD COLUMN max_gap_s integer NOT NULL DEFAULT 60 CHECK (max_gap_s > 0),
    ADD COLUMN created_by text,
    ADD CONSTRAINT alert_rules_finite CHECK (
        (low IS NULL OR low NOT IN ('NaN', 'Infinity', '-Infinity'))
        AND (high IS NULL OR high NOT IN ('NaN', 'Infinity', '-Infinity'))
        AND hysteresis NOT IN ('NaN', 'Infinity')
    ),
    ADD CONSTRAINT alert_rules_range CHECK (
        kind <> 'range' OR (
            (low IS NOT NULL OR high IS NOT NULL)
            AND (low IS NULL OR high IS NULL OR low + 2 * hysteresis <= high)
        )
    ),
    ADD CONSTRAINT alert_rules_missing CHECK (kind <> 'missing_data' OR sustained_s > 0),
    ADD CONSTRAINT alert_rules_escalation CHECK (escalate_after_s IS NULL OR escalate_after_s > 0);
-- One study rule per name, and one override of a name per participant.
CREATE UNIQUE INDEX alert_rules_name ON alert_rules (study_id, name, coalesce(participant_id, ''));

ALTER TABLE alerts
    -- Reading time at which the condition met the rule (first_time: where its episode began).
    ADD COLUMN condition_time timestamptz,
    -- Reading time at which data ended the condition (NULL when a person resolved it).
    ADD COLUMN cleared_time timestamptz,
    ADD COLUMN resolved_by text,
    ADD COLUMN resolve_note text;
CREATE INDEX alerts_unacknowledged ON alerts (opened_at) WHERE state = 'open';

-- Per participant and rule: what the rule knows after the readings judged so far
-- (ingest.rules.RuleState). Written in the transaction that stores the readings.
CREATE TABLE alert_state (
    participant_id  text NOT NULL REFERENCES participants,
    rule_id         bigint NOT NULL REFERENCES alert_rules,
    evaluated_until timestamptz,
    run_start       timestamptz,
    run_last        timestamptz,
    active_since    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant_id, rule_id)
);

-- Every alert transition, in commit order: writers take one advisory lock before their first
-- event, so a larger event_id is never committed before a smaller one and a page resuming
-- after Last-Event-ID misses nothing. Never updated.
CREATE TABLE alert_events (
    event_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id       bigint NOT NULL REFERENCES alerts,
    event          text NOT NULL CHECK (event IN ('opened', 'acknowledged', 'resolved', 'escalated')),
    at             timestamptz NOT NULL,
    actor          text NOT NULL,
    study_id       text NOT NULL REFERENCES studies,
    site_id        text NOT NULL REFERENCES sites,
    participant_id text NOT NULL REFERENCES participants,
    rule_id        bigint NOT NULL REFERENCES alert_rules,
    severity       text NOT NULL,
    detail         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX alert_events_site ON alert_events (site_id, event_id);
CREATE INDEX alert_events_alert ON alert_events (alert_id, event_id);

CREATE FUNCTION alert_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'alert_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER alert_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON alert_events
    FOR EACH STATEMENT EXECUTE FUNCTION alert_events_refuse_change();

-- Events not yet published on MQTT dct/v1/alerts/<study>: drained after COMMIT, a row
-- deleted only in the transaction that saw its publication acknowledged (at least once).
CREATE TABLE alert_outbox (
    event_id bigint PRIMARY KEY REFERENCES alert_events
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialstream_app') THEN
        REVOKE UPDATE, DELETE, TRUNCATE ON alert_events FROM trialstream_app;
    END IF;
END
$$;
