"""`bench hub-wearables`: its figures from known samples, and a run of a few seconds with a
real hub child, radio process and private Mosquitto that has every figure docs/performance.md
reads from it. No timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import hub_wearables
from bench.hub_wearables import BASELINE, HUB, MIB, Sample


def _sample(
    t: float, cpu_s: float, rss_mib: float, notifications: int, file_mib: float = 20.0, **hub: int
) -> Sample:
    report = {"connected": 2, "streaming": 2, "notifications": notifications, **hub}
    delivered = hub.get("delivered", 0)
    file_bytes = int(file_mib * MIB)
    return Sample(t, cpu_s, int(rss_mib * MIB), {"radio": t / 10}, delivered, report, file_bytes)


def _hub_counters(i: int) -> dict[str, int]:
    return {
        "readings": 110 * i,
        "delivered": 100 * i,
        "malformed": 0,
        "dropped": 0,
        "gaps": 0,
        "envelopes_sent": i,
        "envelopes_resent": 0,
        "receipts_rejected": 0,
        "pending_readings": 10,
        "unreceipted_envelopes": 1,
        "outbox_bytes_on_disk": 4096,
    }


def test_figures_from_known_samples() -> None:
    # Every 5 s: 0.25 s of CPU (5 % of a core, 10 % in the last interval), 1 MiB more
    # every 360 s (10 MiB/h), 100 notifications (20/s).
    samples = [_sample(5.0 * i, 0.25 * i, 50 + 5.0 * i / 360, 100 * i) for i in range(12)]
    samples.append(_sample(60.0, 0.25 * 11 + 0.5, 50 + 60 / 360, 1200))
    figures = hub_wearables.summarize(BASELINE, samples, wearables=2, rate_hz=10.0)

    assert figures["window_seconds"] == 60.0
    assert figures["cpu_pct_of_one_core_mean"] == pytest.approx(100 * 3.25 / 60, abs=0.01)
    assert figures["cpu_pct_of_one_core_max"] == pytest.approx(10.0)
    assert 5.0 <= figures["cpu_pct_of_one_core_p95"] <= 10.0
    assert figures["rss_slope_mib_per_hour"] == pytest.approx(10.0, abs=0.01)
    assert figures["rss_slope_second_half_mib_per_hour"] == pytest.approx(10.0, abs=0.01)
    assert figures["rss_mib_start"] == 50.0
    assert figures["notifications_per_s"] == 20.0
    # The growth is all anonymous here (the file-backed part stays at 20 MiB).
    assert figures["rss_anon_mib_start"] == 30.0
    assert figures["rss_anon_slope_mib_per_hour"] == pytest.approx(10.0, abs=0.01)
    assert figures["expected_notifications_per_s"] == 20.0
    assert figures["context_cpu_pct_of_one_core_mean"] == {"radio": 10.0}
    assert len(figures["timeline_s_cpu_pct_rss_mib_notifications"]) == len(samples) - 1
    assert "readings_delivered_per_s" not in figures


def test_growth_in_pages_read_from_files_is_told_from_the_processs_own() -> None:
    # RSS grows 1 MiB in a minute, all of it file-backed (libraries' code paged in).
    samples = [
        _sample(5.0 * i, 0.25 * i, 50 + i / 12, 100 * i, file_mib=20 + i / 12) for i in range(13)
    ]
    figures = hub_wearables.summarize(BASELINE, samples, wearables=2, rate_hz=10.0)
    assert figures["rss_slope_mib_per_hour"] == pytest.approx(60.0, abs=0.01)
    assert figures["rss_anon_slope_mib_per_hour"] == pytest.approx(0.0, abs=0.01)
    assert figures["rss_anon_mib_end"] == 30.0


def test_the_hub_is_compared_with_its_baseline() -> None:
    baseline_samples = [_sample(5.0 * i, 0.1 * i, 50.0, 100 * i) for i in range(13)]
    hub_samples = [
        _sample(5.0 * i, 0.3 * i, 60 + i / 12, 100 * i, **_hub_counters(i)) for i in range(13)
    ]
    baseline = hub_wearables.summarize(BASELINE, baseline_samples, 2, 10.0)
    hub = hub_wearables.summarize(HUB, hub_samples, 2, 10.0)
    assert hub["readings_made_per_s"] == 22.0
    assert hub["readings_delivered_per_s"] == 20.0
    assert hub["delivered_share_of_made"] == pytest.approx(100 / 110, abs=1e-4)
    assert hub["delivered_share_of_sealed"] == hub["delivered_share_of_made"]  # pending: flat
    assert hub["outbox"]["pending_readings_max"] == 10

    comparison = hub_wearables.compare(hub, baseline)
    assert comparison["cpu_mean_ratio_to_baseline"] == 3.0
    assert comparison["cpu_pct_added_over_baseline"] == 4.0
    assert comparison["rss_slope_minus_baseline_mib_per_hour"] == pytest.approx(60.0, abs=0.01)
    assert comparison["rss_anon_slope_minus_baseline_mib_per_hour"] == pytest.approx(60.0, abs=0.01)
    # 91 % of the readings made were delivered: not keeping up, whatever the CPU.
    assert comparison["keeps_up"] is False
    assert comparison["cpu_target_met"] is False
    # 60 MiB/h: past MemoryHigh within hours, and steeper than the baseline's 0.
    assert comparison["memory_flat"] is False
    assert comparison["memory_flat_strictly"] is False


def test_memory_is_flat_when_its_slope_would_not_reach_the_services_bound_in_30_days() -> None:
    baseline = hub_wearables.summarize(
        BASELINE, [_sample(5.0 * i, 0.1 * i, 50.0, 100 * i) for i in range(13)], 2, 10.0
    )

    def hub_rising(mib_per_hour: float) -> dict[str, object]:
        samples = [
            _sample(5.0 * i, 0.3 * i, 60 + mib_per_hour * 5 * i / 3600, 100 * i, **_hub_counters(i))
            for i in range(13)
        ]
        return hub_wearables.summarize(HUB, samples, 2, 10.0)

    # From about 60 MiB to 192 MiB in 30 days is 0.183 MiB/h.
    slow, steep = hub_rising(0.1), hub_rising(0.3)
    assert hub_wearables.memory_budget(60.0, 192.0) == pytest.approx(0.183, abs=0.001)
    assert hub_wearables.compare(slow, baseline, 192.0)["memory_flat"] is True
    assert hub_wearables.compare(slow, baseline, 192.0)["memory_flat_strictly"] is False
    assert hub_wearables.compare(steep, baseline, 192.0)["memory_flat"] is False
    # No bound known: nothing to measure against, so not called flat.
    assert hub_wearables.compare(slow, baseline, None)["memory_flat"] is False
    assert hub_wearables.memory_budget(200.0, 192.0) == 0.0


def test_the_bound_is_read_from_the_hubs_service_unit(tmp_path: Path) -> None:
    assert hub_wearables.memory_high_mib() == 192.0
    unit = tmp_path / "hub.service"
    unit.write_text("[Service]\nMemoryHigh=1G\nMemoryMax=2G\n")
    assert hub_wearables.memory_high_mib(unit) == 1024.0
    unit.write_text("[Service]\nMemoryMax=2G\nMemoryHigh=infinity\n")
    assert hub_wearables.memory_high_mib(unit) is None


def test_the_warmup_is_left_out_of_the_window_and_reported_on_its_own() -> None:
    # 1 MiB in the first 30 s (the warm-up), flat after.
    samples = [_sample(5.0 * i, 0.25 * i, 50 + min(i, 6) / 6, 100 * i) for i in range(19)]
    warmup, window = hub_wearables.split_warmup(samples, 30.0)
    assert [x.t for x in warmup] == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    assert [x.t for x in window] == [5.0 * i for i in range(13)]
    figures = hub_wearables.summarize(BASELINE, window, wearables=2, rate_hz=10.0)
    assert figures["rss_slope_mib_per_hour"] == 0.0
    assert figures["rss_mib_start"] == 51.0
    assert hub_wearables.summarize_warmup(warmup) == {
        "seconds": 30.0,
        "rss_mib_at_ready": 50.0,
        "rss_mib_rise": 1.0,
        "rss_anon_mib_rise": 1.0,
        "cpu_pct_of_one_core_mean": 5.0,
        "timeline_s_rss_mib": [[0.0, 50.0], [30.0, 51.0]],
    }
    # No warm-up: the window is every sample.
    warmup, window = hub_wearables.split_warmup(samples, 0.0)
    assert len(warmup) == 1
    assert len(window) == len(samples)


@pytest.mark.slow
async def test_a_short_run_measures_the_hub_and_its_baseline(tmp_path: Path) -> None:
    result = await hub_wearables.run(
        wearables=2,
        rate_hz=5.0,
        # Longer than the relay's sealing age (5 s): at least one more envelope is receipted.
        duration_s=8.0,
        baseline_duration_s=1.0,
        warmup_s=1.0,
        sample_s=0.5,
        workdir=tmp_path,
    )

    assert result["benchmark"] == "hub-wearables"
    assert {"machine", "method", "baseline", "hub", "target", "keeps_up"} <= result.keys()
    for run in (result["baseline"], result["hub"]):
        assert run["samples"] >= 2
        assert run["notifications_per_s"] > 0
        assert run["cpu_pct_of_one_core_mean"] >= 0
        assert run["rss_mib_start"] > 0
        assert run["rss_mib_end"] > 0
        assert run["rss_slope_mib_per_hour"] is not None
        # A real process has both parts: its own memory and libraries' pages.
        assert 0 < run["rss_anon_mib_end"] < run["rss_mib_end"]
    hub = result["hub"]
    assert hub["warmup"]["seconds"] >= 1.0
    assert hub["warmup"]["rss_mib_at_ready"] > 0
    assert result["memory_high_mib"] == 192.0
    assert result["memory_budget_mib_per_hour"] > 0
    assert hub["readings_made_per_s"] > 0
    assert hub["readings_delivered_per_s"] > 0
    assert hub["malformed"] == hub["dropped"] == hub["receipts_rejected"] == 0
    assert hub["outbox"]["bytes_on_disk_end"] > 0
    assert result["cpu_mean_ratio_to_baseline"] is None or result["cpu_mean_ratio_to_baseline"] > 0


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--duration", "0"),
        ("--duration", "1e9"),
        ("--sample-s", "-1"),
        ("--rate-hz", "nan"),
        ("--rate-hz", "inf"),
        ("--wearables", "0"),
        ("--wearables", "100000"),
        ("--wearables", "9" * 40),
        ("--warmup", "-1"),
        ("--baseline-duration", "x"),
    ],
)
def test_the_command_refuses_a_window_rate_or_count_out_of_bounds(flag: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "bench", "hub-wearables", flag, value],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert flag in result.stderr
    assert "Traceback" not in result.stderr


def test_a_memory_sample_says_what_grew() -> None:
    from bench import hub_wearables_child

    kept: list[object] = []

    class Grown:
        pass

    lines = []
    first = None
    for _ in range(3):
        kept.extend(Grown() for _ in range(5_000))
        line, first = hub_wearables_child.memory_sample(first)
        lines.append(line)
    assert all(x["rss"] > 0 and x["objects"] > 0 and x["threads"] >= 1 for x in lines)
    assert all(x["malloc_in_use"] is None or x["malloc_in_use"] > 0 for x in lines)
    assert all(x["sqlite_in_use"] is None or x["sqlite_in_use"] >= 0 for x in lines)
    assert lines[0]["grew"] == []  # the first sample is the reference
    assert [Grown.__qualname__, 10_000] in lines[-1]["grew"]
    assert all(len(x["largest"]) == 8 for x in lines)


def test_the_largest_containers_and_untracked_objects_are_found_with_their_holders() -> None:
    from bench import hub_wearables_child

    class Holder:
        def __init__(self) -> None:
            self.tracked = [object()]  # keeps the instance's __dict__ tracked
            self.counts = {i: i for i in range(10_000)}  # only numbers: not tracked

    holder, big, small = Holder(), [object()] * 9_000, [object()] * 10
    largest = hub_wearables_child._largest_containers([small, big, holder.tracked])
    assert [x[1:3] for x in largest] == [[id(big), 9_000], [id(small), 10], [id(holder.tracked), 1]]
    # A dict of numbers escapes the collector; it is found through who holds it.
    untracked = hub_wearables_child._largest_untracked([holder, big])
    assert untracked == [["dict", id(holder.counts), 10_000, "int '0' -> int", Holder.__qualname__]]


async def test_the_memory_trace_writes_its_samples_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import contextlib
    import json

    from bench import hub_wearables_child

    monkeypatch.setattr(hub_wearables_child, "MEMORY_TRACE_EVERY_S", 0.01)
    path = tmp_path / "trace.jsonl"
    trace = asyncio.create_task(hub_wearables_child._trace_memory(path))
    try:
        for _ in range(600):  # however long a sample takes in a large process
            if path.exists() and len(path.read_text().splitlines()) >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        trace.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trace
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) >= 2
    assert lines[0]["t_s"] <= lines[1]["t_s"]
    assert {"rss", "malloc_in_use", "objects", "largest", "largest_untracked"} <= set(lines[0])


SMAPS = """\
55d000000000-55d000021000 rw-p 00000000 00:00 0                          [heap]
Rss:                 132 kB
Anonymous:           132 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Rss:                  40 kB
Anonymous:            40 kB
7f0000100000-7f0004000000 ---p 00000000 00:00 0
Anonymous:             0 kB
7f0004000000-7f0004010000 rw-p 00000000 00:00 0
Anonymous:            12 kB
7f1000000000-7f1000001000 ---p 00000000 00:00 0
Anonymous:             0 kB
7f1000001000-7f1000801000 rw-p 00000000 00:00 0
Anonymous:            16 kB
7f2000000000-7f2000010000 r--p 00000000 fe:00 1234                       /usr/lib/libc.so.6
Anonymous:             0 kB
7f2000010000-7f2000012000 rw-p 00010000 fe:00 1234                       /usr/lib/libc.so.6
Anonymous:             8 kB
7f3000010000-7f3000110000 rw-p 00000000 00:00 0
Anonymous:           700 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Anonymous:            20 kB
"""


def test_anonymous_pages_are_told_apart_by_the_mapping_that_holds_them() -> None:
    from bench import hub_wearables_child

    kinds = hub_wearables_child.anonymous_by_mapping(SMAPS)
    assert kinds == {
        "main_heap": 132 * 1024,
        # two 64 MiB-aligned heaps: the second starts where the first's inaccessible tail
        # ends, and is not taken for a stack above a guard
        "thread_arenas": (40 + 12) * 1024,
        "stacks": (16 + 20) * 1024,
        "files": 8 * 1024,
        "other": 700 * 1024,
    }


_THREAD_ALLOCATES = """
import json, os, re, threading
from pathlib import Path
from bench.hub_wearables_child import anonymous_by_mapping

def anonymous():
    return anonymous_by_mapping(Path("/proc/self/smaps").read_text())

before = anonymous()
kept = []
# 100 kB apiece: past CPython's small-object allocator, under malloc's mapping threshold,
# so each comes from the allocating thread's arena.
thread = threading.Thread(target=lambda: kept.extend(os.urandom(100_000) for _ in range(150)))
thread.start()
thread.join()
after = anonymous()
status = re.search(r"RssAnon:\\s+(\\d+) kB", Path("/proc/self/status").read_text())
print(json.dumps({"before": before, "after": after, "rss_anon": int(status.group(1)) * 1024}))
"""


def test_a_threads_allocations_are_found_in_the_thread_arenas() -> None:
    import json

    # A process of its own: in a long-lived one (a test worker) a new thread may reuse an
    # arena whose free pages are already resident, and nothing new would show.
    result = subprocess.run(
        [sys.executable, "-c", _THREAD_ALLOCATES],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(hub_wearables.__file__).resolve().parent.parent,
    )
    found = json.loads(result.stdout)
    before, after = found["before"], found["after"]
    assert after["thread_arenas"] - before["thread_arenas"] >= 10 * MIB
    # Every anonymous page is in one kind (the kernel's own count lags by a few pages).
    assert abs(sum(after.values()) - found["rss_anon"]) < 4 * MIB


def test_the_object_allocators_account_grows_with_live_objects() -> None:
    from bench import hub_wearables_child

    before = hub_wearables_child.pymalloc_stats()
    kept = [(i, str(i)) for i in range(100_000)]
    after = hub_wearables_child.pymalloc_stats()
    assert set(before) == {"arenas", "in_blocks", "available_in_pools", "unused_pools"}
    assert after["in_blocks"] - before["in_blocks"] >= 100_000 * 48
    assert after["arenas"] > before["arenas"]
    assert len(kept) == 100_000
