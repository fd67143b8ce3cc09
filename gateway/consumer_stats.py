"""A consumer's counters and latency histograms, as ``/metrics`` reports them."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

# Upper bounds (seconds) of the consumer's latency histograms on /metrics: a batch's phases
# take milliseconds when all is well and seconds when the database or the machine struggles;
# an outage shows as a store of many seconds (retried until the database answers).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_PHASES = ("judge", "store", "finish")


@dataclass
class Histogram:
    """Observations counted by upper bound, as a Prometheus histogram reports them."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(init=False)  # per bound, then past the last one
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, observations <= le)`` per bound, then ``("+Inf", all)``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((f"{bound:g}", running))
        out.append(("+Inf", self.n))
        return out


@dataclass
class Stats:
    """Counters of this worker since start (the database holds the durable truth)."""

    messages: int = 0
    batches: int = 0
    envelopes_new: int = 0
    envelopes_replayed: int = 0
    readings_stored: int = 0
    rejected_readings: Counter[str] = field(default_factory=Counter)
    rejected_envelopes: Counter[str] = field(default_factory=Counter)
    receipt_publish_failures: int = 0
    database_retries: int = 0
    # Tries of batches held because nothing of them stored and nothing in their data said why.
    held_batches: int = 0
    # Batches judged again because consent changed between reading it and committing.
    consent_rechecks: int = 0
    mqtt_connected: bool = False
    # Seconds per batch in each phase: judge (decode, verify, consent), store (the
    # transaction, retries through an outage included), finish (receipts and acks).
    batch_seconds: dict[str, Histogram] = field(
        default_factory=lambda: {phase: Histogram() for phase in BATCH_PHASES}
    )
    # Seconds from a message's arrival at this worker to its acknowledgement (and receipt).
    receipt_seconds: Histogram = field(default_factory=Histogram)
