"""The hub's wall clock for stamping readings, and the backward jumps it notices.

A reading keeps the time the hub had when it arrived, even after the clock jumped (an
invented time would be worse than a repeated one); the span whose times may now occur twice
is recorded as a ``clock_jump`` gap (docs/drivers.md, "The hub's clock").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from ingest.model import Gap

log = logging.getLogger(__name__)

CLOCK_JUMP: Final = "clock_jump"
# A backwards step of the hub's wall clock larger than this is a jump. NTP daemons step a
# clock that is off by more than their threshold (chrony's packaged default: `makestep 1`,
# i.e. 1 s) and slew below it, so routine corrections stay under this; a hub whose clock
# was set by hand, lost its battery-backed time or picked up a wrong time zone moves by
# minutes to hours. Readings are at most a few per second per wearable, so a sub-2 s step
# makes no meaningful repetition.
CLOCK_JUMP_TOLERANCE_S: Final = 2.0
# Jumps noticed but not yet handed to the sink; past this many (a clock flapping back and
# forth) the newest is widened to cover the next, so none is lost and memory stays bounded.
MAX_PENDING_JUMPS: Final = 64


class HubClock:
    """The hub's wall clock for stamping readings; it notices when it jumps backwards.

    A call returns the wall time unchanged: readings keep the time the hub had, even after a
    jump (an invented time would be worse than a repeated one). A step back of more than
    ``tolerance_s`` below the latest time returned so far is remembered as a ``clock_jump``
    gap from the new time to that latest one: the span whose times may now occur twice.
    :meth:`take_jumps` hands those gaps over once (the hub's sink records them). Safe to
    call from any thread (bleak callbacks, worker threads).
    """

    def __init__(
        self,
        read: Callable[[], float] = time.time,
        *,
        tolerance_s: float = CLOCK_JUMP_TOLERANCE_S,
    ) -> None:
        if tolerance_s < 0:
            raise ValueError("tolerance_s must not be negative")
        self._read = read
        self.tolerance_s = tolerance_s
        self._lock = threading.Lock()
        self._latest: float | None = None
        self._jumps: list[Gap] = []
        self.jumps_seen = 0

    def __call__(self) -> float:
        now = self._read()
        with self._lock:
            latest = self._latest
            if latest is None or now > latest:
                self._latest = now
            elif now < latest - self.tolerance_s:
                self._latest = now
                self.jumps_seen += 1
                self._remember(Gap(int(now * 1000), int(latest * 1000), CLOCK_JUMP))
                log.warning("hub clock jumped backwards back_s=%.3f", latest - now)
        return now

    def _remember(self, gap: Gap) -> None:
        if len(self._jumps) < MAX_PENDING_JUMPS:
            self._jumps.append(gap)
            return
        last = self._jumps[-1]
        self._jumps[-1] = Gap(
            min(last.from_ms, gap.from_ms), max(last.to_ms, gap.to_ms), CLOCK_JUMP
        )

    def take_jumps(self) -> list[Gap]:
        """The jumps noticed since the last call, oldest first."""
        with self._lock:
            jumps, self._jumps = self._jumps, []
        return jumps

    def give_back(self, jumps: Sequence[Gap]) -> None:
        """Put back jumps that could not be recorded, ahead of newer ones."""
        with self._lock:
            pending, self._jumps = self._jumps, []
            for gap in [*jumps, *pending]:
                self._remember(gap)
