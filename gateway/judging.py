"""The pure stages of a batch, run per message in executor threads: decode, check the
signature, verify against the device's record, admit against consent; and the receipts.

A stage that raises refuses its own message (``poison``, with the error on record) and never
the batch: pure code fails the same way on every try.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from consent.gate import ConsentSnapshot
from ingest import pipeline
from ingest.model import AcceptedEnvelope, Reason, Receipt, RejectedEnvelope
from ingest.receipts import RECEIPT_REJECTED, seal_receipts
from ingest.wire import INT64_MAX, is_device_id
from storage.errors import first_line
from storage.writer import EnvelopeOutcome, StoredEnvelope

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    """An MQTT message as the consumer holds it until acknowledged."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_ms: int
    # Delivered again by the broker (MQTT DUP): a worker stopped while holding it.
    dup: bool = False


@dataclass(slots=True)
class Judged:
    """A batch between judging and storing: what was decoded, and what admission made of it."""

    decoded: list[tuple[Message, pipeline.Decoded]]
    undecodable: list[tuple[Message, RejectedEnvelope]]
    now_ms: int
    # Per decoded envelope, its signature checked ahead with a key known then (or None).
    checks: list[pipeline.SignatureCheck | None]
    accepted: list[tuple[Message, AcceptedEnvelope]] = field(default_factory=list)
    refused: list[tuple[Message, RejectedEnvelope]] = field(default_factory=list)
    consent: ConsentSnapshot = field(default_factory=ConsentSnapshot)
    # Byte-identical copies of envelopes stored earlier, with what was stored of them then.
    replays: list[tuple[Message, EnvelopeOutcome]] = field(default_factory=list)

    @property
    def rejected(self) -> list[tuple[Message, RejectedEnvelope]]:
        return self.undecodable + self.refused


# A message decoded (or refused), with its signature checked ahead when its device's key was
# known.
Early = tuple[pipeline.Decoded | RejectedEnvelope, pipeline.SignatureCheck | None]


def decode_and_check(
    messages: Sequence[Message], keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> list[Early]:
    out: list[Early] = []
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
            out.append((faulted(inbound, digest, "decoding", exc), None))
        else:
            out.append((d, check))
    return out


def verify_and_admit_one(
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


def faulted(
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


def claimed_key(r: RejectedEnvelope) -> tuple[str, int] | None:
    """The (device, seq) ``r`` claims, where an envelope could have been stored under it."""
    if r.dev is None or r.seq is None or not is_device_id(r.dev) or not 0 <= r.seq <= INT64_MAX:
        return None
    return (r.dev, r.seq)


def replay_of(
    r: RejectedEnvelope, stored: Mapping[tuple[str, int], StoredEnvelope]
) -> EnvelopeOutcome | None:
    """The outcome of the envelope ``r`` is a byte-identical copy of, if one was stored."""
    claimed = claimed_key(r)
    first = stored.get(claimed) if claimed is not None else None
    if first is None or first.envelope_sha256 != r.envelope_sha256:
        return None
    return first.outcome()


def poisoned_unread(topic: str, digest: bytes, tries: int) -> RejectedEnvelope:
    """A message refused as ``poison`` without being read: it was delivered ``tries`` times
    without its handling completing (0: a copy of one refused so before). Unread, it has no
    device and seq a receipt could name; the device is the topic's."""
    why = (
        f"delivered {tries} times without its handling completing"
        if tries
        else "a copy of a message refused as poison"
    )
    return RejectedEnvelope(
        Reason.POISON, f"{why}; not read", topic, digest, dev=pipeline.topic_device(topic)
    )


def rejected_receipt(r: RejectedEnvelope, now_ms: int) -> Receipt | None:
    """The receipt of an envelope refused whole; None when there is nobody to send it to (no
    device and sequence number, or a topic that names another device)."""
    if r.dev is None or r.seq is None or r.reason is Reason.TOPIC_MISMATCH:
        return None
    return Receipt(r.dev, r.seq, RECEIPT_REJECTED, 0, r.reading_count, now_ms, r.reason.value)


Key = tuple[str, int, bytes]


def key(a: AcceptedEnvelope) -> Key:
    return (a.dev, a.seq, a.envelope_sha256)


def seal_each(receipts: Sequence[Receipt], key: ec.EllipticCurvePrivateKey) -> list[bytes | None]:
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
