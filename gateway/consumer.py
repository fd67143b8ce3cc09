"""The MQTT consumer: envelopes in, one transaction per batch, acks and receipts after COMMIT.

paho runs its network loop in its own thread; ``on_message`` only hands the message to the
event loop. The client is built with ``manual_ack=True`` and the broker's sessions are kept
(stable client id, ``clean_start=False``, a session expiry), so a message is acknowledged to
the broker only after the batch that holds it is committed, and a worker that dies gets its
unacknowledged messages back when it reconnects.

Back-pressure: at most ``MAX_UNACKED`` messages are held in memory between their arrival and
their acknowledgement. The CONNECT packet's Receive Maximum asks the broker for the same cap,
but Mosquitto 2.0.11 does not keep to it once acknowledgements flow (measured: 30 000
unacknowledged deliveries against a Receive Maximum of 2000), so the cap is also enforced
here: ``on_message`` waits for a free slot, which stops paho reading the socket, and TCP flow
control holds the rest at the broker. While the database is down nothing is acknowledged, so
memory stays bounded by the cap; an outage longer than the keepalive costs a reconnect, after
which the broker delivers the unacknowledged messages again (stored once: the dedupe).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import hashlib
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from psycopg_pool import AsyncConnectionPool

from consent import records
from consent.errors import ConsentChanged
from consent.gate import ConsentSnapshot
from gateway.directory import Directory
from ingest import pipeline
from ingest.envelope import RECEIPT_ACCEPTED, RECEIPT_REJECTED, is_device_id, seal_receipts
from ingest.model import AcceptedEnvelope, Batch, Reason, Receipt, RejectedEnvelope
from ingest.transport import connect_async, make_client, stop_client
from storage import faults
from storage.db import Conn
from storage.errors import BatchWriteError, DatabaseUnavailable, first_line, is_transient
from storage.writer import CHECKOUT_TIMEOUT_S, BulkWriter, EnvelopeOutcome, InTransaction

log = logging.getLogger(__name__)

T = TypeVar("T")

SHARED_SUBSCRIPTION = "$share/ingest/dct/v1/+/up"
PLAIN_SUBSCRIPTION = "dct/v1/+/up"
# Unacknowledged messages the broker may hand one worker: a few batches' worth, so the
# batcher always has work while the previous batch commits, and memory stays bounded.
RECEIVE_MAXIMUM = 2000
# Messages held between arrival and acknowledgement, whatever the broker sends: the batch
# being written plus the next batches (about 2 MB at 1 KiB per envelope).
MAX_UNACKED = RECEIVE_MAXIMUM
# Bytes of payload held between arrival and acknowledgement: the count cap alone would let
# 2000 maximum-size envelopes (256 KiB each) hold 512 MB; 64 MiB is some 60,000 ordinary
# envelopes, far more than a batch, and 256 of the largest.
MAX_UNACKED_BYTES = 64 * 1024 * 1024
# Publishes (receipts, alert events) a worker's publishing connection may hold
# unacknowledged by the broker. paho keeps them in memory without a bound by default. Past
# the bound paho refuses the publish: the envelope is stored, and its hub gets the receipt
# when it republishes (an alert event stays in the outbox and is sent again).
MAX_QUEUED_PUBLISHES = 2000
# How often a paho thread waiting for a slot checks whether the consumer is stopping.
_SLOT_POLL_S = 0.5
# While a batch is collected, its messages are decoded and their signatures checked (with the
# key each device had in an earlier batch) in chunks of this many: the batch then needs only
# its database reads and admission once it closes. A chunk per message would cost an
# executor hand-off each.
EARLY_CHUNK = 32
# Device keys remembered for those early checks; past this many the memory starts afresh.
KNOWN_KEYS_MAX = 100_000
# A worker's broker session outlives a crash or restart by this long (seconds).
SESSION_EXPIRY_S = 14 * 86_400
# Database outage: retry the same batch forever (nothing is acknowledged meanwhile), backing
# off to this ceiling between attempts.
OUTAGE_RETRY_CEILING_S = 10.0
# A batch that fails with no cause found in its data (nothing of it stores, nothing says
# why) is held and tried again; a message tried this many times is refused as ``poison``.
# Each try waits as an outage does (0.1 s doubling), so a fault that lasts under about two
# seconds (a schema migrating, a lock) costs nothing, and one that does not frees the
# worker in seconds rather than never.
POISON_AFTER = 5


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


@dataclass(frozen=True, slots=True)
class _Message:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_ms: int


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


class ByteBudget:
    """Bytes held across threads, bounded: ``take`` waits (up to a timeout) for room, and a
    single item larger than the whole budget is let in when nothing else is held, so it
    cannot wait forever."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.held = 0
        self._room = threading.Condition()

    def take(self, n: int, timeout: float) -> bool:
        """Hold ``n`` more bytes once they fit; False if they did not within ``timeout``."""
        with self._room:
            return self._room.wait_for(
                lambda: self.held == 0 or self.held + n <= self.most, timeout
            ) and self._add(n)

    def _add(self, n: int) -> bool:
        self.held += n
        return True

    def give(self, n: int) -> None:
        with self._room:
            self.held -= n
            self._room.notify_all()


class Inbox(Generic[T]):
    """Items from another thread (paho's network loop) to the event loop, which is woken only
    when it waits for one: a ``call_soon_threadsafe`` per message cost a self-pipe write and
    a loop iteration each (5% of a worker's samples under load), while under a backlog the
    loop finds the next items already queued. The flag and the queue change under one lock,
    so an item put while the loop goes to sleep always wakes it; the loop woken is the one
    that waits."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._waiting = False
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # set whenever _waiting is

    def put(self, item: T) -> None:
        """Any thread."""
        with self._lock:
            self._items.append(item)
            loop = self._loop if self._waiting else None
            self._waiting = False
        if loop is not None:
            loop.call_soon_threadsafe(self._ready.set)

    def take(self, most: int) -> list[T]:
        """Up to ``most`` queued items, oldest first (the loop's thread)."""
        with self._lock:
            return [self._items.popleft() for _ in range(min(most, len(self._items)))]

    async def wait(self, within: float | None) -> bool:
        """Until an item is queued (True) or ``within`` seconds pass (False; None: no limit)."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while True:
            with self._lock:
                if self._items:
                    self._waiting = False
                    return True
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    self._waiting = False
                    return False
                self._waiting, self._loop = True, loop
                self._ready.clear()
            # A wake-up scheduled by an earlier put may arrive late: the loop checks again.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), left)


class Consumer:
    def __init__(
        self,
        config: ConsumerConfig,
        pool: AsyncConnectionPool,
        writer: BulkWriter,
        receipt_key: ec.EllipticCurvePrivateKey,
        *,
        clock: Callable[[], float] = time.time,
        configure_client: Callable[[mqtt.Client], None] | None = None,
        also: InTransaction | None = None,
    ) -> None:
        self.config = config
        self._also = also
        self.stats = Stats()
        self._pool = pool
        self._writer = writer
        self._receipt_key = receipt_key
        self._clock = clock
        self._directory = Directory()
        # Digests of messages with tries counted in message_faults (forgotten once handled).
        self._faulted: set[bytes] = set()
        # Device id -> the key its record held when last read (replaced, never changed in
        # place: executor threads read it while the loop makes the next one).
        self._known_keys: dict[str, ec.EllipticCurvePublicKey] = {}
        # Unbounded as a queue; bounded by the slots (one per message until it is acked).
        self._inbox: Inbox[_Message] = Inbox()
        self._slots = threading.BoundedSemaphore(MAX_UNACKED)
        self._bytes = ByteBudget(MAX_UNACKED_BYTES)
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribed = asyncio.Event()
        self._client = make_client(config.client_id, mqtt5=config.mqtt5, manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        # Receipts and alert events go out on a connection of their own. On the consuming
        # one, paho's network thread waits in on_message whenever MAX_UNACKED messages are
        # held, and then reads no PUBACK either: with the database slowed and a backlog at
        # the broker, its receipts were acknowledged about 14 a second, and queued (measured:
        # 14,470 in paho's memory after 75 s, growing) or, once bounded, refused (99% of
        # them over 10 minutes).
        self._out = publisher_client(f"{config.client_id}-out", mqtt5=config.mqtt5)
        for client in (self._client, self._out):
            client.reconnect_delay_set(1, 10)
            if configure_client is not None:
                configure_client(client)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # --- paho thread: hand off only --------------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("mqtt connect refused reason=%s", reason)
            return
        self.stats.mqtt_connected = True
        topic = SHARED_SUBSCRIPTION if self.config.shared else PLAIN_SUBSCRIPTION
        client.subscribe(topic, qos=1)
        log.info("mqtt connected client_id=%s subscribed=%s", self.config.client_id, topic)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(r.is_failure for r in reasons):
            log.error("mqtt subscription refused reasons=%s", reasons)
            return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._subscribed.set)

    async def wait_subscribed(self) -> None:
        """Return once the broker has confirmed the subscription (used at start-up)."""
        await self._subscribed.wait()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.stats.mqtt_connected = False
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._subscribed.clear)
        log.warning("mqtt disconnected reason=%s", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        # Blocks paho's network thread while MAX_UNACKED messages or MAX_UNACKED_BYTES wait:
        # back-pressure by TCP. Once stopping, every message is let go at once (not
        # acknowledged: the broker delivers it again to this session), or a backlog in the
        # socket would hold the shutdown for _SLOT_POLL_S per message.
        payload = bytes(msg.payload)
        while self._stopping.is_set() or not self._slots.acquire(timeout=_SLOT_POLL_S):
            if self._stopping.is_set():
                return
        while not self._bytes.take(len(payload), _SLOT_POLL_S):
            if self._stopping.is_set():
                self._slots.release()
                return
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            # Refused at decode as not an uplink topic; an exception here would end paho's
            # network thread, and with it every delivery to this worker.
            topic = bytes(msg._topic).decode("utf-8", "backslashreplace")
        self._inbox.put(_Message(topic, payload, msg.mid, msg.qos, self._now_ms()))

    # --- event loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect and process batches until cancelled."""
        self._loop = asyncio.get_running_loop()
        # Only the consuming connection asks the broker for a cap on what it is sent.
        for client, receive_maximum in ((self._client, RECEIVE_MAXIMUM), (self._out, None)):
            connect_async(
                client,
                self.config.host,
                self.config.port,
                keepalive=self.config.keepalive_s,
                mqtt5=self.config.mqtt5,
                session_expiry_s=SESSION_EXPIRY_S,
                receive_maximum=receive_maximum,
            )
            client.loop_start()
        # Two batches in flight: while one is written and receipted, the next is collected,
        # decoded and verified (signature checks in a thread: the CPU work overlaps the
        # database's). Batches are stored and acknowledged strictly in order.
        judging = asyncio.create_task(self._collect_and_judge(), name="consumer-judge")
        try:
            while True:
                judged = await judging
                judging = asyncio.create_task(self._collect_and_judge(), name="consumer-judge")
                await self._store_and_finish(judged)
        finally:
            judging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await judging
            self._stopping.set()
            stop_client(self._client)
            stop_client(self._out)

    async def _collect(self, early: Callable[[list[_Message]], None]) -> list[_Message]:
        """A batch: the first message, then whatever arrives within ``max_wait_s``, up to
        ``max_batch``. What is queued already is taken at once, without a timer or a wake-up
        per message. Every ``EARLY_CHUNK`` messages taken while the batch is still open are
        handed to ``early``."""
        inbox, most = self._inbox, self.config.max_batch
        loop = asyncio.get_running_loop()
        await inbox.wait(None)
        items = inbox.take(most)
        handed = 0
        deadline = loop.time() + self.config.max_wait_s
        while len(items) < most:
            if len(items) - handed >= EARLY_CHUNK:
                early(items[handed:])
                handed = len(items)
            left = deadline - loop.time()
            if left <= 0 or not await inbox.wait(left):
                break
            items.extend(inbox.take(most - len(items)))
        return items

    async def _collect_and_judge(self) -> _Judged:
        """Collect a batch, decoding and checking its signatures as it fills, then judge it."""
        loop = asyncio.get_running_loop()
        keys = self._known_keys
        chunks: list[asyncio.Future[list[_Early]]] = []
        messages = await self._collect(
            lambda chunk: chunks.append(loop.run_in_executor(None, _decode_and_check, chunk, keys))
        )
        return await self._judge(messages, chunks, keys)

    async def _judge(
        self,
        messages: Sequence[_Message],
        chunks: Sequence[asyncio.Future[list[_Early]]],
        keys: Mapping[str, ec.EllipticCurvePublicKey],
    ) -> _Judged:
        """Decode (what the early chunks did not), verify and admit a batch (nothing written
        yet)."""
        self.stats.messages += len(messages)
        started = time.monotonic()
        results: list[_Early] = []
        for chunk in chunks:
            results.extend(await chunk)
        if len(results) < len(messages):
            results.extend(
                await asyncio.get_running_loop().run_in_executor(
                    None, _decode_and_check, messages[len(results) :], keys
                )
            )
        decoded: list[tuple[_Message, pipeline.Decoded]] = []
        checks: list[pipeline.SignatureCheck | None] = []
        undecodable: list[tuple[_Message, RejectedEnvelope]] = []
        for m, (d, check) in zip(messages, results, strict=True):
            if isinstance(d, RejectedEnvelope):
                undecodable.append((m, d))
            else:
                decoded.append((m, d))
                checks.append(check)
        judged = _Judged(decoded, undecodable, self._now_ms(), checks)
        await self._admit(judged)
        self.stats.batch_seconds["judge"].observe(time.monotonic() - started)
        return judged

    async def _admit(self, judged: _Judged) -> None:
        judged.accepted, judged.refused, judged.consent = await self._verify_and_admit(
            judged.decoded, judged.checks, judged.now_ms
        )

    async def _store_and_finish(self, judged: _Judged) -> None:
        started = time.monotonic()
        while True:
            unchanged = functools.partial(
                records.confirm_unchanged,
                participants={a.participant_id for _, a in judged.accepted},
                snapshot=judged.consent,
            )
            try:
                outcomes = await self._store(
                    judged.accepted, judged.rejected, judged.now_ms, unchanged
                )
                break
            except ConsentChanged as exc:
                # Judged on consent that changed before the batch could commit: judge again.
                self.stats.consent_rechecks += 1
                log.info("consent changed while the batch was judged; judging again: %s", exc)
                await self._admit(judged)
        stored = time.monotonic()
        self.stats.batch_seconds["store"].observe(stored - started)
        await self._finish(judged.accepted, judged.rejected, outcomes, judged.now_ms)
        self.stats.batch_seconds["finish"].observe(time.monotonic() - stored)

    async def _verify_and_admit(
        self,
        decoded: Sequence[tuple[_Message, pipeline.Decoded]],
        checks: Sequence[pipeline.SignatureCheck | None],
        now_ms: int,
    ) -> tuple[
        list[tuple[_Message, AcceptedEnvelope]],
        list[tuple[_Message, RejectedEnvelope]],
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
                delay = await self._outage_pause(delay, exc)
        self._remember_keys(devices)

        def work() -> list[AcceptedEnvelope | RejectedEnvelope]:
            out: list[AcceptedEnvelope | RejectedEnvelope] = []
            for (_, d), check in zip(decoded, checks, strict=True):
                try:
                    out.append(_verify_and_admit_one(d, devices, check, consent, now_ms))
                except Exception as exc:  # noqa: BLE001 - one message's fault is its own
                    out.append(_faulted(d.inbound, d.envelope_sha256, "judging", exc, d))
            return out

        results = await asyncio.get_running_loop().run_in_executor(None, work)
        accepted: list[tuple[_Message, AcceptedEnvelope]] = []
        rejected: list[tuple[_Message, RejectedEnvelope]] = []
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

    async def _outage_pause(self, delay: float, exc: BaseException) -> float:
        self.stats.database_retries += 1
        log.warning(
            "database unavailable, batch held unacknowledged retry_in_s=%.1f error=%s",
            delay,
            type(exc).__name__,
        )
        await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
        return min(delay * 2, OUTAGE_RETRY_CEILING_S)

    async def _store(
        self,
        accepted: list[tuple[_Message, AcceptedEnvelope]],
        rejected: list[tuple[_Message, RejectedEnvelope]],
        now_ms: int,
        first: Callable[[Conn], Awaitable[None]],
    ) -> dict[_Key, EnvelopeOutcome]:
        """Write the batch; the outcome per (device, seq, digest). Retries until committed.

        ``first`` opens each write transaction (the consent check); what it raises reaches
        the caller with nothing of that transaction stored.

        The same envelope twice in one batch (a republish racing its first copy) is stored
        once and both messages get its outcome. Different content under one (device, seq)
        goes to a later round, where the database reports it as a ``duplicate`` conflict.
        """
        rounds: list[dict[_Key, AcceptedEnvelope]] = []
        seen: dict[tuple[str, int], set[bytes]] = {}
        for _, a in accepted:
            digests = seen.setdefault((a.dev, a.seq), set())
            if a.envelope_sha256 in digests:
                continue
            if len(rounds) <= len(digests):
                rounds.append({})
            rounds[len(digests)][_key(a)] = a
            digests.add(a.envelope_sha256)
        result: dict[_Key, EnvelopeOutcome] = {}
        envelope_rejections = [r for _, r in rejected]
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
    ) -> dict[_Key, EnvelopeOutcome]:
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
        result: dict[_Key, EnvelopeOutcome] = {}
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
                        rejected = [_bare_rejection(row, exc)]
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
                    _bare_rejection(r, exc, Reason.POISON) if r.envelope_sha256 in poisoned else r
                    for r in rejected
                ]
                for a in [a for a in to_store if a.envelope_sha256 in poisoned]:
                    self._refuse(a, Reason.POISON, exc, to_store, rejected, result)
            except DatabaseUnavailable as exc:
                delay = await self._outage_pause(delay, exc)
        by_key = {(a.dev, a.seq): _key(a) for a in to_store}
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
        result: dict[_Key, EnvelopeOutcome],
    ) -> None:
        """Take ``a`` out of what is stored: its rejection row joins ``rejected``, its outcome
        ``result``."""
        log.warning(
            "envelope refused at storage device=%s seq=%d reason=%s", a.dev, a.seq, reason.value
        )
        to_store.remove(a)
        rejected.append(_as_rejected(a, reason, exc))
        result[_key(a)] = EnvelopeOutcome(a.dev, a.seq, True, 0, a.reading_count, refused_as=reason)

    async def _isolate(
        self,
        envelopes: Sequence[AcceptedEnvelope],
        rows: Sequence[RejectedEnvelope],
        now_ms: int,
        first: Callable[[Conn], Awaitable[None]],
    ) -> tuple[dict[_Key, EnvelopeOutcome], list[AcceptedEnvelope], list[RejectedEnvelope]]:
        """A refused batch whose culprit is not known: each item in a transaction of its own.

        Returns the outcomes of what was stored (or refused for its content), and what is
        left: nothing when some item stored, since the faults then lie with the items that
        raised them and these are refused (``storage_refused``); otherwise the faulted items,
        for the caller to hold.
        """
        done: dict[_Key, EnvelopeOutcome] = {}
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
            stored = stored or outcome[_key(one)].refused_as is None
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
        tries: dict[bytes, int] = {}
        try:
            async with self._pool.connection(timeout=CHECKOUT_TIMEOUT_S) as conn:
                tries = await faults.record(conn, digests, first_line(exc))
        except Exception as counting:  # noqa: BLE001 - a count not kept is tried again
            log.error("tries not counted: %s", first_line(counting))
        self._faulted |= digests
        poisoned = {d for d, n in tries.items() if n >= POISON_AFTER}
        if poisoned:
            return delay, poisoned
        return await self._outage_pause(delay, exc), poisoned

    async def _forget_faults(self, batch: Batch) -> None:
        """Messages tried before and handled now lose their count."""
        if not self._faulted:
            return
        done = {a.envelope_sha256 for a in batch.accepted}
        done |= {r.envelope_sha256 for r in batch.rejected}
        forget = self._faulted & done
        if forget:
            self._faulted -= forget
            with contextlib.suppress(Exception):
                async with self._pool.connection(timeout=CHECKOUT_TIMEOUT_S) as conn:
                    await faults.forget(conn, forget)

    async def _finish(
        self,
        accepted: list[tuple[_Message, AcceptedEnvelope]],
        rejected: list[tuple[_Message, RejectedEnvelope]],
        outcomes: dict[_Key, EnvelopeOutcome],
        now_ms: int,
    ) -> None:
        """After COMMIT: a signed receipt per envelope, and the acknowledgement to the broker.

        The batch's receipts are signed together (one signature per tree of receipts) in a
        thread, then published and the messages acknowledged in the batch's order.
        """
        receipts: list[Receipt | None] = []
        for _, a in accepted:
            receipts.append(self._accepted_receipt(a, outcomes[_key(a)], now_ms))
        for _, r in rejected:
            self.stats.rejected_envelopes[r.reason.value] += 1
            receipts.append(_rejected_receipt(r, now_ms))
        key, answered = self._receipt_key, [r for r in receipts if r is not None]
        sealed = iter(
            await asyncio.get_running_loop().run_in_executor(None, _seal_each, answered, key)
        )
        messages = [m for m, _ in accepted] + [m for m, _ in rejected]
        for m, receipt in zip(messages, receipts, strict=True):
            if receipt is not None:
                data = next(sealed)
                if data is not None:
                    self._publish_receipt(receipt, data)
            self._ack(m)
        done_ms = self._now_ms()
        for m in messages:
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

    def _ack(self, m: _Message) -> None:
        self._client.ack(m.mid, m.qos)
        self._bytes.give(len(m.payload))
        self._slots.release()

    def publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        """Publish with QoS 1 on this worker's publishing connection (alert events)."""
        return self._out.publish(topic, payload, qos=1)

    def _publish_receipt(self, receipt: Receipt, data: bytes) -> None:
        info = self._out.publish(pipeline.down_topic(receipt.dev), data, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # The envelope is stored; the hub will republish it and get the receipt again.
            self.stats.receipt_publish_failures += 1
            log.warning(
                "receipt not published device=%s seq=%d rc=%s", receipt.dev, receipt.seq, info.rc
            )


def _seal_each(receipts: Sequence[Receipt], key: ec.EllipticCurvePrivateKey) -> list[bytes | None]:
    """The receipts sealed together; if that fails, one by one, with None for any that
    cannot be sealed. Its envelope is committed: a receipt missing costs the hub a republish
    (receipted then as a replay), while an exception here would stop the consumer."""
    try:
        return list(seal_receipts(receipts, key))
    except Exception:
        log.exception("receipts not sealed together; sealing one by one")
    out: list[bytes | None] = []
    for r in receipts:
        try:
            out.append(seal_receipts([r], key)[0])
        except Exception:
            log.exception("receipt not sealed device=%r seq=%r", r.dev, r.seq)
            out.append(None)
    return out


def publisher_client(client_id: str, *, mqtt5: bool) -> mqtt.Client:
    """A worker's publishing connection: publishes bounded in memory."""
    client = make_client(client_id, mqtt5=mqtt5)
    client.max_queued_messages_set(MAX_QUEUED_PUBLISHES)
    return client


@dataclass(slots=True)
class _Judged:
    """A batch between judging and storing: what was decoded, and what admission made of it."""

    decoded: list[tuple[_Message, pipeline.Decoded]]
    undecodable: list[tuple[_Message, RejectedEnvelope]]
    now_ms: int
    # Per decoded envelope, its signature checked ahead with a key known then (or None).
    checks: list[pipeline.SignatureCheck | None]
    accepted: list[tuple[_Message, AcceptedEnvelope]] = field(default_factory=list)
    refused: list[tuple[_Message, RejectedEnvelope]] = field(default_factory=list)
    consent: ConsentSnapshot = field(default_factory=ConsentSnapshot)

    @property
    def rejected(self) -> list[tuple[_Message, RejectedEnvelope]]:
        return self.undecodable + self.refused


# A message decoded (or refused), with its signature checked ahead when its device's key was
# known.
_Early = tuple[pipeline.Decoded | RejectedEnvelope, pipeline.SignatureCheck | None]


def _decode_and_check(
    messages: Sequence[_Message], keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> list[_Early]:
    out: list[_Early] = []
    for m in messages:
        inbound = pipeline.Inbound(m.topic, m.payload, m.received_ms)
        try:
            d = pipeline.decode(inbound)
            check = None
            if isinstance(d, pipeline.Decoded):
                key = keys.get(d.opened.payload.dev)
                if key is not None:
                    check = pipeline.check_signature(d, key)
        except Exception as exc:  # noqa: BLE001 - one message's fault is its own
            digest = hashlib.sha256(m.payload).digest()
            out.append((_faulted(inbound, digest, "decoding", exc), None))
        else:
            out.append((d, check))
    return out


def _verify_and_admit_one(
    d: pipeline.Decoded,
    devices: Mapping[str, pipeline.DeviceRecord],
    check: pipeline.SignatureCheck | None,
    consent: ConsentSnapshot,
    now_ms: int,
) -> AcceptedEnvelope | RejectedEnvelope:
    device = devices.get(d.opened.payload.dev)
    refusal = pipeline.verify(d, device, check)
    if refusal is not None:
        return refusal
    assert device is not None
    return pipeline.admit(d, device, consent, now_ms)


def _faulted(
    inbound: pipeline.Inbound,
    digest: bytes,
    stage: str,
    exc: BaseException,
    decoded: pipeline.Decoded | None = None,
) -> RejectedEnvelope:
    """A message whose pure stages raised where they never should: a fault of this code with
    this input, which would recur on every try, so the message is refused at once as
    ``poison`` (with the error on record) rather than tried again."""
    log.error("message refused: %s raised topic=%r", stage, inbound.topic[:200], exc_info=exc)
    p = decoded.opened.payload if decoded is not None else None
    return RejectedEnvelope(
        Reason.POISON,
        f"{stage} raised {type(exc).__name__}: {first_line(exc)}",
        inbound.topic,
        digest,
        dev=p.dev if p is not None else pipeline.topic_device(inbound.topic),
        seq=p.seq if p is not None else None,
        reading_count=len(p.readings) if p is not None else 0,
    )


def _rejected_receipt(r: RejectedEnvelope, now_ms: int) -> Receipt | None:
    """The receipt of an envelope refused whole; None when there is nobody to send it to (no
    device and sequence number, or a topic that names another device)."""
    if r.dev is None or r.seq is None or r.reason is Reason.TOPIC_MISMATCH:
        return None
    return Receipt(r.dev, r.seq, RECEIPT_REJECTED, 0, r.reading_count, now_ms, r.reason.value)


_Key = tuple[str, int, bytes]


def _key(a: AcceptedEnvelope) -> _Key:
    return (a.dev, a.seq, a.envelope_sha256)


def _as_rejected(a: AcceptedEnvelope, reason: Reason, exc: BaseException) -> RejectedEnvelope:
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


def _bare_rejection(
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
