"""Rate limits on the requests that cost a password hash or redeem a secret.

Sign-in and consent signing verify an argon2 hash (about 0.2 s of a core, 64 MiB each) and
enrollment redeems a code and signs a certificate, so a client that sends many of them
slows everyone, the MQTT ingestion included. Each limit is a token bucket per key, held in
memory by the worker process:

- ``POST /api/v1/session`` (sign-in): ``LOGIN_PER_ADDRESS`` per client address and
  ``LOGIN_PER_ACCOUNT`` per user name tried (known or not, so the answer tells nothing).
- ``POST /api/v1/enrollments``: ``ENROLLMENT_PER_ADDRESS`` per client address.
- A hub's signed requests (``POST /api/v1/devices/{device_id}/certificates`` and
  ``.../standing``): ``HUB_REQUESTS_PER_ADDRESS`` per client address. (A device renewing
  again within minutes gets its newest certificate again: ``gateway/renewal.py``.)
- ``POST /api/v1/participants/{participant_id}/consents`` (consent signing):
  ``CONSENT_PER_ACCOUNT`` per signed-in account.

Past a limit the answer is ``429`` problem+json (``too-many-requests``) with ``Retry-After``
in whole seconds. The address limits are applied by ``rate_limit_middleware`` before the body
is read (the enrollment route belongs to ``gateway.app``); the account limits by the handlers,
which know the account (``check``).

The client address is the connection's peer (``request.remote``), unless that peer is one of
the trusted proxies (``TRIALSTREAM_TRUSTED_PROXIES``, ``app[TRUSTED_PROXIES]``): then it is
the rightmost address in ``X-Forwarded-For`` that is not itself a trusted proxy (what the
nearest untrusted hop connected from; everything left of it could be written by the client).
Behind a reverse proxy that is not declared, every client shares the proxy's address (and
its limits). An IPv6 address counts as its /64 network, since one host commonly holds a
whole /64.

Memory is bounded: each bucket set tracks at most ``MAX_KEYS`` keys and forgets the least
recently used one to make room (a forgotten key starts again with a full bucket). Limits are
per worker process: with several workers a client gets each limit once per worker.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.problems import CONTENT_TYPE, PROBLEM_TYPE_BASE

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limit:
    """``burst`` requests at once, refilled at ``per_minute`` a minute."""

    burst: int
    per_minute: float

    @property
    def per_second(self) -> float:
        return self.per_minute / 60.0


# A person mistyping a password a few times stays well under these; a clinic behind one
# address signing in its staff at the start of a shift mostly does too.
LOGIN_PER_ADDRESS = Limit(burst=20, per_minute=20)
# Above the lockout (storage.users.MAX_FAILED_LOGINS) so that a guesser sees the lockout,
# and it bounds the hashes spent on one account that signs in successfully again and again.
LOGIN_PER_ACCOUNT = Limit(burst=10, per_minute=10)
# A hub enrolls once; a site enrolling a few hubs in a row from one network stays under it.
ENROLLMENT_PER_ADDRESS = Limit(burst=10, per_minute=10)
# A hub asks for its standing a few times a day and renews every six weeks; many hubs behind
# one clinic's address stay well under this.
HUB_REQUESTS_PER_ADDRESS = Limit(burst=60, per_minute=60)
# Each signature re-verifies a password; a participant signs a handful of documents.
CONSENT_PER_ACCOUNT = Limit(burst=10, per_minute=10)
# Keys tracked per bucket set: with a key of at most a few hundred bytes, a few MiB at most.
MAX_KEYS = 10_000


class Buckets:
    """Token buckets of one limit, one per key, at most ``max_keys`` of them (LRU)."""

    def __init__(
        self,
        name: str,
        limit: Limit,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit.burst < 1 or limit.per_minute <= 0 or max_keys < 1:
            raise ValueError("a limit needs a burst of at least 1, a positive rate and keys")
        self.name = name
        self.limit = limit
        self.max_keys = max_keys
        self.clock = clock
        # key -> (tokens, time of that count); oldest use first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    def take(self, key: str) -> int:
        """Take a token for ``key``: 0 if there was one, else whole seconds until there is."""
        now = self.clock()
        found = self._buckets.pop(key, None)
        if found is None:
            tokens = float(self.limit.burst)
            while len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
        else:
            tokens, then = found
            tokens = min(float(self.limit.burst), tokens + (now - then) * self.limit.per_second)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0
        self._buckets[key] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.limit.per_second))


class RateLimiter:
    """The gateway's limits (``app[RATE_LIMITER]``); one per worker process."""

    def __init__(self, *, max_keys: int = MAX_KEYS) -> None:
        self.login_per_address = Buckets("login-address", LOGIN_PER_ADDRESS, max_keys=max_keys)
        self.login_per_account = Buckets("login-account", LOGIN_PER_ACCOUNT, max_keys=max_keys)
        self.enrollment_per_address = Buckets(
            "enrollment-address", ENROLLMENT_PER_ADDRESS, max_keys=max_keys
        )
        self.consent_per_account = Buckets(
            "consent-account", CONSENT_PER_ACCOUNT, max_keys=max_keys
        )
        self.hub_requests_per_address = Buckets(
            "hub-requests-address", HUB_REQUESTS_PER_ADDRESS, max_keys=max_keys
        )
        self.all = (
            self.login_per_address,
            self.login_per_account,
            self.enrollment_per_address,
            self.consent_per_account,
            self.hub_requests_per_address,
        )
        # (method, route path) -> the per-address limit of that route
        self.by_route: dict[tuple[str, str], Buckets] = {
            ("POST", "/api/v1/session"): self.login_per_address,
            ("POST", "/api/v1/enrollments"): self.enrollment_per_address,
            ("POST", "/api/v1/devices/{device_id}/certificates"): self.hub_requests_per_address,
            ("POST", "/api/v1/devices/{device_id}/standing"): self.hub_requests_per_address,
        }


RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple)
# Bounds on what is read of X-Forwarded-For: a real chain has a handful of hops.
MAX_FORWARDED_CHARS = 1024
MAX_FORWARDED_HOPS = 16


def parse_networks(text: str) -> tuple[Network, ...]:
    """``10.0.0.0/8, 127.0.0.1, ::1``: networks or single addresses (ValueError if not)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if len(items) > 64:
        raise ValueError("at most 64 trusted proxies")
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def _trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: tuple[Network, ...]) -> bool:
    return any(ip in net for net in nets)


def _forwarded_client(
    request: web.Request, peer: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    nets: tuple[Network, ...] = request.app.get(TRUSTED_PROXIES, ())
    if not nets or not _trusted(peer, nets):
        return peer
    header = ",".join(request.headers.getall("X-Forwarded-For", []))
    if not header or len(header) > MAX_FORWARDED_CHARS:
        return peer
    client = peer
    for hop in reversed(header.split(",")[-MAX_FORWARDED_HOPS:]):
        try:
            ip = ipaddress.ip_address(hop.strip())
        except ValueError:
            break  # not an address: nothing left of it can be trusted
        client = ip
        if not _trusted(ip, nets):
            break
    return client


def client_address(request: web.Request) -> str:
    """The key of the request's client: its address, or its /64 network for IPv6."""
    remote = request.remote or "unknown"
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    ip = _forwarded_client(request, ip)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def too_many_requests(retry_after: int) -> web.HTTPTooManyRequests:
    body = {
        "type": PROBLEM_TYPE_BASE + "too-many-requests",
        "title": "too many requests",
        "status": 429,
        "detail": f"try again in {retry_after} s",
    }
    return web.HTTPTooManyRequests(
        text=json.dumps(body),
        content_type=CONTENT_TYPE,
        headers={"Retry-After": str(retry_after)},
    )


def check(buckets: Buckets, key: str) -> None:
    """Take a token for ``key``, or raise the 429 answer (``web.HTTPTooManyRequests``)."""
    wait = buckets.take(key)
    if wait:
        log.info("rate limited limit=%s key=%r retry_after_s=%d", buckets.name, key[:80], wait)
        raise too_many_requests(wait)


def check_request(request: web.Request, pick: Callable[[RateLimiter], Buckets], key: str) -> None:
    """``check`` with the application's limiter (a no-op in an app without one)."""
    limiter = request.app.get(RATE_LIMITER)
    if limiter is not None:
        check(pick(limiter), key)


@web.middleware
async def rate_limit_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The per-address limits, by the matched route's method and path."""
    limiter = request.app.get(RATE_LIMITER)
    if limiter is not None:
        route = request.match_info.route
        resource = route.resource
        if resource is not None:
            buckets = limiter.by_route.get((route.method, resource.canonical))
            if buckets is not None:
                check(buckets, client_address(request))
    return await handler(request)


__all__ = [
    "CONSENT_PER_ACCOUNT",
    "ENROLLMENT_PER_ADDRESS",
    "HUB_REQUESTS_PER_ADDRESS",
    "LOGIN_PER_ACCOUNT",
    "LOGIN_PER_ADDRESS",
    "MAX_KEYS",
    "RATE_LIMITER",
    "TRUSTED_PROXIES",
    "Buckets",
    "Limit",
    "RateLimiter",
    "check",
    "check_request",
    "client_address",
    "parse_networks",
    "rate_limit_middleware",
    "too_many_requests",
]
