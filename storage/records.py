"""Device records stored once (``device_records``): a reading that carries a record key
(protocol v2: a glucose meter's stored record) is stored only the first time the participant's
record arrives; a later copy is refused as ``duplicate_record``. A record's readings of
different metrics (a measurement and its context) are each stored once.

Claimed in the batch's transaction, for its new envelopes only (a replay or a reused seq
stores nothing, so it claims nothing), before their readings are copied: one statement
inserts every key and returns those it inserted. Two copies inside one batch: the first in
batch order is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from psycopg.rows import class_row

from ingest.model import AcceptedEnvelope, Reading, Reason, Refusal
from storage.db import Conn

_CLAIM = """
INSERT INTO device_records (participant_id, sensor, record_key, metric, device_id, seq)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::int8[])
ON CONFLICT (participant_id, sensor, record_key, metric) DO NOTHING
RETURNING participant_id, sensor, record_key, metric
"""
_RECOUNT = """
UPDATE envelopes e SET stored_count = c.stored, refused_count = c.refused
FROM unnest(%b::text[], %b::int8[], %b::int4[], %b::int4[]) AS c (device_id, seq, stored, refused)
WHERE e.device_id = c.device_id AND e.seq = c.seq
"""
DUPLICATE_DETAIL = "record already stored for this participant"


@dataclass(frozen=True, slots=True)
class _Claimed:
    participant_id: str
    sensor: str
    record_key: str
    metric: str


async def claim(
    conn: Conn, fresh: Sequence[AcceptedEnvelope]
) -> tuple[list[AcceptedEnvelope], dict[tuple[str, int], AcceptedEnvelope]]:
    """``fresh`` without readings whose record is already stored, and the envelopes that
    changed, by (device, seq); their envelope rows are recounted."""
    keyed = [(e, r) for e in fresh if e.readings for r in e.readings if r.record is not None]
    if not keyed:
        return list(fresh), {}
    async with conn.cursor(row_factory=class_row(_Claimed)) as cur:
        await cur.execute(
            _CLAIM,
            (
                [e.participant_id for e, _ in keyed],
                [r.sensor for _, r in keyed],
                [r.record for _, r in keyed],
                [r.metric for _, r in keyed],
                [e.dev for e, _ in keyed],
                [e.seq for e, _ in keyed],
            ),
        )
        inserted = {
            (c.participant_id, c.sensor, c.record_key, c.metric) for c in await cur.fetchall()
        }
    changed: dict[tuple[str, int], AcceptedEnvelope] = {}
    out: list[AcceptedEnvelope] = []
    for e in fresh:
        duplicates: list[Reading] = []
        kept: list[int] = []
        for i, r in enumerate(e.readings):
            key = (e.participant_id, r.sensor, r.record, r.metric)
            if r.record is None:
                kept.append(i)
            elif key in inserted:
                inserted.discard(key)  # a second copy in this batch is a duplicate
                kept.append(i)
            else:
                duplicates.append(r)
        if not duplicates:
            out.append(e)
            continue
        updated = replace(
            e,
            readings=tuple(e.readings[i] for i in kept),
            consent_ids=tuple(e.consent_ids[i] for i in kept),
            refusals=(*e.refusals, *_refusals(duplicates)),
        )
        changed[(e.dev, e.seq)] = updated
        out.append(updated)
    await recount(conn, list(changed.values()))
    return out, changed


async def recount(conn: Conn, envs: Sequence[AcceptedEnvelope]) -> None:
    """Set the envelope rows' stored and refused counts to what ``envs`` now hold (readings
    the batch's transaction took out after the rows were inserted)."""
    if envs:
        await conn.execute(
            _RECOUNT,
            (
                [e.dev for e in envs],
                [e.seq for e in envs],
                [len(e.readings) for e in envs],
                [sum(f.count for f in e.refusals) for e in envs],
            ),
        )


def _refusals(duplicates: Sequence[Reading]) -> list[Refusal]:
    by_metric: dict[str, list[int]] = {}
    for r in duplicates:
        by_metric.setdefault(r.metric, []).append(r.t_ms)
    return [
        Refusal(Reason.DUPLICATE_RECORD, len(t), min(t), max(t), metric, DUPLICATE_DETAIL)
        for metric, t in by_metric.items()
    ]
