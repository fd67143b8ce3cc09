"""Data queries through the API: a monitor asks about a reading, a range or a gap; the site
answers; the monitor closes or reopens; every step a message and an audit record, the
messages append-only, a step that does not fit the state a conflict."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.model import AcceptedEnvelope, Batch, Gap, Reading
from storage import db
from storage.migrate import StorageMode
from storage.timeconv import from_ms
from storage.writer import BulkWriter
from tests.alerts.test_engine import rows
from tests.web.conftest import Web

QUERIES = "/api/v1/participants/P1/queries"


async def stored(pool: AsyncConnectionPool, mode: StorageMode) -> tuple[int, Gap]:
    """One heart-rate reading and one gap of P1's hub; the reading's time."""
    t = int(time.time() * 1000) // 1000 * 1000 - 60_000
    gap = Gap(t + 1000, t + 31_000, "out_of_range", "strap")
    env = AcceptedEnvelope(
        dev="hub-1",
        seq=7,
        participant_id="P1",
        sent_ms=t + 40_000,
        envelope_sha256=hashlib.sha256(b"q").digest(),
        reading_count=1,
        readings=(Reading(t, "heart_rate", 31.0, "/min", "strap"),),
        consent_ids=(None,),
        gaps=(gap,),
    )
    await BulkWriter(pool, mode).write(Batch((env,), (), t + 41_000))
    return t, gap


def iso(t_ms: int) -> str:
    return from_ms(t_ms).isoformat()


async def post(web: Web, key: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    resp = await web.call(key, "POST", path, json=body)
    return resp.status, await resp.json()


async def test_a_query_goes_from_open_to_answered_to_closed_and_back(
    web: Web, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    t, _ = await stored(pool, storage_mode)
    reading = {"target": "reading", "metric": "heart_rate", "from": iso(t), "device_id": "hub-1"}
    status, query = await post(web, "monitor", QUERIES, {**reading, "seq": 7, "text": "31/min?"})
    assert status == 201, query
    qid = query["query_id"]
    assert (query["state"], query["to"], query["site_id"]) == ("open", iso(t), "SITE-A")
    steps = [
        ("clinician", "answer", 200, "answered"),
        ("coordinator", "answer", 409, None),  # already answered
        ("monitor", "reopen", 200, "open"),
        ("coordinator", "answer", 200, "answered"),
        ("monitor", "close", 200, "closed"),
        ("clinician", "answer", 409, None),  # closed: reopen first
        ("monitor", "close", 409, None),
    ]
    for key, action, want, state in steps:
        status, body = await post(web, key, f"/api/v1/queries/{qid}/{action}", {"text": action})
        assert status == want, (key, action, body)
        if state:
            assert body["state"] == state
    resp = await web.call("coordinator", "GET", f"/api/v1/queries/{qid}")
    got = await resp.json()
    assert [(m["action"], m["actor"]) for m in got["messages"]] == [
        ("open", "monitor"),
        ("answer", "clinician"),
        ("reopen", "monitor"),
        ("answer", "coordinator"),
        ("close", "monitor"),
    ]
    audited = await rows(
        web.trial.url,
        "SELECT action, actor FROM audit_log WHERE starts_with(action, 'query.') ORDER BY audit_id",
    )
    assert audited == [
        ("query.open", "monitor"),
        ("query.answer", "clinician"),
        ("query.reopen", "monitor"),
        ("query.answer", "coordinator"),
        ("query.close", "monitor"),
    ]
    # The messages cannot be changed afterwards: a trigger refuses it, whoever asks.
    async with db.connection(web.trial.url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await conn.execute("UPDATE data_query_messages SET text = 'nothing'")


async def test_open_queries_are_listed_per_participant_and_site(
    web: Web, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    _, gap = await stored(pool, storage_mode)
    on_gap = {
        "target": "gap",
        "device_id": "hub-1",
        "seq": 7,
        "from": iso(gap.from_ms),
        "to": iso(gap.to_ms),
        "text": "Strap off for 30 s during the visit?",
    }
    on_range = {
        "target": "range",
        "metric": "spo2",
        "from": iso(gap.from_ms - 3_600_000),
        "to": iso(gap.from_ms),
        "text": "No SpO2 for an hour",
    }
    ids = [
        (await post(web, "monitor", QUERIES, body))[1]["query_id"] for body in (on_gap, on_range)
    ]
    await post(web, "monitor", f"/api/v1/queries/{ids[1]}/close", {"text": "explained"})

    async def listed(key: str, path: str) -> list[int]:
        resp = await web.call(key, "GET", path)
        assert resp.status == 200, await resp.text()
        return [q["query_id"] for q in (await resp.json())["queries"]]

    assert await listed("clinician", QUERIES) == [ids[0]]
    assert await listed("clinician", f"{QUERIES}?state=all") == ids[::-1]
    assert await listed("coordinator", "/api/v1/sites/SITE-A/queries") == [ids[0]]
    assert await listed("monitor", "/api/v1/sites/SITE-A/queries?state=closed") == [ids[1]]
    resp = await web.call("other_monitor", "GET", f"/api/v1/queries/{ids[0]}")
    assert resp.status == 404


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"target": "reading", "metric": "heart_rate", "from": "2026-03-01T00:00:00Z",
          "device_id": "hub-1", "seq": 1}, "has no such reading"),
        ({"target": "gap", "from": "2026-03-01T00:00:00Z", "to": "2026-03-01T00:01:00Z",
          "device_id": "hub-1", "seq": 1}, "has no such gap"),
        ({"target": "range", "metric": "steps", "from": "2026-03-01T00:00:00Z"},
         "unknown metric"),
        ({"target": "range", "metric": "spo2", "from": "2026-03-02T00:00:00Z",
          "to": "2026-03-01T00:00:00Z"}, "ends before it starts"),
        ({"target": "range", "metric": "spo2", "from": "2026-03-01T00:00:00Z",
          "device_id": "hub-1", "seq": 1}, "not an envelope"),
        ({"target": "reading", "metric": "spo2", "from": "2026-03-01T00:00:00Z"},
         "metric, time and envelope"),
        ({"target": "gap", "metric": "spo2", "from": "2026-03-01T00:00:00Z"},
         "named by its envelope"),
        ({"target": "range", "metric": "spo2", "from": "2026-13-01T00:00:00Z"},
         "'from' is not a date and time"),
        ({"target": "range", "metric": "spo2", "from": "2026-03-01"}, "from"),
        ({"target": "range", "metric": "spo2", "from": "2026-03-01T00:00:00Z", "text": "   "},
         "the text is empty"),
        ({"target": "range", "metric": "spo2", "from": "2026-03-01T00:00:00Z",
          "text": "x" * 4001}, "text"),
        ({"target": "everything", "from": "2026-03-01T00:00:00Z"}, "target"),
    ],
)  # fmt: skip
async def test_a_query_that_cannot_be_is_refused_and_nothing_stored(
    web: Web, body: dict[str, Any], says: str
) -> None:
    status, problem = await post(web, "monitor", QUERIES, {"text": "why?", **body})
    assert status == 400, problem
    assert says in problem["title"] + str(problem.get("detail")) + str(problem.get("field"))
    assert await rows(web.trial.url, "SELECT count(*) FROM data_queries") == [(0,)]
    assert await rows(web.trial.url, "SELECT count(*) FROM data_query_messages") == [(0,)]
