"""Per participant and rule: what each alert rule knows after the readings judged so far,
the stored readings a late arrival is re-judged from, and the readings it did not judge.

Readings the device marked invalid or questionable (ingest.flags) are not judged unless the
participant's study says so (``studies.alerts_on_doubtful``); how many each rule skipped is
kept with its state (``alert_state.doubtful_skipped``) and shown with the rules.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Final

from ingest.flags import IN_DOUBT
from ingest.rules import RuleState
from storage.db import Conn
from storage.study_settings import StudySetting, set_study_setting
from storage.timeconv import from_ms, to_ms

# The namespace of the per-participant locks (two-key form: namespace, hashtext(participant)).
PARTICIPANT_LOCK_NAMESPACE: Final = 0x616C_7274
# The flags that keep a reading from the rules (a sorted list, sent as a text[] parameter).
_IN_DOUBT: Final = sorted(IN_DOUBT)


async def lock_participants(conn: Conn, participant_ids: Iterable[str]) -> None:
    """Serialise alert evaluation per participant until the transaction ends (two gateway
    workers holding batches of one participant judge them one after the other)."""
    ids = sorted(set(participant_ids))
    if ids:
        await conn.execute(
            "WITH k AS MATERIALIZED ("
            " SELECT DISTINCT hashtext(x) AS h FROM unnest(%s::text[]) AS x ORDER BY h)"
            " SELECT count(pg_advisory_xact_lock(%s, h)) FROM k",
            (ids, PARTICIPANT_LOCK_NAMESPACE),
        )


def _ms(t: datetime | None) -> int | None:
    return None if t is None else to_ms(t)


def _ts(t: int | None) -> datetime | None:
    return None if t is None else from_ms(t)


async def load_states(
    conn: Conn, participant_ids: Collection[str]
) -> dict[tuple[str, int], RuleState]:
    if not participant_ids:
        return {}
    cur = await conn.execute(
        "SELECT participant_id, rule_id, evaluated_until, run_start, run_last, active_since"
        " FROM alert_state WHERE participant_id = ANY(%s)",
        (list(participant_ids),),
    )
    return {
        (str(p), int(r)): RuleState(_ms(until), _ms(start), _ms(last), _ms(active))
        for p, r, until, start, last, active in await cur.fetchall()
    }


async def save_states(conn: Conn, states: Mapping[tuple[str, int], RuleState]) -> None:
    if not states:
        return
    keys = sorted(states)
    await conn.execute(
        "INSERT INTO alert_state (participant_id, rule_id, evaluated_until, run_start, run_last,"
        " active_since)"
        " SELECT * FROM unnest(%b::text[], %b::int8[], %b::timestamptz[], %b::timestamptz[],"
        " %b::timestamptz[], %b::timestamptz[])"  # binary: see storage.writer
        " ON CONFLICT (participant_id, rule_id) DO UPDATE SET"
        " evaluated_until = excluded.evaluated_until, run_start = excluded.run_start,"
        " run_last = excluded.run_last, active_since = excluded.active_since, updated_at = now()",
        (
            [p for p, _ in keys],
            [r for _, r in keys],
            [_ts(states[k].evaluated_until) for k in keys],
            [_ts(states[k].run_start) for k in keys],
            [_ts(states[k].run_last) for k in keys],
            [_ts(states[k].active_since) for k in keys],
        ),
    )


async def reset_point(
    conn: Conn,
    participant_id: str,
    metric: str,
    band: tuple[float | None, float | None],
    *,
    before_ms: int,
    not_before_ms: int,
    doubtful: bool = False,
) -> int | None:
    """The latest stored reading inside the clearing ``band`` before ``before_ms`` (and not
    before ``not_before_ms``): where a replay can start from an idle rule. ``doubtful``:
    readings the device marked invalid or questionable count too."""
    low, high = band
    cur = await conn.execute(
        "SELECT max(time) FROM readings WHERE participant_id = %s AND metric = %s"
        " AND time < %s AND time >= %s"
        " AND value >= coalesce(%s, '-Infinity'::float8)"
        " AND value <= coalesce(%s, 'Infinity'::float8)"
        " AND (%s OR flags IS NULL OR NOT flags && %s::text[])",
        (
            participant_id,
            metric,
            from_ms(before_ms),
            from_ms(not_before_ms),
            low,
            high,
            doubtful,
            _IN_DOUBT,
        ),
    )
    row = await cur.fetchone()
    return None if row is None or row[0] is None else to_ms(row[0])


async def stored_series(
    conn: Conn, participant_id: str, metric: str, from_ms_: int, *, doubtful: bool = False
) -> tuple[list[int], list[float]]:
    """Stored readings of one participant and metric from ``from_ms_`` on, by reading time;
    without those the device marked invalid or questionable unless ``doubtful``."""
    cur = await conn.execute(
        "SELECT time, value FROM readings WHERE participant_id = %s AND metric = %s"
        " AND time >= %s AND (%s OR flags IS NULL OR NOT flags && %s::text[])"
        " ORDER BY time, received_at, device_id, seq",
        (participant_id, metric, from_ms(from_ms_), doubtful, _IN_DOUBT),
    )
    rows = await cur.fetchall()
    return [to_ms(t) for t, _ in rows], [float(v) for _, v in rows]


async def known_starts(conn: Conn, participant_id: str, rule_id: int, from_ms_: int) -> list[int]:
    """Where the alerted episodes of a rule began, from ``from_ms_`` on or still unresolved."""
    cur = await conn.execute(
        "SELECT first_time FROM alerts WHERE participant_id = %s AND rule_id = %s"
        " AND (first_time >= %s OR state <> 'resolved')",
        (participant_id, rule_id, from_ms(from_ms_)),
    )
    return [to_ms(r[0]) for r in await cur.fetchall()]


async def judging_doubtful(conn: Conn, participant_ids: Collection[str]) -> set[str]:
    """Those of ``participant_ids`` whose study's rules judge doubtful readings too."""
    cur = await conn.execute(
        "SELECT p.participant_id FROM participants p JOIN studies s USING (study_id)"
        " WHERE p.participant_id = ANY(%s) AND s.alerts_on_doubtful",
        (list(participant_ids),),
    )
    return {str(row[0]) for row in await cur.fetchall()}


async def count_skipped(conn: Conn, skipped: Mapping[tuple[str, int], int]) -> None:
    """Add to each (participant, rule)'s count of readings it did not judge as doubtful."""
    if not skipped:
        return
    keys = sorted(skipped)
    await conn.execute(
        "INSERT INTO alert_state (participant_id, rule_id, doubtful_skipped)"
        " SELECT * FROM unnest(%b::text[], %b::int8[], %b::int8[])"
        " ON CONFLICT (participant_id, rule_id) DO UPDATE SET"
        " doubtful_skipped = alert_state.doubtful_skipped + excluded.doubtful_skipped",
        ([p for p, _ in keys], [r for _, r in keys], [skipped[k] for k in keys]),
    )


async def skipped_by_rule(conn: Conn, rule_ids: Sequence[int]) -> dict[int, int]:
    """How many doubtful readings each rule skipped, over all its participants."""
    cur = await conn.execute(
        "SELECT rule_id, sum(doubtful_skipped) FROM alert_state WHERE rule_id = ANY(%s)"
        " AND doubtful_skipped > 0"
        " GROUP BY rule_id",
        (list(rule_ids),),
    )
    return {int(rule): int(total) for rule, total in await cur.fetchall()}


async def set_study_judging_doubtful(conn: Conn, study_id: str, judge: bool, *, actor: str) -> None:
    """Whether the study's alert rules judge readings the device doubted. Audited."""
    await set_study_setting(conn, study_id, StudySetting.ALERTS_ON_DOUBTFUL, judge, actor=actor)
