"""One export from start to finish: who may, what consent allows, the files, the audit trail.

1. The participants the actor may export and their consent windows (refusals are audited
   as ``export.refused`` and raised as typed errors).
2. ``export.started`` in the audit trail: who asked for what, before any file exists.
3. Readings stream from the database into the format's writer (in a worker thread, so an
   event loop serving other requests keeps running), into a temporary directory.
4. Files fsynced, hashed, and the directory renamed to its final name
   (:mod:`storage.exports.output`).
5. ``export.completed`` with every file's path, size, row count and SHA-256; or
   ``export.failed`` with the error's type, and nothing under the final name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import psycopg
from psycopg.rows import class_row, tuple_row

from consent.records import Actor
from storage import audit, db
from storage.db import Conn
from storage.errors import DatabaseUnavailable, first_line
from storage.exports import fhir, sdtm, source
from storage.exports.errors import ExportError, ExportWriteFailed
from storage.exports.mapping import VS_METRICS
from storage.exports.output import OpenFile, OutputDir, WrittenFile, open_for_writing
from storage.exports.selection import ExportKind, ExportRequest, Selection, select

log = logging.getLogger(__name__)

OnProgress = Callable[[int], Awaitable[None]]
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ExportResult:
    export_id: str
    kind: ExportKind
    directory: Path
    rows: int
    participants: tuple[str, ...]
    files: tuple[WrittenFile, ...]


def describe(request: ExportRequest) -> str:
    """The request as the command line that would make it (for manifests and messages)."""
    parts = [f"trialstream export {request.kind} --study {request.study_id}"]
    if request.participant_id is not None:
        parts.append(f"--participant {request.participant_id}")
    if request.from_time is not None:
        parts.append(f"--from {request.from_time.isoformat()}")
    if request.to_time is not None:
        parts.append(f"--to {request.to_time.isoformat()}")
    return " ".join(parts)


def _detail(request: ExportRequest, export_id: str, job_id: str | None) -> dict[str, object]:
    detail: dict[str, object] = {
        "export_id": export_id,
        "kind": request.kind.value,
        "study_id": request.study_id,
        "from": request.from_time,
        "to": request.to_time,
    }
    if request.participant_id is not None:
        detail["participant_id"] = request.participant_id
    if job_id is not None:
        detail["job_id"] = job_id
    return detail


async def _audit(
    conn: Conn,
    actor: Actor,
    action: str,
    request: ExportRequest,
    detail: dict[str, object],
    reason: str | None = None,
) -> None:
    await audit.append(
        conn,
        actor=actor.user,
        action=action,
        entity="study",
        entity_id=request.study_id,
        detail=detail,
        reason=reason,
    )


async def export(
    url: str,
    actor: Actor,
    request: ExportRequest,
    out: Path,
    *,
    export_id: str | None = None,
    job_id: str | None = None,
    on_progress: OnProgress | None = None,
    open_file: OpenFile = open_for_writing,
    chunk_rows: int = source.CHUNK_ROWS,
    read_url: str | None = None,
) -> ExportResult:
    """Export ``request`` as ``actor`` into the directory ``out`` (absent or empty).

    ``read_url``: where the exported data is read (a standby); the access check and the
    audit rows stay on ``url``."""
    request.check()
    export_id = export_id or uuid.uuid4().hex
    detail = _detail(request, export_id, job_id)
    async with db.connection(url, autocommit=True) as conn:
        metrics = VS_METRICS if request.kind is ExportKind.SDTM else None
        try:
            selection = await select(conn, actor, request, metrics=metrics)
        except ExportError as exc:
            await _audit(conn, actor, "export.refused", request, detail, reason=str(exc))
            log.info(
                "export refused actor=%s study=%s kind=%s error=%s",
                actor.user,
                request.study_id,
                request.kind,
                type(exc).__name__,
            )
            raise
        if request.kind is ExportKind.ADHERENCE:
            from storage.exports.adherence_files import exportable

            selection = exportable(selection)
        output = OutputDir(out, open_file=open_file)
        exported = tuple(p.participant_id for p in selection.participants)
        try:
            await _audit(
                conn, actor, "export.started", request, {**detail, "participants": list(exported)}
            )
            async with contextlib.AsyncExitStack() as stack:
                reader = (
                    conn
                    if read_url is None
                    else await stack.enter_async_context(db.connection(read_url, autocommit=True))
                )
                rows = await _write(
                    reader, request, selection, output, export_id, on_progress, chunk_rows
                )
            files = tuple(await asyncio.to_thread(output.commit))
        except BaseException as exc:
            output.abort()
            if not isinstance(exc, asyncio.CancelledError):
                with contextlib.suppress(psycopg.Error, audit.AuditError):
                    await _audit(
                        conn,
                        actor,
                        "export.failed",
                        request,
                        {**detail, "error": type(exc).__name__},
                        reason=first_line(exc),
                    )
            log.warning(
                "export failed export_id=%s kind=%s error=%s",
                export_id,
                request.kind,
                type(exc).__name__,
            )
            typed = _typed(exc)
            if typed is exc:
                raise
            raise typed from exc
        await _audit(
            conn,
            actor,
            "export.completed",
            request,
            {
                **detail,
                "participants": list(exported),
                "rows": rows,
                "directory": str(out),
                "files": [f.as_json() for f in files],
            },
        )
    log.info(
        "export done export_id=%s kind=%s study=%s rows=%d files=%d",
        export_id,
        request.kind,
        request.study_id,
        rows,
        len(files),
    )
    return ExportResult(export_id, request.kind, out, rows, exported, files)


def _typed(exc: BaseException) -> BaseException:
    """Failures the caller can match: lost database, unwritable output; others unchanged."""
    if isinstance(exc, ExportError | asyncio.CancelledError):
        return exc
    if isinstance(exc, psycopg.OperationalError):
        return DatabaseUnavailable(f"the export lost the database: {first_line(exc)}")
    # pyarrow is loaded only by a Parquet export (50 MB a process that never writes one
    # does without); when it is not loaded, nothing raised is one of its errors.
    arrow = sys.modules.get("pyarrow")
    if isinstance(exc, OSError | psycopg.Error) or (
        arrow is not None and isinstance(exc, arrow.ArrowException)
    ):
        return ExportWriteFailed(f"the export could not be written: {first_line(exc)}")
    return exc


async def _write(
    conn: Conn,
    request: ExportRequest,
    selection: Selection,
    output: OutputDir,
    export_id: str,
    on_progress: OnProgress | None,
    chunk_rows: int,
) -> int:
    written = 0

    def consumer(write: Callable[[Sequence[R]], None]) -> source.Consume[R]:
        async def consume(rows: list[R]) -> None:
            nonlocal written
            await asyncio.to_thread(write, rows)
            written += len(rows)
            if on_progress is not None:
                await on_progress(written)

        return consume

    if request.kind is ExportKind.ADHERENCE:
        from storage.exports import adherence_files

        aw = adherence_files.AdherenceWriter(output)
        try:
            return await adherence_files.stream(conn, request, selection, consumer(aw.write))
        finally:
            with contextlib.suppress(OSError):
                aw.close()
    if request.kind is ExportKind.PARQUET:
        import pyarrow as pa  # type: ignore[import-untyped]

        from storage.exports import parquet

        pw = parquet.ParquetWriter(output, export_id)
        try:
            rows = await source.stream(
                conn,
                selection,
                parquet.COLUMNS,
                consumer(pw.write),
                row_factory=tuple_row,
                chunk_rows=chunk_rows,
            )
        finally:
            with contextlib.suppress(OSError, pa.ArrowException):
                pw.close()
        return rows
    if request.kind is ExportKind.FHIR:
        transaction_time = datetime.now(UTC).isoformat(timespec="milliseconds")
        fw = fhir.FhirWriter(output)
        try:
            rows = await source.stream(
                conn,
                selection,
                fhir.COLUMNS,
                consumer(fw.write),
                row_factory=fhir.observation_rows,
                ordered=False,
                chunk_rows=chunk_rows,
            )
            devices = await _devices(conn, fw.seen_sensors)
            await asyncio.to_thread(
                fw.finish, devices, transaction_time=transaction_time, request=describe(request)
            )
        except BaseException:
            with contextlib.suppress(OSError):
                fw.discard()
            raise
        return rows
    subjects = await source.subjects(conn, selection)
    sw = sdtm.SdtmWriter(output)
    try:
        await source.stream_sdtm(
            conn,
            selection,
            consumer(sw.write_daily),
            consumer(sw.write_readings),
            chunk_rows=chunk_rows,
        )
        described = await source.descriptions(conn, sw.description_ids)
        await asyncio.to_thread(sw.finish, subjects, described, study_id=request.study_id)
    except BaseException:
        with contextlib.suppress(OSError):
            sw.discard()
        raise
    return sw.rows


# Each hub and description an exported reading referenced (sensor fields null for a wearable
# never described), in the order a reader expects: by hub, sensor and report time.
_DEVICES = """
SELECT k.device_id, d.participant_id, p.study_id, d.revoked_at IS NOT NULL AS revoked,
       k.sensor, s.manufacturer, s.model, s.serial, s.firmware, s.hardware, s.description_id
FROM unnest(%s::text[], %s::text[], %s::int8[]) AS k (device_id, sensor, description_id)
JOIN devices d ON d.device_id = k.device_id
JOIN participants p ON p.participant_id = d.participant_id
LEFT JOIN sensor_descriptions s ON s.description_id = k.description_id
ORDER BY k.device_id, k.sensor, s.reported_at NULLS FIRST, s.description_id
"""


async def _devices(conn: Conn, seen: list[fhir.SensorKey]) -> list[fhir.DeviceInfo]:
    if not seen:
        return []
    async with conn.cursor(row_factory=class_row(fhir.DeviceInfo)) as cur:
        await cur.execute(
            _DEVICES, ([k[0] for k in seen], [k[1] for k in seen], [k[2] for k in seen])
        )
        return await cur.fetchall()
