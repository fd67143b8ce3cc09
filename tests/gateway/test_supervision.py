"""A dead consumer never leaves a worker that looks alive: the app reports the death to its
runner, the worker exits with ``EXIT_CONSUMER_DIED``, and the supervisor starts it again
after a backoff, telling the new worker how many times its slot was restarted.

Against the real PostgreSQL and a test-started Mosquitto. The consumer's death is caused
in the consumer itself (its ``run`` ends with an error); nothing else is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import CONSUMER, ConsumerFactory, TaskDied, create_app
from gateway.broker import MosquittoBroker, free_port
from gateway.consumer import Consumer
from gateway.demo import ConsumerStopped, _unless_died
from gateway.errors import GatewayError
from gateway.serve import (
    EXIT_CONSUMER_DIED,
    RESTART_BACKOFF_MAX_S,
    RESTART_BACKOFF_MIN_S,
    RESTART_RESET_AFTER_S,
    dump_tasks,
    next_backoff,
)
from gateway.settings import Settings
from tests.fixtures.gateway import METRICS_HEADERS, gateway_env, gateway_settings
from tests.fixtures.waiting import wait_until

RESTARTS_METRIC = "trialstream_worker_restarts_total"
Client = TestClient[web.Request, web.Application]


def dying_consumer(die: asyncio.Event) -> ConsumerFactory:
    """The real consumer, until ``die`` is set: then its ``run`` ends with an error, as a
    bug in it would."""

    class DyingConsumer(Consumer):
        async def run(self) -> None:
            consuming = asyncio.create_task(super().run())
            try:
                await die.wait()
            finally:
                consuming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consuming
            raise RuntimeError("the consumer broke")

    return DyingConsumer


@contextlib.asynccontextmanager
async def serving(settings: Settings, **kwargs: Any) -> AsyncIterator[Client]:
    client: Client = TestClient(TestServer(create_app(settings, **kwargs)))
    await client.start_server()
    try:
        async with asyncio.timeout(15):
            await client.app[CONSUMER].wait_subscribed()
        yield client
    finally:
        await client.close()


async def health(client: Client) -> tuple[int, dict[str, Any]]:
    response = await client.get("/healthz")
    return response.status, await response.json()


# --- the app ---------------------------------------------------------------------------------


async def test_a_consumer_that_dies_calls_on_fatal_and_healthz_says_so(
    database_url: str, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    die = asyncio.Event()
    fatal: list[TaskDied] = []
    settings = gateway_settings(database_url, mosquitto, tmp_path / "gateway")
    async with serving(
        settings, on_fatal=fatal.append, consumer_factory=dying_consumer(die)
    ) as client:

        async def healthy() -> bool:
            return (await health(client))[0] == 200

        await wait_until(healthy, "healthz 200 while the consumer runs", within=10)
        assert fatal == []

        die.set()
        await wait_until(lambda: bool(fatal), "on_fatal after the consumer died", within=5)
        assert len(fatal) == 1
        assert fatal[0].exit_code == EXIT_CONSUMER_DIED == 3
        assert fatal[0].task == "mqtt-consumer-0"
        assert isinstance(fatal[0].error, RuntimeError)
        # Until its runner stops it, the worker says it is not ingesting.
        status, body = await health(client)
        assert status == 503
        assert body["consumer"] is False
        assert body["status"] == "unavailable"
    assert len(fatal) == 1  # the stop that follows is no second death


async def test_healthz_and_metrics_report_the_slots_restarts(
    database_url: str, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    fatal: list[TaskDied] = []
    settings = gateway_settings(database_url, mosquitto, tmp_path / "gateway")
    async with serving(
        settings, worker=2, on_fatal=fatal.append, restarts=4, last_exit_code=EXIT_CONSUMER_DIED
    ) as client:

        async def healthy() -> bool:
            return (await health(client))[0] == 200

        await wait_until(healthy, "healthz 200", within=10)
        _, body = await health(client)
        assert body["restarts"] == 4
        assert body["last_exit_code"] == EXIT_CONSUMER_DIED
        # The fields that were there before are still there.
        assert {"database", "mqtt", "consumer", "storage_mode", "status"} <= set(body)
        text = await (await client.get("/metrics", headers=METRICS_HEADERS)).text()
        assert (
            f"# HELP {RESTARTS_METRIC} Times this worker slot was started again after dying."
            in text
        )
        assert f"# TYPE {RESTARTS_METRIC} counter" in text
        assert f'{RESTARTS_METRIC}{{worker="2"}} 4' in text.splitlines()
    # An orderly stop cancels the consumer: that is not a death.
    assert fatal == []


async def test_a_first_start_reports_no_restarts(
    database_url: str, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    settings = gateway_settings(database_url, mosquitto, tmp_path / "gateway")
    async with serving(settings) as client:
        _, body = await health(client)
        assert (body["restarts"], body["last_exit_code"]) == (0, None)
        text = await (await client.get("/metrics", headers=METRICS_HEADERS)).text()
        assert f'{RESTARTS_METRIC}{{worker="0"}} 0' in text.splitlines()


# --- the demo, which runs the app in its own process ----------------------------------------


async def test_the_demo_stops_with_one_line_when_the_consumer_dies() -> None:
    died: asyncio.Future[TaskDied] = asyncio.get_running_loop().create_future()
    watching = asyncio.Event()
    cancelled = asyncio.Event()

    async def watch() -> None:
        watching.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    async def die_soon() -> None:
        await watching.wait()
        died.set_result(
            TaskDied(EXIT_CONSUMER_DIED, "mqtt-consumer-0", RuntimeError("broke\non two lines"))
        )

    dying = asyncio.create_task(die_soon())
    with pytest.raises(ConsumerStopped) as raised:
        async with asyncio.timeout(5):
            await _unless_died(watch(), died)
    await dying
    assert cancelled.is_set()
    assert str(raised.value) == (
        "the gateway's mqtt-consumer-0 task died (RuntimeError: broke on two lines);"
        " the demo stopped"
    )
    assert isinstance(raised.value, GatewayError)  # the CLI prints it as one error: line


async def test_the_demo_ends_normally_while_the_consumer_lives() -> None:
    died: asyncio.Future[TaskDied] = asyncio.get_running_loop().create_future()
    ran: list[bool] = []

    async def watch() -> None:
        ran.append(True)

    await _unless_died(watch(), died)
    assert ran == [True]


# --- the backoff -----------------------------------------------------------------------------


async def dump_of_parked(
    parked: Callable[[asyncio.Event], Coroutine[object, object, None]], name: str
) -> str:
    """What dump_tasks writes while a task runs ``parked`` on an event never set."""
    task = asyncio.create_task(parked(asyncio.Event()), name=name)
    await asyncio.sleep(0.01)
    out = io.StringIO()
    try:
        dump_tasks(out)
    finally:
        task.cancel()
    return out.getvalue()


async def test_dump_tasks_names_every_pending_task_and_the_innermost_await() -> None:
    async def innermost(never: asyncio.Event) -> None:
        await never.wait()

    async def outer(never: asyncio.Event) -> None:
        await innermost(never)

    text = await dump_of_parked(outer, "stuck-cleanup")
    assert "asyncio task(s) still pending" in text
    assert "task stuck-cleanup" in text
    assert ".<locals>.innermost at " in text
    assert "Event.wait" in text


async def test_dump_tasks_follows_an_await_into_async_generators() -> None:
    # An async context manager's exit and an `async for` await an async generator's step,
    # which has no frame of its own: the chain goes on inside the generator.
    async def ticks(never: asyncio.Event) -> AsyncIterator[int]:
        yield 1
        await never.wait()
        yield 2

    @contextlib.asynccontextmanager
    async def resource(never: asyncio.Event) -> AsyncIterator[None]:
        yield
        async for _ in ticks(never):
            pass

    async def cleanup(never: asyncio.Event) -> None:
        async with resource(never):
            pass

    text = await dump_of_parked(cleanup, "stuck-in-a-generator")
    assert "awaits _AsyncGeneratorContextManager.__aexit__" in text
    assert ".<locals>.resource at " in text
    assert ".<locals>.ticks at " in text
    assert "awaits Event.wait" in text


def test_the_restart_backoff_doubles_from_1_s_to_a_60_s_cap() -> None:
    waits: list[float] = []
    previous: float | None = None
    for _ in range(9):
        previous = next_backoff(previous, uptime=0.5)
        waits.append(previous)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert (RESTART_BACKOFF_MIN_S, RESTART_BACKOFF_MAX_S) == (1.0, 60.0)


def test_the_restart_backoff_starts_afresh_after_60_s_up() -> None:
    assert RESTART_RESET_AFTER_S == 60.0
    assert next_backoff(32.0, uptime=59.9) == 60.0
    assert next_backoff(32.0, uptime=60.0) == 1.0
    assert next_backoff(60.0, uptime=3600.0) == 1.0
    assert next_backoff(None, uptime=0.0) == 1.0


# --- the supervisor, as a process ------------------------------------------------------------

# Runs the supervisor (``serve.run``) with a consumer whose first ``DIE_TIMES`` lives end
# with an error. The supervisor's workers are spawned: each imports this file again (as
# ``__mp_main__``), so each gets the same consumer.
SUPERVISOR_SCRIPT = """
import asyncio
import os
import threading
from pathlib import Path

import gateway.app
from gateway import serve
from gateway.consumer import Consumer
from gateway.demo import ConsumerStopped, _unless_died
from gateway.errors import GatewayError
from gateway.settings import Settings

DEATHS = Path(os.environ["TEST_DEATHS_FILE"])
DIE_TIMES = int(os.environ["TEST_DIE_TIMES"])
# With TEST_HANG_ON_EXIT, a dying life also leaves a thread that never ends (a worker that
# cannot finish stopping), and workers get TEST_STOP_DEADLINE_S to stop.
HANG_ON_EXIT = bool(os.environ.get("TEST_HANG_ON_EXIT"))
# With TEST_HANG_IN_CLEANUP, the app's cleanup awaits something that never comes.
HANG_IN_CLEANUP = bool(os.environ.get("TEST_HANG_IN_CLEANUP"))
serve.WORKER_STOP_DEADLINE_S = float(
    os.environ.get("TEST_STOP_DEADLINE_S", serve.WORKER_STOP_DEADLINE_S)
)
_run = Consumer.run


def hang_forever():
    threading.Event().wait()


async def run_or_die(self):
    died = len(DEATHS.read_text()) if DEATHS.exists() else 0
    if died < DIE_TIMES:
        with DEATHS.open("a") as f:
            f.write("x")
        if HANG_ON_EXIT:
            threading.Thread(target=hang_forever, name="never-ends").start()
        raise RuntimeError("injected: this life of the consumer ends here")
    await _run(self)


Consumer.run = run_or_die


async def cleanup_that_never_ends(app):
    await asyncio.Event().wait()


def create_app_hanging_in_cleanup(*args, **kwargs):
    app = _create_app(*args, **kwargs)
    app.on_cleanup.append(cleanup_that_never_ends)
    return app


if HANG_IN_CLEANUP:
    _create_app = gateway.app.create_app
    gateway.app.create_app = create_app_hanging_in_cleanup

if __name__ == "__main__":
    raise SystemExit(serve.run(Settings.from_env(os.environ), 1))
"""


def get(port: int, path: str) -> tuple[int, str]:
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=METRICS_HEADERS)
        with urllib.request.urlopen(request, timeout=1) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for_health(
    proc: subprocess.Popen[str], port: int, *, restarts: int, within: float
) -> dict[str, Any]:
    """The worker's /healthz body once it answers 200 with ``restarts``."""
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the supervisor exited"
        with contextlib.suppress(OSError):
            status, text = get(port, "/healthz")
            body = json.loads(text)
            last = (status, body)
            if status == 200 and body["restarts"] == restarts:
                return dict(body)
        time.sleep(0.1)
    raise AssertionError(f"not within {within:.0f} s: healthz 200 with {restarts=}; last {last}")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGINT, as Ctrl-C; the exit status and what the supervisor logged."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


Launch = Callable[..., tuple[subprocess.Popen[str], int]]


@pytest.fixture
def supervisor(database_url: str, mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[Launch]:
    """Starts ``serve.run`` with one worker whose consumer dies in its first ``die_times``
    lives, then lives; the process and its HTTP port."""
    launched: list[subprocess.Popen[str]] = []

    def launch(die_times: int, **more_env: str) -> tuple[subprocess.Popen[str], int]:
        script = tmp_path / "supervise.py"
        script.write_text(SUPERVISOR_SCRIPT)
        port = free_port()
        env = gateway_env(database_url, mosquitto, tmp_path / "gw", port)
        env.update({"TEST_DEATHS_FILE": str(tmp_path / "deaths"), "TEST_DIE_TIMES": str(die_times)})
        env.update(more_env)
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        launched.append(proc)
        return proc, port

    try:
        yield launch
    finally:
        for proc in launched:
            if proc.poll() is None:
                # Shown with a failing test: what the supervisor and its workers said (a
                # worker stuck stopping writes its threads' stacks there).
                print(f"supervisor stderr:\n{stop(proc)[1][-20000:]}")


@pytest.mark.slow
def test_a_worker_whose_consumer_dies_exits_3_and_is_started_again(supervisor: Launch) -> None:
    proc, port = supervisor(1)
    body = wait_for_health(proc, port, restarts=1, within=14)
    assert body["last_exit_code"] == EXIT_CONSUMER_DIED
    assert body["consumer"] is True
    status, text = get(port, "/metrics")
    assert status == 200
    assert f'{RESTARTS_METRIC}{{worker="0"}} 1' in text.splitlines()
    code, err = stop(proc)
    assert code == 0, err
    # The error, with its traceback, once; the worker's reason to stop; the restart.
    assert err.count("RuntimeError: injected: this life of the consumer ends here") == 1
    assert err.count("Traceback") == 1
    assert f"stopping with exit code {EXIT_CONSUMER_DIED}" in err
    assert "worker 0 exited with code 3 (consumer died)" in err
    assert "restart 1 in 1 s" in err


@pytest.mark.slow
def test_a_worker_that_cannot_finish_stopping_shows_its_stacks_exits_and_starts_again(
    supervisor: Launch,
) -> None:
    """A thread that never ends held a stopping worker forever: no consumer in its slot and
    no restart. Past its deadline it writes every thread's stack and exits."""
    proc, port = supervisor(1, TEST_HANG_ON_EXIT="1", TEST_STOP_DEADLINE_S="2")
    body = wait_for_health(proc, port, restarts=1, within=20)
    assert body["last_exit_code"] == 1
    assert body["consumer"] is True
    code, err = stop(proc)
    assert code == 0, err
    assert "Timeout (0:00:02)!" in err
    assert "in hang_forever" in err  # the stuck thread's stack, to say what held it
    assert "worker 0 exited with code 1 after" in err


@pytest.mark.slow
def test_a_worker_whose_cleanup_awaits_forever_shows_what_it_awaits_and_starts_again(
    supervisor: Launch,
) -> None:
    """A cleanup that awaits forever leaves only the event loop's select in the threads'
    stacks; the pending tasks' stacks, written before the deadline, name the await."""
    proc, port = supervisor(1, TEST_HANG_IN_CLEANUP="1", TEST_STOP_DEADLINE_S="3")
    body = wait_for_health(proc, port, restarts=1, within=20)
    assert body["last_exit_code"] == 1
    _, err = stop(proc)
    # The second life hangs in its cleanup too: the supervisor's stop still ends it.
    assert "asyncio task(s) still pending" in err
    assert "awaits cleanup_that_never_ends at" in err
    assert "worker 0 exited with code 1 after" in err


@pytest.mark.slow
def test_the_supervisor_doubles_its_wait_and_stops_at_once_during_it(
    supervisor: Launch,
) -> None:
    proc, _ = supervisor(99)
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    # The second death noticed: the supervisor now waits 2 s before the third life. (Waiting
    # for its own line, not a fixed time: a worker's exit takes longer on a loaded machine.)
    deadline = time.monotonic() + 20
    while not any("restart 2 in 2 s" in line for line in lines):
        assert proc.poll() is None, "the supervisor exited"
        assert time.monotonic() < deadline, f"no second restart planned: {''.join(lines)}"
        time.sleep(0.02)
    asked = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=20)
    stopped_after = time.monotonic() - asked
    reader.join(timeout=5)
    proc.stderr.close()
    err = "".join(lines)
    assert stopped_after < 1.0, err
    assert code == 0, err
    assert "restart 1 in 1 s" in err
    assert "restart 3" not in err


@pytest.mark.slow
def test_a_killed_worker_is_started_again_and_says_how_the_last_one_ended(
    database_url: str, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    env = gateway_env(database_url, mosquitto, tmp_path / "gw", port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "gateway", "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_health(proc, port, restarts=0, within=10)
        workers = [
            c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())
        ]
        assert len(workers) == 1
        os.kill(workers[0].pid, signal.SIGKILL)
        body = wait_for_health(proc, port, restarts=1, within=10)
        assert body["last_exit_code"] == -signal.SIGKILL
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "worker 0 exited with code -9 (SIGKILL)" in err
