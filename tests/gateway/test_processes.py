"""`attempts` and `until`: the readiness loops of the tools that start servers (the first on a
clock of its own)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway import processes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(processes, "time", clock)
    return clock


def test_the_first_attempt_is_at_once_and_a_check_that_passes_ends_the_loop(clock: Clock) -> None:
    seen = []
    for n in processes.attempts(10.0, 0.5):
        seen.append((n, clock.now))
        if n == 2:
            break
    else:
        pytest.fail("the loop ended as a timeout")
    assert seen == [(0, 100.0), (1, 100.5), (2, 101.0)]


def test_a_check_that_never_passes_ends_in_the_else_once_past_the_bound(clock: Clock) -> None:
    tried = list(processes.attempts(1.0, 0.3))
    # at 0, 0.3, 0.6, 0.9 within the bound, and once more at 1.2: the first to end past it
    assert tried == [0, 1, 2, 3, 4]
    assert clock.now == pytest.approx(101.2)
    assert clock.slept == [0.3] * 4


def test_an_attempt_that_itself_takes_long_is_the_last(clock: Clock) -> None:
    tried = []
    for n in processes.attempts(5.0, 0.2):
        tried.append(n)
        clock.now += 6.0  # one slow check uses up the whole bound
    assert tried == [0]
    assert clock.slept == []


def test_a_process_is_alive_until_it_ends_and_a_zombie_counts_as_ended() -> None:
    import os
    import subprocess
    import sys

    assert processes.alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert processes.alive(child.pid)
        child.kill()
        # ended but not reaped: a zombie until wait(); the signal alone says it exists
        for _ in processes.attempts(10.0, 0.05):
            if not processes.alive(child.pid):
                break
        else:
            pytest.fail("a killed child still counts as alive")
        os.kill(child.pid, 0)  # still there as a zombie
    finally:
        child.kill()
        child.wait()
    assert not processes.alive(child.pid)


def test_a_broker_that_exits_at_start_says_why(tmp_path: Path) -> None:
    """Mosquitto refusing its configuration exits at once: the start says so with the error
    from its output, instead of waiting out its bound."""
    import shutil

    from gateway.broker import DEPLOY_DIR, MosquittoBroker
    from gateway.errors import BrokerError

    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY_DIR, deploy)
    with (deploy / "mosquitto.conf").open("a", encoding="utf-8") as conf:
        conf.write("\nno_such_option true\n")
    broker = MosquittoBroker(tmp_path / "mosquitto", deploy_dir=deploy)
    with pytest.raises(BrokerError, match=r"mosquitto exited with status \d+: .*no_such_option"):
        broker.start(timeout=20)


async def test_until_returns_once_ready_and_lets_other_tasks_run() -> None:
    ticks: list[int] = []

    async def other() -> None:
        for n in range(100):
            ticks.append(n)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(other())
    checks = []

    def ready() -> bool:
        checks.append(len(ticks))
        return len(checks) == 3

    await processes.until(ready, "three looks", within=5.0, every=0.02)
    task.cancel()
    assert len(checks) == 3
    assert checks[0] < checks[2]  # the other task ran while it waited


async def test_until_names_what_did_not_happen_once_its_time_is_up() -> None:
    loop = asyncio.get_running_loop()
    looks = 0

    def never() -> bool:
        nonlocal looks
        looks += 1
        return False

    start = loop.time()
    with pytest.raises(TimeoutError, match=r"not within 0.1 s: the relay connected"):
        await processes.until(never, "the relay connected", within=0.1, every=0.02)
    assert loop.time() - start >= 0.1
    assert looks >= 3


async def test_until_awaits_a_check_that_is_a_coroutine() -> None:
    looks = 0

    async def ready() -> bool:
        nonlocal looks
        looks += 1
        await asyncio.sleep(0)
        return looks == 2

    await processes.until(ready, "two looks", within=5.0, every=0.01)
    assert looks == 2
    with pytest.raises(TimeoutError, match=r"not within 0\.05 s: never"):
        await processes.until(_never_async, "never", within=0.05, every=0.01)


async def _never_async() -> bool:
    return False
