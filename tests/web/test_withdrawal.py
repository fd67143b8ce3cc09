"""Withdrawing consent through the API is an e-signed act: the participant with their own
password, or site staff with theirs, a reason and how the participant's request came."""

from __future__ import annotations

from typing import Any

import pytest

from storage import db
from tests.web.conftest import PASSWORD, Web

PATH = "/api/v1/participants/P1/withdrawals"


async def withdrawals(web: Web) -> list[tuple[Any, ...]]:
    async with db.connection(web.trial.url) as conn:
        cur = await conn.execute(
            "SELECT c.action, c.initiated_by, c.received_via, c.meaning, u.username"
            " FROM consents c JOIN users u ON u.user_id = c.signer_user_id"
            " WHERE c.action <> 'consent' ORDER BY c.consent_id"
        )
        return list(await cur.fetchall())


@pytest.mark.parametrize(
    ("key", "body", "status", "kind"),
    [
        ("participant", {"password": "wrong password"}, 403, "reauthentication-failed"),
        ("participant", {"username": "coordinator"}, 403, "reauthentication-failed"),
        ("participant", {"received_via": "phone"}, 400, "incomplete-withdrawal"),
        ("participant", {"initiated_by": "site"}, 404, "not-found"),
        (
            "coordinator",
            {"username": "participant", "received_via": "phone", "reason": "asked"},
            403,
            "reauthentication-failed",
        ),
        ("coordinator", {"reason": "asked"}, 400, "incomplete-withdrawal"),
        ("coordinator", {"received_via": "phone"}, 400, "incomplete-withdrawal"),
        ("coordinator", {"received_via": "pigeon", "reason": "x"}, 400, "invalid-field"),
        (
            "coordinator",
            {"scopes": ["no-such-scope"], "received_via": "phone", "reason": "x"},
            400,
            "scope-not-granted",
        ),
        ("other_coordinator", {"received_via": "phone", "reason": "x"}, 404, "not-found"),
    ],
    ids=[
        "wrong-password",
        "someone-elses-name",
        "participant-received",
        "participant-as-site",
        "staff-with-participants-credential",
        "staff-without-how-received",
        "staff-without-reason",
        "unknown-channel",
        "scope-not-granted",
        "other-site",
    ],
)
async def test_a_withdrawal_that_is_not_properly_signed_is_refused(
    web: Web, key: str, body: dict[str, Any], status: int, kind: str
) -> None:
    full = {"initiated_by": "participant", "username": key, "password": PASSWORD, **body}
    resp = await web.call(key, "POST", PATH, json=full)
    assert resp.status == status, await resp.text()
    assert (await resp.json())["type"].endswith("/" + kind)
    assert await withdrawals(web) == []


async def test_staff_record_a_request_then_the_participant_withdraws_the_rest(web: Web) -> None:
    resp = await web.call(
        "coordinator",
        "POST",
        PATH,
        json={
            "initiated_by": "participant",
            "received_via": "phone",
            "reason": "asked to stop sharing glucose",
            "scopes": ["glucose"],
            "username": "coordinator",
            "password": PASSWORD,
        },
    )
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["full"] is False
    resp = await web.call(
        "participant",
        "POST",
        PATH,
        json={"initiated_by": "participant", "username": "participant", "password": PASSWORD},
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert (body["full"], body["data_policy"]) == (True, "retain")
    assert await withdrawals(web) == [
        (
            "withdraw_scope",
            "participant",
            "phone",
            "withdrawal requested by the participant, recorded by site staff",
            "coordinator",
        ),
        (
            "withdraw",
            "participant",
            None,
            "withdrawal of consent, by the participant",
            "participant",
        ),
    ]
    again = await web.call(
        "participant",
        "POST",
        PATH,
        json={"initiated_by": "participant", "username": "participant", "password": PASSWORD},
    )
    assert again.status == 409
