"""Connections: one place that opens them and turns connection failures into one clear line."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg import conninfo, sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from storage.errors import DatabaseUnavailable, first_line

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[TupleRow]

# Fail fast on a wrong address: a person waits on the other end of `trialstream db status`.
CONNECT_TIMEOUT_S = 5


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable database URL>"
    params.pop("password", None)
    host = params.get("host", "local socket")
    return f"{params.get('user', '')}@{host}:{params.get('port', 5432)}/{params.get('dbname', '')}"


def _unavailable(url: str, exc: Exception) -> DatabaseUnavailable:
    reason = first_line(exc)
    return DatabaseUnavailable(
        f"cannot connect to the database {describe(url)}: {reason} "
        "(set TRIALSTREAM_DATABASE_URL or --database-url to a reachable PostgreSQL)"
    )


def check_url(url: str) -> None:
    """Raise ``DatabaseUnavailable`` if the URL cannot even be parsed."""
    try:
        conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise DatabaseUnavailable(
            f"the database URL is not valid: {first_line(exc)} "
            "(expected postgresql://user@host:port/dbname)"
        ) from exc


async def connect(url: str, *, autocommit: bool = False) -> Conn:
    """Open one connection, or raise ``DatabaseUnavailable`` naming what to fix."""
    check_url(url)
    try:
        return await psycopg.AsyncConnection.connect(
            url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S
        )
    except psycopg.OperationalError as exc:
        raise _unavailable(url, exc) from exc


@asynccontextmanager
async def connection(url: str, *, autocommit: bool = False) -> AsyncIterator[Conn]:
    conn = await connect(url, autocommit=autocommit)
    try:
        yield conn
    finally:
        await conn.close()


async def open_pool(url: str, *, min_size: int = 1, max_size: int = 4) -> AsyncConnectionPool:
    """A pool that checks each connection before handing it out.

    The check costs one round trip per checkout and buys survival of a database restart or a
    terminated backend: a dead connection is replaced instead of failing the next batch.
    """
    check_url(url)
    pool = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        check=AsyncConnectionPool.check_connection,
        kwargs={"connect_timeout": CONNECT_TIMEOUT_S},
        name="trialstream",
    )
    try:
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)
    except Exception as exc:
        await pool.close()
        # The pool reports a timeout; a direct attempt says why (refused, auth, no such db).
        try:
            conn = await connect(url)
        except DatabaseUnavailable as direct:
            raise direct from exc
        await conn.close()
        raise _unavailable(url, exc) from exc
    return pool


class DatabaseNotCreated(DatabaseUnavailable):
    """The server refused to create a database (no CREATEDB privilege, a name taken)."""


async def create_database(server_url: str, name: str) -> str:
    """Create the empty database ``name`` on the server of ``server_url``; its URL."""
    async with connection(server_url, autocommit=True) as conn:
        try:
            await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            raise DatabaseNotCreated(
                f"cannot create the database {name} on {describe(server_url)}: {first_line(exc)}"
            ) from exc
    return conninfo.make_conninfo(server_url, dbname=name)


async def drop_database(server_url: str, name: str) -> None:
    """Drop the database ``name`` (ending its connections) on the server of ``server_url``."""
    async with connection(server_url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
