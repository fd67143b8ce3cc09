"""argon2 runs in a helper process at the lowest CPU priority, and that process ends with the
one it hashes for, even when that one is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from gateway.processes import alive, attempts
from storage import users

_CHILD = """
import asyncio, os, sys
from storage import users

async def main() -> None:
    pid = await users.hash_off_loop(os.getpid)
    niceness = await users.hash_off_loop(os.nice, 0)
    print(pid, niceness, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_hashes_run_niced_in_another_process() -> None:
    pid = await users.hash_off_loop(os.getpid)
    assert pid != os.getpid()
    assert await users.hash_off_loop(os.nice, 0) == users.HASH_NICENESS
    assert os.nice(0) < users.HASH_NICENESS  # this process keeps its priority


def test_the_hashing_process_ends_when_its_parent_is_killed() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the killed process's resource tracker warns of leaks
        text=True,
        cwd=os.getcwd(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        hashing_pid, niceness = (int(v) for v in line.split())
        assert niceness == users.HASH_NICENESS
        assert alive(hashing_pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for _ in attempts(5.0, 0.1):
            if not alive(hashing_pid):
                break
        assert not alive(hashing_pid), "the hashing process outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _hash_once_then_stop() -> None:
    import asyncio

    asyncio.run(users.hash_off_loop(os.getpid))
    users.stop_hashing()


def test_a_process_started_by_multiprocessing_exits_once_it_stops_hashing() -> None:
    # A gateway worker is such a process: without stop_hashing it waits at its exit, for
    # ever, for the hashing processes it started.
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=_hash_once_then_stop)
    proc.start()
    proc.join(30)
    try:
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
