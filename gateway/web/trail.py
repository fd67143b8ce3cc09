"""The audit trail of who looked at participants' data, and who was refused it.

A read of health data (a participant's page data, readings, rollups, alerts, a live or alert
stream opened) is one audit record per request, not per reading: ``data.read``, naming the
operation and what was asked. An authenticated call refused on a participant's data (a role
that may not, a participant outside the user's sites) is ``participant.access_refused``.
Reads fail closed: a read whose record cannot be written is not answered.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from gateway.web import auth
from gateway.web.access import Principal
from storage import audit

READ = "data.read"
REFUSED = "participant.access_refused"


async def record(
    request: web.Request,
    principal: Principal,
    action: str,
    operation: str,
    *,
    participant_id: str | None,
    query: Mapping[str, object] | None = None,
    status: int | None = None,
) -> None:
    """One record of ``operation`` by ``principal``, in a transaction of its own."""
    detail: dict[str, object] = {"operation": operation, "via": "web"}
    if query:
        detail["query"] = {k: v for k, v in query.items() if v is not None}
    if status is not None:
        detail["status"] = status
    entity, entity_id = ("participant", participant_id) if participant_id else ("data", operation)
    async with request.app[auth.POOL_KEY].connection() as conn, conn.transaction():
        await audit.append(
            conn,
            actor=principal.username,
            action=action,
            entity=entity,
            entity_id=entity_id,
            detail=detail,
        )
