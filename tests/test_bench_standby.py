"""`bench standby` measures what it says: Patroni's synchronous mode really on, off and on
again around its runs (the primary's synchronous_standby_names), every envelope of each
latency run receipted, and the synchronous runs given as ratios to the asynchronous one."""

from __future__ import annotations

import pytest

from bench import standby

pytestmark = pytest.mark.slow


async def test_three_runs_on_off_on_each_fully_receipted() -> None:
    result = await standby.run(seconds=2, rate=40, commits=30, hubs=3, workers=1)
    runs = result["runs"]
    assert [r["mode"] for r in runs] == ["synchronous", "asynchronous", "synchronous"]
    assert [r["synchronous_standby_names"] != "" for r in runs] == [True, False, True]
    for r in runs:
        assert r["envelopes"] >= 40
        assert r["receipts"] == r["envelopes"]
        assert 0 < r["commit_ms"]["p50"] <= r["commit_ms"]["p99"]
    assert "ratio_to_asynchronous" not in runs[1]
    for r in (runs[0], runs[2]):
        assert r["ratio_to_asynchronous"]["commit_p50"] > 0
