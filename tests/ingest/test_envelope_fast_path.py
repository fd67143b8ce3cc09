"""The envelope codec's fast path (the canonical layout ``seal`` writes) against the slow path
(the item-by-item profile scan): it must take every canonical envelope, give the same
answer, and accept nothing the slow path refuses, whatever the bytes."""

from __future__ import annotations

import re
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from ingest import cose, wire
from ingest import envelope as env
from ingest.envelope import open_envelope, seal
from ingest.model import Payload, Reading, Reason
from ingest.wire import EnvelopeError
from tests.ingest.test_envelope import FUZZ, int64, mutate, raw_sign1, utf8_text


def fast_text(max_bytes: int) -> st.SearchStrategy[str]:
    """Texts the fast path takes: none with a character of U+0080..U+00BF (a 0xC2 lead
    byte in UTF-8, which the fast path leaves to the slow one, where C1 controls are)."""
    return utf8_text(max_bytes).filter(lambda s: not any("\x80" <= c <= "\xbf" for c in s))


gapless = st.builds(
    Payload,
    dev=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    seq=st.integers(0, 2**63 - 1),
    sent_ms=int64,
    readings=st.lists(
        st.builds(
            Reading,
            t_ms=int64,
            metric=fast_text(env.MAX_METRIC_BYTES),
            value=st.floats(allow_nan=False) | st.sampled_from([0.5, 72.0, -1.25]),
            unit=fast_text(env.MAX_UNIT_BYTES),
            sensor=fast_text(env.MAX_SENSOR_BYTES),
            flags=st.just(()),
            user=st.none(),
            record=st.none(),
        ),
        max_size=20,
    ).map(tuple),
)


def slow_payload(payload_bytes: bytes) -> Any:
    return wire.loads(payload_bytes, "payload")


@FUZZ
@given(gapless)
def test_every_canonical_envelope_takes_the_fast_path_with_the_same_result(
    key: ec.EllipticCurvePrivateKey, payload: Payload
) -> None:
    data = seal(payload, key)
    fast = cose._split_canonical_sign1(data)
    assert fast is not None
    assert fast == cose._split_sign1(data)
    payload_bytes = fast[2]
    obj = env._loads_canonical_payload(payload_bytes)
    assert obj is not None
    assert obj == slow_payload(payload_bytes)
    assert open_envelope(data).payload == payload


def test_envelopes_with_gaps_or_sensor_reports_take_the_slow_path(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    from tests.ingest.test_envelope import make_payload

    with_gaps = cose._split_canonical_sign1(seal(make_payload(3), key))
    assert with_gaps is not None
    assert env._loads_canonical_payload(with_gaps[2]) is None
    assert open_envelope(seal(make_payload(3), key)).payload == make_payload(3)


def slow_or_error(fn: Any, data: bytes) -> Any:
    try:
        return fn(data)
    except EnvelopeError as e:
        return e.reason


@FUZZ
@given(gapless, st.data())
def test_the_fast_path_accepts_nothing_the_slow_path_refuses(
    key: ec.EllipticCurvePrivateKey, payload: Payload, draw: st.DataObject
) -> None:
    data = mutate(seal(payload, key), draw)
    fast = cose._split_canonical_sign1(data)
    if fast is not None:
        assert fast == cose._split_sign1(data)
    payload_bytes = mutate(cbor2.dumps(env._payload_to_obj(payload)), draw)
    obj = env._loads_canonical_payload(payload_bytes)
    if obj is not None:
        # Compared re-encoded, so that a NaN a mutation made equals itself.
        assert cbor2.dumps(obj) == cbor2.dumps(slow_or_error(slow_payload, payload_bytes))


def canonical_payload_bytes(n: int, head: bytes) -> bytes:
    """A gap-less payload of ``n`` readings whose r array head is replaced by ``head``."""
    body = cbor2.dumps(env._payload_to_obj(Payload("hub-1", 1, 5, readings(n))))
    marker = b"\x61r" + bytes([0x80 + n])
    assert body.count(marker) == 1
    return body.replace(marker, b"\x61r" + head)


def readings(n: int) -> tuple[Reading, ...]:
    return tuple(Reading(1000 + i, "heart_rate", 70.0, "/min", "s") for i in range(n))


@pytest.mark.parametrize("head", [b"\x82", b"\x84", b"\x98\x02", b"\x9f"])
def test_an_array_head_that_disagrees_with_its_items_is_refused(head: bytes) -> None:
    data = canonical_payload_bytes(3, head)
    assert env._loads_canonical_payload(data) is None
    with pytest.raises(EnvelopeError) as info:
        env._payload_from_obj(slow_payload(data))
    assert info.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(
    "reading",
    [
        [1000, "heart_rate", cbor2.CBORTag(2, b"\x01"), "/min", "s"],  # a bignum
        [1000, "heart_rate", float("nan"), "/min", "s"],
        [1000, "heart_rate", 70.0, "/min", "s" * 129],  # sensor too long
        [1000, "heart_rate", True, "/min", "s"],
    ],
)
def test_readings_outside_the_canonical_grammar_take_the_slow_path(
    key: ec.EllipticCurvePrivateKey, reading: list[Any]
) -> None:
    obj = {"v": 1, "dev": "hub-0001", "seq": 1, "sent": 5, "r": [reading], "gaps": []}
    data = raw_sign1(obj, key)
    split = cose._split_canonical_sign1(data)
    assert split is not None
    fast = env._loads_canonical_payload(split[2])
    if isinstance(reading[2], float) and reading[2] != reading[2]:
        assert fast is not None  # NaN is a float: plausibility refuses it later
        return
    assert fast is None
    assert slow_or_error(lambda b: open_envelope(b).payload, data) == Reason.MALFORMED


def test_a_maximal_envelope_takes_the_fast_path(key: ec.EllipticCurvePrivateKey) -> None:
    payload = Payload(
        "d" * 64,
        2**63 - 1,
        -(2**63),
        tuple(
            Reading(2**63 - 1, "m" * 64, 1e308, "u" * 32, "s" * 128)
            for _ in range(env.MAX_ITEMS_PER_ENVELOPE)
        ),
    )
    data = seal(payload, key)
    split = cose._split_canonical_sign1(data)
    assert split is not None
    assert env._loads_canonical_payload(split[2]) is not None
    assert open_envelope(data).payload == payload


def test_values_and_times_never_push_an_envelope_off_the_fast_path(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    """Bytes 0xC2 0x80..0x9F inside a time or a value are no C1 control: only texts are
    checked for them. 1000 readings of the times and values of a day at 1 Hz carry that
    byte pair many times over."""
    readings = tuple(
        Reading(1_780_000_000_000 + i * 1000, "heart_rate", 55.0 + i % 60, "/min", "hr")
        for i in range(1000)
    )
    payload_bytes = cbor2.loads(seal(Payload("hub-1", 1, 1_780_000_000_000, readings), key)).value[
        2
    ]
    assert re.search(rb"\xc2[\x80-\x9f]", payload_bytes) is not None
    assert env._loads_canonical_payload(payload_bytes) is not None


def test_a_c1_control_in_a_text_still_takes_the_slow_path_and_is_refused(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    obj = {
        "v": 2,
        "dev": "hub-1",
        "seq": 1,
        "sent": 5,
        "r": [[1, "heart\x85rate", 1.0, "/min", "s"]],
        "gaps": [],
    }
    payload_bytes = cbor2.dumps(obj)
    assert env._loads_canonical_payload(payload_bytes) is None
    with pytest.raises(EnvelopeError, match="control character"):
        open_envelope(raw_sign1(obj, key))
