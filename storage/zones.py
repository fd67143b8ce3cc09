"""SQL fragments for a participant's local time: the zone valid at a time, from the history
``storage.time_zones`` keeps (``participant_time_zone_history``). Apart from it so that the
queries that need local days (exports, adherence) and the module that records zones (which
asks adherence to sum days again) do not import each other."""

from __future__ import annotations

_ZONE_AT = """
LEFT JOIN LATERAL (
    SELECT z.time_zone FROM participant_time_zone_history z
    WHERE z.participant_id = {participant} AND {time} >= z.valid_from AND {time} < z.valid_to
) {alias} ON true
"""


def zone_join(alias: str, participant: str, time: str) -> str:
    """A LATERAL join fragment giving ``<alias>.time_zone``: the zone of ``participant`` valid
    at ``time`` (null when none is set: UTC). The three are the caller's own column
    expressions and alias, never input."""
    return _ZONE_AT.format(alias=alias, participant=participant, time=time)


# The zone valid at a reading's time ``r.time`` of participant ``r.participant_id``, as
# ``tz.time_zone``, for queries over readings.
ZONE_AT_READING = zone_join("tz", "r.participant_id", "r.time")
LOCAL_ZONE = "coalesce(tz.time_zone, 'UTC')"
