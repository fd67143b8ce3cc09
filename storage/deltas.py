"""What stored readings add to the hourly rollups and to adherence, in the caller's
transaction: the writer's for each batch, an unlock's for the held readings it stores.

One pass over the readings folds both: per (participant, metric, hour) the count, sum, least
and greatest of the values the device did not put in doubt (``rollup_deltas``, plain mode
only: TimescaleDB refreshes its own aggregate), and per (participant, metric, 15-minute slot)
the readings, those marked invalid and a bitmap of the minutes holding a usable one
(``adherence_deltas``, both modes). One statement appends both (insert-only: no two batches
wait on one row); ``storage.rollups`` and ``storage.adherence`` merge them later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ingest.flags import in_doubt, is_invalid
from ingest.model import Reading
from storage.adherence import MINUTE_MS, SLOT_MS
from storage.arrays import Float8s, Int4s, Int8s, PgArray, Texts
from storage.db import Conn
from storage.migrate import StorageMode
from storage.rollups import HOUR_MS

# (participant, metric, hour since the epoch) -> [count, sum, min, max]
HourPartials = dict[tuple[str, str, int], list[float]]
# (participant, metric, slot since the epoch) -> [readings, invalid, minute bitmap]
SlotPartials = dict[tuple[str, str, int], list[int]]

_ADHERENCE = (
    "INSERT INTO adherence_deltas (participant_ids, metrics, slots, readings, invalid, minutes)"
    " VALUES (%b, %b, %b, %b, %b, %b)"
)
_ROLLUP = (
    "INSERT INTO rollup_deltas (participant_ids, metrics, hours, counts, sums, mins, maxs)"
    " VALUES (%b, %b, %b, %b, %b, %b, %b)"
)
_BOTH = """
WITH hours AS (
    INSERT INTO rollup_deltas (participant_ids, metrics, hours, counts, sums, mins, maxs)
    VALUES (%b, %b, %b, %b, %b, %b, %b)
)
INSERT INTO adherence_deltas (participant_ids, metrics, slots, readings, invalid, minutes)
VALUES (%b, %b, %b, %b, %b, %b)
"""


def fold(
    stored: Iterable[tuple[str, Sequence[Reading]]], *, hours: bool
) -> tuple[HourPartials, SlotPartials]:
    """Each participant's stored readings folded into hour (when ``hours``) and slot partials."""
    by_hour: HourPartials = {}
    by_slot: SlotPartials = {}
    for participant_id, readings in stored:
        for reading in readings:
            t_ms, metric, flags = reading.t_ms, reading.metric, reading.flags
            slot = by_slot.get(key := (participant_id, metric, t_ms // SLOT_MS))
            if slot is None:
                slot = by_slot[key] = [0, 0, 0]
            slot[0] += 1
            if flags and is_invalid(flags):
                slot[1] += 1
                continue  # invalid is in doubt as well: no hour
            slot[2] |= 1 << ((t_ms // MINUTE_MS) % 15)
            if not hours or (flags and in_doubt(flags)):
                continue
            value = reading.value
            acc = by_hour.get(key := (participant_id, metric, t_ms // HOUR_MS))
            if acc is None:
                by_hour[key] = [1, value, value, value]
            else:
                acc[0] += 1
                acc[1] += value
                if value < acc[2]:
                    acc[2] = value
                elif value > acc[3]:
                    acc[3] = value
    return by_hour, by_slot


async def add(
    conn: Conn,
    mode: StorageMode,
    stored: Iterable[tuple[str, Sequence[Reading]]],
    *,
    adherence: bool = True,
) -> None:
    """Append what ``stored`` (participant, readings) adds to the rollups and adherence.
    ``adherence=False`` leaves adherence out: `bench adherence` measures what it adds."""
    by_hour, by_slot = fold(stored, hours=mode is StorageMode.PLAIN)
    hours = _hour_arrays(by_hour) if by_hour else ()
    slots = _slot_arrays(by_slot) if by_slot and adherence else ()
    if hours and slots:
        await conn.execute(_BOTH, hours + slots)
    elif hours:
        await conn.execute(_ROLLUP, hours)
    elif slots:
        await conn.execute(_ADHERENCE, slots)


def _hour_arrays(by_hour: HourPartials) -> tuple[PgArray, ...]:
    keys, accs = by_hour.keys(), by_hour.values()
    return (
        Texts(k[0] for k in keys),
        Texts(k[1] for k in keys),
        Int8s(k[2] for k in keys),
        Int8s(int(a[0]) for a in accs),
        Float8s(a[1] for a in accs),
        Float8s(a[2] for a in accs),
        Float8s(a[3] for a in accs),
    )


def _slot_arrays(by_slot: SlotPartials) -> tuple[PgArray, ...]:
    keys, accs = by_slot.keys(), by_slot.values()
    return (
        Texts(k[0] for k in keys),
        Texts(k[1] for k in keys),
        Int8s(k[2] for k in keys),
        Int4s(a[0] for a in accs),
        Int4s(a[1] for a in accs),
        Int4s(a[2] for a in accs),
    )
