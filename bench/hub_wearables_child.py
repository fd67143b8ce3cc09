"""The child processes of ``trialstream bench hub-wearables`` (bench/hub_wearables.py): the
measured hub, or the baseline's plain subscriptions, each reporting its counters as one JSON
line on stdout every ``--sample-s`` until its stdin closes. Kept apart from the benchmark's
own process so that a child loads only the hub's side: its RSS is a hub's."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import gc
import heapq
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic

from device_drivers.driver import WearableSpec
from device_drivers.gatt import registry
from device_drivers.hub_factory import HubParts, open_hub
from device_drivers.identity import HubIdentity
from device_drivers.pairing import BleBackends
from device_drivers.sim import SimAdapter

SAMPLE_S: Final = 5.0
# Set to a file path, the measured hub also writes where its memory goes, once a minute (a
# diagnostic run: counting its objects costs a little CPU).
MEMORY_TRACE_ENV: Final = "TRIALSTREAM_BENCH_MEMORY_TRACE"
MEMORY_TRACE_EVERY_S: Final = 60.0
HEART_RATE_MEASUREMENT: Final = registry.full_uuid(0x2A37)
HUB, BASELINE = "hub", "baseline"


async def _stdin_closed() -> None:
    """Return when this process's stdin reaches EOF: the parent's signal to stop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        await reader.read()
    finally:
        transport.close()


async def _report_every(sample_s: float, report: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """One JSON line of counters on stdout every ``sample_s`` (on a fixed schedule)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time()
    while True:
        print(json.dumps(await report()), flush=True)
        deadline += sample_s
        await asyncio.sleep(max(0.0, deadline - loop.time()))


async def _until_stdin_closed(*work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until stdin closes (or one of them fails)."""
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(w, name=f"bench-child-{i}") for i, w in enumerate(work)]
        await _stdin_closed()
        for task in tasks:
            task.cancel()


def _hub_report(parts: HubParts) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def report() -> dict[str, Any]:
        outbox = await asyncio.to_thread(parts.outbox.stats)
        sessions = [s.stats for s in parts.sessions]
        relay = parts.relay.stats
        return {
            "connected": sum(s.connected for s in sessions),
            "streaming": sum(s.notifications > 0 for s in sessions),
            "notifications": sum(s.notifications for s in sessions),
            "readings": sum(s.readings for s in sessions),
            "malformed": sum(s.malformed for s in sessions),
            "dropped": sum(s.dropped for s in sessions),
            "gaps": sum(s.gaps for s in sessions),
            "relay_connected": relay.connected,
            "envelopes_sent": relay.sent,
            "envelopes_resent": relay.resent,
            "receipts_accepted": relay.receipts_accepted,
            "receipts_rejected": relay.receipts_rejected,
            "pending_readings": outbox.pending_readings,
            "unreceipted_envelopes": outbox.unreceipted_envelopes,
            "outbox_bytes_on_disk": outbox.bytes_on_disk,
        }

    return report


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


# glibc puts each thread arena's heap at an address aligned to its maximum size (HEAP_MAX_SIZE,
# 64 MiB on 64-bit), which tells those mappings from the rest.
THREAD_HEAP_ALIGN: Final = 64 * 2**20
# A thread's stack lies right above its guard, a few inaccessible pages (glibc's default is
# one); a thread arena's inaccessible tail is much larger.
STACK_GUARD_MAX: Final = 64 * 1024


def anonymous_by_mapping(smaps: str) -> dict[str, int]:
    """Anonymous resident bytes by the kind of mapping that holds them, from the text of
    ``/proc/PID/smaps``: ``main_heap`` (the brk heap: glibc's main arena), ``thread_arenas``
    (glibc's arenas for other threads), ``stacks`` (the main thread's, and a thread's: the
    mapping right above a guard page), ``files`` (written pages of mapped files: libraries'
    data) and ``other`` (CPython's object arenas, malloc's own mappings of large chunks,
    libraries' buffers)."""
    kinds = dict.fromkeys(("main_heap", "thread_arenas", "stacks", "files", "other"), 0)
    kind, guard_end = "other", -1
    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0].endswith(":"):
            if fields[0] == "Anonymous:" and len(fields) >= 2 and fields[1].isdigit():
                kinds[kind] += int(fields[1]) * 1024
            continue
        span, perms = fields[0].split("-"), fields[1] if len(fields) > 1 else ""
        if len(span) != 2:
            continue
        start, end = int(span[0], 16), int(span[1], 16)
        path = fields[5] if len(fields) > 5 else ""
        if path == "[heap]":
            kind = "main_heap"
        elif path == "[stack]":
            kind = "stacks"
        elif path:
            kind = "files"
        elif start % THREAD_HEAP_ALIGN == 0:
            kind = "thread_arenas"
        elif start == guard_end:
            kind = "stacks"
        else:
            kind = "other"
        guard = perms.startswith("---") and not path and end - start <= STACK_GUARD_MAX
        guard_end = end if guard else -1
    return kinds


def _malloc_split() -> dict[str, int] | None:
    """glibc's own account (``mallinfo2``): bytes taken from the system for its arenas, in
    mappings of large chunks, handed out (thread caches count as handed out) and free in its
    bins; None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return {
        "arenas": int(info.arena),
        "mapped_chunks": int(info.hblkhd),
        "in_use": int(info.uordblks),
        "free": int(info.fordblks),
    }


PYMALLOC_FIELDS: Final = {
    "# arenas allocated current": "arenas",
    "# bytes in allocated blocks": "in_blocks",
    "# bytes in available blocks": "available_in_pools",
}


def pymalloc_stats() -> dict[str, int]:
    """CPython's object allocator, from ``sys._debugmallocstats`` (which writes only to the
    C stderr: it is pointed at a temporary file for the call): arenas held (1 MiB each),
    bytes in live blocks, bytes free in pools in use, and unused pools' bytes."""
    import tempfile

    with tempfile.TemporaryFile() as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read(1 << 20).decode("ascii", "replace")
    stats: dict[str, int] = {}
    for line in text.splitlines():
        label, _, value = line.partition("=")
        number = value.strip().replace(",", "")
        if not number.isdigit():
            continue
        if label.strip() in PYMALLOC_FIELDS:
            stats[PYMALLOC_FIELDS[label.strip()]] = int(number)
        elif label.strip().endswith("unused pools * 16384 bytes"):
            stats["unused_pools"] = int(number)
    return stats


def _sample_of(container: object) -> str:
    """What a large container holds, in a few characters: its first item's type (and a
    dict's first key), to tell who owns it."""
    try:
        if isinstance(container, dict):
            key = next(iter(container), None)
            return f"{type(key).__name__} {str(key)[:40]!r} -> {type(container.get(key)).__name__}"
        first = next(iter(container), None)  # type: ignore[call-overload]
        return type(first).__name__
    except (RuntimeError, StopIteration, TypeError):
        return "?"


def _sqlite_in_use() -> int | None:
    """Bytes SQLite has allocated (its page caches included: ``sqlite3_memory_used`` of the
    library this process loaded), or None when it cannot be asked."""
    try:
        with open("/proc/self/maps") as maps:
            path = next((ln.split()[-1] for ln in maps if "libsqlite3" in ln), None)
        if path is None:
            return None
        lib = ctypes.CDLL(path)
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        return int(lib.sqlite3_memory_used())
    except (OSError, AttributeError):
        return None


def _largest_containers(objects: list[object]) -> list[list[object]]:
    """A container that keeps growing is one object whose buffer grows in malloc: the
    largest ones by length, with an identity to follow from one sample to the next."""
    largest = heapq.nlargest(
        8,
        (o for o in objects if isinstance(o, list | dict | set | collections.deque)),
        key=len,
    )
    return [[type(o).__name__, id(o), len(o), _sample_of(o)] for o in largest]


def _largest_untracked(objects: list[object]) -> list[list[object]]:
    """The largest objects the collector does not track (a dict of only strings and
    numbers, bytes, bytearrays, strings), found through what tracked objects refer to, with
    the type of one object that holds each."""
    found: dict[int, tuple[int, object, object]] = {}
    for holder in objects:
        for ref in gc.get_referents(holder):
            if isinstance(ref, dict | bytes | bytearray | str | list) and not gc.is_tracked(ref):
                n = len(ref)
                if n >= 4096 and id(ref) not in found:
                    found[id(ref)] = (n, ref, holder)
    top = heapq.nlargest(8, found.items(), key=lambda item: item[1][0])
    return [
        [type(ref).__name__, ident, n, _sample_of(ref), type(holder).__qualname__]
        for ident, (n, ref, holder) in top
    ]


def memory_sample(first: Counter[str] | None) -> tuple[dict[str, Any], Counter[str]]:
    """One line of the memory trace: RSS, glibc malloc's bytes in use (every allocation,
    SQLite's page cache and OpenSSL's included), where the anonymous pages are
    (:func:`anonymous_by_mapping`), glibc's and CPython's allocators' own accounts
    (:func:`pymalloc_stats`), the garbage collector's counts per generation, SQLite's bytes,
    the thread count, the count of objects the collector tracks and the ten types whose count
    grew most since ``first`` (the first sample's counts, returned for the next), the largest
    containers by identity and the largest objects the collector does not track."""
    import psutil  # type: ignore[import-untyped]

    me = psutil.Process()
    objects = gc.get_objects()
    types = Counter(type(o).__qualname__ for o in objects)
    first = first or types
    grew = sorted(((n - first.get(t, 0), t) for t, n in types.items()), reverse=True)[:10]
    malloc = _malloc_split()
    line = {
        "rss": me.memory_info().rss,
        "malloc_in_use": None if malloc is None else malloc["in_use"] + malloc["mapped_chunks"],
        "anonymous_by_mapping": anonymous_by_mapping(Path("/proc/self/smaps").read_text()),
        "malloc": malloc,
        "pymalloc": pymalloc_stats(),
        "gc": gc.get_stats(),
        "sqlite_in_use": _sqlite_in_use(),
        "threads": me.num_threads(),
        "objects": len(objects),
        "grew": [[t, d] for d, t in grew if d > 0],
        "largest": _largest_containers(objects),
        "largest_untracked": _largest_untracked(objects),
    }
    return line, first


async def _trace_memory(path: Path) -> None:
    """A :func:`memory_sample` line every ``MEMORY_TRACE_EVERY_S``, with the seconds since
    the trace began. (tracemalloc slowed the hub so much it missed its own reports.)"""
    first: Counter[str] | None = None
    t0 = asyncio.get_running_loop().time()
    while True:
        await asyncio.sleep(MEMORY_TRACE_EVERY_S)
        line, first = memory_sample(first)
        line["t_s"] = round(asyncio.get_running_loop().time() - t0)
        with path.open("a") as out:
            out.write(json.dumps(line) + "\n")


async def serve_hub(hub_dir: Path, hci: str, addresses: Sequence[str], sample_s: float) -> None:
    """The measured hub: ``open_hub`` with one session per wearable, host stack over HCI."""
    identity = HubIdentity.load(hub_dir)
    async with contextlib.AsyncExitStack() as stack:
        adapter = await SimAdapter.connect_hci(hci)
        stack.push_async_callback(adapter.close)
        backends = BleBackends(adapter.scanner_backend, adapter.client_backend)
        specs = [WearableSpec(a, f"hr-{i}") for i, a in enumerate(addresses)]
        parts = await open_hub(identity, stack, wearables=specs, backends=backends)
        work = [parts.hub.run(), _report_every(sample_s, _hub_report(parts))]
        trace = os.environ.get(MEMORY_TRACE_ENV)
        if trace:
            work.append(_trace_memory(Path(trace)))
        await _until_stdin_closed(*work)


async def serve_baseline(hci: str, addresses: Sequence[str], sample_s: float) -> None:
    """The baseline: plain bleak subscriptions on the same host stack, counting only."""
    counts = dict.fromkeys(addresses, 0)

    def counter(address: str) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        def on_value(_char: BleakGATTCharacteristic, _data: bytearray) -> None:
            counts[address] += 1

        return on_value

    async def report() -> dict[str, Any]:
        return {
            "connected": sum(c.is_connected for c in clients),
            "streaming": sum(n > 0 for n in counts.values()),
            "notifications": sum(counts.values()),
        }

    adapter = await SimAdapter.connect_hci(hci)
    clients = [BleakClient(a, backend=adapter.client_backend) for a in addresses]
    try:
        for address, client in zip(addresses, clients, strict=True):
            await client.connect()
            await client.start_notify(HEART_RATE_MEASUREMENT, counter(address))
        await _until_stdin_closed(_report_every(sample_s, report))
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()
        await adapter.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.hub_wearables_child {hub,baseline} --hci SPEC --addresses A,B,...``: a
    child of the benchmark; it stops when its stdin closes."""
    parser = argparse.ArgumentParser(prog="python -m bench.hub_wearables_child")
    parser.add_argument("mode", choices=[HUB, BASELINE])
    parser.add_argument("--hci", required=True, help="the controller's bumble transport")
    parser.add_argument("--addresses", required=True, help="the wearables, comma-separated")
    parser.add_argument("--sample-s", type=float, default=SAMPLE_S)
    parser.add_argument("--hub-dir", type=Path, help="the hub's identity (mode hub)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    addresses = [a for a in args.addresses.split(",") if a]
    if args.mode == HUB:
        if args.hub_dir is None:
            parser.error("mode hub needs --hub-dir")
        asyncio.run(serve_hub(args.hub_dir, args.hci, addresses, args.sample_s))
    else:
        asyncio.run(serve_baseline(args.hci, addresses, args.sample_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
