"""What every benchmark records beside its figures: the machine and the software."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterable
from typing import Any, TextIO

import psutil  # type: ignore[import-untyped]


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class Progress:
    """One line per step on stderr, with the time since start: long work shows it is alive."""

    def __init__(self, out: TextIO | None) -> None:
        self._out = out
        self._t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self._out is not None:
            print(f"[{time.perf_counter() - self._t0:7.1f}s] {message}", file=self._out, flush=True)


def cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    """User + system CPU time these processes have used so far (one that is gone counts 0)."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += float(times.user + times.system)
    return total
