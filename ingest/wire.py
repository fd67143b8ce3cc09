"""The protocol's CBOR profile and field types (docs/protocol.md sections 2 and 3).

Shared by envelopes, receipts and hubs' own requests. Decoding is defensive in layers: the
size is checked before a single byte is parsed; then :func:`scan` walks the CBOR heads of the
input without building anything and admits only the profile this protocol uses (definite
lengths, integer or text map keys without duplicates, no tags but the outer 18, no simple
values but false/true/null, shallow nesting, no trailing bytes); only then does cbor2 build
Python values. The scan exists because cbor2 on its own accepts inputs we must not: it
ignores trailing bytes, builds cyclic lists from shared-reference tags, and its bigfloat tag
raises ``decimal.Overflow`` rather than a CBOR error. Every failure is an
:class:`EnvelopeError` with a :class:`~ingest.model.Reason`.
"""

from __future__ import annotations

import re
from typing import Any, Final

import cbor2

from ingest.errors import IngestError
from ingest.model import Reason

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
MAX_DEVICE_ID_BYTES: Final = 64

# Valid documents nest at most 4 containers deep (a v2 payload map > r list > reading list >
# flag list; a COSE Receipt's unprotected map > proofs map > proof list).
MAX_DEPTH: Final = 4

DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
# Control characters (C0, DEL, C1): never part of a name, unit or reason, and NUL is what
# PostgreSQL's text type cannot hold at all. Every text field refuses them.
CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What text people write (a query's question, a field of the API) may not hold: the C0
# controls and DEL, tab and line ends excepted. Nothing that renders oddly on a terminal, a
# page or a log line is stored.
TEXT_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# What the decoders accept: bytes, or a bytes-like buffer (copied once after the size check).
Buffer = bytes | bytearray | memoryview


class EnvelopeError(IngestError):
    """An envelope or receipt that cannot be sealed, opened or verified, and why."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


def is_device_id(device_id: object) -> bool:
    """Whether ``device_id`` is a valid device id (see ``check_device_id``)."""
    return isinstance(device_id, str) and DEVICE_ID_RE.fullmatch(device_id) is not None


def check_device_id(device_id: object) -> str:
    """Return ``device_id`` if it is a valid device id (1-64 of ``A-Z a-z 0-9 . _ -``)."""
    if not isinstance(device_id, str) or DEVICE_ID_RE.fullmatch(device_id) is None:
        raise EnvelopeError(
            Reason.MALFORMED, "device id must be 1-64 characters of A-Z a-z 0-9 . _ -"
        )
    return device_id


def within(data: Buffer, max_size: int) -> bytes:
    """``data`` as bytes, if it is bytes-like and at most ``max_size`` long."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EnvelopeError(Reason.MALFORMED, "input is not bytes")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_size:
        raise EnvelopeError(Reason.TOO_LARGE, f"{size} bytes > {max_size}")
    return bytes(data)


def check_keys(obj: dict[Any, Any], expected: frozenset[str], what: str) -> None:
    keys = set(obj)
    if keys != expected:
        missing = sorted(map(repr, expected - keys))
        unknown = sorted(map(repr, keys - expected))
        raise EnvelopeError(Reason.MALFORMED, f"{what} keys: missing {missing}, unknown {unknown}")


# --- field checks (used in both directions) -------------------------------------------------


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def int_field(x: object, what: str, *, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    if not isinstance(x, int) or isinstance(x, bool):
        raise EnvelopeError(Reason.MALFORMED, f"{what} must be an integer")
    if not lo <= x <= hi:
        raise EnvelopeError(Reason.MALFORMED, f"{what} out of range [{lo}, {hi}]")
    return x


def number(x: object, what: str) -> float:
    """Any int or float; NaN and infinities pass (plausibility is a later stage)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise EnvelopeError(Reason.MALFORMED, f"{what} must be a number")
    try:
        return float(x)
    except OverflowError:
        raise EnvelopeError(Reason.MALFORMED, f"{what} is out of float range") from None


def text(x: object, what: str, max_bytes: int) -> str:
    if not isinstance(x, str):
        raise EnvelopeError(Reason.MALFORMED, f"{what} must be a text string")
    try:
        size = len(x.encode("utf-8"))
    except UnicodeEncodeError:
        raise EnvelopeError(Reason.MALFORMED, f"{what} is not valid Unicode") from None
    if not 1 <= size <= max_bytes:
        raise EnvelopeError(Reason.MALFORMED, f"{what} must be 1-{max_bytes} UTF-8 bytes")
    if CONTROL_RE.search(x) is not None:
        raise EnvelopeError(Reason.MALFORMED, f"{what} contains a control character")
    return x


# --- CBOR ---------------------------------------------------------------------------------


def loads(data: bytes, what: str, *, tag: int | None = None) -> Any:
    """Scan ``data`` against the protocol's CBOR profile, then decode it with cbor2."""
    scan(data, what, tag)
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, OverflowError, RecursionError) as exc:
        raise EnvelopeError(Reason.MALFORMED, f"{what}: {exc}") from None


def head(data: bytes, pos: int, what: str) -> tuple[int, int, int, int]:
    """Decode one CBOR head at ``pos``: (major type, additional info, argument, next pos)."""
    n = len(data)
    if pos >= n:
        raise EnvelopeError(Reason.MALFORMED, f"{what}: truncated CBOR")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, info, pos
    if info > 27:
        kind = "indefinite length" if info == 31 else "reserved additional info"
        raise EnvelopeError(Reason.MALFORMED, f"{what}: {kind} at byte {pos - 1}")
    width = 1 << (info - 24)
    if pos + width > n:
        raise EnvelopeError(Reason.MALFORMED, f"{what}: truncated CBOR")
    return major, info, int.from_bytes(data[pos : pos + width], "big"), pos + width


def scan(data: bytes, what: str, tag: int | None) -> None:
    """Walk every CBOR head once, iteratively; raise unless the input is in the profile.

    The head decoding of ``_head`` is inlined here: this loop runs for every item of every
    envelope, and a function call per item was most of the gateway's decoding time.
    """
    n = len(data)
    pos = 0
    if tag is not None:
        major, _, arg, pos = head(data, pos, what)
        if major != 6 or arg != tag:
            raise EnvelopeError(Reason.MALFORMED, f"{what}: expected CBOR tag {tag}")
    from_bytes = int.from_bytes
    # Open containers: items still expected, and map key identities (None for arrays).
    counts = [1]
    keysets: list[set[tuple[int, int | bytes]] | None] = [None]
    while counts:
        start = pos
        if pos >= n:
            raise EnvelopeError(Reason.MALFORMED, f"{what}: truncated CBOR")
        initial = data[pos]
        major = initial >> 5
        info = initial & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info <= 27:
            width = 1 << (info - 24)
            if pos + width > n:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: truncated CBOR")
            arg = from_bytes(data[pos : pos + width], "big")
            pos += width
        else:
            kind = "indefinite length" if info == 31 else "reserved additional info"
            raise EnvelopeError(Reason.MALFORMED, f"{what}: {kind} at byte {start}")
        keys = keysets[-1]
        if keys is not None and counts[-1] % 2 == 0:
            key: tuple[int, int | bytes]
            if major == 0 or major == 1:
                key = (major, arg)
            elif major == 3:
                key = (major, data[pos : pos + arg])
            else:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: map key at byte {start}")
            if key in keys:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: duplicate map key at {start}")
            keys.add(key)
        counts[-1] -= 1
        if major == 2 or major == 3:
            if arg > n - pos:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: string longer than input")
            pos += arg
        elif major == 4 or major == 5:
            items = arg * 2 if major == 5 else arg
            if items > n - pos:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: container longer than input")
            if len(counts) > MAX_DEPTH:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: nested too deep")
            counts.append(items)
            keysets.append(set() if major == 5 else None)
        elif major == 6:
            raise EnvelopeError(Reason.MALFORMED, f"{what}: unexpected tag {arg}")
        elif major == 7 and info not in (20, 21, 22, 25, 26, 27):
            raise EnvelopeError(Reason.MALFORMED, f"{what}: unsupported simple value")
        while counts and counts[-1] == 0:
            counts.pop()
            keysets.pop()
    if pos != n:
        raise EnvelopeError(Reason.MALFORMED, f"{what}: {n - pos} trailing bytes")
