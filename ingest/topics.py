"""The MQTT topics of the protocol (docs/protocol.md): a hub publishes on its ``up`` topic
and reads receipts on its ``down`` topic. Kept apart from the pipeline so the hub, which
only needs the names, imports nothing of the server's (consent, storage)."""

from __future__ import annotations

from ingest.wire import is_device_id

TOPIC_PREFIX = "dct/v1/"
UP_SUFFIX = "/up"


def up_topic(device_id: str) -> str:
    return f"{TOPIC_PREFIX}{device_id}{UP_SUFFIX}"


def down_topic(device_id: str) -> str:
    return f"{TOPIC_PREFIX}{device_id}/down"


def topic_device(topic: str) -> str | None:
    if not (topic.startswith(TOPIC_PREFIX) and topic.endswith(UP_SUFFIX)):
        return None
    dev = topic[len(TOPIC_PREFIX) : -len(UP_SUFFIX)]
    return dev if is_device_id(dev) else None
