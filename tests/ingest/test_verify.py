"""``pipeline.verify`` with signatures checked ahead: a check counts only when made with the
very key object the batch's device record holds."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

from ingest import keys
from ingest.envelope import seal
from ingest.model import Payload, Reading, Reason, RejectedEnvelope
from ingest.pipeline import (
    Decoded,
    DeviceRecord,
    Inbound,
    SignatureCheck,
    check_signature,
    decode,
    up_topic,
    verify,
)

DEV = "hub-1"


def decoded(key: ec.EllipticCurvePrivateKey, *, tamper: bool = False) -> Decoded:
    payload = Payload(DEV, 1, 2_000, (Reading(1_000, "heart_rate", 70.0, "/min", "hr"),))
    data = bytearray(seal(payload, key))
    if tamper:
        data[-1] ^= 1  # the signature's last byte
    d = decode(Inbound(up_topic(DEV), bytes(data), 3_000))
    assert isinstance(d, Decoded)
    return d


def record(public_key: ec.EllipticCurvePublicKey, *, revoked: bool = False) -> DeviceRecord:
    return DeviceRecord(DEV, "P1", public_key, 0, revoked)


def reason_of(refusal: RejectedEnvelope | None) -> Reason | None:
    return None if refusal is None else refusal.reason


def reparsed(public_key: ec.EllipticCurvePublicKey) -> ec.EllipticCurvePublicKey:
    der = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    key = load_der_public_key(der)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_a_check_with_the_records_key_is_used_as_is() -> None:
    key = keys.generate_private_key()
    device = record(key.public_key())
    good, forged = decoded(key), decoded(key, tamper=True)
    assert verify(good, device, check_signature(good, device.public_key)) is None
    found = check_signature(forged, device.public_key)
    assert found.error is not None
    assert reason_of(verify(forged, device, found)) is Reason.BAD_SIGNATURE
    # The contract: a check made with this key object is not made again (here one that
    # claims success for a forged envelope, which only this test can make).
    assert verify(forged, device, SignatureCheck(device.public_key, None)) is None


def test_a_check_with_another_key_object_is_made_again() -> None:
    key, old = keys.generate_private_key(), keys.generate_private_key()
    device = record(key.public_key())
    forged = decoded(key, tamper=True)
    for stale in (old.public_key(), reparsed(device.public_key)):
        assert reason_of(verify(forged, device, SignatureCheck(stale, None))) is (
            Reason.BAD_SIGNATURE
        )
    # Checked ahead with the device's former key (it failed); the record's key verifies.
    good = decoded(key)
    before = check_signature(good, old.public_key())
    assert before.error is not None
    assert verify(good, device, before) is None


def test_unknown_and_revoked_devices_come_before_any_check() -> None:
    key = keys.generate_private_key()
    good = decoded(key)
    check = check_signature(good, key.public_key())
    assert reason_of(verify(good, None, check)) is Reason.UNKNOWN_DEVICE
    revoked = record(key.public_key(), revoked=True)
    assert reason_of(verify(good, revoked, check)) is Reason.DEVICE_REVOKED
