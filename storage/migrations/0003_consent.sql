-- E-consent records with Part 11 e-signatures, withdrawal policy records, and the
-- least-privilege application role that cannot change the audit trail.

-- Some studies require a witness or a site verifier on every consent signature.
ALTER TABLE studies ADD COLUMN consent_witness_required boolean NOT NULL DEFAULT false;

ALTER TABLE consent_documents
    ADD COLUMN created_by text,
    ADD CONSTRAINT consent_documents_optional_in_scopes CHECK (optional_scopes <@ scopes),
    ADD CONSTRAINT consent_documents_reconsent_after_effective
        CHECK (reconsent_by IS NULL OR reconsent_by >= effective_at);
CREATE INDEX consent_documents_study_title ON consent_documents (study_id, title, effective_at);

-- Consent rows: one per signature or withdrawal, never updated.
ALTER TABLE consents
    -- The participant's user account whose own credential re-authenticated the signature.
    ADD COLUMN signer_user_id bigint REFERENCES users,
    -- 'participant' or 'site': who asked for a withdrawal (recorded by whom: recorded_by).
    ADD COLUMN initiated_by text CHECK (initiated_by IN ('participant', 'site')),
    ADD COLUMN reason text,
    -- The study's policy for data already held, as applied by this withdrawal.
    ADD COLUMN data_policy text CHECK (data_policy IN ('retain', 'delete')),
    ADD CONSTRAINT consents_signature_complete CHECK (
        action <> 'consent'
        OR (signer_name IS NOT NULL AND meaning IS NOT NULL AND document_sha256 IS NOT NULL)
    ),
    ADD CONSTRAINT consents_withdrawal_policy CHECK (action = 'consent' OR data_policy IS NOT NULL)
        NOT VALID;

CREATE FUNCTION consents_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'consents are append-only: % refused (withdrawal and supersession add rows)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER consents_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON consents
    FOR EACH STATEMENT EXECUTE FUNCTION consents_refuse_change();

-- What a withdrawal under the 'delete' policy removed: counts and spans, never values.
CREATE TABLE withdrawal_deletions (
    deletion_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consent_id       bigint NOT NULL REFERENCES consents,
    participant_id   text NOT NULL REFERENCES participants,
    metrics          text[] NOT NULL,
    readings_deleted bigint NOT NULL CHECK (readings_deleted >= 0),
    first_time       timestamptz,
    last_time        timestamptz,
    deleted_by       text NOT NULL,
    deleted_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX audit_log_entity ON audit_log (entity, entity_id);
CREATE INDEX audit_log_participant ON audit_log ((detail ->> 'participant_id'));

-- The role the application connects as (through a LOGIN role that is a member of it). It may
-- append to audit_log and consents but not change them: no UPDATE, DELETE or TRUNCATE, and,
-- not owning the tables, it cannot disable their triggers. The role is cluster-wide: created
-- once, and skipped with a notice where the migrating user may not create roles.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialstream_app') THEN
        BEGIN
            CREATE ROLE trialstream_app NOLOGIN;
        EXCEPTION
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'cannot create role trialstream_app: grant it by hand';
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created concurrently by another database's migration
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialstream_app') THEN
        GRANT USAGE ON SCHEMA public TO trialstream_app;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO trialstream_app;
        GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO trialstream_app;
        REVOKE UPDATE, DELETE, TRUNCATE ON audit_log, consents FROM trialstream_app;
        ALTER DEFAULT PRIVILEGES IN SCHEMA public
            GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO trialstream_app;
        ALTER DEFAULT PRIVILEGES IN SCHEMA public
            GRANT USAGE, SELECT ON SEQUENCES TO trialstream_app;
    END IF;
END
$$;
