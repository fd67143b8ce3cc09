"""The storage package's errors: callers match these types, never message text."""

from __future__ import annotations

import psycopg
from psycopg_pool import PoolTimeout

# SQLSTATEs that say the database is away, busy or changing hands, not that the statement or
# its data is wrong: connection exceptions (08), insufficient resources (53), operator
# intervention such as a shutdown (57P), system errors (58), serialization failures and
# deadlocks (40), a lock or statement timeout (55P03, 57014), and a standby that cannot
# take writes (25006, during a failover). The same statement may succeed later.
_TRANSIENT_CLASSES = ("08", "53", "57P", "58", "40")
_TRANSIENT_STATES = frozenset({"55P03", "57014", "25006"})


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (server errors carry DETAIL and HINT lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means "try again later" (the database away or busy) rather than
    "this will fail again" (what was sent is refused, or the code is wrong)."""
    if isinstance(exc, DatabaseUnavailable | PoolTimeout):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        # Raised by the client, not the server: a lost or closed connection.
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state.startswith(_TRANSIENT_CLASSES) or state in _TRANSIENT_STATES


def is_content_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the data itself cannot be stored: a data exception (22), an
    integrity violation (23) or a program limit such as an index row too large (54) from the
    server, or a value our conversion to the wire refused."""
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        return state.startswith(("22", "23", "54")) or isinstance(exc, psycopg.DataError)
    return isinstance(exc, TypeError | ValueError | OverflowError | UnicodeError)


class StorageError(Exception):
    """Base of every error raised by ``storage``."""


class UnknownStudy(StorageError):
    """A study setting named a study that is not there."""


class DatabaseUnavailable(StorageError):
    """The database cannot be reached or refused the connection; the message says what to fix."""


class MigrationError(StorageError):
    """A migration could not be applied; nothing of it was committed."""


class StorageModeError(StorageError):
    """The requested storage mode cannot be used on this database."""


class BatchWriteError(StorageError):
    """A batch could not be stored; nothing of it was committed.

    ``envelope`` names the envelope ``(device_id, seq)`` whose data the database refused when
    that can be told, else ``None``. ``content``: the error says the data cannot be stored
    (``is_content_error``); otherwise it is a fault not explained by the data (a bug, a
    schema that does not match), which may well fail for every batch alike.
    """

    def __init__(
        self, message: str, envelope: tuple[str, int] | None, *, content: bool = True
    ) -> None:
        super().__init__(message)
        self.envelope = envelope
        self.content = content
