"""Rate limits on sign-in, enrollment and consent signing: 429 problem+json with Retry-After."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse

from gateway.broker import MosquittoBroker
from gateway.web import ratelimit
from gateway.web.ratelimit import RATE_LIMITER, Buckets, Limit, RateLimiter
from tests.fixtures.gateway import RunningGateway, gateway_settings, running_gateway
from tests.fixtures.trial import Trial
from tests.web.conftest import PASSWORD, Web, add_people

LOGIN = "/api/v1/session"
ENROLL = "/api/v1/enrollments"
# Loopback is 127.0.0.0/8 on Linux: a client bound to this source is another address.
OTHER_ADDRESS = "127.0.0.2"


@pytest.fixture
async def limited(trial: Trial, gateway: RunningGateway) -> Web:
    """The web people, with the gateway's rate limits as configured (not raised), and the
    limits' clock stopped: no token comes back while a test runs, however slow it is."""
    for buckets in gateway.client.app[RATE_LIMITER].all:  # type: ignore[index]
        buckets.clock = lambda: 1000.0
    await add_people(trial)
    return Web(trial, gateway)


@pytest.fixture
async def other_client(limited: Web) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(local_addr=(OTHER_ADDRESS, 0))
    async with aiohttp.ClientSession(limited.url, connector=connector) as session:
        yield session


def limiter(w: Web) -> RateLimiter:
    return w.gateway.client.app[RATE_LIMITER]  # type: ignore[index, no-any-return]


async def assert_too_many(resp: ClientResponse, limit: Limit) -> None:
    assert resp.status == 429, await resp.text()
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["type"].endswith("/too-many-requests")
    # Whole seconds until the next token: 60 / per_minute, rounded up.
    assert resp.headers["Retry-After"] == str(math.ceil(60 / limit.per_minute))


async def login(w: Web, username: str, password: str) -> ClientResponse:
    return await w.gateway.client.post(LOGIN, json={"username": username, "password": password})


async def test_sign_in_is_limited_per_address(
    limited: Web, other_client: aiohttp.ClientSession
) -> None:
    # Each attempt names another (unknown) account, so only the address limit applies.
    for n in range(ratelimit.LOGIN_PER_ADDRESS.burst):
        assert (await login(limited, f"nobody-{n}", "some guess")).status == 401
    await assert_too_many(await login(limited, "clinician", PASSWORD), ratelimit.LOGIN_PER_ADDRESS)
    # Another address still signs in.
    async with other_client.post(
        LOGIN, json={"username": "clinician", "password": PASSWORD}
    ) as resp:
        assert resp.status == 200


async def test_sign_in_is_limited_per_account(
    limited: Web, other_client: aiohttp.ClientSession
) -> None:
    # Past the lockout the attempts still count: the limit is on the name tried.
    for _ in range(ratelimit.LOGIN_PER_ACCOUNT.burst):
        assert (await login(limited, "monitor", "some guess")).status == 401
    await assert_too_many(
        await login(limited, "monitor", "another guess"), ratelimit.LOGIN_PER_ACCOUNT
    )
    # From another address too: the account's limit is the account's.
    async with other_client.post(LOGIN, json={"username": "monitor", "password": "x"}) as resp:
        await assert_too_many(resp, ratelimit.LOGIN_PER_ACCOUNT)
    # Another account from the first address is unaffected.
    assert (await login(limited, "clinician", PASSWORD)).status == 200


async def test_enrollment_is_limited_per_address(
    limited: Web, other_client: aiohttp.ClientSession
) -> None:
    body = {"code": "NOT-A-CODE", "csr": "not a csr"}
    client = limited.gateway.client
    for _ in range(ratelimit.ENROLLMENT_PER_ADDRESS.burst):
        resp = await client.post(ENROLL, json=body)
        assert resp.status in (400, 404), await resp.text()
    await assert_too_many(await client.post(ENROLL, json=body), ratelimit.ENROLLMENT_PER_ADDRESS)
    async with other_client.post(ENROLL, json=body) as resp:
        assert resp.status in (400, 404)


def consent_body(**changes: Any) -> dict[str, Any]:
    # An unknown document: refused (400) before any password is checked.
    body = {
        "document_id": 2**40,
        "scopes": ["core"],
        "printed_name": "Participant One",
        "username": "participant",
        "password": PASSWORD,
    }
    body.update(changes)
    return body


async def test_consent_signing_is_limited_per_account(limited: Web) -> None:
    path = "/api/v1/participants/P1/consents"
    for _ in range(ratelimit.CONSENT_PER_ACCOUNT.burst):
        resp = await limited.call("participant", "POST", path, json=consent_body())
        assert resp.status == 400, await resp.text()
    await assert_too_many(
        await limited.call("participant", "POST", path, json=consent_body()),
        ratelimit.CONSENT_PER_ACCOUNT,
    )
    # The coordinator signing in clinic for the same participant has a budget of its own.
    resp = await limited.call("coordinator", "POST", path, json=consent_body())
    assert resp.status == 400


def test_buckets_refill_and_say_when() -> None:
    now = [0.0]
    buckets = Buckets("test", Limit(burst=2, per_minute=6), clock=lambda: now[0])
    assert [buckets.take("a"), buckets.take("a")] == [0, 0]
    assert buckets.take("a") == 10  # one token every 10 s
    now[0] += 4.5
    assert buckets.take("a") == 6  # 5.5 s to go, rounded up
    assert buckets.take("b") == 0
    now[0] += 6.0
    assert buckets.take("a") == 0


def test_memory_is_bounded_and_the_least_recently_used_key_goes() -> None:
    buckets = Buckets("test", Limit(burst=1, per_minute=1), max_keys=3)
    for key in ("a", "b", "c"):
        buckets.take(key)
    assert buckets.take("a") > 0  # a is used again: b is now the oldest
    buckets.take("d")
    assert len(buckets) == 3
    assert "b" not in buckets
    assert {"a", "c", "d"} == {k for k in "abcd" if k in buckets}
    for n in range(1000):
        buckets.take(f"address-{n}")
    assert len(buckets) == 3


async def test_the_gateways_limiter_is_bounded(limited: Web) -> None:
    for buckets in limiter(limited).all:
        assert buckets.max_keys == ratelimit.MAX_KEYS
    accounts = limiter(limited).login_per_account
    accounts.max_keys = 3
    for n in range(6):
        assert (await login(limited, f"nobody-{n}", "guess")).status == 401
    assert len(accounts) == 3
    assert "nobody-0" not in accounts
    assert "nobody-5" in accounts


def test_client_address_keys() -> None:
    from aiohttp.test_utils import make_mocked_request

    def key(remote: str) -> str:
        request = make_mocked_request("POST", LOGIN)
        return ratelimit.client_address(request.clone(remote=remote))

    assert key("192.0.2.7") == "192.0.2.7"
    assert key("2001:db8:1:2:3:4:5:6") == key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert key("::ffff:192.0.2.7") == "192.0.2.7"


def test_behind_a_trusted_proxy_the_client_is_the_forwarded_address() -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict

    app = web.Application()
    app[ratelimit.TRUSTED_PROXIES] = ratelimit.parse_networks("127.0.0.1, 10.0.0.0/8")

    def key(remote: str, *forwarded: str) -> str:
        headers = CIMultiDict(("X-Forwarded-For", f) for f in forwarded)
        request = make_mocked_request("POST", LOGIN, headers=headers, app=app)
        return ratelimit.client_address(request.clone(remote=remote))

    # The proxy's own view of its peer.
    assert key("127.0.0.1", "203.0.113.9") == "203.0.113.9"
    # What the client wrote to the left of it is not believed; trusted hops are skipped.
    assert key("127.0.0.1", "198.51.100.1, 203.0.113.9, 10.1.1.1") == "203.0.113.9"
    assert key("127.0.0.1", "198.51.100.1", "203.0.113.9") == "203.0.113.9"
    # Garbage stops the walk at the last address read.
    assert key("127.0.0.1", "<script>, 10.0.0.5") == "10.0.0.5"
    assert key("127.0.0.1", "not an address") == "127.0.0.1"
    # An untrusted peer's header is ignored, as is a header too long to be a real chain.
    assert key("192.0.2.7", "203.0.113.9") == "192.0.2.7"
    assert key("127.0.0.1", ", ".join(["10.0.0.1"] * 200)) == "127.0.0.1"
    assert key("127.0.0.1") == "127.0.0.1"
    assert key("127.0.0.1", "2001:db8:1:2::9") == "2001:db8:1:2::/64"


def test_trusted_proxies_are_checked_when_read() -> None:
    from gateway.errors import ConfigError
    from gateway.settings import Settings

    ok = Settings.from_env({"TRIALSTREAM_TRUSTED_PROXIES": "10.0.0.0/8, ::1"})
    assert ok.trusted_proxies == "10.0.0.0/8, ::1"
    for bad in ("10.0.0.0/33", "proxy.example", ",".join(["10.0.0.1"] * 65)):
        with pytest.raises(ConfigError, match="TRIALSTREAM_TRUSTED_PROXIES"):
            Settings.from_env({"TRIALSTREAM_TRUSTED_PROXIES": bad})


async def test_without_a_trusted_proxy_x_forwarded_for_is_ignored(limited: Web) -> None:
    spoofed = {"X-Forwarded-For": "203.0.113.50"}
    for n in range(ratelimit.LOGIN_PER_ADDRESS.burst):
        resp = await limited.gateway.client.post(
            LOGIN, json={"username": f"nobody-{n}", "password": "x"}, headers=spoofed
        )
        assert resp.status == 401
    resp = await limited.gateway.client.post(
        LOGIN,
        json={"username": "nobody-x", "password": "x"},
        headers={"X-Forwarded-For": "203.0.113.51"},
    )
    assert resp.status == 429


async def test_behind_a_trusted_proxy_each_client_has_its_limits_and_its_record(
    trial: Trial, database_url: str, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    from storage import db

    settings = replace(
        gateway_settings(database_url, mosquitto, tmp_path / "gateway"),
        trusted_proxies="127.0.0.1",
    )
    async with running_gateway(settings) as gw:
        statuses = []
        for n in range(ratelimit.LOGIN_PER_ADDRESS.burst + 5):
            resp = await gw.client.post(
                LOGIN,
                json={"username": f"nobody-{n}", "password": "x"},
                headers={"X-Forwarded-For": f"198.51.100.{n + 1}"},
            )
            statuses.append(resp.status)
    assert statuses == [401] * (ratelimit.LOGIN_PER_ADDRESS.burst + 5)
    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT detail->>'remote' FROM audit_log WHERE action = 'user.login_failed'"
            " ORDER BY audit_id LIMIT 2"
        )
        assert await cur.fetchall() == [("198.51.100.1",), ("198.51.100.2",)]
