"""A participant registered through the API with a time zone has it from then on, audited
as the coordinator's act; the participant's page lists it."""

from __future__ import annotations

from tests.alerts.test_engine import rows
from tests.web.conftest import Web


async def test_a_participant_registered_with_a_zone_has_it(web: Web) -> None:
    resp = await web.call(
        "coordinator",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        json={"participant_id": "P8", "time_zone": "America/Sao_Paulo"},
    )
    assert resp.status == 201, await resp.text()
    page = await web.call("coordinator", "GET", "/api/v1/participants/P8")
    zones = (await page.json())["time_zones"]
    assert [z["time_zone"] for z in zones] == ["America/Sao_Paulo"]
    assert await rows(
        web.trial.url,
        "SELECT action FROM audit_log WHERE entity_id = 'P8' AND action LIKE 'participant.%%'"
        " ORDER BY audit_id",
    ) == [("participant.create",), ("participant.time_zone_set",)]
