"""`bench adherence` measures what it says: its baseline rounds store readings without
adherence, its rounds with adherence are counted by the refresh it times, and its cohort
answers are the real ones."""

from __future__ import annotations

from bench import adherence as adherence_bench
from bench.common import Progress
from tests.alerts.test_engine import rows


async def test_the_rounds_with_and_without_adherence_differ_only_in_adherence(
    empty_database_url: str,
) -> None:
    from storage import db
    from storage.migrate import migrate

    url = empty_database_url
    async with db.connection(url, autocommit=True) as conn:
        await migrate(conn)
    ids = await adherence_bench._seed(url, 20, 5, Progress(None))
    (seeded,) = await rows(url, "SELECT sum(readings) FROM adherence_days")
    result = await adherence_bench._ingest(url, ids, 600, 1, Progress(None))
    per_round = 10 * result["batch_readings"]
    # Both rounds stored their readings; only the round with adherence was counted.
    assert await rows(url, "SELECT count(*) FROM readings") == [(2 * per_round,)]
    assert await rows(url, "SELECT sum(readings) FROM adherence_days") == [(seeded[0] + per_round,)]
    assert result["ratio_with_to_without"] > 0
    cohort = await adherence_bench._cohort(url, ids, 5, 2)
    assert cohort["cells"] == 20 * 5
    assert cohort["answer_ms_median"] > 0
