-- Core schema: who, what, consent, envelopes, rejections, alerts, audit.
-- readings is created by 0002 in the variant of the storage mode (hypertable or partitions).

CREATE TABLE studies (
    study_id          text PRIMARY KEY CHECK (study_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    name              text NOT NULL,
    -- What happens to data already held when a participant withdraws (FDA default: retain).
    withdrawal_policy text NOT NULL DEFAULT 'retain' CHECK (withdrawal_policy IN ('retain', 'delete')),
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sites (
    site_id    text PRIMARY KEY CHECK (site_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    study_id   text NOT NULL REFERENCES studies,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE participants (
    participant_id text PRIMARY KEY CHECK (participant_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    study_id       text NOT NULL REFERENCES studies,
    site_id        text NOT NULL REFERENCES sites,
    enrolled_at    timestamptz NOT NULL DEFAULT now(),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX participants_site ON participants (site_id);

CREATE TABLE users (
    user_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    display_name  text NOT NULL,
    role          text NOT NULL CHECK (role IN ('participant', 'site_coordinator', 'clinician', 'monitor', 'admin')),
    participant_id text REFERENCES participants,
    password_hash text,
    failed_logins integer NOT NULL DEFAULT 0,
    locked_until  timestamptz,
    disabled_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE user_sites (
    user_id bigint NOT NULL REFERENCES users,
    site_id text NOT NULL REFERENCES sites,
    PRIMARY KEY (user_id, site_id)
);

CREATE TABLE enrollment_codes (
    code_sha256    bytea PRIMARY KEY,
    participant_id text NOT NULL REFERENCES participants,
    created_by     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz,
    device_id      text
);

CREATE TABLE devices (
    device_id       text PRIMARY KEY CHECK (device_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    participant_id  text NOT NULL REFERENCES participants,
    -- DER SubjectPublicKeyInfo of the hub's P-256 key: verifies envelopes and pins the certificate.
    public_key      bytea NOT NULL,
    key_fingerprint text NOT NULL,
    certificate_pem text,
    enrolled_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    revoked_reason  text
);
CREATE INDEX devices_participant ON devices (participant_id);

-- A wearable as seen through one hub, with the provenance it reported (Device Information).
CREATE TABLE sensors (
    device_id     text NOT NULL REFERENCES devices,
    sensor        text NOT NULL,
    model         text,
    serial        text,
    firmware      text,
    hardware      text,
    manufacturer  text,
    battery_level smallint,
    first_seen    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, sensor)
);

CREATE TABLE consent_documents (
    document_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    study_id       text NOT NULL REFERENCES studies,
    title          text NOT NULL,
    version        text NOT NULL,
    language       text NOT NULL DEFAULT 'en',
    uri            text,
    body           text,
    content_sha256 bytea NOT NULL,
    scopes         text[] NOT NULL,
    optional_scopes text[] NOT NULL DEFAULT '{}',
    approved_on    date,
    effective_at   timestamptz NOT NULL,
    reconsent_by   timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (study_id, title, version, language)
);

-- Consent records are never updated: withdrawal and supersession add rows.
CREATE TABLE consents (
    consent_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    participant_id  text NOT NULL REFERENCES participants,
    document_id     bigint NOT NULL REFERENCES consent_documents,
    action          text NOT NULL CHECK (action IN ('consent', 'withdraw', 'withdraw_scope')),
    scopes          text[] NOT NULL,
    signer_name     text,
    signed_at       timestamptz NOT NULL,
    meaning         text,
    document_sha256 bytea,
    witness         text,
    recorded_by     text NOT NULL,
    effective_at    timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX consents_participant ON consents (participant_id, effective_at);

-- One row per verified envelope: the primary key is the exactly-once guarantee.
CREATE TABLE envelopes (
    device_id      text NOT NULL,
    seq            bigint NOT NULL CHECK (seq >= 0),
    participant_id text NOT NULL,
    sent_at        timestamptz NOT NULL,
    received_at    timestamptz NOT NULL,
    envelope_sha256 bytea NOT NULL,
    reading_count  integer NOT NULL,
    stored_count   integer NOT NULL,
    refused_count  integer NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX envelopes_received ON envelopes (received_at);

-- Spans without data that a hub reported (wearable out of reach, clock jump, ...).
CREATE TABLE gaps (
    device_id  text NOT NULL,
    seq        bigint NOT NULL,
    from_time  timestamptz NOT NULL,
    to_time    timestamptz NOT NULL,
    reason     text NOT NULL,
    FOREIGN KEY (device_id, seq) REFERENCES envelopes
);
CREATE INDEX gaps_device_time ON gaps (device_id, from_time);

-- Everything that reached the gateway and was not stored has a row here saying why.
CREATE TABLE rejections (
    rejection_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at    timestamptz NOT NULL,
    device_id      text,
    seq            bigint,
    participant_id text,
    reason         text NOT NULL,
    detail         text,
    metric         text,
    reading_count  integer NOT NULL CHECK (reading_count >= 0),
    first_time     timestamptz,
    last_time      timestamptz,
    topic          text,
    envelope_sha256 bytea
);
CREATE INDEX rejections_received ON rejections (received_at);
CREATE INDEX rejections_device ON rejections (device_id, seq);

CREATE TABLE alert_rules (
    rule_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    study_id       text NOT NULL REFERENCES studies,
    participant_id text REFERENCES participants,
    name           text NOT NULL,
    kind           text NOT NULL DEFAULT 'range' CHECK (kind IN ('range', 'missing_data')),
    metric         text NOT NULL,
    low            double precision,
    high           double precision,
    sustained_s    integer NOT NULL DEFAULT 0 CHECK (sustained_s >= 0),
    hysteresis     double precision NOT NULL DEFAULT 0 CHECK (hysteresis >= 0),
    severity       text NOT NULL DEFAULT 'warning' CHECK (severity IN ('info', 'warning', 'critical')),
    escalate_after_s integer,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE alerts (
    alert_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id         bigint NOT NULL REFERENCES alert_rules,
    participant_id  text NOT NULL REFERENCES participants,
    state           text NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    severity        text NOT NULL,
    opened_at       timestamptz NOT NULL,
    first_time      timestamptz NOT NULL,
    last_value      double precision,
    acknowledged_at timestamptz,
    acknowledged_by text,
    ack_note        text,
    resolved_at     timestamptz,
    escalated_at    timestamptz
);
-- One open (or acknowledged, not yet resolved) alert per participant and rule.
CREATE UNIQUE INDEX alerts_one_open ON alerts (participant_id, rule_id) WHERE state <> 'resolved';

CREATE TABLE audit_log (
    audit_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    action    text NOT NULL,
    entity    text NOT NULL,
    entity_id text NOT NULL,
    detail    jsonb NOT NULL DEFAULT '{}',
    reason    text,
    prev_hash bytea,
    hash      bytea NOT NULL
);

CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
