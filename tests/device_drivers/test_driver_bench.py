"""`bench drivers` measures what it says: every profile's sample parses, both runs stream."""

from __future__ import annotations

from bench import drivers
from device_drivers.gatt import registry


def test_every_sample_parses_and_its_baseline_layout_covers_the_payload() -> None:
    samples = drivers.samples()
    assert len({s.char_id for s in samples}) == len(samples) == 8
    for s in samples:
        assert registry.decode_to_measurements(s.char_id, s.payload)
        assert s.raw_layout.size == len(s.payload)


def test_parser_figures_have_a_baseline_in_the_same_run() -> None:
    results = drivers.parser_rates(50, drivers.Progress(None))
    assert [r["profile"] for r in results] == [s.profile for s in drivers.samples()]
    for r in results:
        assert r["payloads_per_s"] > 0
        assert r["baseline_unpacks_per_s"] > 0
        per = r["readings_per_payload"]
        assert per >= 1
        assert abs(r["readings_per_s"] - r["payloads_per_s"] * per) <= per


async def test_end_to_end_streams_through_sessions_and_plain_bleak() -> None:
    result = await drivers.end_to_end(2, 5.0, 0.5, drivers.Progress(None))
    assert result["baseline"]["notifications_per_s"] > 0
    assert result["sessions"]["notifications_per_s"] > 0
    assert result["sessions"]["readings_per_s"] > 0
    assert result["sessions"]["malformed"] == 0
    assert result["sessions"]["dropped"] == 0
