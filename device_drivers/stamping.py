"""Measurements as readings: the time each gets, and the wearable it came from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from device_drivers.gatt.base import Measurement
from ingest.model import Reading

RR_INTERVAL: Final = "rr_interval"


def to_readings(measured: Sequence[Measurement], received_ms: int, sensor: str) -> list[Reading]:
    """The readings of one notified or indicated value that arrived at ``received_ms``.

    A measurement with a device time keeps it; one without gets the arrival time, except
    RR intervals: the beats of one Heart Rate notification ended one after the other, the
    last at the notification, so each earlier interval ends that much earlier
    (``t_k = received - sum of the intervals after k``, rounded to the millisecond).
    """
    times = [received_ms] * len(measured)
    after_ms = 0.0
    for i in range(len(measured) - 1, -1, -1):
        m = measured[i]
        if m.time is not None:
            times[i] = int(m.time.timestamp() * 1000)
        elif m.metric == RR_INTERVAL:
            times[i] = received_ms - round(after_ms)
            after_ms += m.value
    return [
        Reading(t_ms, m.metric, m.value, m.unit, sensor, tuple(sorted(set(m.flags))), m.user)
        for t_ms, m in zip(times, measured, strict=True)
    ]
