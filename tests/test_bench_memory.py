"""`bench memory` end to end with a tiny flood: a real gateway worker, a private Mosquitto and
a scratch database; every envelope published is stored, and the result has what
docs/performance.md reads from it. No timing is asserted."""

from __future__ import annotations

from bench import memory as memory_bench
from ingest.envelope import MAX_ENVELOPE_BYTES
from tests.fixtures.postgres import PgServer


async def test_a_tiny_flood_stores_every_envelope_and_reports_the_worker_memory(
    pg_server: PgServer,
) -> None:
    result = await memory_bench.run(
        pg_server.admin_url, envelopes=4, ordinary_envelopes=40, hubs=2, idle_s=0.5
    )

    assert result["benchmark"] == "memory"
    assert {"machine", "postgresql", "method", "limits", "floods", "summary"} <= result.keys()
    assert set(result["floods"]) == {"large", "ordinary"}
    for kind, per_envelope, envelopes in (("large", 1000, 4), ("ordinary", 10, 40)):
        flood = result["floods"][kind]
        assert flood["readings_per_envelope"] == per_envelope
        assert flood["envelopes_published"] == envelopes
        assert flood["envelopes_stored"] == flood["envelopes_published"]
        assert flood["readings_stored"] == envelopes * per_envelope
        assert flood["readings_in_envelope_rows"] == envelopes * per_envelope
        assert flood["readings_refused"] == 0
        assert flood["envelopes_rejected"] == 0
        assert flood["all_stored"] is True
        assert flood["worker_restarted"] is False
        rss = flood["worker_rss_mib"]
        assert {"idle", "peak", "peak_hwm", "steady", "after"} <= rss.keys()
        assert all(rss[k] is not None and rss[k] > 0 for k in ("idle", "peak", "peak_hwm"))
        assert flood["timeline_s_mib_stored"][-1][2] == envelopes

    large = result["floods"]["large"]
    assert large["envelope_bytes_max"] <= MAX_ENVELOPE_BYTES
    assert large["envelope_bytes_mean"] > MAX_ENVELOPE_BYTES / 2
    assert result["limits"]["max_unacked_bytes_mib"] > 0
    summary = result["summary"]
    assert summary["all_stored"] is True
    for key in (
        "large_peak_mib",
        "idle_mib",
        "ordinary_peak_mib",
        "peak_to_idle",
        "peak_to_ordinary_peak",
        "idle_plus_budget_mib",
        "peak_above_idle_mib",
    ):
        assert summary[key] is not None, key
