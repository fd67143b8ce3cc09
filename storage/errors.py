"""The storage package's errors: callers match these types, never message text."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (server errors carry DETAIL and HINT lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class StorageError(Exception):
    """Base of every error raised by ``storage``."""


class DatabaseUnavailable(StorageError):
    """The database cannot be reached or refused the connection; the message says what to fix."""


class MigrationError(StorageError):
    """A migration could not be applied; nothing of it was committed."""


class StorageModeError(StorageError):
    """The requested storage mode cannot be used on this database."""


class BatchWriteError(StorageError):
    """A batch could not be stored; nothing of it was committed.

    ``envelope`` names the envelope ``(device_id, seq)`` whose data the database refused when
    that can be told, else ``None``.
    """

    def __init__(self, message: str, envelope: tuple[str, int] | None) -> None:
        super().__init__(message)
        self.envelope = envelope
