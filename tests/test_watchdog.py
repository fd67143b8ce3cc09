"""The suite's time limit: a test that hangs fails alone and says where it waited."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from tests.fixtures.watchdog import write_report

ROOT = Path(__file__).resolve().parent.parent


async def _parked(gate: asyncio.Event) -> None:
    await gate.wait()


async def test_report_names_each_thread_and_each_pending_tasks_innermost_await() -> None:
    gate = asyncio.Event()
    task = asyncio.create_task(_parked(gate), name="parked-task")
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="parked-thread", daemon=True)
    thread.start()
    await asyncio.sleep(0)
    out = io.StringIO()
    try:
        # From another thread, as the timer writes it: this loop is found while it runs.
        await asyncio.to_thread(write_report, "tests/x.py::test_y", 7.0, out)
    finally:
        release.set()
        gate.set()
        await task
        thread.join()
    text = out.getvalue()
    assert "TIMEOUT: tests/x.py::test_y ran past 7 s" in text
    assert "--- thread parked-thread" in text
    assert "task parked-task" in text
    assert "awaits _parked at" in text
    assert "awaits Event.wait at" in text


def test_a_hanging_test_under_xdist_fails_alone_with_its_awaits_on_the_runs_output(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_hangs.py").write_text(
        textwrap.dedent(
            """
            import asyncio

            async def stuck_here():
                await asyncio.Event().wait()

            async def test_hangs():
                await stuck_here()

            def test_passes():
                pass
            """
        )
    )
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "timeout = 3\ntimeout_method = thread\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.fixtures.watchdog", "-p", "no:cacheprovider",
         "-n", "1", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "TIMEOUT: test_hangs.py::test_hangs ran past 3 s" in output, output
    assert "awaits stuck_here at" in output, output
    assert "1 failed, 1 passed" in output, output
