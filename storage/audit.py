"""The audit trail: append-only and hash-chained.

Every row holds ``hash = SHA-256(prev_hash || content)``, where ``prev_hash`` is the hash of
the row before it (32 zero bytes for the first) and ``content`` is the row's canonical form
(:func:`canonical`). A trigger refuses UPDATE, DELETE and TRUNCATE, and the application role
has no such privileges; :func:`verify` finds what a superuser changed anyway: an altered row
no longer matches its hash, a deleted or inserted row breaks the link of the row after it.

Appends are serialised by a transaction-level advisory lock, so concurrent writers (consent,
alerts, exports) extend one chain; the lock is held until the appending transaction ends,
which is what makes the next writer read the committed head. ``detail`` is hashed as
PostgreSQL prints the stored ``jsonb`` (its text form is deterministic), so what is verified
is exactly what is stored.

The chain alone only shows the table is self-consistent: whoever owns the database can
rewrite a row and recompute every hash after it. :func:`verify` therefore also takes
*anchors*, chain heads recorded outside the database (signed checkpoints,
:mod:`storage.audit_checkpoints`), and reports every anchor whose row no longer carries the
recorded hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import psycopg
from psycopg.rows import class_row

from storage.db import Conn
from storage.errors import StorageError, first_line
from storage.timeconv import EPOCH

# An arbitrary, fixed key for pg_advisory_xact_lock: "trialstream audit chain".
AUDIT_CHAIN_LOCK_KEY = 0x7472_6175_6469_74
GENESIS_HASH = bytes(32)
# Bumped if the canonical form ever changes; it is part of every hashed content.
CANONICAL_VERSION = 1
# verify() reads the chain in pages of this many rows: bounded memory for any length.
VERIFY_PAGE_ROWS = 5000

# Where the records appended in this context come from, beyond their actor: an
# authenticated command line sets it (``via``, the operating-system user, the host), and each
# record's detail carries it, whichever module appends.
_ORIGIN: ContextVar[Mapping[str, object] | None] = ContextVar("audit_origin", default=None)


@contextlib.contextmanager
def origin(stamp: Mapping[str, object]) -> Iterator[None]:
    """Every record appended within adds ``stamp`` to its detail."""
    token = _ORIGIN.set(stamp)
    try:
        yield
    finally:
        _ORIGIN.reset(token)


class AuditError(StorageError):
    """An audit record could not be appended (bad arguments or detail not JSON-encodable)."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    audit_id: int
    at: datetime
    actor: str
    action: str
    entity: str
    entity_id: str
    detail: Mapping[str, object]
    reason: str | None


@dataclass(frozen=True, slots=True)
class BrokenLink:
    """The first row where the chain does not hold, and how."""

    audit_id: int
    # 'content_changed': the row's content does not hash to its stored hash;
    # 'chain_broken': its prev_hash is not the hash of the row before it (a row was removed,
    # inserted or reordered).
    problem: str
    expected: bytes
    found: bytes


@dataclass(frozen=True, slots=True)
class ChainHead:
    """A point of the chain: the row ``audit_id``, its ``hash``, and ``count``, the number of
    rows from the start of the chain up to and including it."""

    audit_id: int
    hash: bytes
    count: int


@dataclass(frozen=True, slots=True)
class AnchorFailure:
    """An anchor (a chain head recorded outside the database) the database no longer matches."""

    # Index of the anchor in the sequence given to :func:`verify`.
    index: int
    anchor: ChainHead
    # 'hash_differs': the row is there but carries another hash (history up to it rewritten);
    # 'count_differs': same hash but another number of rows before it;
    # 'row_missing': no row with that id (removed, or the table cut back before it).
    problem: str
    # What the database holds instead: the row's hash and count, or None for 'row_missing'.
    found: ChainHead | None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    rows_checked: int
    head_hash: bytes
    broken: BrokenLink | None
    # The id of the last row verified (0 for an empty chain): with ``head_hash`` and
    # ``rows_checked``, the head a checkpoint records.
    head_id: int = 0
    # Indices of the anchors whose row still carries the recorded hash, in chain order.
    anchors_held: tuple[int, ...] = ()
    anchor_failures: tuple[AnchorFailure, ...] = ()
    # Anchors not reached because the chain broke before their row.
    anchors_unchecked: int = 0

    @property
    def ok(self) -> bool:
        return self.broken is None and not self.anchor_failures and not self.anchors_unchecked

    @property
    def head(self) -> ChainHead:
        return ChainHead(self.head_id, self.head_hash, self.rows_checked)


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"not JSON-encodable in audit detail: {type(value).__name__}")


def _epoch_us(at: datetime) -> int:
    return (at - EPOCH) // timedelta(microseconds=1)


def canonical(
    *,
    at: datetime,
    actor: str,
    action: str,
    entity: str,
    entity_id: str,
    detail_text: str,
    reason: str | None,
) -> bytes:
    """The bytes hashed for one row: a compact JSON array of its fields in a fixed order.

    ``detail_text`` is the jsonb text PostgreSQL returns for the stored detail.
    """
    fields = [
        CANONICAL_VERSION,
        _epoch_us(at),
        actor,
        action,
        entity,
        entity_id,
        detail_text,
        reason,
    ]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


def chain_hash(prev_hash: bytes, content: bytes) -> bytes:
    return hashlib.sha256(prev_hash + content).digest()


_HEAD = """
SELECT %s::jsonb::text, clock_timestamp(),
       (SELECT hash FROM audit_log ORDER BY audit_id DESC LIMIT 1)
"""
_INSERT = """
INSERT INTO audit_log (at, actor, action, entity, entity_id, detail, reason, prev_hash, hash)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)
RETURNING audit_id
"""


async def append(
    conn: Conn,
    *,
    actor: str,
    action: str,
    entity: str,
    entity_id: str,
    detail: Mapping[str, object] | None = None,
    reason: str | None = None,
) -> int:
    """Append one record to the chain in the caller's transaction; returns its ``audit_id``.

    Call it inside the transaction that makes the audited change, so both commit or neither.
    The chain lock is held until that transaction ends: keep such transactions short.
    """
    for name, value in (
        ("actor", actor),
        ("action", action),
        ("entity", entity),
        ("entity_id", entity_id),
    ):
        if not value or "\x00" in value:
            raise AuditError(f"audit {name} must be a non-empty string without NUL")
    if reason is not None and "\x00" in reason:
        raise AuditError("audit reason must not contain NUL")
    stamp = _ORIGIN.get()
    try:
        detail_json = json.dumps(
            {**(detail or {}), **(stamp or {})},
            default=_json_default,
            allow_nan=False,
            ensure_ascii=False,
        )
    except (TypeError, ValueError) as exc:
        raise AuditError(f"audit detail for {action} is not JSON-encodable: {exc}") from exc
    if "\\u0000" in detail_json:
        raise AuditError("audit detail must not contain NUL characters")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_CHAIN_LOCK_KEY,))
        try:
            cur = await conn.execute(_HEAD, (detail_json,))
        except psycopg.DataError as exc:
            raise AuditError(f"audit detail refused by the database: {first_line(exc)}") from exc
        row = await cur.fetchone()
        assert row is not None
        detail_text, at, prev = str(row[0]), row[1], row[2]
        prev_hash = bytes(prev) if prev is not None else GENESIS_HASH
        content = canonical(
            at=at,
            actor=actor,
            action=action,
            entity=entity,
            entity_id=entity_id,
            detail_text=detail_text,
            reason=reason,
        )
        cur = await conn.execute(
            _INSERT,
            (
                at,
                actor,
                action,
                entity,
                entity_id,
                detail_text,
                reason,
                prev_hash,
                chain_hash(prev_hash, content),
            ),
        )
        inserted = await cur.fetchone()
    assert inserted is not None
    return int(inserted[0])


@dataclass(frozen=True, slots=True)
class _StoredRow:
    audit_id: int
    at: datetime
    actor: str
    action: str
    entity: str
    entity_id: str
    detail_text: str
    reason: str | None
    prev_hash: bytes | None
    hash: bytes


_PAGE = """
SELECT audit_id, at, actor, action, entity, entity_id, detail::text AS detail_text, reason,
       prev_hash, hash
FROM audit_log WHERE audit_id > %s ORDER BY audit_id LIMIT %s
"""


class _Anchors:
    """Anchors in chain order, compared with each row as :func:`verify` walks past it."""

    def __init__(self, anchors: Sequence[ChainHead]) -> None:
        self._anchors = anchors
        self._order = sorted(range(len(anchors)), key=lambda i: anchors[i].audit_id)
        self._next = 0
        self.held: list[int] = []
        self.failures: list[AnchorFailure] = []

    def _missing_before(self, audit_id: int) -> None:
        """Anchors whose row would come before ``audit_id`` but was not found."""
        while self._next < len(self._order):
            i = self._order[self._next]
            if self._anchors[i].audit_id >= audit_id:
                return
            self.failures.append(AnchorFailure(i, self._anchors[i], "row_missing", None))
            self._next += 1

    def row(self, found: ChainHead) -> None:
        self._missing_before(found.audit_id)
        while self._next < len(self._order):
            i = self._order[self._next]
            anchor = self._anchors[i]
            if anchor.audit_id != found.audit_id:
                return
            if anchor.hash != found.hash:
                self.failures.append(AnchorFailure(i, anchor, "hash_differs", found))
            elif anchor.count != found.count:
                self.failures.append(AnchorFailure(i, anchor, "count_differs", found))
            else:
                self.held.append(i)
            self._next += 1

    def end_of_chain(self) -> None:
        self._missing_before(2**63)

    def report(
        self, checked: int, head_hash: bytes, head_id: int, broken: BrokenLink | None
    ) -> VerifyReport:
        return VerifyReport(
            checked,
            head_hash,
            broken,
            head_id,
            tuple(self.held),
            tuple(self.failures),
            len(self._order) - self._next,
        )


async def verify(conn: Conn, anchors: Sequence[ChainHead] = ()) -> VerifyReport:
    """Walk the whole chain in order and report the first row where it does not hold, and
    every anchor whose row no longer carries the anchored hash and count.

    A rewrite that recomputed every hash leaves the chain consistent; only the anchors,
    kept outside the database, show it. Anchors after the first broken row are not checked
    (``anchors_unchecked``): the report is already a failure.
    """
    expected_prev = GENESIS_HASH
    checked = 0
    last_id = 0
    check = _Anchors(anchors)
    while True:
        async with conn.cursor(row_factory=class_row(_StoredRow)) as cur:
            await cur.execute(_PAGE, (last_id, VERIFY_PAGE_ROWS))
            page = await cur.fetchall()
        if not page:
            check.end_of_chain()
            return check.report(checked, expected_prev, last_id, None)
        for row in page:
            stored_prev = bytes(row.prev_hash) if row.prev_hash is not None else GENESIS_HASH
            stored_hash = bytes(row.hash)
            if stored_prev != expected_prev:
                broken = BrokenLink(row.audit_id, "chain_broken", expected_prev, stored_prev)
                return check.report(checked, expected_prev, last_id, broken)
            content = canonical(
                at=row.at,
                actor=row.actor,
                action=row.action,
                entity=row.entity,
                entity_id=row.entity_id,
                detail_text=row.detail_text,
                reason=row.reason,
            )
            computed = chain_hash(stored_prev, content)
            if computed != stored_hash:
                broken = BrokenLink(row.audit_id, "content_changed", computed, stored_hash)
                return check.report(checked, expected_prev, last_id, broken)
            expected_prev = stored_hash
            checked += 1
            last_id = row.audit_id
            check.row(ChainHead(last_id, stored_hash, checked))


_HISTORY = """
SELECT audit_id, at, actor, action, entity, entity_id, detail, reason
FROM audit_log
WHERE (entity = 'participant' AND entity_id = %s) OR detail ->> 'participant_id' = %s
ORDER BY audit_id
"""


async def participant_history(conn: Conn, participant_id: str) -> list[AuditRecord]:
    """Records about one participant: entity ``participant`` or ``detail.participant_id``."""
    cur = await conn.execute(_HISTORY, (participant_id, participant_id))
    return [
        AuditRecord(int(aid), at, str(actor), str(action), str(ent), str(eid), dict(detail), reason)
        for aid, at, actor, action, ent, eid, detail, reason in await cur.fetchall()
    ]
