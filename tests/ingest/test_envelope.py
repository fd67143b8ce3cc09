"""The envelope codec: round trips, interoperability with pycose, tampering, hostile input."""

from __future__ import annotations

import math
import pickle
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.keys.curves import P256
from pycose.keys.ec2 import EC2Key
from pycose.messages.sign1message import Sign1Message

from ingest import cose, wire
from ingest import envelope as env
from ingest.envelope import (
    MAX_ENVELOPE_BYTES,
    MAX_ITEMS_PER_ENVELOPE,
    Opened,
    open_envelope,
    seal,
    verify,
)
from ingest.model import Gap, Payload, Reading, Reason
from ingest.wire import EnvelopeError
from tests.fixtures import envelopes

DEV = "hub-0001"

# Hypothesis must not write its example database into the working tree.
FUZZ = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_payload(n: int = 3, *, dev: str = DEV, seq: int = 7) -> Payload:
    readings = tuple(
        Reading(
            t_ms=1_700_000_000_000 + i * 1000,
            metric="heart_rate",
            value=60.0 + i,
            unit="/min",
            sensor="sensor-a",
        )
        for i in range(n)
    )
    gaps = (Gap(from_ms=1_699_999_000_000, to_ms=1_699_999_990_000, reason="out_of_range"),)
    return Payload(dev=dev, seq=seq, sent_ms=1_700_000_100_000, readings=readings, gaps=gaps)


def payload_obj(**changes: Any) -> dict[str, Any]:
    """The CBOR map of make_payload(), with fields replaced or (value ...) removed."""
    obj: dict[str, Any] = {
        "v": 1,
        "dev": DEV,
        "seq": 7,
        "sent": 1_700_000_100_000,
        "r": [[1_700_000_000_000, "heart_rate", 61.0, "/min", "sensor-a"]],
        "gaps": [],
    }
    for name, value in changes.items():
        if value is ...:
            del obj[name]
        else:
            obj[name] = value
    return obj


def raw_sign1(payload: Any, key: ec.EllipticCurvePrivateKey, **kwargs: Any) -> bytes:
    """Build a COSE_Sign1 by hand (cbor2 + cryptography), independent of the codec."""
    return envelopes.raw_sign1(payload, key, kid=DEV, **kwargs)


def reason_of(data: bytes, **kwargs: Any) -> Reason:
    with pytest.raises(EnvelopeError) as info:
        open_envelope(data, **kwargs)
    return info.value.reason


def cose_key(key: ec.EllipticCurvePrivateKey, *, private: bool) -> EC2Key:
    numbers = key.private_numbers()
    x = numbers.public_numbers.x.to_bytes(32, "big")
    y = numbers.public_numbers.y.to_bytes(32, "big")
    if private:
        return EC2Key(crv=P256, x=x, y=y, d=numbers.private_value.to_bytes(32, "big"))
    return EC2Key(crv=P256, x=x, y=y)


# --- round trips and interoperability -------------------------------------------------------


def test_round_trip(key: ec.EllipticCurvePrivateKey) -> None:
    payload = make_payload()
    opened = open_envelope(seal(payload, key))
    assert opened.kid == DEV
    assert opened.payload == payload
    verify(opened, key.public_key())


def test_wire_shape(key: ec.EllipticCurvePrivateKey) -> None:
    message = cbor2.loads(seal(make_payload(), key))
    assert message.tag == 18
    protected, unprotected, payload_bytes, signature = message.value
    assert cbor2.loads(protected) == {1: -7}
    assert unprotected == {4: DEV.encode()}
    assert len(signature) == 64
    assert list(cbor2.loads(payload_bytes)) == ["v", "dev", "seq", "sent", "r", "gaps"]


def test_protected_header_constant_is_alg_es256() -> None:
    assert cbor2.dumps({1: -7}) == cose.PROTECTED_ES256


def test_bytes_like_input_is_accepted(key: ec.EllipticCurvePrivateKey) -> None:
    data = seal(make_payload(), key)
    assert open_envelope(bytearray(data)).payload == make_payload()
    assert open_envelope(memoryview(data)).payload == make_payload()


def test_pycose_verifies_ours_with_the_public_key_only(key: ec.EllipticCurvePrivateKey) -> None:
    message = Sign1Message.decode(seal(make_payload(), key))
    message.key = cose_key(key, private=False)
    assert message.verify_signature()
    assert message.uhdr[KID] == DEV.encode()
    assert message.phdr[Algorithm] is Es256


def test_ours_verifies_pycose(key: ec.EllipticCurvePrivateKey) -> None:
    message = Sign1Message(
        phdr={Algorithm: Es256}, uhdr={KID: DEV.encode()}, payload=cbor2.dumps(payload_obj())
    )
    message.key = cose_key(key, private=True)
    opened = open_envelope(message.encode())
    verify(opened, key.public_key())
    assert opened.payload.readings == (
        Reading(1_700_000_000_000, "heart_rate", 61.0, "/min", "sensor-a"),
    )


def test_pycose_envelope_from_another_key_is_refused(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    message = Sign1Message(
        phdr={Algorithm: Es256}, uhdr={KID: DEV.encode()}, payload=cbor2.dumps(payload_obj())
    )
    message.key = cose_key(other_key, private=True)
    with pytest.raises(EnvelopeError) as info:
        verify(open_envelope(message.encode()), key.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_integer_values_decode_as_floats(key: ec.EllipticCurvePrivateKey) -> None:
    obj = payload_obj(r=[[1, "heart_rate", 72, "/min", "s"]])
    reading = open_envelope(raw_sign1(obj, key)).payload.readings[0]
    assert reading.value == 72.0
    assert type(reading.value) is float


def test_non_finite_values_pass_the_codec(key: ec.EllipticCurvePrivateKey) -> None:
    readings = (
        Reading(1, "heart_rate", math.nan, "/min", "s"),
        Reading(2, "heart_rate", math.inf, "/min", "s"),
        Reading(3, "heart_rate", -math.inf, "/min", "s"),
    )
    payload = Payload(dev=DEV, seq=1, sent_ms=3, readings=readings)
    values = [r.value for r in open_envelope(seal(payload, key)).payload.readings]
    assert math.isnan(values[0])
    assert values[1:] == [math.inf, -math.inf]


def test_a_full_batch_of_maximal_readings_fits(key: ec.EllipticCurvePrivateKey) -> None:
    reading = Reading(
        t_ms=-(2**63),
        metric="m" * env.MAX_METRIC_BYTES,
        value=-1.0e300,
        unit="u" * env.MAX_UNIT_BYTES,
        sensor="s" * env.MAX_SENSOR_BYTES,
    )
    payload = Payload(
        dev="d" * wire.MAX_DEVICE_ID_BYTES,
        seq=2**63 - 1,
        sent_ms=2**63 - 1,
        readings=(reading,) * MAX_ITEMS_PER_ENVELOPE,
    )
    data = seal(payload, key)
    assert len(data) <= MAX_ENVELOPE_BYTES
    assert open_envelope(data).payload == payload


def test_envelope_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(EnvelopeError(Reason.MALFORMED, "x")))
    assert (error.reason, error.detail, str(error)) == (Reason.MALFORMED, "x", "malformed: x")


# --- tampering --------------------------------------------------------------------------------


def test_flipped_bit_in_payload_is_bad_signature(key: ec.EllipticCurvePrivateKey) -> None:
    data = bytearray(seal(make_payload(), key))
    at = data.index(b"sensor-a") + 7
    data[at] ^= 0x01  # "sensor-a" -> "sensor-`": still a valid envelope
    opened = open_envelope(bytes(data))
    assert opened.payload.readings[0].sensor == "sensor-`"
    with pytest.raises(EnvelopeError) as info:
        verify(opened, key.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_flipped_bit_in_signature_is_bad_signature(key: ec.EllipticCurvePrivateKey) -> None:
    data = bytearray(seal(make_payload(), key))
    data[-1] ^= 0x80
    with pytest.raises(EnvelopeError) as info:
        verify(open_envelope(bytes(data)), key.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_signature_from_another_key_is_bad_signature(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    opened = open_envelope(seal(make_payload(), other_key))
    with pytest.raises(EnvelopeError) as info:
        verify(opened, key.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_verify_refuses_a_key_on_another_curve(key: ec.EllipticCurvePrivateKey) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(EnvelopeError) as info:
        verify(open_envelope(seal(make_payload(), key)), p384)
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_verify_refuses_a_hand_built_opened_with_a_short_signature(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    opened = open_envelope(seal(make_payload(), key))
    short = Opened(opened.kid, opened.payload, opened.protected, opened.payload_bytes, b"\x01")
    with pytest.raises(EnvelopeError) as info:
        verify(short, key.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


# --- size and CBOR bombs ----------------------------------------------------------------------


def test_ten_megabytes_is_too_large_before_decoding() -> None:
    # A well-formed-looking prefix followed by junk: a decoder would call it malformed.
    data = b"\xd2\x84" + b"\xff" * (10 * 1024 * 1024)
    assert reason_of(data) is Reason.TOO_LARGE


def test_max_size_is_a_parameter(key: ec.EllipticCurvePrivateKey) -> None:
    data = seal(make_payload(), key)
    assert reason_of(data, max_size=len(data) - 1) is Reason.TOO_LARGE
    assert open_envelope(data, max_size=len(data)).kid == DEV


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x81" * 100_000 + b"\x00", id="deep-arrays"),
        pytest.param(b"\xa1\x00" * 50_000 + b"\x00", id="deep-maps"),
        pytest.param(b"\xd2\x84" + b"\x81" * 1000 + b"\x00", id="deep-inside-tag"),
        pytest.param(b"\xd2" * 100_000 + b"\x00", id="tag-chain"),
        pytest.param(b"\x5b" + b"\xff" * 8, id="huge-bstr-length"),
        pytest.param(b"\x7b" + b"\x7f" + b"\xff" * 7 + b"abc", id="huge-tstr-length"),
        pytest.param(b"\xd2\x9b" + b"\x00\x00\x00\x01\x00\x00\x00\x00", id="huge-array-count"),
        pytest.param(b"\xd2\xbb" + b"\x7f" + b"\xff" * 7, id="huge-map-count"),
        pytest.param(b"\xd2\x9f" + b"\x9f" * 10_000, id="indefinite-arrays"),
        pytest.param(b"\xd2\x84\x5f\x41\x00\xff", id="indefinite-bstr"),
        pytest.param(b"\xd2\xbf\xff", id="indefinite-map"),
        pytest.param(b"\xd2\x84\xc5\x82\x1a\x7f\xff\xff\xff\x01", id="bigfloat-exponent"),
        pytest.param(b"\xd2\x84\xc4\x82\x3a\x7f\xff\xff\xff\x01", id="decimal-exponent"),
        pytest.param(b"\xd2\xd8\x1c\x81\xd8\x1d\x00", id="shared-reference-cycle"),
        pytest.param(b"\xd2\x84\xc2\x5a\x00\x10\x00\x00" + b"\xff" * 64, id="bignum"),
        pytest.param(b"\xd2\x84\xf7\xf7\xf7\xf7", id="undefined"),
        pytest.param(b"\xd2\x84\xf8\x20\xf6\xf6\xf6", id="simple-value"),
        pytest.param(b"\xd2\x84\x1c\x00\x00\x00", id="reserved-info"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xd2", id="tag-only"),
    ],
)
def test_cbor_bombs_are_malformed(data: bytes) -> None:
    assert reason_of(data) is Reason.MALFORMED


def test_trailing_bytes_are_malformed(key: ec.EllipticCurvePrivateKey) -> None:
    assert reason_of(seal(make_payload(), key) + b"\x00") is Reason.MALFORMED


def test_duplicate_map_keys_are_malformed(key: ec.EllipticCurvePrivateKey) -> None:
    # {"seq": 1, "seq": 2, ...}: decoders disagree on which one wins, so neither does.
    obj = payload_obj()
    head = cbor2.dumps(obj)
    assert head[0] == 0xA6
    duplicated = b"\xa7" + head[1:] + cbor2.dumps("seq") + cbor2.dumps(2)
    data = raw_sign1(duplicated, key, encode_payload=False)
    assert reason_of(data) is Reason.MALFORMED


def test_same_integer_key_in_two_encodings_is_a_duplicate(key: ec.EllipticCurvePrivateKey) -> None:
    # {1: -7, 1 (as 0x18 0x01): -7}
    protected = b"\xa2\x01\x26\x18\x01\x26"
    data = raw_sign1(payload_obj(), key, protected=protected)
    assert reason_of(data) is Reason.MALFORMED


def test_bomb_inside_the_payload_bstr_is_malformed(key: ec.EllipticCurvePrivateKey) -> None:
    for bomb in (b"\x81" * 10_000 + b"\x00", b"\x9f\xff", b"\xc5\x82\x1a\x7f\xff\xff\xff\x01"):
        assert reason_of(raw_sign1(bomb, key, encode_payload=False)) is Reason.MALFORMED


# --- structure and schema ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param({"seq": True}, Reason.MALFORMED, id="bool-seq"),
        pytest.param({"seq": -1}, Reason.MALFORMED, id="negative-seq"),
        pytest.param({"seq": 2**63}, Reason.MALFORMED, id="seq-beyond-int64"),
        pytest.param({"seq": 1.0}, Reason.MALFORMED, id="float-seq"),
        pytest.param({"sent": "now"}, Reason.MALFORMED, id="text-sent"),
        pytest.param({"seq": ...}, Reason.MALFORMED, id="missing-seq"),
        pytest.param({"gaps": ...}, Reason.MALFORMED, id="missing-gaps"),
        pytest.param({"extra": 1}, Reason.MALFORMED, id="unknown-key"),
        pytest.param({"dev": "other/dev"}, Reason.MALFORMED, id="dev-with-slash"),
        pytest.param({"dev": "hub-0002"}, Reason.MALFORMED, id="dev-differs-from-kid"),
        pytest.param({"r": {}}, Reason.MALFORMED, id="r-not-array"),
        pytest.param({"r": [[1, "hr", "72", "/min", "s"]]}, Reason.MALFORMED, id="str-value"),
        pytest.param({"r": [[1, "hr", True, "/min", "s"]]}, Reason.MALFORMED, id="bool-value"),
        pytest.param({"r": [[1, "hr", None, "/min", "s"]]}, Reason.MALFORMED, id="null-value"),
        pytest.param({"r": [[1.5, "hr", 1.0, "/min", "s"]]}, Reason.MALFORMED, id="float-t"),
        pytest.param({"r": [[1, "", 1.0, "/min", "s"]]}, Reason.MALFORMED, id="empty-metric"),
        pytest.param({"r": [[1, "m" * 65, 1.0, "/min", "s"]]}, Reason.MALFORMED, id="long-metric"),
        pytest.param({"r": [[1, "hr", 1.0, "/min"]]}, Reason.MALFORMED, id="short-reading"),
        pytest.param({"r": [[1, b"hr", 1.0, "/min", "s"]]}, Reason.MALFORMED, id="bstr-metric"),
        pytest.param({"gaps": [[1, 2]]}, Reason.MALFORMED, id="short-gap"),
        pytest.param({"gaps": [[1, 2, 3]]}, Reason.MALFORMED, id="int-gap-reason"),
        pytest.param(
            {"r": [[1, "hr", 1.0, "/min", "s"]] * (MAX_ITEMS_PER_ENVELOPE + 1)},
            Reason.TOO_LARGE,
            id="too-many-readings",
        ),
        pytest.param({"v": 4}, Reason.UNSUPPORTED_VERSION, id="v4"),
        pytest.param({"v": 4, "r": ..., "new": 1}, Reason.UNSUPPORTED_VERSION, id="v4-schema"),
        pytest.param({"v": 0}, Reason.UNSUPPORTED_VERSION, id="v0"),
        pytest.param({"v": "1"}, Reason.MALFORMED, id="text-v"),
        pytest.param({"v": True}, Reason.MALFORMED, id="bool-v"),
        pytest.param({"v": ...}, Reason.MALFORMED, id="missing-v"),
    ],
)
def test_payload_schema(
    key: ec.EllipticCurvePrivateKey, change: dict[str, Any], reason: Reason
) -> None:
    assert reason_of(raw_sign1(payload_obj(**change), key)) is reason


def test_payload_must_be_a_map(key: ec.EllipticCurvePrivateKey) -> None:
    assert reason_of(raw_sign1([1, DEV], key)) is Reason.MALFORMED


@pytest.mark.parametrize(
    ("protected", "reason"),
    [
        pytest.param(cbor2.dumps({1: -35}), Reason.MALFORMED, id="es384"),
        pytest.param(cbor2.dumps({1: "ES256"}), Reason.MALFORMED, id="text-alg"),
        pytest.param(cbor2.dumps({1: -7, 2: [4]}), Reason.MALFORMED, id="crit-header"),
        pytest.param(b"", Reason.MALFORMED, id="empty-protected"),
        pytest.param(cbor2.dumps([1, -7]), Reason.MALFORMED, id="protected-array"),
        pytest.param(b"\xa1\x01", Reason.MALFORMED, id="truncated-protected"),
    ],
)
def test_protected_header(
    key: ec.EllipticCurvePrivateKey, protected: bytes, reason: Reason
) -> None:
    assert reason_of(raw_sign1(payload_obj(), key, protected=protected)) is reason


@pytest.mark.parametrize(
    "unprotected",
    [
        pytest.param({}, id="no-kid"),
        pytest.param({4: DEV}, id="text-kid"),
        pytest.param({4: DEV.encode(), 5: b"iv"}, id="extra-header"),
        pytest.param({4: b"\xff\xfe"}, id="non-ascii-kid"),
        pytest.param({4: b"dev/+"}, id="wildcard-kid"),
        pytest.param({"4": DEV.encode()}, id="text-label"),
    ],
)
def test_unprotected_header(key: ec.EllipticCurvePrivateKey, unprotected: Any) -> None:
    assert reason_of(raw_sign1(payload_obj(), key, unprotected=unprotected)) is Reason.MALFORMED


def test_missing_tag_is_malformed(key: ec.EllipticCurvePrivateKey) -> None:
    assert reason_of(raw_sign1(payload_obj(), key, tag=None)) is Reason.MALFORMED


def test_other_cose_tag_is_malformed(key: ec.EllipticCurvePrivateKey) -> None:
    assert reason_of(raw_sign1(payload_obj(), key, tag=17)) is Reason.MALFORMED


@pytest.mark.parametrize(
    "message",
    [
        pytest.param([b"\xa1\x01\x26", {4: b"d"}, b"\xa0"], id="three-parts"),
        pytest.param([b"\xa1\x01\x26", {4: b"d"}, None, b"s" * 64], id="detached-payload"),
        pytest.param([b"\xa1\x01\x26", {4: b"d"}, b"\xa0", b"s" * 63], id="short-signature"),
        pytest.param([b"\xa1\x01\x26", {4: b"d"}, b"\xa0", "s" * 64], id="text-signature"),
        pytest.param([{1: -7}, {4: b"d"}, b"\xa0", b"s" * 64], id="map-protected"),
        pytest.param({1: 2}, id="map"),
    ],
)
def test_cose_structure(message: Any) -> None:
    assert reason_of(cbor2.dumps(cbor2.CBORTag(18, message))) is Reason.MALFORMED


def test_non_bytes_input_is_malformed() -> None:
    assert reason_of("not bytes") is Reason.MALFORMED  # type: ignore[arg-type]


# --- sealing refuses what opening would refuse ----------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(
            Payload(dev=DEV, seq=True, sent_ms=1, readings=()), Reason.MALFORMED, id="bool-seq"
        ),
        pytest.param(
            Payload(dev="a/b", seq=1, sent_ms=1, readings=()), Reason.MALFORMED, id="bad-dev"
        ),
        pytest.param(
            Payload(dev=DEV, seq=1, sent_ms=1, readings=(Reading(1, "m" * 65, 1.0, "u", "s"),)),
            Reason.MALFORMED,
            id="long-metric",
        ),
        pytest.param(
            Payload(dev=DEV, seq=1, sent_ms=1, readings=(Reading(1, "m", 10**400, "u", "s"),)),
            Reason.MALFORMED,
            id="int-beyond-float",
        ),
        pytest.param(
            Payload(dev=DEV, seq=1, sent_ms=1, readings=(), v=4),
            Reason.UNSUPPORTED_VERSION,
            id="v4",
        ),
        pytest.param(
            Payload(
                dev=DEV,
                seq=1,
                sent_ms=1,
                readings=(Reading(1, "m", 1.0, "u", "s"),) * MAX_ITEMS_PER_ENVELOPE,
                gaps=(Gap(1, 2, "x"),),
            ),
            Reason.TOO_LARGE,
            id="too-many-items",
        ),
    ],
)
def test_seal_refuses_invalid_payloads(
    key: ec.EllipticCurvePrivateKey, payload: Payload, reason: Reason
) -> None:
    with pytest.raises(EnvelopeError) as info:
        seal(payload, key)
    assert info.value.reason is reason


def test_seal_needs_a_p256_key() -> None:
    with pytest.raises(TypeError):
        seal(make_payload(), ec.generate_private_key(ec.SECP384R1()))


# --- properties -------------------------------------------------------------------------------


def check_any_bytes(data: bytes) -> None:
    """Opened or EnvelopeError: any other exception escapes and fails the test."""
    try:
        opened = open_envelope(data)
    except EnvelopeError as error:
        reason = error.reason
    else:
        assert isinstance(opened, Opened)
        return
    assert reason in {Reason.MALFORMED, Reason.TOO_LARGE, Reason.UNSUPPORTED_VERSION}


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes_open_or_envelope_error(data: bytes) -> None:
    check_any_bytes(data)


@FUZZ
@given(st.binary(max_size=64))
def test_any_bytes_after_the_tag_open_or_envelope_error(data: bytes) -> None:
    check_any_bytes(b"\xd2\x84" + data)


@pytest.fixture(scope="module")
def sample(key: ec.EllipticCurvePrivateKey) -> bytes:
    return seal(make_payload(2), key)


@FUZZ
@given(st.data())
def test_mutated_envelopes_open_or_envelope_error(sample: bytes, data: st.DataObject) -> None:
    check_any_bytes(mutate(sample, data))


def mutate(original: bytes, data: st.DataObject) -> bytes:
    """``original`` with 1-4 bits flipped, bytes set, inserted or deleted."""
    buffer = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(buffer) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if action == "flip":
            buffer[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            buffer[at] = data.draw(st.integers(0, 255))
        elif action == "insert":
            buffer[at:at] = data.draw(st.binary(min_size=1, max_size=9))
        elif len(buffer) > 1:
            del buffer[at]
    return bytes(buffer)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.integers(-5, 5) | st.text(max_size=4), inner, max_size=6)
    ),
    max_leaves=30,
)


@FUZZ
@given(cbor_values)
def test_arbitrary_cbor_in_a_tag_18_opens_or_envelope_error(value: Any) -> None:
    check_any_bytes(cbor2.dumps(cbor2.CBORTag(18, value)))


@FUZZ
@given(st.dictionaries(st.sampled_from(["v", "dev", "seq", "sent", "r", "gaps", "x"]), cbor_values))
def test_arbitrary_payload_maps_open_or_envelope_error(
    key: ec.EllipticCurvePrivateKey, obj: dict[str, Any]
) -> None:
    check_any_bytes(raw_sign1(obj, key))


def utf8_text(max_bytes: int) -> st.SearchStrategy[str]:
    """Text an envelope may carry: 1..max_bytes of UTF-8, no control character."""
    return st.text(
        st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=max_bytes
    ).filter(lambda s: len(s.encode("utf-8")) <= max_bytes)


int64 = st.integers(-(2**63), 2**63 - 1)
readings = st.builds(
    Reading,
    t_ms=int64,
    metric=utf8_text(env.MAX_METRIC_BYTES),
    value=st.floats(allow_nan=False),
    unit=utf8_text(env.MAX_UNIT_BYTES),
    sensor=utf8_text(env.MAX_SENSOR_BYTES),
    flags=st.lists(
        st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True),
        max_size=env.MAX_FLAGS_PER_READING,
        unique=True,
    ).map(lambda f: tuple(sorted(f))),
    user=st.none() | st.integers(0, 255),
    record=st.none() | utf8_text(env.MAX_RECORD_BYTES),
)
gaps = st.builds(Gap, from_ms=int64, to_ms=int64, reason=utf8_text(env.MAX_GAP_REASON_BYTES))
payloads = st.builds(
    Payload,
    dev=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    seq=st.integers(0, 2**63 - 1),
    sent_ms=int64,
    readings=st.lists(readings, max_size=20).map(tuple),
    gaps=st.lists(gaps, max_size=5).map(tuple),
)


@FUZZ
@given(payloads)
def test_random_payloads_round_trip(key: ec.EllipticCurvePrivateKey, payload: Payload) -> None:
    opened = open_envelope(seal(payload, key))
    assert opened.payload == payload
    assert opened.kid == payload.dev
    verify(opened, key.public_key())


_BOUNDARY_LENGTHS = [0, 1, 23, 24, 255, 256, 65_535, 65_536, env.MAX_ENVELOPE_BYTES]


@given(
    st.sampled_from(_BOUNDARY_LENGTHS) | st.integers(0, 70_000),
    st.sampled_from(_BOUNDARY_LENGTHS) | st.integers(0, 300),
)
def test_the_signed_structure_is_the_cbor_of_rfc_9052(payload_len: int, protected_len: int) -> None:
    """The bytes signed and checked, written without cbor2, are what cbor2 writes for
    ``["Signature1", protected, h'', payload]`` at every length head."""
    protected, payload = (
        b"\xa1" * protected_len,
        bytes(range(256)) * (payload_len // 256) + (b"p" * (payload_len % 256)),
    )
    assert cose.sig_structure(protected, payload) == cbor2.dumps(
        ["Signature1", protected, b"", payload]
    )


CONTROLS = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x1F),
    st.just("\x7f"),
    st.characters(min_codepoint=0x80, max_codepoint=0x9F),
)


@FUZZ
@given(st.data())
def test_a_control_character_in_any_text_field_is_malformed(
    key: ec.EllipticCurvePrivateKey, data: st.DataObject
) -> None:
    """NUL (which PostgreSQL's text cannot hold) and every other C0, DEL or C1 control, in
    any of the texts a payload carries, on the canonical layout and off it."""
    control = data.draw(CONTROLS)
    t = 1_780_000_000_000
    reading = [t, "heart_rate", 72.0, "/min", "hr-strap"]
    gap = [t - 10, t, "out_of_range"]
    sensor = ["hr-strap", "Acme", "HR-1", "SN1", "1.0", "rev A", 90]
    field = data.draw(st.sampled_from(["metric", "unit", "sensor", "gap", "report", "name"]))
    where = data.draw(st.sampled_from(["start", "middle", "end"]))

    def spoil(text: str) -> str:
        at = {"start": 0, "middle": len(text) // 2, "end": len(text)}[where]
        return text[:at] + control + text[at:]

    if field in ("metric", "unit", "sensor"):
        i = {"metric": 1, "unit": 3, "sensor": 4}[field]
        reading[i] = spoil(str(reading[i]))
    elif field == "gap":
        gap[2] = spoil(str(gap[2]))
    elif field == "report":
        sensor[1] = spoil(str(sensor[1]))
    else:
        sensor[0] = spoil(str(sensor[0]))
    obj = {"v": 1, "dev": DEV, "seq": 1, "sent": t, "r": [reading], "gaps": [gap], "s": [sensor]}
    if field in ("metric", "unit", "sensor") and data.draw(st.booleans()):
        del obj["s"]
        obj["gaps"] = []  # the canonical layout: the fast path's pattern sees it first
    with pytest.raises(EnvelopeError, match="control character") as info:
        open_envelope(raw_sign1(obj, key))
    assert info.value.reason is Reason.MALFORMED
