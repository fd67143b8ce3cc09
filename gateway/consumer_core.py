"""The consumer's work between a broker and the database, whatever the broker.

Messages arrive in an inbox (the broker's side, ``gateway.consumer`` for MQTT and
``gateway.amqp`` for RabbitMQ over AMQP, puts them there); batches are collected, decoded and
verified while the previous batch is stored, written in one transaction each
(``gateway.storing``), receipted and acknowledged to the broker after COMMIT, in order. A
message the broker delivers again is triaged first (set apart, or refused as poison).

Back-pressure: at most ``MAX_UNACKED`` messages and ``MAX_UNACKED_BYTES`` of payload are held
between arrival and acknowledgement; the broker's side enforces both.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec
from psycopg_pool import AsyncConnectionPool

from consent import records
from consent.errors import ConsentChanged
from consent.gate import ConsentSnapshot
from gateway.consumer_stats import Histogram, Stats
from gateway.directory import Directory
from gateway.flow import ByteBudget, Inbox
from gateway.judging import (
    Early,
    Judged,
    Key,
    Message,
    claimed_key,
    decode_and_check,
    faulted,
    key,
    poisoned_unread,
    rejected_receipt,
    replay_of,
    seal_each,
    verify_and_admit_one,
)
from gateway.storing import POISON_AFTER, BatchStore, outage_pause
from ingest import pipeline
from ingest.model import AcceptedEnvelope, Reason, Receipt, RejectedEnvelope
from ingest.receipts import RECEIPT_ACCEPTED, RECEIPT_REJECTED
from storage.errors import first_line, is_transient
from storage.writer import (
    CHECKOUT_TIMEOUT_S,
    BulkWriter,
    EnvelopeOutcome,
    InTransaction,
    stored_envelopes,
)

__all__ = ["BatchConsumer", "ConsumerConfig", "Histogram", "Stats"]

log = logging.getLogger(__name__)

# Messages held between arrival and acknowledgement, whatever the broker sends: the batch
# being written plus the next batches (about 2 MB at 1 KiB per envelope).
MAX_UNACKED = 2000
# Bytes of payload held between arrival and acknowledgement: the count cap alone would let
# 2000 maximum-size envelopes (256 KiB each) hold 512 MB. A decoded envelope costs about four
# times its size (measured: 657 KB for one of 170 KB with 1000 readings), so 16 MiB of
# payload is some 64 MiB of the worker's memory (docs/performance.md, bench memory); it is
# still some 15,000 ordinary envelopes, far more than the count cap lets in.
MAX_UNACKED_BYTES = 16 * 1024 * 1024
# While a batch is collected, its messages are decoded and their signatures checked (with the
# key each device had in an earlier batch) in chunks of this many: the batch then needs only
# its database reads and admission once it closes. A chunk per message would cost an
# executor hand-off each.
EARLY_CHUNK = 32
# Device keys remembered for those early checks; past this many the memory starts afresh.
KNOWN_KEYS_MAX = 100_000
# A message delivered again after a batch holding it stopped a worker this many times (not
# counting its first delivery) is handled in a batch of its own (``Consumer._triage``).
ALONE_AFTER = 1


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    host: str
    port: int
    client_id: str
    shared: bool = True
    max_batch: int = 500
    max_wait_s: float = 0.05
    keepalive_s: int = 30
    # False only for brokers that speak MQTT 3.1.1 alone (amqtt in the demo's reduced mode):
    # no shared subscription, no Receive Maximum.
    mqtt5: bool = True


class BatchConsumer:
    """Batches from a broker to the database and back: the broker's side (connecting,
    acknowledging, publishing receipts) is a subclass's."""

    def __init__(
        self,
        config: ConsumerConfig,
        pool: AsyncConnectionPool,
        writer: BulkWriter,
        receipt_key: ec.EllipticCurvePrivateKey,
        *,
        clock: Callable[[], float] = time.time,
        also: InTransaction | None = None,
    ) -> None:
        self.config = config
        self.stats = Stats()
        self._pool = pool
        self._writer = writer
        self._storing = BatchStore(pool, writer, self.stats, also)
        self._receipt_key = receipt_key
        self._clock = clock
        self._directory = Directory()
        # Device id -> the key its record held when last read (replaced, never changed in
        # place: executor threads read it while the loop makes the next one).
        self._known_keys: dict[str, ec.EllipticCurvePublicKey] = {}
        # Messages set apart by _triage, each to be a batch of its own.
        self._alone: deque[Message] = deque()
        # Unbounded as a queue; bounded by the broker's side (MAX_UNACKED messages until
        # acknowledged) and by the bytes they hold.
        self._inbox: Inbox[Message] = Inbox()
        self._bytes = ByteBudget(MAX_UNACKED_BYTES)
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribed = asyncio.Event()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def wait_subscribed(self) -> None:
        """Return once the broker has confirmed the subscription (used at start-up)."""
        await self._subscribed.wait()

    # --- event loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect and process batches until cancelled."""
        self._loop = asyncio.get_running_loop()
        await self._open_transport()
        # Two batches in flight: while one is written and receipted, the next is collected,
        # decoded and verified (signature checks in a thread: the CPU work overlaps the
        # database's). Batches are stored and acknowledged strictly in order. A message set
        # apart (_triage) is handled with nothing beside it: the batch before it finishes
        # first, and the next is collected only once it has finished, so a message that
        # kills the worker takes no other message's handling with it (each would count a
        # try against that message, and an innocent one could reach POISON_AFTER).
        judging = asyncio.create_task(self._next_judged(), name="consumer-judge")
        try:
            while True:
                judged, alone = await judging
                if alone or self._alone:
                    await self._store_and_finish(judged)
                    judging = asyncio.create_task(self._next_judged(), name="consumer-judge")
                    continue
                judging = asyncio.create_task(self._next_judged(), name="consumer-judge")
                await self._store_and_finish(judged)
        finally:
            judging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await judging
            self._stopping.set()
            await self._close_transport()

    async def _collect(self, early: Callable[[list[Message]], None]) -> list[Message]:
        """A batch: the first message, then whatever arrives within ``max_wait_s``, up to
        ``max_batch``. What is queued already is taken at once, without a timer or a wake-up
        per message. Every ``EARLY_CHUNK`` messages taken while the batch is still open are
        handed to ``early``, until a message that must be triaged first (``_triage``) is
        taken. A message set aside to be handled alone is a batch of its own."""
        if self._alone:
            return [self._alone.popleft()]
        inbox, most = self._inbox, self.config.max_batch
        loop = asyncio.get_running_loop()
        await inbox.wait(None)
        items = inbox.take(most)
        handed = 0
        early_ok = True
        deadline = loop.time() + self.config.max_wait_s
        while len(items) < most:
            if early_ok and len(items) - handed >= EARLY_CHUNK:
                chunk = items[handed:]
                early_ok = not any(self._needs_triage(m) for m in chunk)
                if early_ok:
                    early(chunk)
                    handed = len(items)
            left = deadline - loop.time()
            if left <= 0 or not await inbox.wait(left):
                break
            items.extend(inbox.take(most - len(items)))
        return items

    def _needs_triage(self, m: Message) -> bool:
        poisoned = self._storing.poisoned
        return m.dup or (bool(poisoned) and hashlib.sha256(m.payload).digest() in poisoned)

    async def _triage(
        self, messages: Sequence[Message], *, alone: bool
    ) -> tuple[list[Message], list[tuple[Message, RejectedEnvelope]]]:
        """Before anything handles them: the messages to handle now, and those refused.

        A message the broker delivers again (DUP) was held by a worker that stopped before
        acknowledging it, perhaps killed by it without an exception to catch. Each batch that
        holds such messages counts a try against them as it starts; one tried
        ``POISON_AFTER`` times, or a copy of one refused as poison, is refused as ``poison``
        unread. One tried ``ALONE_AFTER`` times is set apart to be a batch of its own, the
        least tried first: what kills a worker is then found alone, and the messages that
        were only beside it are handled.
        """
        poisoned = self._storing.poisoned
        if not poisoned and not any(m.dup for m in messages):
            return list(messages), []
        digests = {m: hashlib.sha256(m.payload).digest() for m in messages}
        tries = await self._storing.tries_of({digests[m] for m in messages if m.dup})
        go: list[Message] = []
        apart: list[tuple[int, Message]] = []
        refused: list[tuple[Message, RejectedEnvelope]] = []
        for m in messages:
            digest, n = digests[m], tries.get(digests[m], 0)
            if digest in poisoned or n >= POISON_AFTER:
                self._storing.remember_poisoned([digest])
                refused.append((m, poisoned_unread(m.topic, digest, n)))
            elif n >= ALONE_AFTER and not alone:
                apart.append((n, m))
            else:
                go.append(m)
        self._alone.extend(m for _, m in sorted(apart, key=lambda item: item[0]))
        await self._storing.count_redelivered({digests[m] for m in go if m.dup})
        if refused or apart:
            log.warning("redelivered messages: refused=%d set apart=%d", len(refused), len(apart))
        return go, refused

    async def _next_judged(self) -> tuple[Judged, bool]:
        """The next batch judged, and whether it is a message set apart (handled alone)."""
        alone = bool(self._alone)  # _collect takes from it before anything else
        return await self._collect_and_judge(), alone

    async def _collect_and_judge(self) -> Judged:
        """Collect a batch, decoding and checking its signatures as it fills, then judge it."""
        loop = asyncio.get_running_loop()
        keys = self._known_keys
        chunks: list[asyncio.Future[list[Early]]] = []
        messages = await self._collect(
            lambda chunk: chunks.append(loop.run_in_executor(None, decode_and_check, chunk, keys))
        )
        return await self._judge(messages, chunks, keys)

    async def _judge(
        self,
        messages: Sequence[Message],
        chunks: Sequence[asyncio.Future[list[Early]]],
        keys: Mapping[str, ec.EllipticCurvePublicKey],
    ) -> Judged:
        """Decode (what the early chunks did not), verify and admit a batch (nothing written
        yet)."""
        started = time.monotonic()
        results: list[Early] = []
        for chunk in chunks:
            results.extend(await chunk)
        handled = list(messages[: len(results)])
        rest, unread = await self._triage(messages[len(results) :], alone=len(messages) == 1)
        if rest:
            results.extend(
                await asyncio.get_running_loop().run_in_executor(None, decode_and_check, rest, keys)
            )
            handled.extend(rest)
        self.stats.messages += len(handled) + len(unread)
        decoded: list[tuple[Message, pipeline.Decoded]] = []
        checks: list[pipeline.SignatureCheck | None] = []
        undecodable: list[tuple[Message, RejectedEnvelope]] = []
        undecodable.extend(unread)
        for m, (d, check) in zip(handled, results, strict=True):
            if isinstance(d, RejectedEnvelope):
                undecodable.append((m, d))
            else:
                decoded.append((m, d))
                checks.append(check)
        judged = Judged(decoded, undecodable, self._now_ms(), checks)
        await self._admit(judged)
        self.stats.batch_seconds["judge"].observe(time.monotonic() - started)
        return judged

    async def _admit(self, judged: Judged) -> None:
        judged.accepted, judged.refused, judged.consent = await self._verify_and_admit(
            judged.decoded, judged.checks, judged.now_ms
        )
        await self._find_replays(judged)

    async def _find_replays(self, judged: Judged) -> None:
        """Take byte-identical copies of envelopes stored earlier out of the refused: they
        are replays, whatever judging them now says. Each was verified and admitted when it
        was stored, and its hub, which republishes until it has a receipt, must be told so;
        since then the window times are judged in has moved, or a key was rotated. Only the
        refused are looked up: a copy judged as accepted is found by the writer's dedupe.
        A message found here leaves ``decoded`` too, so that judging again cannot refuse it.
        """
        asked = {k for _, r in judged.rejected if (k := claimed_key(r)) is not None}
        if not asked:
            return
        delay = 0.1
        while True:
            try:
                async with self._pool.connection(timeout=CHECKOUT_TIMEOUT_S) as conn:
                    stored = await stored_envelopes(conn, asked)
                break
            except Exception as exc:  # noqa: BLE001 - the refusals stand, the batch goes on
                if not is_transient(exc):
                    log.error("replays not looked up; refusals stand: %s", first_line(exc))
                    return
                delay = await outage_pause(self.stats, delay, exc)
        found: set[Message] = set()
        for m, r in judged.rejected:
            outcome = replay_of(r, stored)
            if outcome is not None:
                judged.replays.append((m, outcome))
                found.add(m)
        if not found:
            return
        judged.undecodable = [(m, r) for m, r in judged.undecodable if m not in found]
        judged.refused = [(m, r) for m, r in judged.refused if m not in found]
        kept = [i for i, (m, _) in enumerate(judged.decoded) if m not in found]
        judged.decoded = [judged.decoded[i] for i in kept]
        judged.checks = [judged.checks[i] for i in kept]

    async def _store_and_finish(self, judged: Judged) -> None:
        started = time.monotonic()
        outcomes: dict[Key, EnvelopeOutcome] = {}
        while judged.accepted or judged.rejected:  # not when all were replays or set apart
            unchanged = functools.partial(
                records.confirm_unchanged,
                participants={a.participant_id for _, a in judged.accepted},
                snapshot=judged.consent,
            )
            try:
                outcomes = await self._storing.store(
                    [a for _, a in judged.accepted],
                    [r for _, r in judged.rejected],
                    judged.now_ms,
                    unchanged,
                )
                break
            except ConsentChanged as exc:
                # Judged on consent that changed before the batch could commit: judge again.
                self.stats.consent_rechecks += 1
                log.info("consent changed while the batch was judged; judging again: %s", exc)
                await self._admit(judged)
        stored = time.monotonic()
        self.stats.batch_seconds["store"].observe(stored - started)
        await self._finish(judged, outcomes)
        self.stats.batch_seconds["finish"].observe(time.monotonic() - stored)

    async def _verify_and_admit(
        self,
        decoded: Sequence[tuple[Message, pipeline.Decoded]],
        checks: Sequence[pipeline.SignatureCheck | None],
        now_ms: int,
    ) -> tuple[
        list[tuple[Message, AcceptedEnvelope]],
        list[tuple[Message, RejectedEnvelope]],
        ConsentSnapshot,
    ]:
        if not decoded:
            return [], [], ConsentSnapshot()
        delay = 0.1
        while True:
            try:
                async with self._pool.connection(timeout=CHECKOUT_TIMEOUT_S) as conn:
                    devices, consent = await self._directory.read(
                        conn, pipeline.devices_of(d for _, d in decoded)
                    )
                break
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = await outage_pause(self.stats, delay, exc)
        self._remember_keys(devices)

        def work() -> list[AcceptedEnvelope | RejectedEnvelope]:
            out: list[AcceptedEnvelope | RejectedEnvelope] = []
            for (_, d), check in zip(decoded, checks, strict=True):
                try:
                    out.append(verify_and_admit_one(d, devices, check, consent, now_ms))
                except Exception as exc:  # noqa: BLE001 - one message's fault is its own
                    out.append(faulted(d.inbound, d.envelope_sha256, "judging", exc, d))
            return out

        results = await asyncio.get_running_loop().run_in_executor(None, work)
        accepted: list[tuple[Message, AcceptedEnvelope]] = []
        rejected: list[tuple[Message, RejectedEnvelope]] = []
        for (m, _), r in zip(decoded, results, strict=True):
            if isinstance(r, AcceptedEnvelope):
                accepted.append((m, r))
            else:
                rejected.append((m, r))
        return accepted, rejected, consent

    def _remember_keys(self, devices: Mapping[str, pipeline.DeviceRecord]) -> None:
        """Keep the keys just read for the next batches' early signature checks."""
        known = self._known_keys
        if all(known.get(dev) is record.public_key for dev, record in devices.items()):
            return
        fresh = {dev: record.public_key for dev, record in devices.items()}
        self._known_keys = fresh if len(known) >= KNOWN_KEYS_MAX else {**known, **fresh}

    async def _finish(self, judged: Judged, outcomes: dict[Key, EnvelopeOutcome]) -> None:
        """After COMMIT: a signed receipt per envelope, and the acknowledgement to the broker.

        The batch's receipts are signed together (one signature per tree of receipts) in a
        thread, then published, then the messages acknowledged in the batch's order.
        """
        now_ms = judged.now_ms
        answers: list[tuple[Message, Receipt | None]] = []
        for m, a in judged.accepted:
            answers.append((m, self._accepted_receipt(a, outcomes[key(a)], now_ms)))
        for m, r in judged.rejected:
            self.stats.rejected_envelopes[r.reason.value] += 1
            answers.append((m, rejected_receipt(r, now_ms)))
        if judged.replays:
            await self._storing.forget(
                {hashlib.sha256(m.payload).digest() for m, _ in judged.replays}
            )
        for m, o in judged.replays:
            self.stats.envelopes_replayed += 1
            answers.append(
                (m, Receipt(o.dev, o.seq, RECEIPT_ACCEPTED, o.stored, o.refused, now_ms))
            )
        signer = self._receipt_key
        answered = [r for _, r in answers if r is not None]
        sealed = iter(
            await asyncio.get_running_loop().run_in_executor(None, seal_each, answered, signer)
        )
        receipts: list[tuple[Receipt, bytes]] = []
        for _, receipt in answers:
            if receipt is not None and (data := next(sealed)) is not None:
                receipts.append((receipt, data))
        await self._publish_receipts(receipts)
        await self._ack_all([m for m, _ in answers])
        done_ms = self._now_ms()
        for m, _ in answers:
            self.stats.receipt_seconds.observe(max(0, done_ms - m.received_ms) / 1000)

    def _accepted_receipt(self, a: AcceptedEnvelope, o: EnvelopeOutcome, now_ms: int) -> Receipt:
        """The receipt of a verified envelope, counted in the stats."""
        if o.refused_as is not None or o.conflict:
            reason = o.refused_as or Reason.DUPLICATE
            self.stats.rejected_envelopes[reason.value] += 1
            return Receipt(a.dev, a.seq, RECEIPT_REJECTED, 0, o.refused, now_ms, reason.value)
        if o.new:
            self.stats.envelopes_new += 1
            self.stats.readings_stored += o.stored
            for f in a.refusals:
                self.stats.rejected_readings[f.reason.value] += f.count
        else:
            self.stats.envelopes_replayed += 1
        # Accepted even when consent refused every reading: the envelope was processed, and
        # ``refused`` tells the hub how many readings were not stored.
        return Receipt(a.dev, a.seq, RECEIPT_ACCEPTED, o.stored, o.refused, now_ms)

    # --- the broker's side ---------------------------------------------------------------
    async def _open_transport(self) -> None:
        """Connect to the broker; messages then arrive in the inbox."""
        raise NotImplementedError

    async def _close_transport(self) -> None:
        raise NotImplementedError

    async def _ack(self, m: Message) -> None:
        """Acknowledge a handled message to the broker (after its batch committed)."""
        raise NotImplementedError

    async def _ack_all(self, handled: list[Message]) -> None:
        """Acknowledge a committed batch's messages (one by one, unless the broker's side
        does better)."""
        for m in handled:
            await self._ack(m)

    async def _publish_receipts(self, receipts: list[tuple[Receipt, bytes]]) -> None:
        """Publish a batch's sealed receipts (one by one, unless the broker's side does
        better)."""
        for receipt, data in receipts:
            await self._publish_receipt(receipt, data)

    async def _publish_receipt(self, receipt: Receipt, data: bytes) -> None:
        raise NotImplementedError
