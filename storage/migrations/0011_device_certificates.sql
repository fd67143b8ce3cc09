-- Every certificate the study CA issued to a hub: the one of its enrollment and each renewal.
-- Hub certificates are short-lived and renewed by the hub before they expire, so a device has
-- several over a trial; revoking it must list every one still valid in the CRL. The newest
-- one's not_after says whether the hub may still renew (an expired hub re-enrolls).
-- devices.certificate_pem keeps the newest certificate, as before.
CREATE TABLE device_certificates (
    serial          text PRIMARY KEY CHECK (serial ~ '^[0-9a-f]{1,40}$'),
    device_id       text NOT NULL REFERENCES devices,
    issued_for      text NOT NULL CHECK (issued_for IN ('enrollment', 'renewal')),
    issued_at       timestamptz NOT NULL DEFAULT now(),
    not_before      timestamptz NOT NULL,
    not_after       timestamptz NOT NULL CHECK (not_after > not_before),
    certificate_pem text NOT NULL
);
CREATE INDEX device_certificates_device ON device_certificates (device_id, not_after DESC);
