"""`bench storage` measures what it says: its rollup refresh timings come from rollups that
end up equal to what the readings give."""

from __future__ import annotations

import pytest

from bench import storage as storage_bench
from bench.common import Progress
from storage import db


@pytest.mark.plain_only(
    "bench storage times plain mode's rollup refresh; TimescaleDB keeps a continuous aggregate"
)
async def test_rollup_refresh_benchmark_times_both_methods_and_checks_the_result(
    database_url: str,
) -> None:
    result = await storage_bench._rollups(database_url, 200, Progress(None))
    assert result["rollups_agree_with_readings"] is True
    assert result["merge_ms_median"] > 0
    assert result["baseline_recompute_ms_median"] > 0
    async with db.connection(database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM readings")
        row = await cur.fetchone()
    expected = storage_bench.ROLLUP_PARTICIPANTS * (
        200 + storage_bench.ROLLUP_ROUNDS * 2 * storage_bench.READINGS_PER_ENVELOPE
    )
    assert row == (expected,)
