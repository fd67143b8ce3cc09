"""The gateway's maintenance round: one step that fails is logged and does not hold up the
others, and what it could not handle stays for the next round."""

from __future__ import annotations

import logging

import pytest

from gateway.web import _maintenance_round
from storage import db, sessions
from storage.migrate import StorageMode
from tests.alerts.test_engine import rows
from tests.fixtures.trial import Trial

SLOT = "('{P1}', '{heart_rate}', '{1}', '{1}', '{0}', '{%s}')"


async def test_a_failing_step_is_logged_and_the_next_steps_run(
    trial: Trial,
    storage_mode: StorageMode,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    purges: list[int] = []

    async def purge(conn: db.Conn) -> int:
        purges.append(1)
        return 0

    monkeypatch.setattr(sessions, "purge_expired", purge)
    async with db.connection(trial.url, autocommit=True) as conn:
        # A delta no slot can hold (a minute map wider than 15 bits): adherence refuses it.
        await conn.execute(f"INSERT INTO adherence_deltas VALUES {SLOT % 40000}")
        with caplog.at_level(logging.ERROR, logger="gateway.web"):
            await _maintenance_round(conn, storage_mode, 0)
        assert "web maintenance: adherence failed" in caplog.text
        assert "CheckViolation" in caplog.text
        # The sessions' purge, after it, ran (round 0 purges); the delta waits, untouched.
        assert purges == [1]
        assert await rows(trial.url, "SELECT count(*) FROM adherence_deltas") == [(1,)]
        # Once fixed (here: the row taken away and a good one added), the next round merges.
        await conn.execute("DELETE FROM adherence_deltas")
        await conn.execute(f"INSERT INTO adherence_deltas VALUES {SLOT % 1}")
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="gateway.web"):
            await _maintenance_round(conn, storage_mode, 1)
    assert caplog.text == ""
    assert await rows(trial.url, "SELECT readings, minutes FROM adherence_slots") == [(1, 1)]
