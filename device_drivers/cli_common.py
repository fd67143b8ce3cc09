"""What the hub's command line modules share: the one user error and how a command runs
its coroutine, and the hub's state file as a command opens it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from device_drivers.errors import DeviceDriverError

if TYPE_CHECKING:
    from device_drivers.state import HubState

T = TypeVar("T")


class HubCliError(DeviceDriverError):
    """A setting, flag or file the user can fix: printed as one ``error:`` line, exit 2."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def state_of(directory: Path) -> HubState:
    from device_drivers.hub_factory import STATE_FILE
    from device_drivers.state import HubState, StateError

    try:
        return HubState.open(directory / STATE_FILE)
    except StateError as exc:
        raise HubCliError(str(exc)) from exc
