"""Tries counted against messages whose handling failed with no cause in their data.

Keyed by the SHA-256 of a message's bytes, so the count survives a worker's restart and a
broker's redelivery to another worker. The gateway refuses a message as ``poison`` once it
has been tried ``POISON_AFTER`` times (gateway.consumer), and forgets the count of a message
it handled after all.
"""

from __future__ import annotations

from collections.abc import Collection

from psycopg import sql
from psycopg.rows import dict_row

from storage.db import Conn
from storage.writer import storable_text

_RECORD = sql.SQL(
    """
INSERT INTO message_faults (envelope_sha256, attempts, last_error)
SELECT d, 1, %(error)s FROM unnest(%(digests)s::bytea[]) AS d
ON CONFLICT (envelope_sha256) DO UPDATE SET
    attempts = message_faults.attempts + 1,
    last_at = now(),
    last_error = EXCLUDED.last_error
RETURNING envelope_sha256, attempts
"""
)
_TRIES = sql.SQL(
    "SELECT envelope_sha256, attempts FROM message_faults"
    " WHERE envelope_sha256 = ANY(%(digests)s::bytea[])"
)
_FORGET = sql.SQL("DELETE FROM message_faults WHERE envelope_sha256 = ANY(%(digests)s::bytea[])")


async def record(conn: Conn, digests: Collection[bytes], error: str) -> dict[bytes, int]:
    """Count one more try against each message; the tries so far, by digest. Commits."""
    if not digests:
        return {}
    async with conn.transaction():
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(_RECORD, {"digests": list(digests), "error": storable_text(error)})
        return {bytes(row["envelope_sha256"]): int(row["attempts"]) for row in await cur.fetchall()}


async def tries(conn: Conn, digests: Collection[bytes]) -> dict[bytes, int]:
    """The tries counted so far against these messages (those with none are absent)."""
    if not digests:
        return {}
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_TRIES, {"digests": list(digests)})
    return {bytes(row["envelope_sha256"]): int(row["attempts"]) for row in await cur.fetchall()}


async def forget(conn: Conn, digests: Collection[bytes]) -> None:
    """Drop the counts of messages handled after all. Commits."""
    if digests:
        async with conn.transaction():
            await conn.execute(_FORGET, {"digests": list(digests)})
