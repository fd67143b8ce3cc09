"""``trialstream gateway stats``: what the database says was stored and rejected."""

from __future__ import annotations

from typing import Any

from storage import db


async def collect(url: str, *, hours: float) -> dict[str, Any]:
    async with db.connection(url) as conn:
        cur = await conn.execute(
            "SELECT count(*), coalesce(sum(stored_count), 0) FROM envelopes"
            " WHERE received_at > now() - make_interval(secs => %s)",
            (hours * 3600,),
        )
        row = await cur.fetchone()
        envelopes, readings = (int(row[0]), int(row[1])) if row else (0, 0)
        cur = await conn.execute(
            "SELECT reason, count(*), sum(reading_count) FROM rejections"
            " WHERE received_at > now() - make_interval(secs => %s)"
            " GROUP BY reason ORDER BY 3 DESC, 1",
            (hours * 3600,),
        )
        rejections = [
            {"reason": str(r), "rows": int(n), "readings": int(k)}
            for r, n, k in await cur.fetchall()
        ]
    return {"hours": hours, "envelopes": envelopes, "readings": readings, "rejections": rejections}
