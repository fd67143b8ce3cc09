"""An open stream does not keep an unattended session alive: the session ends after its idle
time, the stream warns its page shortly before (``session-idle``) and then signs out; using
the session (the page's "Stay signed in") restarts the idle time."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import pytest
from aiohttp import ClientResponse

from gateway.web import auth, live, sse
from storage import db
from tests.web.conftest import Signed, Web

WITHIN_S = 30


@pytest.fixture(autouse=True)
def quick_checks(web: Web, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "POLL_S", 0.2)
    monkeypatch.setattr(live, "POLL_S", 0.2)
    web.gateway.client.app[auth.SESSION_CHECKS_KEY].every_s = 0.2  # type: ignore[index]


async def next_event(resp: ClientResponse, *names: str) -> tuple[str, Any]:
    """The next event among ``names`` (others are skipped), with its data."""
    event = None
    while True:
        line = await resp.content.readline()
        assert line, "the stream ended"
        if line.startswith(b"event: "):
            event = line[7:].strip().decode()
        elif line.startswith(b"data: ") and event in names:
            return event, json.loads(line[6:])


@asynccontextmanager
async def opened(web: Web, signed: Signed, path: str) -> AsyncIterator[ClientResponse]:
    async with web.gateway.client.get(path, headers=signed.headers(), timeout=WITHIN_S) as resp:
        assert resp.status == 200
        yield resp


async def idle_left(web: Web, signed: Signed, seconds: float) -> datetime:
    """Make the session end after ``seconds`` unused, last used 10 minutes ago (a check that
    restarts the idle time would restart it now); its idle expiry."""
    async with db.connection(web.trial.url, autocommit=True) as conn:
        cur = await conn.execute(
            "UPDATE web_sessions SET idle_expires_at = now() + make_interval(secs => %s),"
            " last_seen_at = now() - interval '10 minutes'"
            " WHERE ended_at IS NULL AND user_id = (SELECT user_id FROM users WHERE username = %s)"
            " RETURNING idle_expires_at",
            (seconds, signed.username),
        )
        row = await cur.fetchone()
        assert row is not None
        return row[0]


async def idle_expiry(web: Web, signed: Signed) -> datetime:
    async with db.connection(web.trial.url) as conn:
        cur = await conn.execute(
            "SELECT idle_expires_at FROM web_sessions WHERE ended_at IS NULL"
            " AND user_id = (SELECT user_id FROM users WHERE username = %s)",
            (signed.username,),
        )
        row = await cur.fetchone()
        assert row is not None
        return row[0]


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("monitor", "/api/v1/alerts/events?after=0"),
        ("clinician", "/api/v1/participants/P1/readings/live"),
    ],
    ids=["alert-board", "live-view"],
)
async def test_an_open_stream_warns_then_signs_out_an_unattended_session(
    web: Web, key: str, path: str
) -> None:
    signed = await web.sign_in(key)
    async with opened(web, signed, path) as resp:
        ends = await idle_left(web, signed, 3)
        event, data = await next_event(resp, "session-idle", "signed-out")
        assert event == "session-idle"
        assert datetime.fromisoformat(data["idle_expires_at"]) == ends
        event, _ = await next_event(resp, "session-idle", "signed-out")
        assert event == "signed-out"
    assert await idle_expiry(web, signed) == ends  # the stream never restarted it


async def test_using_the_session_after_the_warning_keeps_it(web: Web) -> None:
    signed = await web.sign_in("monitor")
    async with opened(web, signed, "/api/v1/alerts/events?after=0") as resp:
        ends = await idle_left(web, signed, 4)
        assert (await next_event(resp, "session-idle", "signed-out"))[0] == "session-idle"
        # The page's "Stay signed in": a request of the session.
        assert (await web.call("monitor", "GET", "/api/v1/session")).status == 200
        assert (await idle_expiry(web, signed)) > ends
        await idle_left(web, signed, 0.5)  # once more, and this time it runs out
        assert (await next_event(resp, "session-idle", "signed-out"))[0] == "session-idle"
        assert (await next_event(resp, "session-idle", "signed-out"))[0] == "signed-out"
