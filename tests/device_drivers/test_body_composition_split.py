"""A Body Composition measurement split over two packets (Multiple Packet Measurement) is
stored once both are in, as one measurement; a part whose other part never came is stored
alone, flagged, so nothing is lost and nothing is stored as if it were whole."""

from __future__ import annotations

from device_drivers.driver import BODY_COMPOSITION, Arrival, WearableSession, WearableSpec
from device_drivers.gatt import body_composition as bc
from device_drivers.gatt.date_time import DateTime
from tests.device_drivers.test_driver import MemorySink

WHEN = DateTime(2026, 5, 20, 7, 0, 0)
# The first packet: body fat, time and user; the second: the same, and the weight.
FIRST = bc.BodyCompositionMeasurement(22.5, timestamp=WHEN, user_id=2, multiple_packet=True)
SECOND = bc.BodyCompositionMeasurement(
    22.5, timestamp=WHEN, user_id=2, weight=71.2, height=1.76, multiple_packet=True
)


def session(sink: MemorySink) -> WearableSession:
    return WearableSession(WearableSpec("AA:BB:CC:DD:EE:FF", "scale"), sink)


async def arrive(s: WearableSession, m: bc.BodyCompositionMeasurement, t_ms: int) -> None:
    await s._handle(Arrival(BODY_COMPOSITION, t_ms, bc.encode(m)))


def test_merge_takes_each_field_from_the_packet_that_carries_it() -> None:
    merged = bc.merge(FIRST, SECOND)
    assert merged == bc.BodyCompositionMeasurement(
        22.5, timestamp=WHEN, user_id=2, weight=71.2, height=1.76
    )
    other_user = bc.BodyCompositionMeasurement(20.0, user_id=3, multiple_packet=True)
    assert bc.merge(FIRST, other_user) is None
    imperial = bc.BodyCompositionMeasurement(
        20.0, unit=bc.UnitSystem.IMPERIAL, multiple_packet=True
    )
    assert bc.merge(FIRST, imperial) is None


async def test_two_packets_are_stored_as_one_measurement() -> None:
    sink = MemorySink()
    s = session(sink)
    await arrive(s, FIRST, 1000)
    assert sink.readings_in == []
    await arrive(s, SECOND, 1100)
    assert [(r.metric, r.value, r.flags, r.user) for r in sink.readings_in] == [
        ("body_fat", 22.5, (), 2),
        ("body_weight", 71.2, (), 2),
    ]


async def test_a_part_without_its_other_part_is_stored_alone_and_flagged() -> None:
    sink = MemorySink()
    s = session(sink)
    await arrive(s, FIRST, 1000)
    whole = bc.BodyCompositionMeasurement(30.0, timestamp=WHEN)
    await arrive(s, whole, 2000)
    assert [(r.metric, r.value, r.flags) for r in sink.readings_in] == [
        ("body_fat", 22.5, ("multiple_packet",)),
        ("body_fat", 30.0, ()),
    ]
    # The connection ends with a part held: it is stored, not dropped.
    await arrive(s, FIRST, 3000)
    await s._store_split()
    assert [r.flags for r in sink.readings_in][-1] == ("multiple_packet",)
