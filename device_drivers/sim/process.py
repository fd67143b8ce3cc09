"""A virtual radio in a child process, its hub's controller reached over HCI on loopback.

A real hub is split between its Bluetooth controller (a dongle doing the radio work) and the
host stack that talks HCI to it. :class:`RadioProcess` splits the simulation the same way:
a child process runs a :class:`~device_drivers.sim.link.VirtualRadio` with the wearables
and one controller served over a TCP HCI transport
(:meth:`~device_drivers.sim.link.VirtualRadio.add_remote_host_controller`); the hub's
process runs only the host side (:meth:`~device_drivers.sim.backend.SimAdapter.connect_hci`),
so what the hub costs can be measured apart from the radio simulation::

    strap = functools.partial(VirtualHeartRateStrap, "TS-HRM-0001", seed=7)
    async with RadioProcess([strap], hci_port=free_port()) as radio:
        adapter = await SimAdapter.connect_hci(radio.hci_spec)
        ...  # bleak with adapter.client_backend, to radio.addresses[0]
        await adapter.close()

Wearables are given as factories (a class, or a ``functools.partial`` of one) because they
are built in the child: the child is spawned, not forked, so the hub's event loop and
threads are not copied into it, and the factories travel by pickling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Final, Self

from device_drivers.sim.link import SimError, VirtualRadio
from device_drivers.sim.wearable import VirtualWearable

logger = logging.getLogger(__name__)

WearableFactory = Callable[[], VirtualWearable]

# The child imports bumble and bleak afresh (a second or two on a loaded 2-core machine)
# before its wearables advertise; a minute leaves room for a busy machine without hanging.
START_WITHIN_S: Final = 60.0
# A radio closes in well under a second; past this the child is terminated, then killed.
STOP_WITHIN_S: Final = 10.0
# How often the parent looks for the child's ready message (it must not block its loop).
_POLL_S: Final = 0.05


class RadioProcessError(SimError):
    """The radio's child process failed to start, or died before it was ready."""


@dataclass(frozen=True, slots=True)
class _Ready:
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Failed:
    error: str


class RadioProcess:
    """Wearables and a hub's controller on a virtual radio in a child process.

    Use as an async context manager (or :meth:`start` / :meth:`stop`). Stopping closes the
    pipe to the child, which closes its radio and exits; a child that does not is
    terminated, then killed, and always joined.
    """

    def __init__(
        self,
        wearables: Sequence[WearableFactory],
        *,
        hci_port: int,
        host: str = "127.0.0.1",
        start_within: float = START_WITHIN_S,
    ) -> None:
        """
        Args:
            wearables: picklable factories of the wearables to run, in order.
            hci_port: TCP port the controller serves HCI on (pick a free one).
            host: address the controller listens on; loopback keeps it private.
        """
        self._wearables = tuple(wearables)
        self._host = host
        self._port = hci_port
        self._start_within = start_within
        self._process: BaseProcess | None = None
        self._pipe: Connection | None = None
        self._addresses: tuple[str, ...] = ()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def hci_spec(self) -> str:
        """The bumble transport name the hub connects to the controller with."""
        return f"tcp-client:{self._host}:{self._port}"

    @property
    def addresses(self) -> tuple[str, ...]:
        """The wearables' addresses, in the order of their factories."""
        return self._addresses

    @property
    def pid(self) -> int:
        """The child's process id (to measure its CPU use from outside)."""
        if self._process is None or self._process.pid is None:
            raise RadioProcessError("the radio process is not running")
        return self._process.pid

    async def start(self) -> None:
        """Spawn the child and wait until its controller listens and its wearables advertise."""
        if self._process is not None:
            raise RadioProcessError("the radio process is already running")
        context = multiprocessing.get_context("spawn")
        self._pipe, child_pipe = context.Pipe()
        self._process = context.Process(
            target=serve_radio,
            args=(child_pipe, self._wearables, f"tcp-server:{self._host}:{self._port}"),
            name="virtual-radio",
            daemon=True,
        )
        try:
            self._process.start()
            child_pipe.close()
            self._addresses = await self._wait_until_ready(self._process, self._pipe)
        except BaseException:
            child_pipe.close()
            await self.stop()
            raise
        logger.debug("radio process up pid=%s port=%s", self._process.pid, self._port)

    async def stop(self) -> None:
        """Stop the child (gracefully if it can) and join it; a no-op when not running."""
        process, pipe = self._process, self._pipe
        self._process = self._pipe = None
        if pipe is not None:
            pipe.close()  # the child's end sees EOF: its signal to close the radio
        if process is None:
            return
        if process.pid is not None:
            await _join(process)
        process.close()

    async def _wait_until_ready(self, process: BaseProcess, pipe: Connection) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_within
        while not pipe.poll():
            if not process.is_alive():
                raise RadioProcessError(f"the radio process exited (code {process.exitcode})")
            if loop.time() > deadline:
                raise RadioProcessError(f"the radio was not ready within {self._start_within} s")
            await asyncio.sleep(_POLL_S)
        try:
            message = pipe.recv()
        except EOFError as error:
            raise RadioProcessError("the radio process exited before it was ready") from error
        if isinstance(message, _Failed):
            raise RadioProcessError(f"the radio failed to start: {message.error}")
        if not isinstance(message, _Ready):
            raise RadioProcessError(f"unexpected message from the radio process: {message!r}")
        return message.addresses


async def _join(process: BaseProcess) -> None:
    """Join ``process``: let it exit, else terminate it, else kill it."""
    for end in (None, process.terminate, process.kill):
        if end is not None:
            end()
        await asyncio.to_thread(process.join, STOP_WITHIN_S)
        if not process.is_alive():
            return
    raise RadioProcessError(f"the radio process {process.pid} survived SIGKILL")


def serve_radio(pipe: Connection, wearables: Sequence[WearableFactory], spec: str) -> None:
    """The child's entry point: run the radio until the parent closes its end of ``pipe``."""
    asyncio.run(_serve(pipe, wearables, spec))


async def _serve(pipe: Connection, wearables: Sequence[WearableFactory], spec: str) -> None:
    try:
        async with VirtualRadio() as radio, contextlib.AsyncExitStack() as stack:
            await radio.add_remote_host_controller(spec)
            started = [
                await stack.enter_async_context(factory().running(radio)) for factory in wearables
            ]
            pipe.send(_Ready(tuple(w.address for w in started)))
            await asyncio.to_thread(_wait_for_eof, pipe)
    except Exception as error:
        with contextlib.suppress(OSError):  # the parent may be gone already
            pipe.send(_Failed(f"{type(error).__name__}: {error}"))
        raise
    finally:
        pipe.close()


def _wait_for_eof(pipe: Connection) -> None:
    """Block until the parent closes its end (it sends nothing else)."""
    with contextlib.suppress(EOFError, OSError):
        while True:
            pipe.recv()
