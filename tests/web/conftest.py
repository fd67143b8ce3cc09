"""People for the web tests: one account of each role at SITE-A (study S1, participant P1),
and staff of a second site SITE-B (participant P2), with helpers that sign in and call the
API the way a browser does (session cookie, CSRF header).

These tests sign in many times within seconds from one address, so the ``web`` fixture
raises the gateway's rate limits; ``tests/web/test_rate_limits.py`` checks the real ones."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import ClientResponse
from selenium.webdriver import Chrome

from gateway.broker import MosquittoBroker
from gateway.web.auth import COOKIE, CSRF_HEADER
from gateway.web.ratelimit import RATE_LIMITER, Limit
from ingest.rules import Change, RuleEvent
from storage import alerts, db, registry, users
from storage.users import Role
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until
from tests.web.browser import Browser
from tests.web.browser import chromium as chromium  # a fixture for the page tests

PASSWORD = "correct horse battery staple"

# key -> (role, sites, participant)
ACCOUNTS: dict[str, tuple[Role, tuple[str, ...], str | None]] = {
    "participant": (Role.PARTICIPANT, (), "P1"),
    "coordinator": (Role.SITE_COORDINATOR, ("SITE-A",), None),
    "clinician": (Role.CLINICIAN, ("SITE-A",), None),
    "monitor": (Role.MONITOR, ("SITE-A",), None),
    "admin": (Role.ADMIN, (), None),
    "other_participant": (Role.PARTICIPANT, (), "P2"),
    "other_coordinator": (Role.SITE_COORDINATOR, ("SITE-B",), None),
    "other_clinician": (Role.CLINICIAN, ("SITE-B",), None),
    "other_monitor": (Role.MONITOR, ("SITE-B",), None),
}


@dataclass
class Signed:
    username: str
    cookie: str
    csrf: str

    def headers(self, *, csrf: bool = True) -> dict[str, str]:
        h = {"Cookie": f"{COOKIE}={self.cookie}"}
        if csrf:
            h[CSRF_HEADER] = self.csrf
        return h


@dataclass
class Web:
    trial: Trial
    gateway: RunningGateway
    signed: dict[str, Signed] = field(default_factory=dict)
    finished_jobs: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return str(self.gateway.client.make_url("/"))[:-1]

    async def sign_in(self, key: str) -> Signed:
        if key not in self.signed:
            client = self.gateway.client
            resp = await client.post(
                "/api/v1/session", json={"username": key, "password": PASSWORD}
            )
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            token = resp.cookies[COOKIE].value
            client.session.cookie_jar.clear()
            self.signed[key] = Signed(key, token, body["csrf_token"])
        return self.signed[key]

    async def call(
        self,
        key: str | None,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        csrf: bool = True,
    ) -> ClientResponse:
        h: dict[str, str] = {}
        if key is not None:
            h.update((await self.sign_in(key)).headers(csrf=csrf))
        h.update(headers or {})
        resp = await self.gateway.client.request(method, path, json=json, headers=h)
        await resp.read()
        return resp

    async def export_job(self, key: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Submit an export job as ``key`` through the API and poll it until it ends."""
        resp = await self.call(
            key, "POST", "/api/v1/exports", json=dict(body or {"kind": "fhir", "study_id": "S1"})
        )
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["job_id"]
        assert resp.headers["Location"] == f"/api/v1/exports/{job_id}"
        job: dict[str, Any] = {}

        async def ended() -> bool:
            nonlocal job
            got = await self.call(key, "GET", f"/api/v1/exports/{job_id}")
            assert got.status == 200, await got.text()
            job = await got.json()
            return job["state"] in ("done", "failed")

        await wait_until(ended, f"export job {job_id} ended")
        return job

    async def finished_job(self, key: str) -> str:
        """The id of a done export job (FHIR, participant P1) of ``key``, made once."""
        if key not in self.finished_jobs:
            job = await self.export_job(
                key, {"kind": "fhir", "study_id": "S1", "participant_id": "P1"}
            )
            assert job["state"] == "done", job
            self.finished_jobs[key] = job["job_id"]
        return self.finished_jobs[key]

    async def new_alert(self, participant_id: str = "P1") -> int:
        """An open alert of ``participant_id`` (each call a new episode of its own rule)."""
        async with db.connection(self.trial.url) as conn:
            study = await registry.participant_study(conn, participant_id)
            assert study is not None
            rule = await alerts.add_rule(
                conn,
                study_id=study,
                name=f"hr-high-{time.monotonic_ns()}",
                metric="heart_rate",
                high=120.0,
                created_by="tester",
            )
            now = int(time.time() * 1000)
            async with conn.transaction():
                (event,) = await alerts.apply_events(
                    conn,
                    [RuleEvent(Change.OPENED, rule.rule_id, participant_id, now, now, 150.0)],
                    {rule.rule_id: rule},
                    now,
                )
            await conn.commit()
        return event.alert_id


async def add_people(trial: Trial) -> None:
    async with db.connection(trial.url) as conn:
        async with conn.transaction():
            await registry.create_site(conn, "SITE-B", trial.study_id, "Site B")
        site, trial.site_id = trial.site_id, "SITE-B"
        await trial.add_participant("P2", "hub-2")
        trial.site_id = site
        for key, (role, sites, pid) in ACCOUNTS.items():
            await users.create_user(
                conn,
                actor="tester",
                username=key,
                display_name=f"{key.replace('_', ' ').title()}",
                role=role,
                password=PASSWORD,
                participant_id=pid,
                sites=sites,
            )
        await conn.commit()


RAISED_LIMIT = Limit(burst=100_000, per_minute=100_000)


@pytest.fixture
async def web(trial: Trial, gateway: RunningGateway) -> Web:
    for buckets in gateway.client.app[RATE_LIMITER].all:  # type: ignore[index]
        buckets.limit = RAISED_LIMIT
    await add_people(trial)
    return Web(trial, gateway)


@pytest.fixture
async def browser(web: Web, chromium: Chrome) -> Browser:
    """Chromium on the test gateway's pages."""
    return Browser(chromium, web.url)


@pytest.fixture
async def probe(mosquitto: MosquittoBroker) -> AsyncIterator[MqttProbe]:
    """A hub's MQTT connection for the page tests to publish envelopes with."""
    p = MqttProbe(mosquitto, "web-test-hub")
    yield p
    p.close()
