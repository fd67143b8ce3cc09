"""The bulk writer: one transaction per batch, exactly once by envelope.

1. ``INSERT INTO envelopes ... ON CONFLICT DO NOTHING RETURNING``: the envelopes that are new.
2. Binary ``COPY`` of the new envelopes' readings only (``readings`` has no unique index, so
   COPY stays fast; the envelopes primary key is what makes storage exactly-once).
3. Rejection rows: for whole envelopes refused, and for the refused readings of new envelopes.
4. Gaps of the new envelopes.
5. Sensor reports of the new envelopes: ``sensors`` and the description history
   (:mod:`storage.sensors`); the hubs' time zones (:mod:`storage.time_zones`).

A replayed envelope is found in step 1 and reported with the counts stored the first time,
so its receipt can be sent again. A connection lost mid-batch rolls the whole batch back and
is retried on a fresh connection (safe because of step 1); data the database refuses raises
``BatchWriteError`` naming the envelope, with nothing of the batch stored.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import re
import struct
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg import postgres
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ingest.model import AcceptedEnvelope, Batch, Reason
from storage import deltas, locks, originals, records, review, sensors, time_zones
from storage.arrays import PG_EPOCH_MS, Byteas, Int4s, Int8s, Texts, TimestamptzMs
from storage.db import Conn
from storage.errors import (
    BatchWriteError,
    DatabaseUnavailable,
    first_line,
    is_content_error,
    is_transient,
)
from storage.migrate import StorageMode
from storage.partitions import ensure_partitions, existing_partitions, partition_start_ms
from storage.timeconv import from_ms, from_ms_or_none

log = logging.getLogger(__name__)

# Connection-level failures (restart, failover, terminated backend) are retried this many
# times with jittered exponential backoff from 0.1 s up to 5 s: about a minute in all, long
# enough for a PostgreSQL restart; past that the caller keeps the batch unacknowledged.
RETRY_ATTEMPTS = 15
RETRY_BASE_S = 0.1
RETRY_CEILING_S = 5.0
# A pool that cannot hand out a connection within this long counts as a failed attempt (and
# is retried as above): an outage is noticed in seconds, not after the pool's 30 s default.
CHECKOUT_TIMEOUT_S = 5.0

READING_COLUMNS = (
    "time",
    "participant_id",
    "metric",
    "value",
    "unit",
    "device_id",
    "seq",
    "sensor",
    "received_at",
    "consent_id",
    "flags",
    "device_user",
)
_READING_TYPES = (
    "timestamptz",
    "text",
    "text",
    "float8",
    "text",
    "text",
    "int8",
    "text",
    "timestamptz",
    "int8",
    "text[]",
    "int2",
)
_COPY_READINGS = f"COPY readings ({', '.join(READING_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_COPY_LINE = re.compile(r"COPY readings, line (\d+)")
_INT8: Final = struct.Struct(">q")


class EpochMsDumper(Dumper):
    """Binary ``timestamptz`` straight from integer milliseconds since the Unix epoch.

    Registered on the COPY cursor by OID only, so the readings' times (already integers in
    the pipeline) go to the wire without a ``datetime`` per row.
    """

    format = Format.BINARY
    oid = postgres.types["timestamptz"].oid

    def dump(self, obj: int) -> bytes:
        return _INT8.pack((obj - PG_EPOCH_MS) * 1000)


# Batch parameters are sent as binary arrays (%b): psycopg renders a text array element by
# element in Python, 6x the cost of its binary form (17.6 against 2.7 ms for one 500-envelope
# batch of _INSERT_ENVELOPES, measured here), and the arrays of storage.arrays are built in a
# few C-level calls where psycopg's binary list dumper takes one Python call per element.
_INSERT_ENVELOPES = """
INSERT INTO envelopes (device_id, seq, participant_id, sent_at, received_at, envelope_sha256,
                       reading_count, stored_count, refused_count)
SELECT * FROM unnest(%b::text[], %b::int8[], %b::text[], %b::timestamptz[], %b::timestamptz[],
                     %b::bytea[], %b::int4[], %b::int4[], %b::int4[])
ON CONFLICT (device_id, seq) DO NOTHING
RETURNING device_id, seq
"""
_EXISTING_COUNTS = """
SELECT device_id, seq, stored_count, refused_count, envelope_sha256 FROM envelopes
WHERE (device_id, seq) IN (SELECT * FROM unnest(%b::text[], %b::int8[]))
"""
_INSERT_REJECTIONS = """
INSERT INTO rejections (received_at, device_id, seq, participant_id, reason, detail, metric,
                        reading_count, first_time, last_time, topic, envelope_sha256,
                        first_ms, last_ms)
SELECT * FROM unnest(%b::timestamptz[], %b::text[], %b::int8[], %b::text[], %b::text[],
                     %b::text[], %b::text[], %b::int4[], %b::timestamptz[], %b::timestamptz[],
                     %b::text[], %b::bytea[], %b::int8[], %b::int8[])
"""
# Text a rejection row keeps of what a message claimed (its topic, the detail naming what
# was wrong), in characters: enough to read, never enough to strain an index or a page.
REJECTION_TEXT_MAX = 512
# Characters PostgreSQL's text cannot hold (NUL) or a reader should not be handed raw
# (other controls, lone surrogates): kept visible as escapes.
_UNSAFE_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_INSERT_GAPS = """
INSERT INTO gaps (device_id, seq, from_time, to_time, reason, sensor)
SELECT * FROM unnest(%b::text[], %b::int8[], %b::timestamptz[], %b::timestamptz[], %b::text[],
                     %b::text[])
"""


InTransaction = Callable[[Conn, Sequence[AcceptedEnvelope]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class EnvelopeOutcome:
    """What the database holds for one accepted envelope after the batch committed."""

    dev: str
    seq: int
    new: bool
    stored: int
    refused: int
    # The (device, seq) was stored earlier with different content: a hub that lost its
    # outbox state reuses numbers. Not a replay: rejected with reason ``duplicate``.
    conflict: bool = False
    # Set by the gateway for an envelope it could not store, and why (``storage_refused``:
    # the database refused its data; ``poison``: every try to store it failed).
    refused_as: Reason | None = None


class BulkWriter:
    def __init__(self, pool: AsyncConnectionPool, mode: StorageMode) -> None:
        self._pool = pool
        self._mode = mode
        self._partitions: set[int] | None = None

    async def write(
        self,
        batch: Batch,
        *,
        first: Callable[[Conn], Awaitable[None]] | None = None,
        also: InTransaction | None = None,
    ) -> list[EnvelopeOutcome]:
        """Store ``batch`` in one transaction, retrying lost connections; see the module doc.

        ``first`` runs as the transaction's first statement (the gateway's consent check: it
        may raise to roll the batch back, and the exception reaches the caller). ``also``
        runs inside the same transaction after the readings are copied, with the envelopes
        that were new: work derived from readings (alert evaluation) then commits atomically
        with them, or not at all.
        """
        delay = RETRY_BASE_S
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                async with self._pool.connection(timeout=CHECKOUT_TIMEOUT_S) as conn:
                    await self._prepare_partitions(conn, batch)
                    async with conn.transaction():
                        if first is not None:
                            await first(conn)
                        try:
                            outcomes, fresh = await self._write(conn, batch)
                            if also is not None and fresh:
                                await also(conn, fresh)
                        except BatchWriteError:
                            raise
                        except Exception as exc:
                            if is_transient(exc):
                                raise
                            # Anything else refuses this batch, typed, so the caller can
                            # store the rest without whatever caused it.
                            raise BatchWriteError(
                                f"batch refused: {type(exc).__name__}: {first_line(exc)}",
                                None,
                                content=is_content_error(exc),
                            ) from exc
                        return outcomes
            except (psycopg.Error, PoolTimeout) as exc:
                if not is_transient(exc):
                    raise BatchWriteError(
                        f"batch refused: {type(exc).__name__}: {first_line(exc)}",
                        None,
                        content=is_content_error(exc),
                    ) from exc
                if attempt == RETRY_ATTEMPTS:
                    raise DatabaseUnavailable(
                        f"batch not stored after {attempt} attempts: {first_line(exc)}"
                    ) from exc
                log.warning(
                    "batch write failed, retrying attempt=%d delay_s=%.2f error=%s",
                    attempt,
                    delay,
                    type(exc).__name__,
                )
                self._partitions = None
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
                delay = min(delay * 2, RETRY_CEILING_S)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _prepare_partitions(self, conn: Conn, batch: Batch) -> None:
        if self._mode is not StorageMode.PLAIN:
            return
        needed = {partition_start_ms(r.t_ms) for env in batch.accepted for r in env.readings}
        if self._partitions is None or not needed <= self._partitions:
            self._partitions = await existing_partitions(conn)
            missing = needed - self._partitions
            if missing:
                self._partitions |= set(await ensure_partitions(conn, missing))
                self._partitions = await existing_partitions(conn)

    async def _write(
        self, conn: Conn, batch: Batch
    ) -> tuple[list[EnvelopeOutcome], list[AcceptedEnvelope]]:
        received = from_ms(batch.received_ms)
        new_keys = await self._insert_envelopes(conn, batch.accepted, batch.received_ms)
        fresh = [e for e in batch.accepted if (e.dev, e.seq) in new_keys]
        fresh, changed = await records.claim(conn, fresh)
        fresh, locked = await locks.claim(conn, fresh, batch.received_ms)
        changed.update(locked)
        accepted = [changed.get((e.dev, e.seq), e) for e in batch.accepted]
        await self._copy_readings(conn, fresh, batch.received_ms)
        await deltas.add(conn, self._mode, [(e.participant_id, e.readings) for e in fresh])
        await review.note_changes(
            conn, [(e.participant_id, e.dev, e.seq, e.readings) for e in fresh]
        )
        outcomes = await self._outcomes(conn, accepted, new_keys)
        conflicts = [e for e, o in zip(accepted, outcomes, strict=True) if o.conflict]
        await self._insert_rejections(conn, batch, fresh, conflicts, received)
        await self._insert_gaps(conn, fresh)
        await sensors.record_reports(conn, fresh, received)
        await time_zones.record_reported(conn, fresh)
        await originals.keep(conn, fresh, received)
        return outcomes, fresh

    async def _insert_envelopes(
        self, conn: Conn, accepted: Sequence[AcceptedEnvelope], received_ms: int
    ) -> set[tuple[str, int]]:
        if not accepted:
            return set()
        cur = await conn.execute(
            _INSERT_ENVELOPES,
            (
                Texts(e.dev for e in accepted),
                Int8s(e.seq for e in accepted),
                Texts(e.participant_id for e in accepted),
                TimestamptzMs(e.sent_ms for e in accepted),
                TimestamptzMs([received_ms] * len(accepted)),
                Byteas(e.envelope_sha256 for e in accepted),
                Int4s(e.reading_count for e in accepted),
                Int4s(len(e.readings) for e in accepted),
                Int4s(sum(r.count for r in e.refusals) for e in accepted),
            ),
        )
        return {(str(d), int(s)) for d, s in await cur.fetchall()}

    async def _copy_readings(
        self, conn: Conn, fresh: Sequence[AcceptedEnvelope], received_ms: int
    ) -> None:
        if not any(e.readings for e in fresh):
            return
        # Envelope i owns COPY lines ends[i - 1] + 1 .. ends[i] (1-based, as the server counts).
        ends: list[int] = []
        owners: list[tuple[str, int]] = []
        current: tuple[str, int] | None = None
        lines = 0
        try:
            async with conn.cursor() as cur:
                cur.adapters.register_dumper(None, EpochMsDumper)
                async with cur.copy(_COPY_READINGS) as copy:
                    copy.set_types(_READING_TYPES)
                    write = copy.write_row
                    for env in fresh:
                        current = (env.dev, env.seq)
                        pid, dev, seq = env.participant_id, env.dev, env.seq
                        for r, consent_id in zip(env.readings, env.consent_ids, strict=True):
                            await write(
                                (
                                    r.t_ms,
                                    pid,
                                    r.metric,
                                    r.value,
                                    r.unit,
                                    dev,
                                    seq,
                                    r.sensor,
                                    received_ms,
                                    consent_id,
                                    list(r.flags) if r.flags else None,
                                    r.user,
                                )
                            )
                        lines += len(env.readings)
                        ends.append(lines)
                        owners.append(current)
        except psycopg.OperationalError:
            raise
        except (psycopg.Error, TypeError, ValueError, OverflowError, struct.error) as exc:
            owner = _copy_error_owner(exc, ends, owners) or current
            where = f"envelope {owner[0]}#{owner[1]}" if owner else "an unknown envelope"
            raise BatchWriteError(
                f"readings of {where} refused by the database: {first_line(exc)}",
                owner,
            ) from exc

    async def _insert_rejections(
        self,
        conn: Conn,
        batch: Batch,
        fresh: Sequence[AcceptedEnvelope],
        conflicts: Sequence[AcceptedEnvelope],
        received: object,
    ) -> None:
        rows = [
            _rejection_row(
                received,
                r.dev,
                r.seq,
                r.participant_id,
                r.reason,
                r.detail,
                None,
                r.reading_count,
                r.first_ms,
                r.last_ms,
                r.topic,
                r.envelope_sha256,
            )
            for r in batch.rejected
        ]
        rows.extend(
            _rejection_row(
                received,
                e.dev,
                e.seq,
                e.participant_id,
                f.reason,
                f.detail,
                f.metric,
                f.count,
                f.first_ms,
                f.last_ms,
                None,
                e.envelope_sha256,
            )
            for e in fresh
            for f in e.refusals
        )
        rows.extend(
            _rejection_row(
                received,
                e.dev,
                e.seq,
                e.participant_id,
                Reason.DUPLICATE,
                "seq already stored with different content",
                None,
                e.reading_count,
                min((r.t_ms for r in e.readings), default=None),
                max((r.t_ms for r in e.readings), default=None),
                None,
                e.envelope_sha256,
            )
            for e in conflicts
        )
        if rows:
            await conn.execute(_INSERT_REJECTIONS, [list(col) for col in zip(*rows, strict=True)])

    async def _insert_gaps(self, conn: Conn, fresh: Sequence[AcceptedEnvelope]) -> None:
        rows = [
            (e.dev, e.seq, from_ms(g.from_ms), from_ms(g.to_ms), g.reason, g.sensor)
            for e in fresh
            for g in e.gaps
        ]
        if rows:
            await conn.execute(_INSERT_GAPS, [list(col) for col in zip(*rows, strict=True)])

    async def _outcomes(
        self, conn: Conn, accepted: Sequence[AcceptedEnvelope], new_keys: set[tuple[str, int]]
    ) -> list[EnvelopeOutcome]:
        earlier = await stored_envelopes(
            conn, [(e.dev, e.seq) for e in accepted if (e.dev, e.seq) not in new_keys]
        )
        out: list[EnvelopeOutcome] = []
        for e in accepted:
            key = (e.dev, e.seq)
            if key in new_keys:
                out.append(
                    EnvelopeOutcome(
                        e.dev, e.seq, True, len(e.readings), sum(r.count for r in e.refusals)
                    )
                )
            elif (first := earlier[key]).envelope_sha256 == e.envelope_sha256:
                out.append(first.outcome())
            else:
                out.append(EnvelopeOutcome(e.dev, e.seq, False, 0, e.reading_count, True))
        return out


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """An envelope as stored the first time (a row of ``envelopes``)."""

    device_id: str
    seq: int
    stored_count: int
    refused_count: int
    envelope_sha256: bytes

    def outcome(self) -> EnvelopeOutcome:
        """What a byte-identical copy of it is receipted with: a replay, with these counts."""
        return EnvelopeOutcome(
            self.device_id, self.seq, False, self.stored_count, self.refused_count
        )


async def stored_envelopes(
    conn: Conn, keys: Collection[tuple[str, int]]
) -> dict[tuple[str, int], StoredEnvelope]:
    """The envelopes stored under these (device, seq) keys, by key."""
    if not keys:
        return {}
    async with conn.cursor(row_factory=class_row(StoredEnvelope)) as cur:
        await cur.execute(_EXISTING_COUNTS, ([dev for dev, _ in keys], [seq for _, seq in keys]))
        return {(s.device_id, s.seq): s for s in await cur.fetchall()}


def _rejection_row(
    received: object,
    dev: str | None,
    seq: int | None,
    participant_id: str | None,
    reason: Reason,
    detail: str | None,
    metric: str | None,
    count: int,
    first_ms: int | None,
    last_ms: int | None,
    topic: str | None,
    digest: bytes,
) -> tuple[object, ...]:
    """A row that stores whatever the envelope claimed: times kept as milliseconds (and as
    timestamps only where they convert), text escaped and cut to ``REJECTION_TEXT_MAX``."""
    return (
        received,
        storable_text(dev),
        seq,
        storable_text(participant_id),
        reason.value,
        storable_text(detail),
        storable_text(metric),
        count,
        from_ms_or_none(first_ms),
        from_ms_or_none(last_ms),
        storable_text(topic),
        digest,
        first_ms,
        last_ms,
    )


def storable_text(text: str | None, most: int = REJECTION_TEXT_MAX) -> str | None:
    """``text`` as PostgreSQL's text can hold it and a person can read it: control
    characters and lone surrogates as ``\\xNN`` / ``\\uNNNN`` escapes, at most ``most``
    characters (an ellipsis marks a cut)."""
    if text is None:
        return None
    if _UNSAFE_TEXT.search(text) is not None:
        text = _UNSAFE_TEXT.sub(lambda m: ascii(m.group())[1:-1], text)
    return text if len(text) <= most else text[: most - 1] + "\u2026"


def _copy_error_owner(
    exc: BaseException, ends: Sequence[int], owners: Sequence[tuple[str, int]]
) -> tuple[str, int] | None:
    """Which envelope's row the server refused, from the COPY line number in its context."""
    context = exc.diag.context if isinstance(exc, psycopg.Error) else None
    if context:
        m = _COPY_LINE.search(context)
        if m:
            i = bisect.bisect_left(ends, int(m.group(1)))
            if int(m.group(1)) >= 1 and i < len(owners):
                return owners[i]
    return None
