-- Alerts delivered to people who are not looking at a page (docs/notifications.md): by e-mail
-- and by signed webhooks, to whoever is on call for the alert's site, as each chose.

-- A user's ways of being reached, and which alert events reach them there. The webhook's
-- secret signs each request (HMAC-SHA256) so that the paging system can tell it is ours.
CREATE TABLE notification_contacts (
    user_id        bigint PRIMARY KEY REFERENCES users,
    email          text CHECK (email IS NULL OR length(email) BETWEEN 3 AND 254),
    webhook_url    text CHECK (webhook_url IS NULL OR length(webhook_url) BETWEEN 8 AND 2048),
    webhook_secret bytea CHECK (webhook_secret IS NULL OR length(webhook_secret) = 32),
    events         text[] NOT NULL
        CHECK (events <@ ARRAY['escalated', 'critical']::text[] AND cardinality(events) > 0),
    updated_by     text NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CHECK ((webhook_url IS NULL) = (webhook_secret IS NULL))
);

-- Who is on call for a site, from when to when (several at once is allowed: all are told).
CREATE TABLE on_call (
    on_call_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site_id    text NOT NULL REFERENCES sites,
    user_id    bigint NOT NULL REFERENCES users,
    from_time  timestamptz NOT NULL,
    to_time    timestamptz NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    removed_by text,
    removed_at timestamptz,
    CHECK (to_time > from_time),
    CHECK ((removed_by IS NULL) = (removed_at IS NULL))
);
CREATE INDEX on_call_site ON on_call (site_id, from_time) WHERE removed_at IS NULL;

-- One row per alert event, person and channel: what was sent where, when, and every failure.
-- An event that reached no one (nobody on call with a way to be reached) has one row saying
-- so (state no_recipient, no user).
CREATE TABLE notification_deliveries (
    delivery_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        bigint NOT NULL REFERENCES alert_events,
    site_id         text NOT NULL REFERENCES sites,
    user_id         bigint REFERENCES users,
    channel         text CHECK (channel IN ('email', 'webhook')),
    address         text,
    state           text NOT NULL CHECK (state IN ('pending', 'sent', 'failed', 'no_recipient')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    CHECK ((state = 'no_recipient') = (user_id IS NULL)),
    CHECK ((user_id IS NULL) = (channel IS NULL)),
    CHECK ((state = 'pending') = (next_attempt_at IS NOT NULL))
);
CREATE UNIQUE INDEX notification_deliveries_once
    ON notification_deliveries (event_id, coalesce(user_id, 0), coalesce(channel, ''));
CREATE INDEX notification_deliveries_due
    ON notification_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX notification_deliveries_site ON notification_deliveries (site_id, delivery_id);

-- The last alert event planned. Event ids commit in increasing order (docs/alerts.md), so a
-- planner that follows this cursor misses none; it starts at the events already there.
CREATE TABLE notification_cursor (
    one           boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_event_id bigint NOT NULL
);
INSERT INTO notification_cursor (last_event_id)
SELECT coalesce(max(event_id), 0) FROM alert_events;
