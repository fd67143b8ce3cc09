"""The signed originals of accepted envelopes (``envelope_originals``), for source data
verification: each stored reading can be checked against the envelope its hub signed.

Kept compressed (zlib; the CBOR of a batch repeats its metric, unit and sensor names) in the
transaction that stores the envelope, for new envelopes only. Read back with a bound on the
decompressed size, so a damaged or hostile row cannot expand without limit.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from psycopg.rows import class_row

from ingest.envelope import MAX_ENVELOPE_BYTES
from ingest.model import AcceptedEnvelope
from storage import audit
from storage.arrays import Byteas, Int4s, Int8s, Texts
from storage.db import Conn
from storage.errors import StorageError
from storage.study_settings import StudySetting, set_study_setting

CODEC: Final = "zlib"
# zlib level 6 (its default): most of the gain of level 9 at a fraction of its time. A 4 KiB
# window (wbits 12) rather than 32 KiB: an envelope's repeats (metric, unit and sensor names)
# lie within a few hundred bytes, so the output is the same size, and setting up the smaller
# window takes 16-18 us instead of 28 for a 600-byte envelope (docs/performance.md, run Q).
# The stream's header records the window; any zlib reader takes it.
_LEVEL: Final = 6
_WBITS: Final = 12

_KEEP = """
INSERT INTO envelope_originals (device_id, seq, received_at, codec, size, original)
SELECT d, s, %b::timestamptz, %b::text, z, o
FROM unnest(%b::text[], %b::int8[], %b::int4[], %b::bytea[]) AS u (d, s, z, o)
ON CONFLICT (device_id, seq) DO NOTHING
"""
_READINGS = """
SELECT (extract(epoch FROM r.time) * 1000)::int8 AS t_ms, r.metric, r.value, r.unit, r.sensor,
       r.flags, r.device_user, r.device_id, r.seq
FROM readings r
WHERE r.participant_id = %s AND r.time >= %s AND r.time < %s
ORDER BY r.time, r.device_id, r.seq
"""
_ORIGINALS = """
SELECT e.device_id, e.seq, e.envelope_sha256, d.public_key, o.codec, o.size, o.original
FROM unnest(%b::text[], %b::int8[]) AS k (device_id, seq)
JOIN envelopes e ON e.device_id = k.device_id AND e.seq = k.seq
JOIN devices d ON d.device_id = e.device_id
LEFT JOIN envelope_originals o ON o.device_id = e.device_id AND o.seq = e.seq
"""
_PRUNE = """
WITH gone AS (
    DELETE FROM envelope_originals o
    USING envelopes e, participants p, studies s
    WHERE e.device_id = o.device_id AND e.seq = o.seq
      AND p.participant_id = e.participant_id AND s.study_id = p.study_id
      AND s.originals_retention_days IS NOT NULL
      AND o.received_at < %s - make_interval(days => s.originals_retention_days)
    RETURNING s.study_id
)
SELECT study_id, count(*) AS pruned FROM gone GROUP BY study_id ORDER BY study_id
"""


class OriginalError(StorageError):
    """A stored original that cannot be read back (unknown codec, damaged, too large)."""


def compress(data: bytes) -> bytes:
    return zlib.compress(data, _LEVEL, _WBITS)


def decompress(codec: str, blob: bytes, size: int) -> bytes:
    """The original of ``size`` bytes, or :class:`OriginalError`; never more than an
    envelope's limit, whatever the row holds."""
    if codec != CODEC:
        raise OriginalError(f"unknown codec {codec!r}")
    if not 0 < size <= MAX_ENVELOPE_BYTES:
        raise OriginalError(f"recorded size {size} outside 1..{MAX_ENVELOPE_BYTES}")
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(blob, size + 1)
    except zlib.error as exc:
        raise OriginalError(f"damaged: {exc}") from None
    if len(data) != size or not inflater.eof:
        raise OriginalError(f"does not inflate to its recorded {size} bytes")
    return data


async def keep(conn: Conn, fresh: Sequence[AcceptedEnvelope], received: datetime) -> None:
    """Store the originals of the batch's new envelopes (those that carry one)."""
    kept = [e for e in fresh if e.original]
    if not kept:
        return
    await conn.execute(
        _KEEP,
        (
            received,
            CODEC,
            Texts(e.dev for e in kept),
            Int8s(e.seq for e in kept),
            Int4s(len(e.original) for e in kept),
            Byteas(compress(e.original) for e in kept),
        ),
    )


@dataclass(frozen=True, slots=True)
class StoredReading:
    t_ms: int
    metric: str
    value: float
    unit: str
    sensor: str
    flags: list[str] | None
    device_user: int | None
    device_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class Original:
    """An envelope as the database holds it: its digest, its device's key (fixed for the
    device's life: a renewed certificate keeps the key) and its original, if kept."""

    device_id: str
    seq: int
    envelope_sha256: bytes
    public_key: bytes
    codec: str | None
    size: int | None
    original: bytes | None


async def participant_readings(
    conn: Conn, participant_id: str, start: datetime, end: datetime
) -> list[StoredReading]:
    async with conn.cursor(row_factory=class_row(StoredReading)) as cur:
        await cur.execute(_READINGS, (participant_id, start, end))
        return await cur.fetchall()


async def originals(conn: Conn, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Original]:
    if not keys:
        return {}
    async with conn.cursor(row_factory=class_row(Original)) as cur:
        await cur.execute(_ORIGINALS, ([d for d, _ in keys], [s for _, s in keys]))
        return {(o.device_id, o.seq): o for o in await cur.fetchall()}


@dataclass(frozen=True, slots=True)
class Pruned:
    study_id: str
    pruned: int


async def prune(conn: Conn, now: datetime, *, actor: str) -> list[Pruned]:
    """Delete the originals past their study's retention; audited per study."""
    async with conn.transaction():
        async with conn.cursor(row_factory=class_row(Pruned)) as cur:
            await cur.execute(_PRUNE, (now,))
            done = await cur.fetchall()
        for p in done:
            await audit.append(
                conn,
                actor=actor,
                action="study.originals_pruned",
                entity="study",
                entity_id=p.study_id,
                detail={"originals_pruned": p.pruned, "at": now.isoformat()},
            )
    return done


async def set_retention(conn: Conn, study_id: str, days: int | None, *, actor: str) -> None:
    """How many days the study keeps signed originals (None: as long as its envelopes)."""
    await set_study_setting(
        conn, study_id, StudySetting.ORIGINALS_RETENTION_DAYS, days, actor=actor
    )
