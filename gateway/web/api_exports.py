"""The API's export operations: submit a job, show it, download its files."""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web

from gateway.web.access import CLINICAL
from gateway.web.api_common import ID_PATTERN, TIME_PATTERN, V1, actor_of, iso, pool_of, when
from gateway.web.errors import BadInput, Conflict, NotFound
from gateway.web.exports import EXPORT_RUNNER
from gateway.web.schemas import EXPORT_JOB
from gateway.web.spec import Ctx, Endpoint, Field
from storage import audit
from storage.exports import errors as export_errors
from storage.exports import jobs
from storage.exports.selection import ExportKind, ExportRequest
from storage.exports.selection import participants as export_participants

UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

# --- handlers: exports ----------------------------------------------------------------------


def job_json(job: jobs.ExportJob) -> dict[str, Any]:
    r = job.request
    return {
        "job_id": job.job_id,
        "kind": r.kind.value,
        "study_id": r.study_id,
        "participant_id": r.participant_id,
        "from": iso(r.from_time),
        "to": iso(r.to_time),
        "requested_by": job.requested_by,
        "state": job.state.value,
        "submitted_at": iso(job.submitted_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "rows_written": job.rows_written,
        "error": job.error,
        "files": [
            {
                "index": i,
                "path": f.path,
                "sha256": f.sha256,
                "bytes": f.bytes,
                "rows": f.rows,
                "href": f"{V1}/exports/{job.job_id}/files/{i}",
            }
            for i, f in enumerate(job.files)
        ],
    }


async def submit_export(ctx: Ctx) -> web.StreamResponse:
    b = ctx.body
    request = ExportRequest(
        ExportKind(b["kind"]),
        b["study_id"],
        b["participant_id"],
        when("from", b["from"]),
        when("to", b["to"]),
    )
    if request.from_time and request.to_time and request.from_time >= request.to_time:
        raise BadInput("'from' must be before 'to'", field="to")
    async with pool_of(ctx).connection() as conn:
        try:
            job = await jobs.submit(conn, actor_of(ctx.user), request)
        except export_errors.InvalidExportRequest as exc:
            raise BadInput(str(exc)) from exc
        except (
            export_errors.UnknownStudy,
            export_errors.UnknownParticipant,
            export_errors.ExportNotPermitted,
        ) as exc:
            # One answer whatever the cause (the audit record keeps it): a participant of
            # another site must not be told apart from one that does not exist.
            who = f", participant {request.participant_id!r}" if request.participant_id else ""
            raise NotFound(
                f"nothing to export for study {request.study_id!r}{who} within your sites"
            ) from exc
    runner = ctx.request.app.get(EXPORT_RUNNER)
    if runner is not None:
        runner.wake()
    return web.json_response(
        job_json(job), status=202, headers={"Location": f"{V1}/exports/{job.job_id}"}
    )


async def _visible_job(ctx: Ctx, conn: Any, job_id: str) -> jobs.ExportJob:
    try:
        return await jobs.status(conn, actor_of(ctx.user), job_id)
    except export_errors.JobNotFound as exc:
        raise NotFound(str(exc)) from exc


async def get_export(ctx: Ctx) -> web.StreamResponse:
    async with pool_of(ctx).connection() as conn:
        job = await _visible_job(ctx, conn, ctx.path["job_id"])
    return web.json_response(job_json(job))


async def download_export_file(ctx: Ctx) -> web.StreamResponse:
    job_id, index = ctx.path["job_id"], ctx.path["index"]
    actor = actor_of(ctx.user)
    async with pool_of(ctx).connection() as conn:
        job = await _visible_job(ctx, conn, job_id)
        if job.state is not jobs.JobState.DONE:
            raise Conflict(f"export job {job_id} is {job.state.value}, not done")
        if index >= len(job.files):
            raise NotFound(f"export job {job_id} has no file {index}")
        file = job.files[index]
        # The files hold what the requester could export when the job ran: they are handed
        # out only while the requester may still export that request.
        try:
            async with conn.transaction():
                await export_participants(conn, actor, job.request)
        except export_errors.ExportError as exc:
            raise NotFound(f"no export job {job_id!r}") from exc
        path = ctx.request.app[EXPORT_RUNNER].file_path(job_id, file)
        if path is None:
            raise NotFound(f"file {index} of export job {job_id} is not on this gateway's disk")
        detail: dict[str, object] = {"job_id": job_id, "path": file.path, "sha256": file.sha256}
        if job.request.participant_id is not None:
            detail["participant_id"] = job.request.participant_id
        async with conn.transaction():
            await audit.append(
                conn,
                actor=ctx.user.username,
                action="export.downloaded",
                entity="study",
                entity_id=job.request.study_id,
                detail=detail,
            )
    digest = base64.b64encode(bytes.fromhex(file.sha256)).decode()
    name = file.path.rsplit("/", 1)[-1]
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{name}"',
            "Repr-Digest": f"sha-256=:{digest}:",
            "X-Content-SHA256": file.sha256,
            "Cache-Control": "no-store",
        },
    )


# --- the operations -----------------------------------------------------------------------

JOB_ID = Field("job_id", pattern=UUID_PATTERN, max_len=36, min_len=36)
FILE_INDEX = Field("index", kind="integer", minimum=0, maximum=1_000_000)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        f"{V1}/exports",
        "submit_export",
        "Submit an export job",
        submit_export,
        CLINICAL,
        "exports",
        body=(
            Field("kind", enum=tuple(k.value for k in ExportKind)),
            Field("study_id", pattern=ID_PATTERN, max_len=64),
            Field("participant_id", required=False, pattern=ID_PATTERN, max_len=64),
            Field(
                "from",
                required=False,
                pattern=TIME_PATTERN,
                max_len=40,
                description="inclusive, by measurement time, with a time zone",
            ),
            Field(
                "to",
                required=False,
                pattern=TIME_PATTERN,
                max_len=40,
                description="exclusive, by measurement time, with a time zone",
            ),
        ),
        ok_status=202,
        ok_schema=EXPORT_JOB,
        extra_statuses=(404,),
        description="Queues an export of the study (or one participant) for the user's sites; "
        "it runs in the background. Poll the job, then download its files.",
    ),
    Endpoint(
        "GET",
        f"{V1}/exports/{{job_id}}",
        "get_export",
        "Show an export job",
        get_export,
        CLINICAL,
        "exports",
        path_params=(JOB_ID,),
        ok_schema=EXPORT_JOB,
    ),
    Endpoint(
        "GET",
        f"{V1}/exports/{{job_id}}/files/{{index}}",
        "download_export_file",
        "Download a file of an export job",
        download_export_file,
        CLINICAL,
        "exports",
        path_params=(JOB_ID, FILE_INDEX),
        ok_content_type="application/octet-stream",
        conflicts=True,
        description="The file's bytes, streamed from disk; its SHA-256 is in the Repr-Digest "
        "(base64) and X-Content-SHA256 (hex) headers.",
    ),
)
