"""The alert event stream: each site's events once, in order, to every stream of that site;
a stream that starts behind the gateway's in-memory window catches up from the database;
a reconnect with Last-Event-ID gets exactly what it missed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import ClientResponse

from gateway.web import access, sse
from storage import alerts, db
from tests.web.conftest import Web

WITHIN_S = 30


class Stream:
    def __init__(self, resp: ClientResponse) -> None:
        self.resp = resp

    async def next_events(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` alert events (waiting for each at most WITHIN_S)."""
        out: list[dict[str, Any]] = []
        event_id = None
        while len(out) < n:
            line = await self.resp.content.readline()
            assert line, "the stream ended"
            if line.startswith(b"id: "):
                event_id = int(line[4:])
            elif line.startswith(b"data: "):
                data = json.loads(line[6:])
                assert data["event_id"] == event_id
                out.append(data)
        return out


@asynccontextmanager
async def stream(web: Web, key: str, *, last_event_id: int | None = None) -> AsyncIterator[Stream]:
    headers = (await web.sign_in(key)).headers()
    path = "/api/v1/alerts/events"
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    else:
        path += "?after=0"
    async with web.gateway.client.get(path, headers=headers, timeout=WITHIN_S) as resp:
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"retry:")
        yield Stream(resp)


def summary(events: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    return [(e["alert_id"], e["event"], e["participant_id"]) for e in events]


async def test_each_site_gets_its_events_once_in_order_and_resumes_after_the_last_seen(
    web: Web,
) -> None:
    early = await web.new_alert("P1")  # before any stream: older than the gateway's window
    async with stream(web, "monitor") as a, stream(web, "other_monitor") as b:
        assert summary(await a.next_events(1)) == [(early, "opened", "P1")]
        p2 = await web.new_alert("P2")
        p1 = await web.new_alert("P1")
        async with db.connection(web.trial.url, autocommit=True) as conn:
            await alerts.acknowledge(conn, p1, by="monitor")
        first = await a.next_events(2)
        assert summary(first) == [(p1, "opened", "P1"), (p1, "acknowledged", "P1")]
        assert first[1]["alert"]["state"] == "acknowledged"
        assert summary(await b.next_events(1)) == [(p2, "opened", "P2")]
        # Nothing else was queued for either: the next event each gets is the next one made.
        later_a, later_b = await web.new_alert("P1"), await web.new_alert("P2")
        assert summary(await a.next_events(1)) == [(later_a, "opened", "P1")]
        assert summary(await b.next_events(1)) == [(later_b, "opened", "P2")]
        a_ids = [e["event_id"] for e in first]

    # A browser reconnecting after the first of those events gets exactly the rest.
    async with stream(web, "monitor", last_event_id=a_ids[0]) as again:
        assert summary(await again.next_events(2)) == [
            (p1, "acknowledged", "P1"),
            (later_a, "opened", "P1"),
        ]
        newest = await web.new_alert("P1")
        assert summary(await again.next_events(1)) == [(newest, "opened", "P1")]


async def test_a_stream_follows_the_users_sites_as_they_change(
    web: Web, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "POLL_S", 0.2)
    monkeypatch.setattr(access, "STREAM_CHECK_S", 0.2)
    async with stream(web, "monitor") as a:
        first = await web.new_alert("P1")
        assert summary(await a.next_events(1)) == [(first, "opened", "P1")]
        # The monitor moves from SITE-A to SITE-B while the stream is open.
        async with db.connection(web.trial.url) as conn:
            await conn.execute(
                "UPDATE user_sites SET site_id = 'SITE-B' WHERE user_id ="
                " (SELECT user_id FROM users WHERE username = 'monitor')"
            )
            await conn.commit()
        await asyncio.sleep(3 * sse.POLL_S)
        await web.new_alert("P1")
        p2 = await web.new_alert("P2")
        assert summary(await a.next_events(1)) == [(p2, "opened", "P2")]


async def test_an_admins_stream_carries_every_sites_events(web: Web) -> None:
    async with stream(web, "admin") as a:
        p1 = await web.new_alert("P1")  # SITE-A
        p2 = await web.new_alert("P2")  # SITE-B
        assert summary(await a.next_events(2)) == [(p1, "opened", "P1"), (p2, "opened", "P2")]
