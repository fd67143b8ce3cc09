"""The JSON schemas of the API's answers, as the OpenAPI document shows them."""

from __future__ import annotations

from typing import Any

from ingest.flags import FlagClass
from storage import users
from storage.exports import jobs

STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
TIME = {"type": "string", "format": "date-time"}
NULL_TIME = {"type": "string", "format": "date-time", "nullable": True}
NULL_STR = {"type": "string", "nullable": True}
NULL_INT = {"type": "integer", "nullable": True}
NULL_NUM = {"type": "number", "nullable": True}
BOOL = {"type": "boolean"}
STRS = {"type": "array", "items": STR}
# The class of a reading's worst flag (ingest.flags), null when the device said nothing.
QUALITY = {"type": "string", "nullable": True, "enum": [*(c.value for c in FlagClass), None]}


def obj(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": sorted(props), "properties": props}


def arr(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


USER = obj(
    {
        "username": STR,
        "display_name": STR,
        "role": {"type": "string", "enum": [r.value for r in users.Role]},
        "participant_id": NULL_STR,
        "sites": STRS,
    }
)
SESSION = obj({"user": USER, "csrf_token": STR})
SITE = obj({"site_id": STR, "study_id": STR, "name": STR, "participants": INT})
# A wearable: last_seen is the time of its newest reading (null: none in the last 30 days,
# storage.views.sensor_last_readings); first_seen and last_report when its hub first and last
# reported it (description, battery), null for one known only by its readings.
SENSOR = obj(
    {
        "sensor": STR,
        "manufacturer": NULL_STR,
        "model": NULL_STR,
        "firmware": NULL_STR,
        "battery_level": NULL_INT,
        "first_seen": NULL_TIME,
        "last_seen": NULL_TIME,
        "last_report": NULL_TIME,
    }
)
# One description of a wearable and the reading times it is valid for (storage.sensors):
# valid_from null for a wearable's first description (it also covers the readings before its
# report), valid_to null for the one valid now.
SENSOR_PERIOD = obj(
    {
        "device_id": STR,
        "sensor": STR,
        "manufacturer": NULL_STR,
        "model": NULL_STR,
        "serial": NULL_STR,
        "firmware": NULL_STR,
        "hardware": NULL_STR,
        "reported_at": TIME,
        "valid_from": NULL_TIME,
        "valid_to": NULL_TIME,
    }
)
# The participant's time zones, oldest first: each from a time on (the first also covers the
# times before it); none: UTC (storage.time_zones).
TIME_ZONE = obj({"time_zone": STR, "from": TIME})
DEVICE = obj(
    {
        "device_id": STR,
        "enrolled_at": TIME,
        "revoked_at": NULL_TIME,
        "revoked_reason": NULL_STR,
        "last_received": NULL_TIME,
        "envelopes": INT,
        "readings_stored": INT,
        "readings_refused": INT,
        "sensors": arr(SENSOR),
    }
)
PARTICIPANT = obj(
    {
        "participant_id": STR,
        "study_id": STR,
        "site_id": STR,
        "enrolled_at": TIME,
        "active_devices": INT,
        "last_received": NULL_TIME,
        "consent": obj(
            {"action": NULL_STR, "version": NULL_STR, "scopes": STRS, "effective_at": NULL_TIME}
        ),
    }
)
RECONSENT = obj(
    {
        "participant_id": STR,
        "current_version": STR,
        "required_version": STR,
        "reconsent_by": TIME,
        "overdue": {"type": "boolean"},
    }
)
CODE_ROW = obj(
    {
        "participant_id": STR,
        "created_by": STR,
        "created_at": TIME,
        "expires_at": TIME,
        "used_at": NULL_TIME,
        "device_id": NULL_STR,
    }
)
# The site's cohort at a glance, per participant: the time of their newest reading (null:
# none in the last 30 days), alerts not yet resolved (null for a site coordinator, who does
# not see alerts), queries awaiting the site's answer and answered ones awaiting the monitor,
# and today's adherence (the UTC date's, as the heat map counts it; adherence null when
# nothing is expected).
COHORT_ROW = {
    "devices": arr(DEVICE),
    "last_reading": NULL_TIME,
    "unresolved_alerts": NULL_INT,
    "open_queries": INT,
    "answered_queries": INT,
    "adherence_today": obj(
        {
            "day": {"type": "string", "format": "date"},
            "adherence": NULL_NUM,
            "metrics_expected": INT,
            "metrics_met": INT,
        }
    ),
}
SITE_PAGE = obj(
    {
        "site": SITE,
        "participants": arr(
            {
                **PARTICIPANT,
                "properties": {**PARTICIPANT["properties"], **COHORT_ROW},
                "required": sorted([*PARTICIPANT["required"], *COHORT_ROW]),
            }
        ),
        "pending_reconsents": arr(RECONSENT),
        "enrollment_codes": arr(CODE_ROW),
    }
)
CONSENT_RECORD = obj(
    {
        "consent_id": INT,
        "document_id": INT,
        "version": STR,
        "action": STR,
        "scopes": STRS,
        "signer_name": NULL_STR,
        "signed_at": TIME,
        "meaning": NULL_STR,
        "recorded_by": STR,
        "valid_from": TIME,
        "valid_to": NULL_TIME,
    }
)
PARTICIPANT_PAGE = obj(
    {
        "participant": PARTICIPANT,
        "devices": arr(DEVICE),
        "envelopes": arr(
            obj(
                {
                    "device_id": STR,
                    "seq": INT,
                    "sent_at": TIME,
                    "received_at": TIME,
                    "readings": INT,
                    "stored": INT,
                    "refused": INT,
                }
            )
        ),
        "rejections": arr(
            obj(
                {
                    "received_at": TIME,
                    "device_id": NULL_STR,
                    "seq": NULL_INT,
                    "reason": STR,
                    "metric": NULL_STR,
                    "readings": INT,
                }
            )
        ),
        "consents": arr(CONSENT_RECORD),
        "sensor_history": arr(SENSOR_PERIOD),
        "time_zones": arr(TIME_ZONE),
    }
)
READINGS = obj(
    {
        "participant_id": STR,
        "from": TIME,
        "to": TIME,
        "cursor": INT,
        "readings": arr(
            obj(
                {
                    "t": INT,
                    "metric": STR,
                    "value": NUM,
                    "unit": STR,
                    "device_id": STR,
                    "sensor": STR,
                    "flags": STRS,
                    "quality": QUALITY,
                    "device_user": NULL_INT,
                }
            )
        ),
        "gaps": arr(obj({"device_id": STR, "from": INT, "to": INT, "reason": STR})),
    }
)
ROLLUPS = obj(
    {
        "participant_id": STR,
        "from": TIME,
        "buckets": arr(
            obj({"metric": STR, "bucket": INT, "n": INT, "mean": NUM, "min": NUM, "max": NUM})
        ),
    }
)
ALERT = obj(
    {
        "alert_id": INT,
        "rule": STR,
        "metric": STR,
        "study_id": STR,
        "site_id": STR,
        "participant_id": STR,
        "state": STR,
        "severity": STR,
        "opened_at": TIME,
        "first_time": TIME,
        "acknowledged_at": NULL_TIME,
        "acknowledged_by": NULL_STR,
        "ack_note": NULL_STR,
        "resolved_at": NULL_TIME,
        "resolved_by": NULL_STR,
        "escalated_at": NULL_TIME,
        # What opened it: the rule (kind, bounds, duration), the value that met it and when,
        # how long the condition had held by then; and the participant's latest reading.
        "kind": {"type": "string", "enum": ["range", "missing_data", "adherence"]},
        "low": NULL_NUM,
        "high": NULL_NUM,
        "sustained_s": INT,
        "value": NULL_NUM,
        "unit": NULL_STR,
        "condition_time": NULL_TIME,
        "held_s": NULL_NUM,
        "cleared_time": NULL_TIME,
        "latest": {
            **obj(
                {
                    "time": TIME,
                    "value": NUM,
                    "unit": STR,
                    "flags": STRS,
                    "quality": QUALITY,
                }
            ),
            "nullable": True,
        },
    }
)
ALERT_EVENT = obj(
    {"event_id": INT, "event": STR, "at": TIME, "actor": STR, "detail": {"type": "object"}}
)
ALERT_LIST = obj({"alerts": arr(ALERT), "last_event_id": INT})
ALERT_PAGE = obj({"alert": ALERT, "events": arr(ALERT_EVENT)})
DELIVERY = obj(
    {
        "delivery_id": INT,
        "event_id": INT,
        "alert_id": INT,
        "event": STR,
        "severity": STR,
        "site_id": STR,
        "participant_id": STR,
        "user": NULL_STR,
        "channel": NULL_STR,
        "address": NULL_STR,
        "state": STR,
        "attempts": INT,
        "next_attempt_at": NULL_TIME,
        "last_error": NULL_STR,
        "created_at": TIME,
        "sent_at": NULL_TIME,
    }
)
DELIVERY_LIST = obj({"deliveries": arr(DELIVERY)})
USER_ROW = obj(
    {
        **USER["properties"],
        "locked": {"type": "boolean"},
        "disabled": {"type": "boolean"},
        "created_at": TIME,
    }
)
CODE = obj(
    {
        "code": STR,
        "participant_id": STR,
        "study_id": STR,
        "expires_at": TIME,
        "qr_payload": STR,
        "qr_svg": STR,
    }
)
CONSENT_DOCUMENT = obj(
    {
        "document_id": INT,
        "title": STR,
        "version": STR,
        "language": STR,
        "text": NULL_STR,
        "uri": NULL_STR,
        "sha256": STR,
        "scopes": STRS,
        "optional_scopes": STRS,
        "effective_at": TIME,
        "signed": BOOL,
        "signed_scopes": STRS,
        "reconsent_by": NULL_TIME,
        "overdue": BOOL,
    }
)
CONSENT_DOCUMENTS = obj(
    {
        "participant_id": STR,
        "witness_required": BOOL,
        "in_force": {
            **obj({"consent_id": INT, "document_id": INT, "scopes": STRS}),
            "nullable": True,
        },
        "documents": arr(CONSENT_DOCUMENT),
    }
)
EXPORT_FILE = obj(
    {"index": INT, "path": STR, "sha256": STR, "bytes": INT, "rows": INT, "href": STR}
)
EXPORT_JOB = obj(
    {
        "job_id": STR,
        "kind": STR,
        "study_id": STR,
        "participant_id": NULL_STR,
        "from": NULL_TIME,
        "to": NULL_TIME,
        "requested_by": STR,
        "state": {"type": "string", "enum": [s.value for s in jobs.JobState]},
        "submitted_at": TIME,
        "started_at": NULL_TIME,
        "finished_at": NULL_TIME,
        "rows_written": INT,
        "error": NULL_STR,
        "files": arr(EXPORT_FILE),
    }
)
