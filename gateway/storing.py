"""Storing a judged batch so that no item of it can stop the others.

One transaction per batch (``BulkWriter``), retried without end through a database outage.
What the database refuses of one item is found and left out, so the rest is stored: an
envelope whose data is refused is recorded as ``storage_refused``, a rejection row that
cannot be stored is replaced by its bare minimum, and a batch that fails with no cause in its
data is held and tried again, each try counted durably against its messages, until those
tried ``POISON_AFTER`` times are refused as ``poison`` (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

from psycopg_pool import AsyncConnectionPool

from gateway.consumer_stats import Stats
from gateway.judging import Key, key
from ingest import pipeline
from ingest.model import AcceptedEnvelope, Batch, Reason, RejectedEnvelope
from ingest.wire import is_device_id
from storage import faults
from storage.db import Conn
from storage.errors import BatchWriteError, DatabaseUnavailable, first_line
from storage.writer import CHECKOUT_TIMEOUT_S, BulkWriter, EnvelopeOutcome, InTransaction

log = logging.getLogger(__name__)

# Database outage: retry the same batch forever (nothing is acknowledged meanwhile), backing
# off to this ceiling between attempts.
OUTAGE_RETRY_CEILING_S = 10.0
# A batch that fails with no cause found in its data (nothing of it stores, nothing says
# why) is held and tried again; a message tried this many times is refused as ``poison``.
# Each try waits as an outage does (0.1 s doubling), so a fault that lasts under about two
# seconds (a schema migrating, a lock) costs nothing, and one that does not frees the
# worker in seconds rather than never.
POISON_AFTER = 5
# Poisoned digests a worker remembers; past this many the memory starts afresh (the counts
# stay in message_faults, so a copy redelivered is refused at once all the same).
POISONED_MAX = 10_000


async def outage_pause(stats: Stats, delay: float, exc: BaseException) -> float:
    """Wait out one try of a database outage (with jitter); the next delay."""
    stats.database_retries += 1
    log.warning(
        "database unavailable, batch held unacknowledged retry_in_s=%.1f error=%s",
        delay,
        type(exc).__name__,
    )
    await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
    return min(delay * 2, OUTAGE_RETRY_CEILING_S)


class BatchStore:
    """Stores judged batches for one consumer; holds the digests with tries counted."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        writer: BulkWriter,
        stats: Stats,
        also: InTransaction | None = None,
    ) -> None:
        self._pool = pool
        self._writer = writer
        self._also = also
        self.stats = stats
        # Digests of messages with tries counted in message_faults (forgotten once handled).
        self._faulted: set[bytes] = set()
        # Digests refused as poison since this worker started: a copy is refused at once.
        self.poisoned: set[bytes] = set()

    async def store(
        self,
        accepted: Sequence[AcceptedEnvelope],
        rejected: Sequence[RejectedEnvelope],
        now_ms: int,
        first: Callable[[Conn], Awaitable[None]],
    ) -> dict[Key, EnvelopeOutcome]:
        """Write the batch; the outcome per (device, seq, digest). Retries until committed.

        ``first`` opens each write transaction (the consent check); what it raises reaches
        the caller with nothing of that transaction stored.

        The same envelope twice in one batch (a republish racing its first copy) is stored
        once and both messages get its outcome. Different content under one (device, seq)
        goes to a later round, where the database reports it as a ``duplicate`` conflict.
        """
        rounds: list[dict[Key, AcceptedEnvelope]] = []
        seen: dict[tuple[str, int], set[bytes]] = {}
        for a in accepted:
            digests = seen.setdefault((a.dev, a.seq), set())
            if a.envelope_sha256 in digests:
                continue
            if len(rounds) <= len(digests):
                rounds.append({})
            rounds[len(digests)][key(a)] = a
            digests.add(a.envelope_sha256)
        result: dict[Key, EnvelopeOutcome] = {}
        envelope_rejections = list(rejected)
        for envelopes in rounds or [{}]:
            result.update(
                await self._commit(list(envelopes.values()), envelope_rejections, now_ms, first)
            )
            envelope_rejections = []
        self.stats.batches += 1
        return result

    async def _commit(
        self,
        to_store: list[AcceptedEnvelope],
        rejected: list[RejectedEnvelope],
        now_ms: int,
        first: Callable[[Conn], Awaitable[None]],
        *,
        alone: bool = False,
    ) -> dict[Key, EnvelopeOutcome]:
        """Store envelopes and rejection rows in one transaction, retrying through outages.

        Whatever one item makes the database (or the building of its rows) refuse is found
        and left out, so the rest is stored: an envelope whose data is refused is recorded
        as a rejection (``storage_refused``), a rejection row that cannot be stored is
        replaced by its bare minimum. A fault that is not a content error (a bug, a schema
        that does not match) refuses an item only when other items stored beside it
        (``_isolate``); when nothing stores, the batch is held and tried again, each try
        counted against its messages, until those tried ``POISON_AFTER`` times are refused
        as ``poison``. ``alone``: one item of an isolation; a fault raises ``_Fault``.
        """
        to_store, rejected = list(to_store), list(rejected)
        result: dict[Key, EnvelopeOutcome] = {}
        bared: set[bytes] = set()
        delay = 0.1
        while True:
            batch = Batch(tuple(to_store), tuple(rejected), now_ms)
            try:
                outcomes = await self._writer.write(batch, first=first, also=self._also)
                break
            except BatchWriteError as exc:
                culprit = next((a for a in to_store if (a.dev, a.seq) == exc.envelope), None)
                if culprit is None and len(to_store) + len(rejected) > 1:
                    done, to_store, rejected = await self._isolate(
                        to_store, rejected, now_ms, first
                    )
                    result.update(done)
                    if not to_store and not rejected:
                        return result
                    # Nothing stored beside them: what is left is held below.
                elif culprit is None and not to_store:
                    (row,) = rejected
                    if row.envelope_sha256 not in bared:
                        bared.add(row.envelope_sha256)
                        rejected = [bare_rejection(row, exc)]
                        continue
                elif exc.content:
                    self._refuse(
                        culprit or to_store[0],
                        Reason.STORAGE_REFUSED,
                        exc,
                        to_store,
                        rejected,
                        result,
                    )
                    continue
                if alone:
                    raise _Fault(exc) from exc
                delay, poisoned = await self._hold(to_store, rejected, exc, delay)
                rejected = [
                    bare_rejection(r, exc, Reason.POISON) if r.envelope_sha256 in poisoned else r
                    for r in rejected
                ]
                for a in [a for a in to_store if a.envelope_sha256 in poisoned]:
                    self._refuse(a, Reason.POISON, exc, to_store, rejected, result)
            except DatabaseUnavailable as exc:
                delay = await outage_pause(self.stats, delay, exc)
        by_key = {(a.dev, a.seq): key(a) for a in to_store}
        result.update({by_key[(o.dev, o.seq)]: o for o in outcomes})
        await self._forget_faults(batch)
        return result

    def _refuse(
        self,
        a: AcceptedEnvelope,
        reason: Reason,
        exc: BaseException,
        to_store: list[AcceptedEnvelope],
        rejected: list[RejectedEnvelope],
        result: dict[Key, EnvelopeOutcome],
    ) -> None:
        """Take ``a`` out of what is stored: its rejection row joins ``rejected``, its outcome
        ``result``."""
        log.warning(
            "envelope refused at storage device=%s seq=%d reason=%s", a.dev, a.seq, reason.value
        )
        to_store.remove(a)
        rejected.append(as_rejected(a, reason, exc))
        result[key(a)] = EnvelopeOutcome(a.dev, a.seq, True, 0, a.reading_count, refused_as=reason)

    async def _isolate(
        self,
        envelopes: Sequence[AcceptedEnvelope],
        rows: Sequence[RejectedEnvelope],
        now_ms: int,
        first: Callable[[Conn], Awaitable[None]],
    ) -> tuple[dict[Key, EnvelopeOutcome], list[AcceptedEnvelope], list[RejectedEnvelope]]:
        """A refused batch whose culprit is not known: each item in a transaction of its own.

        Returns the outcomes of what was stored (or refused for its content), and what is
        left: nothing when some item stored, since the faults then lie with the items that
        raised them and these are refused (``storage_refused``); otherwise the faulted items,
        for the caller to hold.
        """
        done: dict[Key, EnvelopeOutcome] = {}
        faulted: list[tuple[AcceptedEnvelope, _Fault]] = []
        faulted_rows: list[RejectedEnvelope] = []
        stored = False
        for one in envelopes:
            try:
                outcome = await self._commit([one], [], now_ms, first, alone=True)
            except _Fault as fault:
                faulted.append((one, fault))
                continue
            done.update(outcome)
            stored = stored or outcome[key(one)].refused_as is None
        for row in rows:
            try:
                await self._commit([], [row], now_ms, first, alone=True)
            except _Fault:
                faulted_rows.append(row)
                continue
            stored = True
        if not stored:
            return done, [a for a, _ in faulted], faulted_rows
        refusals: list[RejectedEnvelope] = []
        for a, failed in faulted:
            self._refuse(a, Reason.STORAGE_REFUSED, failed.error, [a], refusals, done)
        if refusals:
            done.update(await self._commit([], refusals, now_ms, first))
        for row in faulted_rows:
            log.error("rejection row not stored, even bare: digest=%s", row.envelope_sha256.hex())
        return done, [], []

    async def _hold(
        self,
        envelopes: Sequence[AcceptedEnvelope],
        rows: Sequence[RejectedEnvelope],
        exc: BaseException,
        delay: float,
    ) -> tuple[float, set[bytes]]:
        """Nothing of a batch stores and nothing in it says why: count a try against each of
        its messages (durably, by digest) and wait. Returns the next delay and the digests
        tried ``POISON_AFTER`` times, which the caller refuses as ``poison``."""
        self.stats.held_batches += 1
        digests = {a.envelope_sha256 for a in envelopes} | {r.envelope_sha256 for r in rows}
        log.error("batch held: refused with no cause in its data error=%s", first_line(exc))
        tries = await self._count(digests, first_line(exc))
        poisoned = {d for d, n in tries.items() if n >= POISON_AFTER}
        if poisoned:
            return delay, poisoned
        return await outage_pause(self.stats, delay, exc), poisoned

    async def tries_of(self, digests: Collection[bytes]) -> dict[bytes, int]:
        """The tries counted against these messages; none known when the database cannot
        say (the messages are then simply handled)."""
        try:
            async with self._pool.connection(timeout=CHECKOUT_TIMEOUT_S) as conn:
                return await faults.tries(conn, digests)
        except Exception as exc:  # noqa: BLE001 - handled as if never tried
            log.error("tries not read: %s", first_line(exc))
            return {}

    async def count_redelivered(self, digests: Collection[bytes]) -> None:
        """Count a try against messages delivered again (MQTT DUP) as their handling starts:
        a worker that stops while handling them (killed by one of them, perhaps, without an
        exception to catch) leaves the count on record. Forgotten once they are handled."""
        if digests:
            await self._count(digests, "delivered again: a worker stopped while handling it")

    async def _count(self, digests: Collection[bytes], error: str) -> dict[bytes, int]:
        """One more try against each message, durably; a count not kept (the database away)
        is an empty answer: the message is simply tried again."""
        tries: dict[bytes, int] = {}
        try:
            async with self._pool.connection(timeout=CHECKOUT_TIMEOUT_S) as conn:
                tries = await faults.record(conn, digests, error)
        except Exception as counting:  # noqa: BLE001 - a count not kept is tried again
            log.error("tries not counted: %s", first_line(counting))
        self._faulted |= set(digests)
        self.remember_poisoned(d for d, n in tries.items() if n >= POISON_AFTER)
        return tries

    def remember_poisoned(self, digests: Iterable[bytes]) -> None:
        """Digests refused as poison: a copy delivered to this worker is refused at once."""
        if len(self.poisoned) >= POISONED_MAX:
            self.poisoned.clear()
        self.poisoned.update(digests)

    async def _forget_faults(self, batch: Batch) -> None:
        done = {a.envelope_sha256 for a in batch.accepted}
        done |= {r.envelope_sha256 for r in batch.rejected}
        await self.forget(done)

    async def forget(self, handled: Collection[bytes]) -> None:
        """Messages tried before and handled now lose their count, except those refused as
        poison: their count stays, so a copy delivered later is refused at once."""
        if not self._faulted:
            return
        forget = self._faulted & set(handled)
        self._faulted -= forget
        forget -= self.poisoned
        if forget:
            with contextlib.suppress(Exception):
                async with self._pool.connection(timeout=CHECKOUT_TIMEOUT_S) as conn:
                    await faults.forget(conn, forget)


def as_rejected(a: AcceptedEnvelope, reason: Reason, exc: BaseException) -> RejectedEnvelope:
    """The rejection of an envelope verified but not stored, with the first line of why."""
    times = [r.t_ms for r in a.readings]
    return RejectedEnvelope(
        reason,
        first_line(exc),
        pipeline.up_topic(a.dev),
        a.envelope_sha256,
        dev=a.dev,
        seq=a.seq,
        participant_id=a.participant_id,
        reading_count=a.reading_count,
        first_ms=min(times, default=None),
        last_ms=max(times, default=None),
    )


def bare_rejection(
    r: RejectedEnvelope, exc: BaseException, reason: Reason | None = None
) -> RejectedEnvelope:
    """What of ``r`` surely stores: its reason (or ``reason``), digest and counts, the
    device only where it is a valid id, and why the full row was not stored."""
    dev = r.dev if is_device_id(r.dev) else None
    return RejectedEnvelope(
        reason or r.reason,
        f"row not stored as built: {first_line(exc)}" if reason is None else first_line(exc),
        "",
        r.envelope_sha256,
        dev=dev,
        seq=r.seq,
        reading_count=r.reading_count,
    )


class _Fault(Exception):
    """One item of an isolation failed with a fault that is not a content error."""

    def __init__(self, error: BatchWriteError) -> None:
        super().__init__(str(error))
        self.error = error
