"""The hub's own state file: the wearables it has paired, and per-sensor cursors.

One JSON document, rewritten whole on every change through a temporary file, ``fsync`` and
``os.replace`` (then ``fsync`` of the folder), so a crash leaves either the old or the new
document, never half of one. Several processes share it (the running hub, and ``pair`` or
``unpair`` at the command line): each change takes an exclusive lock on a file beside it
(``.state.json.lock``, ``flock``), reads the document again, makes its change on what it
read and writes it, so no process overwrites what another wrote. A process sees another's
changes at its own next change (or when it opens the file).

The bond keys themselves belong to the Bluetooth stack (BlueZ keeps them under
/var/lib/bluetooth); this file says which wearables the hub paired, under which sensor name
and profile, and whether a bond was made.

Cursors are small integers a driver keeps per sensor, such as the last glucose record
sequence number whose readings are durable in the outbox: a driver advances one only after
the data it covers is durable, so a restart asks the wearable again from there.

Link marks say, per sensor, where its link stood when last written: watched (connected) up
to a moment, or lost since a moment for a reason. A restart records the span from there as
one gap (device_drivers.driver.LinkKeeper). A damaged cursor is refused, as records could
be skipped by it; a damaged link mark is only logged and ignored: at worst one gap loses its
start, where refusing would stop the hub from reading any wearable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from device_drivers.errors import DeviceDriverError
from ingest.envelope import check_gap
from ingest.model import MAX_DEVICE_USER, Gap
from ingest.wire import INT64_MAX, EnvelopeError

__all__ = ["FORMAT_VERSION", "HubState", "LinkMark", "PairedWearable", "StateError"]

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1


class StateError(DeviceDriverError):
    """The state file cannot be read (not JSON, wrong shape or version) or written."""


@dataclass(frozen=True, slots=True)
class PairedWearable:
    address: str
    sensor: str
    profile: str
    bonded: bool
    # The participant's user index on a wearable shared by several people (None: not shared).
    user: int | None = None


@dataclass(frozen=True, slots=True)
class LinkMark:
    """Where a wearable's link stood when the hub last wrote it down, so that a restart can
    record the span nobody watched. ``outage`` None: connected and watched up to ``at_ms``;
    otherwise lost since ``at_ms`` for that reason (a gap reason)."""

    at_ms: int
    outage: str | None = None


def _wearable_from(raw: Any) -> PairedWearable:
    if not isinstance(raw, Mapping):
        raise StateError("a wearable entry is not an object")
    address, sensor, profile, bonded = (
        raw.get("address"),
        raw.get("sensor"),
        raw.get("profile"),
        raw.get("bonded"),
    )
    if not (
        isinstance(address, str)
        and isinstance(sensor, str)
        and isinstance(profile, str)
        and isinstance(bonded, bool)
    ):
        raise StateError("a wearable entry lacks address, sensor, profile or bonded")
    user = raw.get("user")
    if user is not None and (
        not isinstance(user, int) or isinstance(user, bool) or not 0 <= user <= MAX_DEVICE_USER
    ):
        raise StateError(f"a wearable's user must be 0-{MAX_DEVICE_USER}")
    return PairedWearable(address, sensor, profile, bonded, user)


def _cursors_from(raw: Any) -> dict[str, dict[str, int]]:
    if not isinstance(raw, Mapping):
        raise StateError("cursors is not an object")
    out: dict[str, dict[str, int]] = {}
    for sensor, values in raw.items():
        if not isinstance(values, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in values.items()
        ):
            raise StateError(f"cursors of {sensor!r} are not name -> integer")
        out[str(sensor)] = dict(values)
    return out


def _link_from(raw: Any) -> LinkMark:
    if not isinstance(raw, Mapping):
        raise StateError("not an object")
    at_ms, outage = raw.get("at_ms"), raw.get("outage")
    if not isinstance(at_ms, int) or isinstance(at_ms, bool) or not 0 <= at_ms <= INT64_MAX:
        raise StateError("at_ms is not a time in milliseconds")
    if outage is not None:
        try:  # the reason becomes a gap's: it must be one an envelope can carry
            check_gap(Gap(at_ms, at_ms, outage))
        except EnvelopeError as exc:
            raise StateError(f"outage is not a gap reason: {exc.detail}") from None
    return LinkMark(at_ms, outage)


def _links_from(raw: Any) -> dict[str, LinkMark]:
    """The link marks that can be read; each one that cannot is logged and left out."""
    if not isinstance(raw, Mapping):
        log.warning("link marks ignored: not an object")
        return {}
    links: dict[str, LinkMark] = {}
    for sensor, value in raw.items():
        try:
            links[str(sensor)] = _link_from(value)
        except StateError as exc:
            log.warning("link mark ignored sensor=%.64r: %s", sensor, exc)
    return links


def _read(
    path: Path,
) -> tuple[dict[str, PairedWearable], dict[str, dict[str, int]], dict[str, LinkMark]]:
    """The document's wearables, cursors and link marks; a missing file is a new hub's."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, {}, {}
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc}") from exc
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise StateError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(document, Mapping) or document.get("version") != FORMAT_VERSION:
        raise StateError(f"{path} is not a version {FORMAT_VERSION} hub state file")
    raw_wearables = document.get("wearables", [])
    if not isinstance(raw_wearables, list):
        raise StateError("wearables is not a list")
    wearables = {w.address: w for w in map(_wearable_from, raw_wearables)}
    cursors = _cursors_from(document.get("cursors", {}))
    return wearables, cursors, _links_from(document.get("links", {}))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock, across processes, on the lock file beside ``path``."""
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateError(f"cannot lock {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class HubState:
    """Load with :meth:`open`; every mutation is written to disk before it returns.

    Safe to call from several threads (a hub's sessions write on its disk thread, a command
    in the same process may call it from its own).
    """

    def __init__(
        self,
        path: Path,
        wearables: dict[str, PairedWearable],
        cursors: dict[str, dict[str, int]],
        links: dict[str, LinkMark] | None = None,
    ) -> None:
        self.path = path
        self._wearables = wearables
        self._cursors = cursors
        self._links = links if links is not None else {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | str) -> HubState:
        """Read the state file; a missing file is an empty state (a new hub)."""
        path = Path(path)
        return cls(path, *_read(path))

    def reload(self) -> None:
        """Read the file again: what other processes changed since (``pair``, ``unpair``)."""
        with self._lock, _locked(self.path):
            self._wearables, self._cursors, self._links = _read(self.path)

    @property
    def wearables(self) -> tuple[PairedWearable, ...]:
        with self._lock:
            return tuple(self._wearables.values())

    def wearable(self, address: str) -> PairedWearable | None:
        with self._lock:
            return self._wearables.get(address)

    def by_sensor(self, sensor: str) -> PairedWearable | None:
        with self._lock:
            return next((w for w in self._wearables.values() if w.sensor == sensor), None)

    def remember(self, wearable: PairedWearable) -> None:
        """Add or replace the wearable at ``wearable.address``."""
        with self._changing():
            clash = next(
                (
                    w
                    for w in self._wearables.values()
                    if w.sensor == wearable.sensor and w.address != wearable.address
                ),
                None,
            )
            if clash is not None:
                raise StateError(f"sensor name {wearable.sensor!r} is taken by {clash.address}")
            self._wearables[wearable.address] = wearable
            self._save()

    def forget(self, address: str) -> None:
        """Drop a wearable, its cursors and its link mark (no-op if unknown)."""
        with self._changing():
            known = self._wearables.pop(address, None)
            if known is None:
                return
            self._cursors.pop(known.sensor, None)
            self._links.pop(known.sensor, None)
            self._save()

    def cursor(self, sensor: str, name: str) -> int | None:
        with self._lock:
            return self._cursors.get(sensor, {}).get(name)

    def set_cursor(self, sensor: str, name: str, value: int) -> None:
        with self._changing():
            if self._cursors.get(sensor, {}).get(name) == value:
                return
            self._cursors.setdefault(sensor, {})[name] = value
            self._save()

    def clear_cursor(self, sensor: str, name: str) -> None:
        """Forget a cursor (a meter whose numbering started again is read from the start)."""
        with self._changing():
            values = self._cursors.get(sensor, {})
            if name not in values:
                return
            del values[name]
            self._save()

    def link(self, sensor: str) -> LinkMark | None:
        with self._lock:
            return self._links.get(sensor)

    def set_link(self, sensor: str, mark: LinkMark) -> None:
        """Write where ``sensor``'s link stands (nothing is written when it is unchanged)."""
        with self._changing():
            if self._links.get(sensor) == mark:
                return
            self._links[sensor] = mark
            self._save()

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """One change: under this process's lock and the file's, on the document as it is
        on disk now (another process may have changed it since this one last read it)."""
        with self._lock, _locked(self.path):
            try:
                self._wearables, self._cursors, self._links = _read(self.path)
            except StateError as exc:
                # Damaged since this process read it: what this process knows is written
                # over it rather than no change being kept at all.
                log.warning("state file unreadable, rewritten from this process: %s", exc)
            yield

    def _document(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "wearables": [
                {
                    "address": w.address,
                    "sensor": w.sensor,
                    "profile": w.profile,
                    "bonded": w.bonded,
                    **({} if w.user is None else {"user": w.user}),
                }
                for w in self._wearables.values()
            ],
            "cursors": self._cursors,
            "links": {
                sensor: {"at_ms": mark.at_ms, "outage": mark.outage}
                for sensor, mark in self._links.items()
            },
        }

    def _save(self) -> None:
        data = json.dumps(self._document(), indent=2, sort_keys=True).encode("utf-8")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc}") from exc
