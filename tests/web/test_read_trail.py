"""Who looked at participants' data, and who was refused it, is on the audit trail: one
record per read request (pages' data, readings, rollups, alerts, streams opened), one per
refused call on a participant's data, one per failed hub enrollment. Reads fail closed."""

from __future__ import annotations

import json
from typing import Any

from storage import db
from tests.fixtures.refusals import refuse_rows
from tests.web.conftest import Web


async def trail(web: Web, action: str) -> list[tuple[Any, ...]]:
    async with db.connection(web.trial.url) as conn:
        cur = await conn.execute(
            "SELECT actor, entity, entity_id, detail FROM audit_log WHERE action = %s"
            " ORDER BY audit_id",
            (action,),
        )
        return [(a, e, i, d) for a, e, i, d in await cur.fetchall()]


async def test_reads_of_health_data_are_on_record(web: Web) -> None:
    for key, path in (
        ("clinician", "/api/v1/participants/P1/readings?minutes=30"),
        ("clinician", "/api/v1/participants/P1/rollups?days=2"),
        ("participant", "/api/v1/participants/P1"),
        ("monitor", "/api/v1/alerts?site=SITE-A"),
    ):
        assert (await web.call(key, "GET", path)).status == 200, path
    headers = (await web.sign_in("clinician")).headers()
    async with web.gateway.client.get(
        "/api/v1/participants/P1/readings/live?minutes=5", headers=headers
    ) as resp:
        assert resp.status == 200
        await resp.content.readline()
    rows = await trail(web, "data.read")
    assert [(a, e, i, d["operation"]) for a, e, i, d in rows] == [
        ("clinician", "participant", "P1", "get_readings"),
        ("clinician", "participant", "P1", "get_rollups"),
        ("participant", "participant", "P1", "get_participant"),
        ("monitor", "data", "list_alerts", "list_alerts"),
        ("clinician", "participant", "P1", "follow_readings"),
    ]
    assert rows[0][3]["query"]["minutes"] == 30
    assert all(d["via"] == "web" for *_, d in rows)


async def test_refused_calls_on_a_participants_data_are_on_record(web: Web) -> None:
    for key, path, status in (
        ("other_clinician", "/api/v1/participants/P1/readings", 404),
        ("participant", "/api/v1/participants/P1/readings", 403),
        ("other_monitor", "/api/v1/participants/P1", 404),
        ("clinician", "/api/v1/participants/NOBODY", 404),
    ):
        assert (await web.call(key, "GET", path)).status == status, path
    rows = await trail(web, "participant.access_refused")
    assert [(a, i, d["operation"], d["status"]) for a, _, i, d in rows] == [
        ("other_clinician", "P1", "get_readings", 404),
        ("participant", "P1", "get_readings", 403),
        ("other_monitor", "P1", "get_participant", 404),
        ("clinician", "NOBODY", "get_participant", 404),
    ]
    assert await trail(web, "data.read") == []


async def test_a_failed_enrollment_attempt_is_on_record(web: Web) -> None:
    resp = await web.call(
        None, "POST", "/api/v1/enrollments", json={"code": "AAAA-BBBB-CCCC-DDDD", "csr": "x"}
    )
    assert resp.status == 404
    [(actor, entity, address, detail)] = await trail(web, "enrollment.refused")
    assert (actor, entity, detail) == (f"hub@{address}", "enrollment", {"kind": "unknown_code"})
    assert "AAAA" not in json.dumps(detail)


async def test_a_read_that_cannot_be_recorded_is_not_answered(web: Web) -> None:
    await refuse_rows(web.trial.url, "audit_log", "NEW.action = 'data.read'", "XX000")
    resp = await web.call("clinician", "GET", "/api/v1/participants/P1/readings")
    assert resp.status == 500
    assert "readings" not in await resp.text()
