"""The hub's local time zone, as an IANA name ("Europe/Berlin"), for the gateway to place the
participant's readings on their local days (protocol v3, ``tz``).

Where it comes from, first found wins:

1. ``TRIALSTREAM_HUB_TIME_ZONE``: set by whoever installs the hub when the system's own zone
   is wrong or is UTC on a box that lives elsewhere;
2. ``TZ``, when it names a zone (``Europe/Berlin`` or ``:Europe/Berlin``; a POSIX rule such
   as ``CET-1CEST`` names no zone and is skipped);
3. ``/etc/timezone`` (Debian and its kin);
4. the ``/etc/localtime`` link's target below a ``zoneinfo`` directory (systemd's
   ``timedatectl set-timezone`` makes it).

A name is taken only if it has the shape of a zone name and the system's zone database (or
Python's ``tzdata``) knows it; nothing found gives None, and the hub then says nothing of its
zone. Only names are read: nothing here follows a path the environment gives.
"""

from __future__ import annotations

import os
import re
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Final

ENV_VARIABLE: Final = "TRIALSTREAM_HUB_TIME_ZONE"
_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_+/-]{0,63}", re.ASCII)
_MAX_FILE_BYTES: Final = 256


def valid_zone(name: str) -> str | None:
    """``name`` if it is an IANA zone name that can be loaded here, else None."""
    name = name.strip()
    if _NAME.fullmatch(name) is None or ".." in name or "//" in name or name.endswith("/"):
        return None
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None
    return name


def system_time_zone(env: Mapping[str, str] | None = None, etc: Path = Path("/etc")) -> str | None:
    """The hub's zone (see the module's text), or None when nothing names one."""
    env = os.environ if env is None else env
    for raw in (env.get(ENV_VARIABLE, ""), env.get("TZ", "").removeprefix(":")):
        if raw and (zone := valid_zone(raw)) is not None:
            return zone
    try:
        with (etc / "timezone").open("rb") as f:
            text = f.read(_MAX_FILE_BYTES).decode("ascii", "replace")
    except OSError:
        pass
    else:
        if (zone := valid_zone(text)) is not None:
            return zone
    try:
        target = os.readlink(etc / "localtime")
    except OSError:
        return None
    _, found, name = target.partition("zoneinfo/")
    # A "posix/" or "right/" subtree names the same zones.
    name = name.removeprefix("posix/").removeprefix("right/")
    return valid_zone(name) if found else None
