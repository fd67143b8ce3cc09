"""Fuzzing the whole consumer: hypothesis builds lists of hostile, broken and valid envelopes,
publishes them through a real Mosquitto into the real gateway, and checks what PostgreSQL
holds afterwards.

Each example publishes its envelopes (hub-1's, an unknown device's, hub-1's under hub-2's
topic; validly signed, signed with another key, bits flipped, truncated, garbage), then one
valid envelope of hub-2 last. Its receipt proves that the consumer moved past everything
before it (batches are stored and receipted in order). Then:

1. the consumer task is alive and ``/healthz`` answers 200;
2. every published message is accounted for by its SHA-256: an ``envelopes`` row, or
   ``rejections`` rows with a reason; a stored envelope's readings are all either in
   ``readings`` or counted in its rejection rows; nothing is ``poison`` or
   ``storage_refused`` (nothing here makes the database fail, so either would be a fault of
   the gateway's checks), and no message has tries counted in ``message_faults``;
3. the hub-2 envelope sent last is stored with its five readings and receipted accepted.

Where the outcome of a message is known without the gateway, it is checked too: a time or
seq outside int64 and text that is not UTF-8 are ``malformed`` (refused while decoding); a
message the codec refuses on its own (``open_envelope``) has a rejection row with the
codec's reason, and one it opens gets the verdict of the topic, the device and the key.

Hypothesis runs in a thread, as in tests/web/test_openapi.py, so the gateway's event loop
keeps running between examples; the async helpers of test_hostile run on that loop. The
database is emptied of ingested data before each example (the trial stays). Set
``TRIALSTREAM_FUZZ_EXAMPLES`` for a longer campaign by hand.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from gateway.app import CONSUMER_TASK
from ingest import keys
from ingest.envelope import (
    MAX_ENVELOPE_BYTES,
    MAX_GAP_REASON_BYTES,
    MAX_ITEMS_PER_ENVELOPE,
    MAX_METRIC_BYTES,
    MAX_SENSOR_BYTES,
    MAX_SENSOR_FIELD_BYTES,
    MAX_UNIT_BYTES,
    open_envelope,
    seal,
    verify,
)
from ingest.metrics import METRICS
from ingest.model import Payload, Reading, Receipt
from ingest.pipeline import up_topic
from ingest.receipts import RECEIPT_ACCEPTED
from ingest.wire import INT64_MAX, INT64_MIN, EnvelopeError
from storage import db
from storage.timeconv import MAX_MS, MIN_MS
from tests.fixtures.envelopes import payload_obj, raw_sign1
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.trial import Trial
from tests.gateway.test_hostile import (  # noqa: F401 - hubs and probe are fixtures
    hubs,
    probe,
    receipts,
    rows,
)

T = TypeVar("T")

# 25 examples (about 150 messages) take some seconds; a campaign by hand sets more.
EXAMPLES = int(os.environ.get("TRIALSTREAM_FUZZ_EXAMPLES", "25"))
DAY_MS = 86_400_000
# Broker limit (deploy/mosquitto: max_packet_size 263168): a message cut to this size still
# goes through and is refused as too_large; a bigger one would cost the probe its connection.
MAX_PUBLISHED = MAX_ENVELOPE_BYTES + 512
DECODING_REASONS = {"malformed", "too_large", "unsupported_version"}
# Reasons an envelope that opened, came from its own topic and verified may still be refused
# with as a whole (its sent time, a seq reused with other content).
VERIFIED_REFUSALS = {"implausible_time", "duplicate"}
# Reasons of the rejection rows of readings (and gaps) of a stored envelope.
READING_REASONS = {
    "unknown_metric",
    "wrong_unit",
    "implausible_value",
    "implausible_time",
    "no_consent",
    "scope_not_consented",
    "reconsent_required",
}
NEVER = {"poison", "storage_refused"}
# topic device, payload dev (and kid)
TARGETS = {"hub-1": ("hub-1", "hub-1"), "hub-x": ("hub-x", "hub-x"), "cross": ("hub-2", "hub-1")}
# Invalid UTF-8: a lone byte, a cut sequence, an encoded surrogate, an overlong slash, past
# U+10FFFF.
INVALID_UTF8 = [
    b"\xff",
    b"\xc3\x28",
    b"\xe2\x82",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xf4\x90\x80\x80",
]
SENSORS = ["hr-strap", "watch", "ring-2", "cgm.1", "scale_A"]


# --- what hypothesis draws ------------------------------------------------------------------


@dataclass(frozen=True)
class Near:
    """A time relative to the clock when the example runs, so a drawn time keeps its meaning
    when hypothesis runs the example again (while shrinking) minutes later."""

    offset_ms: int


@dataclass(frozen=True)
class Bulk:
    """``count`` copies of ``reading``, each ``step_ms`` earlier than the one before: long
    lists without drawing every item."""

    reading: Any
    count: int
    step_ms: int

    def expand(self, now: int) -> list[Any]:
        first = resolve(self.reading, now)
        t = first[0] if isinstance(first, list) and first else None
        if type(t) is not int or not INT64_MIN <= t <= INT64_MAX:
            return [first] * self.count
        out = []
        for i in range(self.count):
            r = list(first)
            r[0] = max(INT64_MIN, t - i * self.step_ms)
            out.append(r)
        return out


@dataclass(frozen=True, repr=False)
class Message:
    target: str  # a key of TARGETS
    seq: Any  # None: the next unused seq of its device
    body: dict[str, Any]  # sent, r, gaps and s of the payload (times may be Near)
    shape: str | None  # a change to the payload map's keys
    signer: str  # own (hub-1's key), other (an unknown key), hub-2 (another device's key)
    bad_utf8: bytes | None  # bytes put into a text string before signing
    canonical: bool  # CBOR with sorted keys and the shortest floats (not as seal writes it)
    mutation: tuple[Any, ...] | None  # done to the bytes after signing

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={short(getattr(self, k))}" for k in self.__dataclass_fields__)
        return f"Message({fields})"


def short(obj: Any) -> str:
    """repr with long strings written as what they are (``'x' * 65536``)."""
    if isinstance(obj, str) and len(obj) > 40:
        if len(set(obj)) == 1:
            return f"{obj[0]!r} * {len(obj)}"
        return f"{obj[:30]!r}...({len(obj)} chars)"
    if isinstance(obj, bytes) and len(obj) > 60:
        return f"{obj[:40]!r}...({len(obj)} bytes)"
    if isinstance(obj, list):
        return "[" + ", ".join(map(short, obj)) + "]"
    if isinstance(obj, tuple):
        return "(" + ", ".join(map(short, obj)) + ("," if len(obj) == 1 else "") + ")"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{short(k)}: {short(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, Bulk):
        return f"Bulk({short(obj.reading)}, count={obj.count}, step_ms={obj.step_ms})"
    return repr(obj)


def resolve(obj: Any, now: int) -> Any:
    if isinstance(obj, Near):
        return now + obj.offset_ms
    if isinstance(obj, list):
        out: list[Any] = []
        for item in obj:
            if isinstance(item, Bulk):
                out.extend(item.expand(now))
            else:
                out.append(resolve(item, now))
        return out
    if isinstance(obj, dict):
        return {k: resolve(v, now) for k, v in obj.items()}
    return obj


def pick(
    draw: st.DrawFn, usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int
) -> Any:
    """``usual``, or ``rare`` about once in ``one_in`` draws (shrinking towards ``usual``)."""
    return draw(rare) if draw(st.integers(0, one_in - 1)) == one_in - 1 else draw(usual)


# Inside consent (given a day ago) and the device's window: stored when all else is right.
consented = st.builds(Near, st.integers(-DAY_MS + 300_000, 0))
# From before the participant's enrollment (two days ago) to beyond the allowed skew.
around_now = st.builds(Near, st.integers(-3 * DAY_MS, 15 * 60_000))
edge_times = st.sampled_from(
    [
        *(INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1, -1, 0, 1, 2**53 + 1, 2**62),
        # what datetime and timestamptz hold, and the year 10946 of a flipped bit
        *(MIN_MS, MIN_MS - 1, MAX_MS, MAX_MS + 1, 283_250_000_000_000),
    ]
)
outside_int64 = st.one_of(
    st.sampled_from([2**63, 2**64 - 1, 2**64, -(2**63) - 1, -(2**64), -(2**64) - 1, 2**80]),
    st.integers(INT64_MAX + 1, 2**64 + 2),
    st.integers(-(2**64) - 2, INT64_MIN - 1),
)
odd_time = st.one_of(around_now, st.integers(INT64_MIN, INT64_MAX), edge_times)


@st.composite
def times(draw: st.DrawFn, wild: bool, usual: st.SearchStrategy[Any] = consented) -> Any:
    """Mostly ``usual``; else any int64 (and in a wild envelope, now and then one just
    outside int64, which makes it malformed)."""
    rare = st.integers(0, 7).flatmap(lambda n: outside_int64 if n == 7 else odd_time)
    return pick(draw, usual, rare if wild else odd_time, 5)


huge_text = st.sampled_from(["x", "é", "€", "\U0001f600"]).map(
    lambda c: c * (65536 // len(c.encode()))
)
hostile_text = st.one_of(
    st.text(max_size=24),
    st.text(
        st.characters(categories=("Cc", "Cf", "Co", "Zl", "Zp", "Zs", "Mn")), min_size=1, max_size=6
    ),
    st.sampled_from(
        ["", "\x00", "a\x00b", "\x1b[31m", "\x7f", "\x85", "\u2028", "\ufeff", "\U0010ffff"]
    ),
    st.sampled_from(["a", "é", "€"]).flatmap(
        lambda c: st.sampled_from([32, 33, 64, 65, 128, 129]).map(lambda n: c * n)
    ),
    huge_text,
)
not_text = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.binary(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
odd_text = st.one_of(hostile_text, not_text)
# Numbers the codec takes (as floats) but the gateway must refuse or store with care.
odd_number = st.one_of(
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324, 2**53 + 1]),
    st.integers(-(2**64), 2**64 - 1),
)
# Not numbers at all, or integers CBOR carries as bignums (tags).
not_number = st.one_of(
    st.none(), st.booleans(), st.text(max_size=3), st.integers(2**64, 2**70), st.just(-(2**65))
)


def wrong_shape(item: st.SearchStrategy[list[Any]]) -> st.SearchStrategy[Any]:
    """A list item with one field too few or too many, or not a list at all."""
    return st.one_of(
        item.map(lambda x: x[:-1]),
        item.map(lambda x: [*x, 0]),
        st.none(),
        st.integers(),
        st.text(max_size=4),
        st.just({}),
        st.just([]),
    )


def valid_text(max_bytes: int) -> st.SearchStrategy[str]:
    """Text the codec takes (no control characters, 1..max_bytes UTF-8 bytes) that the
    gateway then stores as it is: any characters, and strings at the limit."""
    return st.one_of(
        st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=8).filter(
            lambda t: len(t.encode()) <= max_bytes
        ),
        st.sampled_from(["a", "é", "€", "\U0001f600", "\ufffd", "\U0010fffd"]).map(
            lambda c: c * (max_bytes // len(c.encode()))
        ),
    )


@st.composite
def text(
    draw: st.DrawFn, wild: bool, usual: st.SearchStrategy[Any], one_in: int, max_bytes: int
) -> Any:
    """``usual``; now and then any text the codec takes, or in a wild envelope one it
    refuses (or not text at all)."""
    return pick(draw, usual, odd_text if wild else valid_text(max_bytes), one_in)


@st.composite
def good_reading(draw: st.DrawFn, wild: bool) -> list[Any]:
    metric = draw(text(wild, st.sampled_from(sorted(METRICS)), 6, MAX_METRIC_BYTES))
    known = METRICS.get(metric) if isinstance(metric, str) else None
    if known is not None:
        unit = pick(draw, st.just(known.unit), st.sampled_from(["/min", "ms", "%", "kg"]), 12)
        value = pick(draw, st.floats(known.low, known.high), odd_number, 6)
    else:
        unit, value = draw(st.sampled_from(["/min", "%"])), draw(st.floats(0, 100))
    if wild:
        value = pick(draw, st.just(value), not_number, 8)
    unit = draw(text(wild, st.just(unit), 8, MAX_UNIT_BYTES))
    sensor = draw(text(wild, st.sampled_from(SENSORS), 8, MAX_SENSOR_BYTES))
    return [draw(times(wild)), metric, value, unit, sensor]


@st.composite
def readings(draw: st.DrawFn, wild: bool) -> Any:
    if not wild:
        return draw(good_reading(wild))
    return pick(draw, good_reading(wild), wrong_shape(good_reading(wild)), 15)


@st.composite
def good_gap(draw: st.DrawFn, wild: bool) -> list[Any]:
    start = draw(times(wild))
    if isinstance(start, Near):
        end = Near(start.offset_ms + draw(st.integers(-1000, 120_000)))
    else:
        end = draw(times(wild))
    known = st.sampled_from(["out_of_range", "clock_jump", "outbox_full"])
    reason = draw(text(wild, known, 6, MAX_GAP_REASON_BYTES))
    return [start, end, reason]


@st.composite
def gaps(draw: st.DrawFn, wild: bool) -> Any:
    if not wild:
        return draw(good_gap(wild))
    return pick(draw, good_gap(wild), wrong_shape(good_gap(wild)), 15)


@st.composite
def good_sensor_report(draw: st.DrawFn, wild: bool) -> list[Any]:
    name = draw(text(wild, st.sampled_from(SENSORS), 8, MAX_SENSOR_BYTES))
    info = st.none() | st.sampled_from(["Acme", "HR-9", "SN 0042", "1.2.3", "Ω é €"])
    texts = [draw(text(wild, info, 12, MAX_SENSOR_FIELD_BYTES)) for _ in range(5)]
    battery = st.none() | st.integers(0, 100)
    if wild:
        odd_battery = st.integers(-3, -1) | st.integers(101, 300)
        odd_battery |= st.sampled_from([2**63, 2**64, True, 50.0, math.nan, "50"])
        battery = st.integers(0, 5).flatmap(lambda n: odd_battery if n == 5 else battery)
    return [name, *texts, draw(battery)]


@st.composite
def sensor_reports(draw: st.DrawFn, wild: bool) -> Any:
    if not wild:
        return draw(good_sensor_report(wild))
    return pick(draw, good_sensor_report(wild), wrong_shape(good_sensor_report(wild)), 15)


@st.composite
def bodies(draw: st.DrawFn, wild: bool) -> dict[str, Any]:
    r: list[Any] = draw(st.lists(readings(wild), max_size=5))
    bulk = pick(
        draw,
        st.none(),
        st.builds(
            Bulk,
            good_reading(wild),
            st.integers(1, MAX_ITEMS_PER_ENVELOPE) | st.sampled_from([999, 1000, 1001]),
            st.integers(0, 1000),
        ),
        10,
    )
    if bulk is not None:
        r.append(bulk)
    body: dict[str, Any] = {
        "sent": draw(times(wild, st.builds(Near, st.integers(-120_000, 0)))),
        "r": r,
        "gaps": pick(draw, st.just([]), st.lists(gaps(wild), min_size=1, max_size=3), 3),
    }
    # 1-16 sensor reports are allowed: a wild envelope may carry none or too many.
    n = draw(st.integers(1, 3))
    if wild:
        n = pick(draw, st.just(n), st.sampled_from([0, 16, 17]), 4)
    sensors = pick(draw, st.none(), st.lists(sensor_reports(wild), min_size=n, max_size=n), 4)
    if sensors is not None:
        body["s"] = sensors
    return body


SHAPES = [
    "v2",
    "v0",
    "v_text",
    "v_true",
    "v_float",
    "no_v",
    "no_dev",
    "no_seq",
    "no_sent",
    "no_gaps",
    "extra_key",
    "int_key",
    "r_map",
    "r_null",
    "dev_other",
]
mutations = st.one_of(
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 7)), min_size=1, max_size=4),
    ),
    st.tuples(st.just("truncate"), st.integers(0, 2**32)),
    st.tuples(st.just("garbage"), st.binary(max_size=80)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.integers(0, 2**32), st.binary(min_size=1, max_size=8)),
)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    # A third of the envelopes are wild: text the codec refuses, wrong types and shapes,
    # times outside int64, odd payload keys. The others break only rules checked after
    # decoding (units, value ranges, time windows, consent, seq reuse, signatures).
    wild = draw(st.integers(0, 2)) == 2
    return Message(
        target=pick(draw, st.just("hub-1"), st.sampled_from(["hub-x", "cross"]), 6),
        seq=pick(
            draw,
            st.none(),
            st.integers(1, 4)
            | st.sampled_from(
                [0, INT64_MAX, -1, INT64_MAX + 1, 2**64, True, "1", 1.0] if wild else [0, INT64_MAX]
            ),
            5,
        ),
        body=draw(bodies(wild)),
        shape=pick(draw, st.none(), st.sampled_from(SHAPES), 4) if wild else None,
        signer=pick(draw, st.just("own"), st.sampled_from(["other", "hub-2"]), 8),
        bad_utf8=pick(draw, st.none(), st.sampled_from(INVALID_UTF8), 25),
        canonical=pick(draw, st.just(False), st.just(True), 4),
        mutation=pick(draw, st.none(), mutations, 6),
    )


@dataclass(frozen=True)
class Plan:
    messages: list[Message]
    # (message index, position): that message's bytes published again at that position.
    replays: list[tuple[int, int]] = field(default_factory=list)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    return Plan(
        draw(st.lists(messages(), min_size=2, max_size=10)),
        draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 10)), max_size=2)),
    )


# --- building and judging messages ------------------------------------------------------------


@dataclass
class Built:
    message: Message | None  # None: the last, valid envelope of hub-2
    topic: str
    data: bytes
    obj: Any  # the payload map that was signed (None for the last envelope)
    tampered: bool  # changed after signing, or cut to the broker's limit
    bad_utf8: bool  # a text string holds invalid UTF-8

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.data).digest()

    def describe(self) -> str:
        head = self.data[:64].hex()
        return f"{self.topic} {len(self.data)} bytes {head}... from {self.message!r}"


def payload_map(m: Message, dev: str, seq: Any, now: int) -> dict[str, Any]:
    body = resolve(m.body, now)
    obj: dict[Any, Any] = payload_obj(
        dev, seq, body["r"], sent=body["sent"], gaps=body["gaps"], sensors=body.get("s")
    )
    changes: dict[str, Callable[[dict[Any, Any]], None]] = {
        "v2": lambda o: o.update(v=2),
        "v0": lambda o: o.update(v=0),
        "v_text": lambda o: o.update(v="1"),
        "v_true": lambda o: o.update(v=True),
        "v_float": lambda o: o.update(v=1.0),
        "no_v": lambda o: o.pop("v"),
        "no_dev": lambda o: o.pop("dev"),
        "no_seq": lambda o: o.pop("seq"),
        "no_sent": lambda o: o.pop("sent"),
        "no_gaps": lambda o: o.pop("gaps"),
        "extra_key": lambda o: o.update(x=1),
        "int_key": lambda o: o.update({1: 1}),
        "r_map": lambda o: o.update(r={}),
        "r_null": lambda o: o.update(r=None),
        "dev_other": lambda o: o.update(dev="hub-2"),
    }
    if m.shape is not None:
        changes[m.shape](obj)
    return obj


def encode(m: Message, obj: dict[Any, Any], now: int) -> tuple[bytes, bool]:
    """The payload's CBOR, and whether it holds ``m.bad_utf8`` in place of a text string's
    bytes (in a reading added for it; not when the payload has no readings list)."""
    if m.bad_utf8 is None or not isinstance(obj.get("r"), list):
        return cbor2.dumps(obj, canonical=m.canonical), False
    marker = "Q" * 16 + "@" * len(m.bad_utf8)
    obj["r"] = [*obj["r"], [now - 1000, "heart_rate", 72.0, "/min", marker]]
    encoded = cbor2.dumps(obj, canonical=m.canonical)
    if encoded.count(marker.encode()) != 1:
        return encoded, False
    return encoded.replace(marker.encode(), b"Q" * 16 + m.bad_utf8), True


def mutate(data: bytes, mutation: tuple[Any, ...]) -> bytes:
    kind = mutation[0]
    if kind == "flip":
        buffer = bytearray(data)
        for at, bit in mutation[1]:
            buffer[at % len(buffer)] ^= 1 << bit
        return bytes(buffer)
    if kind == "truncate":
        return data[: mutation[1] % len(data)]
    if kind == "garbage":
        return bytes(mutation[1])
    if kind == "append":
        return data + mutation[1]
    at = mutation[1] % (len(data) + 1)
    return data[:at] + mutation[2] + data[at:]


def out_of_int64(obj: Any) -> bool:
    """Whether a time or the seq of the payload map is an integer outside int64."""

    def outside(x: Any) -> bool:
        return type(x) is int and not INT64_MIN <= x <= INT64_MAX

    if not isinstance(obj, dict):
        return False
    found = outside(obj.get("sent")) or outside(obj.get("seq"))
    for r in obj.get("r") if isinstance(obj.get("r"), list) else []:
        found = found or (isinstance(r, list) and len(r) > 0 and outside(r[0]))
    for g in obj.get("gaps") if isinstance(obj.get("gaps"), list) else []:
        found = found or (isinstance(g, list) and any(outside(x) for x in g[:2]))
    return found


def items(obj: Any) -> int:
    n = 0
    for k in ("r", "gaps"):
        if isinstance(obj.get(k), list):
            n += len(obj[k])
    return n


def codec_verdict(
    b: Built, public_keys: dict[str, ec.EllipticCurvePublicKey]
) -> tuple[str | None, str]:
    """What the gateway must answer, from the codec and the checks before storage alone:
    (reason of a refusal of the whole message, or None when it opened, came from its own
    device and verified; why)."""
    topic_dev = b.topic.split("/")[2]
    try:
        opened = open_envelope(b.data)
    except EnvelopeError as exc:
        return exc.reason.value, f"codec: {exc}"
    if opened.payload.dev != topic_dev:
        return "topic_mismatch", "opens, dev differs from the topic"
    key = public_keys.get(topic_dev)
    if key is None:
        return "unknown_device", "opens, no such device"
    try:
        verify(opened, key)
    except EnvelopeError as exc:
        return exc.reason.value, f"opens, {exc}"
    return None, "opens and verifies"


# --- the test -------------------------------------------------------------------------------


async def clear_ingested(url: str) -> None:
    async with db.connection(url) as conn:
        await conn.execute(
            b"DELETE FROM gaps; DELETE FROM readings; DELETE FROM rejections; "
            b"DELETE FROM sensor_descriptions; DELETE FROM sensors; DELETE FROM envelopes; "
            b"DELETE FROM message_faults; "
            b"DELETE FROM rollup_deltas"
        )
        await conn.commit()


@pytest.mark.slow
# The gateway uses the random module on its event loop (psycopg_pool's jitter, backoffs)
# while hypothesis draws in its thread; hypothesis takes that for a strategy using random.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
async def test_whatever_hubs_send_the_consumer_accounts_for_it_and_goes_on(
    hubs: Trial,  # noqa: F811 - the fixture imported from test_hostile
    gateway: RunningGateway,
    probe: MqttProbe,  # noqa: F811 - the fixture imported from test_hostile
) -> None:
    loop = asyncio.get_running_loop()
    task = gateway.client.app[CONSUMER_TASK]
    hub1, hub2 = hubs.hubs["hub-1"], hubs.hubs["hub-2"]
    signers = {"own": hub1.key, "other": keys.generate_private_key(), "hub-2": hub2.key}
    public_keys = {"hub-1": hub1.key.public_key(), "hub-2": hub2.key.public_key()}
    marker_seqs = itertools.count(1)
    outcomes: Counter[str] = Counter()  # messages by what became of them
    tables: Counter[str] = Counter()  # rows written, summed over the examples

    def on_loop(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=120)

    async def health() -> tuple[int, Any]:
        response = await gateway.client.get("/healthz")
        return response.status, await response.json()

    def build(plan: Plan, now: int) -> list[Built]:
        seqs: dict[str, itertools.count[int]] = defaultdict(lambda: itertools.count(1))
        out: list[Built] = []
        for m in plan.messages:
            topic_dev, dev = TARGETS[m.target]
            seq = next(seqs[dev]) if m.seq is None else m.seq
            obj = payload_map(m, dev, seq, now)
            payload_bytes, bad_utf8 = encode(m, obj, now)
            data = raw_sign1(payload_bytes, signers[m.signer], kid=dev, encode_payload=False)
            tampered = m.mutation is not None
            if tampered:
                data = mutate(data, m.mutation)
            if len(data) > MAX_PUBLISHED:
                data, tampered = data[:MAX_PUBLISHED], True
            out.append(Built(m, up_topic(topic_dev), data, obj, tampered, bad_utf8))
        for index, position in plan.replays:
            if out:
                again = out[index % len(out)]
                out.insert(position % (len(out) + 1), again)
        return out

    def check(built: list[Built], marker: Built, marker_seq: int, seen: list[Receipt]) -> None:
        envelopes = on_loop(
            rows(
                hubs.url,
                "SELECT envelope_sha256, device_id, seq, reading_count, stored_count, "
                "refused_count FROM envelopes",
            )
        )
        rejections = on_loop(
            rows(hubs.url, "SELECT envelope_sha256, reason, reading_count, seq FROM rejections")
        )
        stored = on_loop(
            rows(hubs.url, "SELECT device_id, seq, count(*) FROM readings GROUP BY 1, 2")
        )
        faults = on_loop(rows(hubs.url, "SELECT count(*) FROM message_faults"))
        (written,) = on_loop(
            rows(
                hubs.url,
                "SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM gaps), "
                "(SELECT count(*) FROM sensors), (SELECT count(*) FROM rejections)",
            )
        )
        for table, n in zip(("readings", "gaps", "sensors", "rejections"), written, strict=True):
            tables[table] += int(str(n))
        by_digest = {bytes(e[0]): e for e in envelopes}
        by_key = {(e[1], e[2]): e for e in envelopes}
        refused: dict[bytes, list[tuple[Any, ...]]] = defaultdict(list)
        for digest, *rest in rejections:
            refused[bytes(digest)].append(tuple(rest))
        counts = {(dev, seq): n for dev, seq, n in stored}

        # (2) every message accounted for, by the digest of its bytes
        for b in [*built, marker]:
            d = b.digest
            assert d in by_digest or refused[d], f"no row for {b.describe()}"
            assert all(reason for reason, *_ in refused[d]), b.describe()
        # (2) a stored envelope's readings: in readings, or counted as refused
        for digest, dev, seq, reading_count, stored_count, refused_count in envelopes:
            n = counts.get((dev, seq), 0)
            rows_of = refused[bytes(digest)]
            assert n + sum(count for _, count, _ in rows_of) == reading_count, (
                dev,
                seq,
                n,
                rows_of,
                reading_count,
            )
            assert (stored_count, refused_count) == (n, reading_count - n), (dev, seq)
            assert {reason for reason, *_ in rows_of} <= READING_REASONS, (dev, seq, rows_of)
            assert all(row_seq == seq for *_, row_seq in rows_of), (dev, seq, rows_of)
        assert set(counts) <= set(by_key), "readings of no stored envelope"
        bad = [(r, d.hex()) for d, rs in refused.items() for r, *_ in rs if r in NEVER]
        assert not bad, f"refused as a fault of the gateway: {bad}"
        assert faults == [(0,)]

        # the outcomes known without the gateway
        for b in built:
            d = b.digest
            reasons = {reason for reason, *_ in refused[d]}
            if not b.tampered and (b.bad_utf8 or out_of_int64(b.obj)):
                assert d not in by_digest, b.describe()
                assert reasons, b.describe()
                assert reasons <= DECODING_REASONS, (reasons, b.describe())
                exact = (
                    type(b.obj.get("v")) is int
                    and b.obj["v"] == 1
                    and items(b.obj) <= MAX_ITEMS_PER_ENVELOPE
                    and len(b.data) <= MAX_ENVELOPE_BYTES
                )
                if exact:
                    assert reasons == {"malformed"}, (reasons, b.describe())
            verdict, why = codec_verdict(b, public_keys)
            if verdict is not None:
                outcomes[verdict] += 1
                assert d not in by_digest, f"stored, yet {why}: {b.describe()}"
                assert reasons == {verdict}, (
                    f"{reasons}, expected {verdict} ({why}): {b.describe()}"
                )
            elif d in by_digest:
                outcomes["stored"] += 1
            else:
                outcomes["|".join(sorted(reasons))] += 1
                assert reasons, b.describe()
                assert reasons <= VERIFIED_REFUSALS, (reasons, b.describe())

        # (3) the last envelope, and the receipts seen on the way
        marker_key = ("hub-2", marker_seq)
        assert marker_key in by_key, "the last envelope is not stored"
        assert counts.get(marker_key) == 5
        for r in seen:
            if r.status == RECEIPT_ACCEPTED:
                row = by_key.get((r.dev, r.seq))
                assert row is not None, f"accepted receipt, no envelope: {r}"
                assert (r.stored, r.refused) == (row[4], row[5]), (r, row)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(plan=plans())
    def example(plan: Plan) -> None:
        assert not task.done(), "the consumer task stopped in an earlier example"
        on_loop(clear_ingested(hubs.url))
        now = int(time.time() * 1000)
        built = build(plan, now)
        for i, b in enumerate(built):
            note(f"published {i}: sha256 {b.digest.hex()[:16]} {b.describe()}")
            probe.publish(b.topic, b.data)
        seq = next(marker_seqs)
        t = now - 60_000
        valid = Payload(
            "hub-2",
            seq,
            now,
            tuple(Reading(t + i, "heart_rate", 70.0, "/min", "s") for i in range(5)),
        )
        marker = Built(None, up_topic("hub-2"), seal(valid, hub2.key), None, False, False)
        probe.publish(marker.topic, marker.data)
        seen: list[Receipt] = []
        while True:
            (r,) = on_loop(receipts(probe, gateway, 1)).values()
            if (r.dev, r.seq) == ("hub-2", seq):
                break
            seen.append(r)
        assert (r.status, r.stored, r.refused) == (RECEIPT_ACCEPTED, 5, 0)
        # (1) the consumer is alive and the gateway healthy
        assert not task.done(), "the consumer task stopped"
        status, body = on_loop(health())
        assert status == 200, body
        check(built, marker, seq, seen)

    await asyncio.to_thread(example)
    print(f"\nfuzz outcomes over {EXAMPLES} examples: {dict(outcomes.most_common())}")
    print(f"rows written: {dict(tables)}")
