"""The outbox's SQLite file: its schema and versions, the checks made on opening it, and
the errors of the outbox.

Schema versions: 1 had readings without status; 2 adds each pending reading's flags, device
user and record key, each pending gap's wearable, and each pending sensor report's paired
user; 3 adds the hub's time zone, since when it is in force, and whether it is still to be
sent. A file of an earlier version is upgraded in place when it is opened (columns added;
nothing rewritten), so a hub keeps what it held across an upgrade of its software.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from device_drivers.errors import DeviceDriverError

# Marks the SQLite file as ours (PRAGMA application_id, ASCII "TSOB"), so an outbox is never
# confused with another application's database.
APPLICATION_ID: Final = 0x54534F42
SCHEMA_VERSION: Final = 3
FIRST_SEQ: Final = 1
# Keep the WAL file from staying large after a checkpoint.
JOURNAL_SIZE_LIMIT: Final = 4 * 1024 * 1024

# pending_readings.flags: the device's flags, space-separated (codes have no spaces); NULL
# for none. (No comments inside the statements: SQLite keeps their text as the schema.)
_SCHEMA: Final = (
    """
    CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        device_id TEXT NOT NULL,
        next_seq INTEGER NOT NULL CHECK (next_seq >= 1),
        last_receipt_seq INTEGER,
        last_receipt_status TEXT,
        last_receipt_at_ms INTEGER,
        time_zone TEXT,
        time_zone_since_ms INTEGER,
        time_zone_pending INTEGER NOT NULL DEFAULT 0
    ) STRICT
    """,
    """
    CREATE TABLE pending_readings (
        id INTEGER PRIMARY KEY,
        t_ms INTEGER NOT NULL,
        metric TEXT NOT NULL,
        value BLOB NOT NULL CHECK (length(value) = 8),
        unit TEXT NOT NULL,
        sensor TEXT NOT NULL,
        flags TEXT,
        user INTEGER,
        record TEXT
    ) STRICT
    """,
    """
    CREATE TABLE pending_gaps (
        id INTEGER PRIMARY KEY,
        from_ms INTEGER NOT NULL,
        to_ms INTEGER NOT NULL,
        reason TEXT NOT NULL,
        sensor TEXT
    ) STRICT
    """,
    """
    CREATE TABLE pending_sensors (
        sensor TEXT PRIMARY KEY,
        manufacturer TEXT,
        model TEXT,
        serial TEXT,
        firmware TEXT,
        hardware TEXT,
        battery_level INTEGER,
        paired_user INTEGER
    ) STRICT
    """,
    """
    CREATE TABLE envelopes (
        seq INTEGER PRIMARY KEY,
        sealed BLOB NOT NULL,
        created_ms INTEGER NOT NULL,
        readings INTEGER NOT NULL,
        gaps INTEGER NOT NULL,
        oldest_t_ms INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_sent_ms INTEGER,
        status TEXT NOT NULL DEFAULT 'sealed' CHECK (status IN ('sealed', 'sent'))
    ) STRICT
    """,
    """
    CREATE TABLE rejected (
        seq INTEGER PRIMARY KEY,
        reason TEXT NOT NULL,
        readings INTEGER NOT NULL,
        gaps INTEGER NOT NULL,
        refused INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        receipt_at_ms INTEGER NOT NULL
    ) STRICT
    """,
)

# What upgrades a file of the version before to this one, in order.
_UPGRADES: Final = {
    1: (
        "ALTER TABLE pending_readings ADD COLUMN flags TEXT",
        "ALTER TABLE pending_readings ADD COLUMN user INTEGER",
        "ALTER TABLE pending_readings ADD COLUMN record TEXT",
        "ALTER TABLE pending_sensors ADD COLUMN paired_user INTEGER",
        "ALTER TABLE pending_gaps ADD COLUMN sensor TEXT",
    ),
    2: (
        "ALTER TABLE meta ADD COLUMN time_zone TEXT",
        "ALTER TABLE meta ADD COLUMN time_zone_since_ms INTEGER",
        "ALTER TABLE meta ADD COLUMN time_zone_pending INTEGER NOT NULL DEFAULT 0",
    ),
}


class OutboxError(DeviceDriverError):
    """The outbox cannot do what was asked: corrupt file, wrong device, closed, I/O error."""


class OutboxFull(OutboxError):
    """The outbox reached its size bound; nothing of the refused batch was written."""

    def __init__(self, used_bytes: int, max_bytes: int, needed_bytes: int) -> None:
        super().__init__(used_bytes, max_bytes, needed_bytes)
        self.used_bytes = used_bytes
        self.max_bytes = max_bytes
        self.needed_bytes = needed_bytes

    def __str__(self) -> str:
        return (
            f"outbox full: {self.used_bytes} of {self.max_bytes} bytes used, "
            f"{self.needed_bytes} more refused"
        )


class InvalidReading(OutboxError):
    """A reading or gap that no envelope could carry (see ``ingest.envelope`` limits)."""


def prepare(db: sqlite3.Connection, path: Path, device_id: str) -> None:
    """Check the file is our outbox for ``device_id`` (creating the schema in a new file)."""
    (app_id,) = db.execute("PRAGMA application_id").fetchone()
    if app_id not in (0, APPLICATION_ID):
        raise OutboxError(f"{path} is an SQLite database of another application")
    problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise OutboxError(f"{path} is corrupt: {'; '.join(problems)}")
    (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode != "wal":
        raise OutboxError(f"{path}: cannot use WAL journal mode (got {mode})")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    with immediate(db):
        (app_id,) = db.execute("PRAGMA application_id").fetchone()
        if app_id == 0:
            _create_schema(db, path, device_id)
        else:
            _check_owner(db, path, device_id)


def _create_schema(db: sqlite3.Connection, path: Path, device_id: str) -> None:
    (objects,) = db.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    if objects:
        raise OutboxError(f"{path} is an SQLite database of another application")
    for statement in _SCHEMA:
        db.execute(statement)
    db.execute(
        "INSERT INTO meta (id, device_id, next_seq) VALUES (1, ?, ?)", (device_id, FIRST_SEQ)
    )
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _check_owner(db: sqlite3.Connection, path: Path, device_id: str) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    while version in _UPGRADES:
        for statement in _UPGRADES[version]:
            db.execute(statement)
        version += 1
        db.execute(f"PRAGMA user_version = {version}")
    if version != SCHEMA_VERSION:
        raise OutboxError(
            f"{path} has outbox schema {version}; this version reads {SCHEMA_VERSION}"
        )
    row = db.execute("SELECT device_id FROM meta WHERE id = 1").fetchone()
    if row is None:
        raise OutboxError(f"{path} is corrupt: no meta row")
    if row[0] != device_id:
        raise OutboxError(f"{path} belongs to device {row[0]!r}, not {device_id!r}")


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the body raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def create_private_file(path: Path) -> None:
    """Create an empty file with mode 0600 unless it exists (SQLite gives its WAL the same)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise OutboxError(f"cannot create outbox {path}: {exc.strerror}") from exc
    os.close(fd)


def used_bytes(db: sqlite3.Connection) -> int:
    """Bytes in pages that hold data (free pages are reused before the file grows)."""
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    return int((pages - free) * page_size)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
