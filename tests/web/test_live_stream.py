"""The live readings stream: the window whole, then each reading the gateway stores for that
participant once (late readings too, other participants' never), the window again when a
reader falls behind, and an end when the session ends or the user loses the site. The feed
behind it is tested against the database directly, the stream through the real gateway,
broker and database."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import ClientResponse

from gateway.broker import MosquittoBroker
from gateway.web import access, live
from ingest.envelope import seal
from ingest.model import Payload, Reading
from ingest.pipeline import up_topic
from storage import db, reading_views
from storage.timeconv import to_ms
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until
from tests.web.conftest import Web
from tests.web.test_views import store

WITHIN_S = 30


# --- the feed -------------------------------------------------------------------------------


async def test_feed_hands_each_stream_its_participants_new_readings_once(trial: Trial) -> None:
    feed = live.LiveFeed()
    mine, again, other = feed.watch("P1"), feed.watch("P1"), feed.watch("P2")
    now = datetime.now(UTC)
    await store(
        trial, [(now - timedelta(seconds=2), 70.0), (now - timedelta(seconds=1), 71.0)], now
    )
    async with db.connection(trial.url) as conn:
        await feed.read(conn)
        assert [r.value for r in mine.take()] == [70.0, 71.0]
        assert [r.value for r in again.take()] == [70.0, 71.0]
        assert other.take() == []
        # The next read covers the same received times again (the overlap): nothing repeats.
        await feed.read(conn)
        assert mine.take() == []
    # A late reading (measured 30 s ago, received now) is new all the same; one measured
    # longer than LATE_S ago is left to the stream's next whole window.
    late = datetime.now(UTC)
    await store(
        trial,
        [
            (late - timedelta(seconds=live.LATE_S + 30), 64.0),
            (late - timedelta(seconds=30), 66.0),
        ],
        late,
    )
    async with db.connection(trial.url) as conn:
        await feed.read(conn)
    assert [r.value for r in mine.take()] == [66.0]
    assert feed.reads == 3


async def test_feed_reads_only_while_watched_and_forgets_who_left(trial: Trial) -> None:
    feed = live.LiveFeed()
    w = feed.watch("P1")
    assert feed.streams == 1
    feed.unwatch(w)
    feed.unwatch(w)  # twice is harmless
    assert feed.streams == 0
    async with db.connection(trial.url) as conn:
        await feed.read(conn)
    assert feed.reads == 0


async def test_a_read_too_large_or_a_slow_stream_gets_the_window_instead(
    trial: Trial, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = live.LiveFeed()
    w = feed.watch("P1")
    now = datetime.now(UTC)
    await store(trial, [(now - timedelta(seconds=s), 60.0 + s) for s in range(1, 4)], now)
    monkeypatch.setattr(live, "READ_LIMIT", 2)
    async with db.connection(trial.url) as conn:
        await feed.read(conn)
    assert w.behind
    assert w.take() == []

    monkeypatch.setattr(live, "READ_LIMIT", 100)
    monkeypatch.setattr(live, "MAX_PENDING", 2)
    slow = live.LiveFeed()
    s = slow.watch("P1")
    async with db.connection(trial.url) as conn:
        await slow.read(conn)
    assert s.behind
    assert s.take() == []


# --- the stream through the gateway --------------------------------------------------------


class Stream:
    def __init__(self, resp: ClientResponse) -> None:
        self.resp = resp

    async def next_event(self) -> tuple[str, dict[str, Any]]:
        name = ""
        while True:
            line = await self.resp.content.readline()
            assert line, "the stream ended"
            if line.startswith(b"event: "):
                name = line[7:].strip().decode()
            elif line.startswith(b"data: "):
                return name, json.loads(line[6:])

    async def next_readings(self) -> list[float]:
        name, data = await self.next_event()
        assert name == "readings", (name, data)
        return [r["value"] for r in data["readings"]]


@asynccontextmanager
async def stream(web: Web, key: str, pid: str = "P1") -> AsyncIterator[Stream]:
    headers = (await web.sign_in(key)).headers()
    path = f"/api/v1/participants/{pid}/readings/live?minutes=10"
    async with web.gateway.client.get(path, headers=headers, timeout=WITHIN_S) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert (await resp.content.readline()).startswith(b"retry:")
        yield Stream(resp)


@pytest.fixture
async def probe(mosquitto: MosquittoBroker) -> AsyncIterator[MqttProbe]:
    p = MqttProbe(mosquitto, "live-test-hub")
    yield p
    p.close()


def now_ms() -> int:
    return int(time.time() * 1000)


class Sender:
    def __init__(self, web: Web, probe: MqttProbe) -> None:
        self.web, self.probe = web, probe
        self.seq: dict[str, int] = {}

    async def send(
        self,
        hub_id: str,
        values: list[float],
        *,
        t0: int | None = None,
        flags: tuple[str, ...] = (),
        user: int | None = None,
    ) -> None:
        """Publish one envelope of 1 Hz heart rate from ``hub_id``, each reading with
        ``flags`` and ``user``, and wait until stored."""
        hub = self.web.trial.hubs[hub_id]
        seq = self.seq[hub_id] = self.seq.get(hub_id, 0) + 1
        start = now_ms() - 1000 * len(values) if t0 is None else t0
        readings = tuple(
            Reading(start + i * 1000, "heart_rate", v, "/min", "hr-strap-1", flags, user)
            for i, v in enumerate(values)
        )
        payload = Payload(dev=hub.device_id, seq=seq, sent_ms=now_ms(), readings=readings)
        self.probe.publish(up_topic(hub.device_id), seal(payload, hub.key))

        async def stored() -> bool:
            async with db.connection(self.web.trial.url) as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM envelopes WHERE device_id = %s AND seq = %s",
                    (hub.device_id, seq),
                )
                row = await cur.fetchone()
                return row is not None and row[0] == 1

        await wait_until(stored, f"{hub_id} envelope {seq} stored")


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ticks and checks a few times a second, so the tests wait for the stream, not a clock."""
    monkeypatch.setattr(live, "TICK_S", 0.2)
    monkeypatch.setattr(live, "POLL_S", 0.5)
    monkeypatch.setattr(access, "STREAM_CHECK_S", 0.5)


@pytest.fixture
async def sender(web: Web, probe: MqttProbe) -> Sender:
    return Sender(web, probe)


async def test_stream_sends_the_window_then_each_new_reading_of_its_participant_once(
    quick: None, web: Web, sender: Sender
) -> None:
    await sender.send("hub-1", [70.0, 71.0, 72.0])
    async with stream(web, "clinician") as s:
        name, first = await s.next_event()
        assert name == "window"
        assert [r["value"] for r in first["readings"]] == [70.0, 71.0, 72.0]
        assert first["participant_id"] == "P1"
        assert first["gaps"] == []
        await sender.send("hub-1", [80.0, 81.0])
        assert await s.next_readings() == [80.0, 81.0]
        # Several reads later (each overlapping the last), another participant's reading and
        # a late one of this participant: the next event holds that late one only.
        await asyncio.sleep(3 * live.TICK_S)
        await sender.send("hub-2", [99.0])
        await sender.send("hub-1", [65.0], t0=now_ms() - 30_000)
        assert await s.next_readings() == [65.0]


async def test_stream_readings_say_what_the_device_said_about_them(
    quick: None, web: Web, sender: Sender
) -> None:
    await sender.send("hub-1", [70.0], flags=("cuff_loose", "site_armpit"), user=1)
    async with stream(web, "clinician") as s:
        name, first = await s.next_event()
        assert name == "window"
        assert [
            (r["value"], r["flags"], r["quality"], r["device_user"]) for r in first["readings"]
        ] == [(70.0, ["cuff_loose", "site_armpit"], "questionable", 1)]
        await sender.send("hub-1", [71.0])
        await sender.send("hub-1", [40.0], flags=("sensor_displaced", "no_sensor_contact"))
        got = []
        while len(got) < 2:
            name, data = await s.next_event()
            assert name == "readings", (name, data)
            got += [
                (r["value"], r["flags"], r["quality"], r["device_user"]) for r in data["readings"]
            ]
    assert got == [
        (71.0, [], None, None),
        (40.0, ["no_sensor_contact", "sensor_displaced"], "invalid", None),
    ]


async def test_a_reading_later_than_late_s_comes_with_the_next_window(
    quick: None, web: Web, sender: Sender, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "FULL_EVERY_S", 2.0)
    async with stream(web, "clinician") as s:
        assert (await s.next_event())[0] == "window"
        await sender.send("hub-1", [65.0], t0=now_ms() - 4 * 60_000)
        name, data = await s.next_event()
        assert name == "window"
        assert [r["value"] for r in data["readings"]] == [65.0]


async def test_a_reader_behind_gets_the_window_whole(
    quick: None, web: Web, sender: Sender, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "MAX_PENDING", 2)
    async with stream(web, "clinician") as s:
        assert (await s.next_event())[0] == "window"
        await sender.send("hub-1", [90.0, 91.0, 92.0])
        name, data = await s.next_event()
        assert name == "window"
        assert [r["value"] for r in data["readings"]] == [90.0, 91.0, 92.0]


async def test_stream_ends_when_the_session_ends(quick: None, web: Web) -> None:
    async with stream(web, "clinician") as s:
        assert (await s.next_event())[0] == "window"
        resp = await web.call("clinician", "DELETE", "/api/v1/session")
        assert resp.status in (200, 204), await resp.text()
        assert await s.next_event() == ("signed-out", {})
        assert (await s.resp.content.read()).strip() == b""  # and the stream ended


async def test_stream_ends_when_the_user_loses_the_site(quick: None, web: Web) -> None:
    async with stream(web, "clinician") as s:
        assert (await s.next_event())[0] == "window"
        async with db.connection(web.trial.url) as conn:
            await conn.execute(
                "DELETE FROM user_sites WHERE user_id = (SELECT user_id FROM users"
                " WHERE username = 'clinician')"
            )
            await conn.commit()
        assert await s.next_event() == ("forbidden", {"participant_id": "P1"})


@pytest.mark.parametrize(
    ("key", "query", "status"),
    [
        ("other_clinician", "minutes=10", 404),  # another site's participant: as if absent
        ("coordinator", "minutes=10", 403),  # no clinical role
        ("clinician", "minutes=0", 400),
        ("clinician", "minutes=61", 400),
        ("clinician", "minutes=ten", 400),
        ("clinician", "minutes=10&minutes=20", 400),
    ],
)
async def test_stream_refuses_with_problem_details(
    web: Web, key: str, query: str, status: int
) -> None:
    resp = await web.call(key, "GET", f"/api/v1/participants/P1/readings/live?{query}")
    assert resp.status == status
    assert resp.content_type == "application/problem+json"


async def test_window_and_increments_share_the_readings_answer(trial: Trial) -> None:
    now = datetime.now(UTC)
    await store(trial, [(now - timedelta(seconds=5), 70.0)], now)
    async with db.connection(trial.url) as conn:
        body = await live.window(conn, "P1", 10)
    (reading,) = body["readings"]
    assert reading == {
        "t": to_ms(now - timedelta(seconds=5)),
        "metric": "heart_rate",
        "value": 70.0,
        "unit": "/min",
        "device_id": "hub-1",
        "sensor": "s",
        "flags": [],
        "quality": None,
        "device_user": None,
    }
    assert body["cursor"] <= to_ms(datetime.now(UTC)) - reading_views.RECEIVED_OVERLAP_MS
