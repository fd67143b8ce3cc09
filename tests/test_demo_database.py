"""Where the demo writes: its accounts have a printed password, so it never writes them into
a database it was merely pointed at. Given a server, it creates a database of its own there
and drops it at the end (unless kept); the given database itself only when told so."""

from __future__ import annotations

import io
from pathlib import Path

import psycopg
from psycopg import conninfo

from gateway.demo import DemoOptions, _database
from tests.fixtures.postgres import PgServer


def dbname(url: str) -> str:
    return str(conninfo.conninfo_to_dict(url)["dbname"])


def exists(pg: PgServer, name: str) -> bool:
    with psycopg.connect(pg.admin_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        return row == (1,)


async def test_a_given_server_gets_a_database_of_the_demos_own_dropped_at_the_end(
    empty_database_url: str, pg_server: PgServer, tmp_path: Path
) -> None:
    out = io.StringIO()
    async with _database(DemoOptions(database_url=empty_database_url), tmp_path, out) as url:
        assert dbname(url) != dbname(empty_database_url)
        assert dbname(url).startswith("trialstream_demo_")
        assert exists(pg_server, dbname(url))
    assert not exists(pg_server, dbname(url))
    assert "created for this run" in out.getvalue()


async def test_kept_the_demos_database_stays(
    empty_database_url: str, pg_server: PgServer, tmp_path: Path
) -> None:
    options = DemoOptions(database_url=empty_database_url, keep=True)
    async with _database(options, tmp_path, io.StringIO()) as url:
        pass
    try:
        assert exists(pg_server, dbname(url))
    finally:
        pg_server.drop_database(dbname(url))


async def test_the_given_database_itself_only_when_told(
    empty_database_url: str, tmp_path: Path
) -> None:
    options = DemoOptions(database_url=empty_database_url, into_database=True)
    async with _database(options, tmp_path, io.StringIO()) as url:
        assert url == empty_database_url


def test_each_run_has_its_own_password() -> None:
    first, second = DemoOptions(), DemoOptions()
    assert first.password != second.password
    assert len(first.password) >= 16
