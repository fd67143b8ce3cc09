"""Hubs' broker identities on RabbitMQ, kept by the gateway through the management HTTP API
(docs/scaling.md). ``TRIALSTREAM_RABBITMQ_ADMIN_URL`` names it (any node of the cluster,
with an administrator's credentials).

- Enrollment creates the hub's user, named by its device id, with no password (it logs in
  by its certificate: ``mqtt.ssl_cert_login``) and ``gateway.rabbitmq.hub_permissions``,
  tagged ``trialstream-hub`` so the gateway can tell its users from the operators'.
- Revocation deletes the user and closes every connection it still holds, on every node.
- ``trialstream broker sync-hubs`` makes the broker's hub users match the database: every
  active device has one, no revoked or unknown device keeps one.

Why the gateway keeps them rather than RabbitMQ asking the gateway at each login (the HTTP
auth backend): a broker that can log hubs in while the gateway is down keeps taking their
readings into the queue, and a revocation then is one call that also cuts the open
connection, which an auth backend would not do (RabbitMQ caches its answers per connection).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

import aiohttp

from gateway.errors import BrokerError
from gateway.rabbitmq import TOPIC_EXCHANGE, hub_permissions

log = logging.getLogger(__name__)

HUB_TAG: Final = "trialstream-hub"
VHOST: Final = "/"
TIMEOUT_S: Final = 10.0


def check_admin_url(raw: str) -> str:
    """The management API's base URL, checked: http(s), a host, credentials in it."""
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("expected http:// or https:// with a host")
    if not parts.username or parts.password is None:
        raise ValueError("expected the administrator's user:password@ in it")
    if parts.query or parts.fragment:
        raise ValueError("expected no query or fragment")
    return raw


@dataclass(frozen=True, slots=True)
class SyncReport:
    created: list[str]
    removed: list[str]


class RabbitAdmin:
    """The management API at ``url`` (``http://user:password@host:15672/``)."""

    def __init__(self, url: str) -> None:
        check_admin_url(url)
        parts = urlsplit(url)
        self._authorization = aiohttp.encode_basic_auth(
            unquote(parts.username or ""), unquote(parts.password or "")
        )
        port = f":{parts.port}" if parts.port else ""
        self._base = f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}/api"
        self._shown = f"{parts.scheme}://{parts.hostname}{port}"

    async def _call(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        body: Any = None,
        *,
        missing_ok: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Any:
        try:
            async with session.request(
                method,
                self._base + path,
                json=body,
                headers={"Authorization": self._authorization, **(headers or {})},
            ) as resp:
                if missing_ok and resp.status == 404:
                    return None
                if resp.status >= 300:
                    text = (await resp.text())[:300]
                    raise BrokerError(
                        f"RabbitMQ at {self._shown} answered {method} {path} with "
                        f"{resp.status}: {text}"
                    )
                if resp.content_type == "application/json":
                    return await resp.json()
                return None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BrokerError(
                f"cannot reach RabbitMQ's management API at {self._shown}: {exc}"
            ) from exc

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))

    async def add_hub(self, device_id: str) -> None:
        """The hub's user (no password, certificate login) and its permissions."""
        allowed = hub_permissions(device_id)
        user = quote(device_id, safe="")
        vhost = quote(VHOST, safe="")
        async with self._session() as s:
            await self._call(s, "PUT", f"/users/{user}", {"password_hash": "", "tags": HUB_TAG})
            await self._call(
                s,
                "PUT",
                f"/permissions/{vhost}/{user}",
                {"configure": allowed.configure, "write": allowed.write, "read": allowed.read},
            )
            await self._call(
                s,
                "PUT",
                f"/topic-permissions/{vhost}/{user}",
                {
                    "exchange": TOPIC_EXCHANGE,
                    "write": allowed.topic_write,
                    "read": allowed.topic_read,
                },
            )
        log.info("rabbitmq hub identity created device=%s", device_id)

    async def remove_hub(self, device_id: str, reason: str = "hub revoked") -> int:
        """Delete the hub's user (gone already: fine) and close the connections it holds on
        every node; how many were still open."""
        hub_permissions(device_id)  # checks the id
        user = quote(device_id, safe="")
        async with self._session() as s:
            await self._call(s, "DELETE", f"/users/{user}", missing_ok=True)
            connections = await self._call(s, "GET", "/connections?columns=name,user") or []
            closed = 0
            for c in connections:
                if isinstance(c, dict) and c.get("user") == device_id:
                    name = quote(str(c.get("name", "")), safe="")
                    await self._call(
                        s,
                        "DELETE",
                        f"/connections/{name}",
                        missing_ok=True,
                        headers={"X-Reason": reason},
                    )
                    closed += 1
        log.info("rabbitmq hub identity removed device=%s closed=%d", device_id, closed)
        return closed

    async def hubs(self) -> set[str]:
        """The broker's hub users (those tagged ``trialstream-hub``)."""
        async with self._session() as s:
            users = await self._call(s, "GET", "/users") or []
        out: set[str] = set()
        for u in users:
            tags = u.get("tags") if isinstance(u, dict) else None
            tagged = HUB_TAG in tags if isinstance(tags, list) else tags == HUB_TAG
            if tagged and isinstance(u.get("name"), str):
                out.add(u["name"])
        return out

    async def sync(self, active: set[str]) -> SyncReport:
        """Make the hub users exactly ``active``: create the missing, remove the others."""
        present = await self.hubs()
        created, removed = sorted(active - present), sorted(present - active)
        for device_id in created:
            await self.add_hub(device_id)
        for device_id in removed:
            await self.remove_hub(device_id, "hub no longer active")
        return SyncReport(created, removed)
