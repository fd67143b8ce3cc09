"""The hub's durable outbox: every reading is on disk before anything else happens to it.

One SQLite file per hub (WAL, ``synchronous=FULL``: a write has reached the disk when the
call returns). Readings and gaps wait in ``pending_*`` tables until :meth:`Outbox.seal_pending`
moves them, in one transaction, into signed envelopes with consecutive sequence numbers; the
next number lives in the same file, so it survives restarts and never repeats. An envelope
stays until the gateway's receipt for it arrives: ``accepted`` deletes it, ``rejected`` moves
a record of it (seq, counts, reason) to ``rejected`` and it is never sent again.

Nothing is dropped silently: when the file reaches its bound, :meth:`Outbox.add_readings`
raises :class:`OutboxFull` and the caller decides (typically: record a gap saying so; gaps
have a small reserve beyond the bound for exactly that). The bound counts database pages in
use (pages freed by receipts are reused before the file grows); the WAL file comes on top,
a few MiB at most (checkpointed every 1000 pages, truncated to ``outbox_file.JOURNAL_SIZE_LIMIT``).
Rejected envelopes keep only their record, not their data: what the gateway refused (for
example for lack of consent) does not linger on the hub.

The class is synchronous and thread-safe (one lock around one connection): the hub calls it
from a worker thread or an executor, never from the event loop directly.
"""

from __future__ import annotations

import sqlite3
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from cryptography.hazmat.primitives.asymmetric import ec

from device_drivers.outbox_file import (
    FIRST_SEQ,
    InvalidReading,
    OutboxError,
    OutboxFull,
    create_private_file,
    file_size,
    immediate,
    prepare,
    used_bytes,
)
from ingest.envelope import (
    MAX_ITEMS_PER_ENVELOPE,
    MAX_SENSORS_PER_ENVELOPE,
    check_gap,
    check_reading,
    seal,
)
from ingest.model import Gap, Payload, Reading, Reason, Receipt, SensorReport, ZoneReport
from ingest.receipts import RECEIPT_ACCEPTED, RECEIPT_REJECTED
from ingest.wire import EnvelopeError, check_device_id

# The outbox's errors are defined with its file, and are part of this module's interface.
__all__ = [
    "DEFAULT_MAX_BYTES",
    "FIRST_SEQ",
    "InvalidReading",
    "Outbox",
    "OutboxError",
    "OutboxFull",
    "OutboxStats",
    "RejectedEnvelope",
    "SealedEnvelope",
]

# 256 MiB: a pending reading costs about 60 bytes on disk, so this holds about four million
# readings, weeks of several wearables at 1 Hz with the hub offline, and still fits on the
# smallest SD card or phone storage a hub runs on.
DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024
# The empty schema takes about 10 pages; below this there is no room for data.
MIN_MAX_BYTES: Final = 128 * 1024
NEAR_FULL_FRACTION: Final = 0.8
# Gaps may exceed the bound by this much: when readings are refused because the outbox is
# full, the gap saying so must still be recorded. A gap costs about 60 bytes: ~1000 gaps.
GAP_RESERVE_BYTES: Final = 64 * 1024
# Per-row overhead (record header, rowid, integer and value columns, cell pointer) used to
# estimate the size of rows before inserting them; text columns are added at their length.
_ROW_OVERHEAD: Final = 40
# Wait this long for another connection's write lock (a status tool reading the same file)
# before failing: long enough to ride out one seal transaction, short enough to surface.
_BUSY_TIMEOUT_S: Final = 5.0

# Reading values are stored as IEEE 754 binary64, big-endian, in an 8-byte BLOB: exact for
# every float, including NaN (a REAL column would turn NaN into NULL). Whether a value is
# plausible is decided at the gateway, where a refusal is recorded with its reason.
_DOUBLE: Final = struct.Struct(">d")


@dataclass(frozen=True, slots=True)
class SealedEnvelope:
    """One signed envelope waiting for its receipt."""

    seq: int
    data: bytes
    created_ms: int
    readings: int
    gaps: int
    attempts: int
    last_sent_ms: int | None


@dataclass(frozen=True, slots=True)
class RejectedEnvelope:
    """The record kept of an envelope the gateway refused (its data is not kept)."""

    seq: int
    reason: str
    readings: int
    gaps: int
    refused: int
    created_ms: int
    receipt_at_ms: int


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """What the hub shows about its outbox (no data values)."""

    device_id: str
    pending_readings: int
    pending_gaps: int
    unreceipted_envelopes: int
    rejected_envelopes: int
    oldest_unreceipted_t_ms: int | None
    next_seq: int
    bytes_on_disk: int
    bytes_used: int
    max_bytes: int
    near_full: bool
    last_receipt_seq: int | None
    last_receipt_status: str | None
    last_receipt_at_ms: int | None
    # A new time zone waits for the next envelope (one is sealed for it alone if need be).
    time_zone_pending: bool = False


class Outbox:
    """A hub's durable outbox in one SQLite file; create it with :meth:`open`."""

    def __init__(
        self, connection: sqlite3.Connection, path: Path, device_id: str, max_bytes: int
    ) -> None:
        self._connection: sqlite3.Connection | None = connection
        self._lock = threading.Lock()
        self.path = path
        self.device_id = device_id
        self.max_bytes = max_bytes
        # The database and SQLite's files beside it, made once: pathlib interns a new Path's
        # names, and making them again on every status call was the churn through CPython's
        # table of interned strings that set off its one doubling in a running hub
        # (docs/performance.md).
        self._files = tuple(Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm"))

    @classmethod
    def open(cls, path: Path, device_id: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Outbox:
        """Open (creating if needed) the outbox of ``device_id`` at ``path``.

        Raises :class:`OutboxError` if the file is not an outbox, is corrupt, or belongs to
        another device. A new file is created with mode 0600: it holds health data.
        """
        try:
            check_device_id(device_id)
        except EnvelopeError as exc:
            raise OutboxError(f"invalid device id {device_id!r}: {exc.detail}") from None
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES}")
        create_private_file(path)
        try:
            connection = sqlite3.connect(
                path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {path}: {exc}") from exc
        try:
            prepare(connection, path, device_id)
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise OutboxError(
                f"{path} is not a usable outbox (corrupt, or not an SQLite database): {exc}"
            ) from exc
        except BaseException:
            connection.close()
            raise
        return cls(connection, path, device_id, max_bytes)

    def close(self) -> None:
        """Close the file; later calls raise :class:`OutboxError`. Idempotent."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- writes -----------------------------------------------------------------------------

    def add_readings(self, readings: Sequence[Reading]) -> None:
        """Store readings durably (all or none); on return they survive a crash.

        Raises :class:`InvalidReading` for a reading no envelope could carry and
        :class:`OutboxFull` when the batch would take the file past ``max_bytes``.
        """
        rows = []
        needed = 0
        for i, reading in enumerate(readings):
            try:
                check_reading(reading)
            except EnvelopeError as exc:
                raise InvalidReading(f"reading {i}: {exc.detail}") from None
            flags = " ".join(reading.flags) if reading.flags else None
            rows.append(
                (
                    reading.t_ms,
                    reading.metric,
                    _DOUBLE.pack(float(reading.value)),
                    reading.unit,
                    reading.sensor,
                    flags,
                    reading.user,
                    reading.record,
                )
            )
            needed += _ROW_OVERHEAD + _utf8_len(
                reading.metric, reading.unit, reading.sensor, flags or "", reading.record or ""
            )
        if not rows:
            return
        with self._transaction() as db:
            self._check_space(db, needed, self.max_bytes)
            db.executemany(
                "INSERT INTO pending_readings"
                " (t_ms, metric, value, unit, sensor, flags, user, record)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def add_gap(self, gap: Gap) -> None:
        """Store a gap durably. Gaps may use a small reserve beyond ``max_bytes``."""
        try:
            check_gap(gap)
        except EnvelopeError as exc:
            raise InvalidReading(f"gap: {exc.detail}") from None
        with self._transaction() as db:
            needed = _ROW_OVERHEAD + _utf8_len(gap.reason)
            self._check_space(db, needed, self.max_bytes + GAP_RESERVE_BYTES)
            db.execute(
                "INSERT INTO pending_gaps (from_ms, to_ms, reason, sensor) VALUES (?, ?, ?, ?)",
                (gap.from_ms, gap.to_ms, gap.reason, gap.sensor),
            )

    def add_sensor(self, report: SensorReport) -> None:
        """Keep a wearable's latest description for the next envelope (newest wins)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO pending_sensors (sensor, manufacturer, model, serial,"
                " firmware, hardware, battery_level, paired_user) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    report.sensor,
                    report.manufacturer,
                    report.model,
                    report.serial,
                    report.firmware,
                    report.hardware,
                    report.battery_level,
                    report.paired_user,
                ),
            )

    def note_time_zone(self, time_zone: str, now_ms: int) -> bool:
        """The hub's zone is ``time_zone`` now. A zone other than the one last noted is
        kept, in force from ``now_ms``, and travels with the next envelope sealed; the same
        zone again changes nothing. True when it changed."""
        with self._transaction() as db:
            (known,) = db.execute("SELECT time_zone FROM meta WHERE id = 1").fetchone()
            if known == time_zone:
                return False
            db.execute(
                "UPDATE meta SET time_zone = ?, time_zone_since_ms = ?, time_zone_pending = 1"
                " WHERE id = 1",
                (time_zone, now_ms),
            )
            return True

    def time_zone(self) -> ZoneReport | None:
        """The zone last noted, and since when (None: none yet)."""
        with self._lock:
            zone, since = (
                self._db()
                .execute("SELECT time_zone, time_zone_since_ms FROM meta WHERE id = 1")
                .fetchone()
            )
        return None if zone is None else ZoneReport(zone, since)

    def seal_pending(
        self,
        key: ec.EllipticCurvePrivateKey,
        now_ms: int,
        max_readings: int = MAX_ITEMS_PER_ENVELOPE,
        *,
        max_envelopes: int | None = None,
    ) -> list[SealedEnvelope]:
        """Move pending gaps and readings into signed envelopes, oldest first, atomically.

        Each envelope holds at most ``max_readings`` items (gaps first, then readings) and
        gets the next sequence number; ``now_ms`` is its ``sent`` time (a resend carries the
        same bytes). Either every envelope of the call is stored and its items are gone from
        the pending tables, or nothing changed. ``max_envelopes`` bounds the work of one call.
        """
        if not 1 <= max_readings <= MAX_ITEMS_PER_ENVELOPE:
            raise ValueError(f"max_readings must be in 1..{MAX_ITEMS_PER_ENVELOPE}")
        if max_envelopes is not None and max_envelopes < 1:
            raise ValueError("max_envelopes must be at least 1")
        sealed: list[SealedEnvelope] = []
        with self._transaction() as db:
            (seq,) = db.execute("SELECT next_seq FROM meta WHERE id = 1").fetchone()
            limit = max_readings
            while max_envelopes is None or len(sealed) < max_envelopes:
                gap_rows = db.execute(
                    "SELECT id, from_ms, to_ms, reason, sensor FROM pending_gaps"
                    " ORDER BY id LIMIT ?",
                    (limit,),
                ).fetchall()
                reading_rows = db.execute(
                    "SELECT id, t_ms, metric, value, unit, sensor, flags, user, record"
                    " FROM pending_readings ORDER BY id LIMIT ?",
                    (limit - len(gap_rows),),
                ).fetchall()
                sensors = tuple(
                    SensorReport(*row)
                    for row in db.execute(
                        "SELECT sensor, manufacturer, model, serial, firmware, hardware,"
                        " battery_level, paired_user FROM pending_sensors ORDER BY sensor LIMIT ?",
                        (MAX_SENSORS_PER_ENVELOPE,),
                    ).fetchall()
                )
                zone = _pending_zone(db)
                if not gap_rows and not reading_rows and not sensors and zone is None:
                    break
                readings = tuple(
                    Reading(
                        t_ms,
                        metric,
                        _DOUBLE.unpack(value)[0],
                        unit,
                        sensor,
                        tuple(flags.split(" ")) if flags else (),
                        user,
                        record,
                    )
                    for _, t_ms, metric, value, unit, sensor, flags, user, record in reading_rows
                )
                gaps = tuple(Gap(a, b, reason, sensor) for _, a, b, reason, sensor in gap_rows)
                payload = Payload(
                    dev=self.device_id,
                    seq=seq,
                    sent_ms=now_ms,
                    readings=readings,
                    gaps=gaps,
                    sensors=sensors,
                    zone=zone,
                )
                try:
                    data = seal(payload, key)
                except EnvelopeError as exc:
                    if exc.reason is Reason.TOO_LARGE and limit > 1:
                        # Flagged readings can make a full batch too large: fewer this time.
                        limit = max(1, (len(gap_rows) + len(reading_rows)) // 2)
                        continue
                    raise OutboxError(f"cannot seal envelope {seq}: {exc}") from exc
                limit = max_readings
                oldest = min((r.t_ms for r in readings), default=None)
                db.execute(
                    "INSERT INTO envelopes (seq, sealed, created_ms, readings, gaps, oldest_t_ms)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, data, now_ms, len(readings), len(gaps), oldest),
                )
                # The rows were selected as the lowest ids, so "id <= last" is exactly them.
                if gap_rows:
                    db.execute("DELETE FROM pending_gaps WHERE id <= ?", (gap_rows[-1][0],))
                if reading_rows:
                    db.execute("DELETE FROM pending_readings WHERE id <= ?", (reading_rows[-1][0],))
                db.executemany(
                    "DELETE FROM pending_sensors WHERE sensor = ?", [(s.sensor,) for s in sensors]
                )
                if zone is not None:
                    db.execute("UPDATE meta SET time_zone_pending = 0 WHERE id = 1")
                sealed.append(SealedEnvelope(seq, data, now_ms, len(readings), len(gaps), 0, None))
                seq += 1
            db.execute("UPDATE meta SET next_seq = ? WHERE id = 1", (seq,))
        return sealed

    def mark_sent(self, seq: int, now_ms: int) -> bool:
        """Record a (re)send of envelope ``seq``; False if it is no longer waiting.

        A receipt can overtake the bookkeeping of its own send, so an unknown seq is normal.
        """
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE envelopes SET attempts = attempts + 1, last_sent_ms = ?, status = 'sent'"
                " WHERE seq = ?",
                (now_ms, seq),
            )
            return cursor.rowcount == 1

    def receipt(self, receipt: Receipt) -> bool:
        """Apply a verified receipt (see ``ingest.receipts.open_receipt``).

        ``accepted`` deletes the envelope; ``rejected`` replaces it with a record in
        ``rejected`` and it is not sent again. Returns False when no waiting envelope had
        that seq (a repeated receipt). A receipt for another device raises
        :class:`OutboxError`.
        """
        if receipt.dev != self.device_id:
            raise OutboxError(
                f"receipt for device {receipt.dev!r} reached the outbox of {self.device_id!r}"
            )
        if receipt.status not in (RECEIPT_ACCEPTED, RECEIPT_REJECTED):
            raise OutboxError(f"receipt status {receipt.status!r} is neither accepted nor rejected")
        with self._transaction() as db:
            if receipt.status == RECEIPT_REJECTED:
                db.execute(
                    "INSERT OR REPLACE INTO rejected"
                    " (seq, reason, readings, gaps, refused, created_ms, receipt_at_ms)"
                    " SELECT seq, ?, readings, gaps, ?, created_ms, ? FROM envelopes"
                    " WHERE seq = ?",
                    (receipt.reason or "", receipt.refused, receipt.at_ms, receipt.seq),
                )
            cursor = db.execute("DELETE FROM envelopes WHERE seq = ?", (receipt.seq,))
            db.execute(
                "UPDATE meta SET last_receipt_seq = ?, last_receipt_status = ?,"
                " last_receipt_at_ms = ? WHERE id = 1",
                (receipt.seq, receipt.status, receipt.at_ms),
            )
            return cursor.rowcount == 1

    # --- reads ------------------------------------------------------------------------------

    def due(self, now_ms: int, resend_after_ms: int, limit: int) -> list[SealedEnvelope]:
        """Envelopes to send now, oldest first, at most ``limit``.

        Never sent, or last sent at least ``resend_after_ms`` ago (the relay passes a
        jittered value), or last sent "after" ``now_ms``: the wall clock went back since,
        so how long ago is unknown, and a resend costs less than a wait of unknown length.
        Rejected envelopes are never due.
        """
        with self._lock:
            rows = (
                self._db()
                .execute(
                    "SELECT seq, sealed, created_ms, readings, gaps, attempts, last_sent_ms"
                    " FROM envelopes WHERE last_sent_ms IS NULL OR last_sent_ms <= ?"
                    " OR last_sent_ms > ? ORDER BY seq LIMIT ?",
                    (now_ms - resend_after_ms, now_ms, limit),
                )
                .fetchall()
            )
        return [SealedEnvelope(*row) for row in rows]

    def rejected(self, limit: int = 100) -> list[RejectedEnvelope]:
        """The most recent records of rejected envelopes, newest first."""
        with self._lock:
            rows = (
                self._db()
                .execute(
                    "SELECT seq, reason, readings, gaps, refused, created_ms, receipt_at_ms"
                    " FROM rejected ORDER BY seq DESC LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
        return [RejectedEnvelope(*row) for row in rows]

    def stats(self) -> OutboxStats:
        """Counts, sizes and the last receipt, for the hub's status page and metrics."""
        with self._lock:
            db = self._db()
            (pending,) = db.execute("SELECT count(*) FROM pending_readings").fetchone()
            (pending_gaps,) = db.execute("SELECT count(*) FROM pending_gaps").fetchone()
            (unreceipted,) = db.execute("SELECT count(*) FROM envelopes").fetchone()
            (rejected,) = db.execute("SELECT count(*) FROM rejected").fetchone()
            (oldest,) = db.execute(
                "SELECT min(t) FROM (SELECT min(t_ms) AS t FROM pending_readings"
                " UNION ALL SELECT min(oldest_t_ms) FROM envelopes)"
            ).fetchone()
            next_seq, last_seq, last_status, last_at, zone_pending = db.execute(
                "SELECT next_seq, last_receipt_seq, last_receipt_status, last_receipt_at_ms,"
                " time_zone_pending FROM meta WHERE id = 1"
            ).fetchone()
            used = used_bytes(db)
        on_disk = sum(file_size(f) for f in self._files)
        return OutboxStats(
            device_id=self.device_id,
            pending_readings=pending,
            pending_gaps=pending_gaps,
            unreceipted_envelopes=unreceipted,
            rejected_envelopes=rejected,
            oldest_unreceipted_t_ms=oldest,
            next_seq=next_seq,
            bytes_on_disk=on_disk,
            bytes_used=used,
            max_bytes=self.max_bytes,
            near_full=used >= NEAR_FULL_FRACTION * self.max_bytes,
            last_receipt_seq=last_seq,
            last_receipt_status=last_status,
            last_receipt_at_ms=last_at,
            time_zone_pending=bool(zone_pending),
        )

    # --- internals --------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise OutboxError(f"outbox {self.path} is closed")
        return self._connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: committed (durably) or rolled back."""
        with self._lock:
            db = self._db()
            try:
                with immediate(db):
                    yield db
            except sqlite3.Error as exc:
                if exc.sqlite_errorname == "SQLITE_FULL":
                    raise OutboxFull(used_bytes(db), self.max_bytes, 0) from exc
                raise OutboxError(f"outbox {self.path}: {exc}") from exc

    def _check_space(self, db: sqlite3.Connection, needed: int, limit: int) -> None:
        used = used_bytes(db)
        if used + needed > limit:
            raise OutboxFull(used, limit, needed)


def _pending_zone(db: sqlite3.Connection) -> ZoneReport | None:
    """The hub's zone while it is still to be sent (sealing clears the mark)."""
    row = db.execute(
        "SELECT time_zone, time_zone_since_ms FROM meta WHERE id = 1 AND time_zone_pending = 1"
    ).fetchone()
    return None if row is None else ZoneReport(row[0], row[1])


def _utf8_len(*texts: str) -> int:
    return sum(len(text.encode("utf-8")) for text in texts)
