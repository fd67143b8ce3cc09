-- Data queries (discrepancy management, docs/queries.md): a monitor asks the site about a
-- participant's data (one reading, a metric over a time range, or a gap the hub reported);
-- the site answers; the monitor closes the query or reopens it. The query's row holds what it
-- is about and its state; every step is a message row, never changed, and in the audit trail.
CREATE TABLE data_queries (
    query_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    participant_id text NOT NULL REFERENCES participants,
    target         text NOT NULL CHECK (target IN ('reading', 'range', 'gap')),
    -- The reading's or the range's metric (null for a gap).
    metric         text CHECK (metric ~ '^[a-z][a-z0-9_]{0,63}$'),
    from_time      timestamptz NOT NULL,
    to_time        timestamptz NOT NULL,
    -- The envelope that carried the reading or the gap (null for a range).
    device_id      text,
    seq            bigint,
    state          text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'answered', 'closed')),
    opened_by      text NOT NULL,
    opened_at      timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT data_queries_span CHECK (from_time <= to_time),
    CONSTRAINT data_queries_target CHECK (
        CASE target
            WHEN 'reading' THEN metric IS NOT NULL AND device_id IS NOT NULL AND seq IS NOT NULL
                AND from_time = to_time
            WHEN 'range' THEN metric IS NOT NULL AND device_id IS NULL AND seq IS NULL
            ELSE metric IS NULL AND device_id IS NOT NULL AND seq IS NOT NULL
        END)
);
CREATE INDEX data_queries_participant ON data_queries (participant_id, state);
CREATE INDEX data_queries_open ON data_queries (state) WHERE state <> 'closed';

CREATE TABLE data_query_messages (
    message_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    query_id   bigint NOT NULL REFERENCES data_queries,
    action     text NOT NULL CHECK (action IN ('open', 'answer', 'close', 'reopen')),
    text       text NOT NULL CHECK (length(text) BETWEEN 1 AND 4000),
    actor      text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX data_query_messages_query ON data_query_messages (query_id, message_id);

CREATE FUNCTION data_query_messages_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'data query messages are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER data_query_messages_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON data_query_messages
    FOR EACH STATEMENT EXECUTE FUNCTION data_query_messages_refuse_change();
