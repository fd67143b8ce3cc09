"""`trialstream export`: readings out as Parquet, FHIR R4 NDJSON or SDTM datasets (VS, SUPPVS, DM).

The command runs as an authenticated clinician, monitor or admin (``--as``,
:mod:`gateway.commands.operator`), whose sites decide what may be exported, exactly as for
the API's export jobs. Consent is honoured and every export is
audited with the SHA-256 of each file (docs/exports.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gateway.commands import operator
from gateway.commands.common import Subparsers, add_database_flags, iso_time, run
from gateway.settings import Settings

FORMATS = {
    "parquet": "Parquet dataset with provenance, partitioned by participant and day",
    "fhir": "FHIR R4 Observation, Patient and Device resources as NDJSON (Bulk Data layout)",
    "sdtm": "CDISC SDTM VS (readings and local-day summaries), SUPPVS and DM as CSV and XPT,"
    " with define.xml",
    "adherence": "adherence per participant, local day and metric against the schedule, as"
    " Parquet and CSV (counts, no values)",
}


def register(sub: Subparsers) -> None:
    ex = sub.add_parser(
        "export",
        help="export readings (Parquet, FHIR, SDTM)",
        description="Export a study's (or one participant's) readings. Only readings whose "
        "consent held at their time, only participants of your sites (--as); audited.",
    )
    ex_sub = ex.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    for name, text in FORMATS.items():
        p = ex_sub.add_parser(name, help=text, description=text + ".")
        add_database_flags(p)
        operator.add_operator_flags(p)
        p.add_argument("--study", required=True, help="study id")
        p.add_argument("--participant", help="only this participant")
        p.add_argument("--from", dest="from_time", type=iso_time, help="from (ISO 8601, inclusive)")
        p.add_argument("--to", dest="to_time", type=iso_time, help="to (ISO 8601, exclusive)")
        p.add_argument("--out", type=Path, required=True, help="output directory (absent or empty)")
        p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
        p.set_defaults(handler=_export_handler, export_kind=name)

    jobs = ex_sub.add_parser(
        "run-jobs",
        help="run the export jobs queued through the API",
        description="Run queued export jobs one after another until none is left, each "
        "into OUT_ROOT/<job id>; jobs whose runner died are marked failed first.",
    )
    add_database_flags(jobs)
    jobs.add_argument("--out-root", type=Path, required=True, help="where job outputs go")
    jobs.set_defaults(handler=_cmd_run_jobs)


def _export_handler(args: argparse.Namespace, settings: Settings) -> int:
    """The export of ``args.export_kind``, authenticated as that command."""
    handler = _AUTHENTICATED[args.export_kind]
    return handler(args, settings)


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from consent.records import Actor
    from storage.exports import ExportKind, ExportRequest, export

    url = settings.require_database_url()
    request = ExportRequest(
        ExportKind(args.export_kind), args.study, args.participant, args.from_time, args.to_time
    )
    t0 = time.perf_counter()

    async def progress(rows: int) -> None:
        if not args.quiet:
            rate = rows / max(time.perf_counter() - t0, 1e-9)
            print(f"\r{rows:,} rows ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)

    actor = Actor.of(operator.current().require())

    async def go() -> int:
        result = await export(
            url,
            actor,
            request,
            args.out,
            on_progress=progress,
            read_url=settings.read_database_url,
        )
        if not args.quiet:
            print(file=sys.stderr)
        print(
            f"exported {result.rows:,} {_UNITS.get(args.export_kind, 'readings')}"
            f" of {len(result.participants)} participant(s) to {result.directory}"
        )
        for f in result.files:
            print(f"  {f.path}  {f.rows} rows  {f.bytes} bytes  sha256 {f.sha256}")
        return 0

    return run(go())


_UNITS = {"sdtm": "records", "adherence": "participant-days by metric"}
_AUTHENTICATED = {kind: operator.authenticated(f"export {kind}")(_cmd_export) for kind in FORMATS}


def _cmd_run_jobs(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import timedelta

    from storage import db
    from storage.exports import jobs

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            abandoned = await jobs.fail_abandoned(conn, stale_after=timedelta(minutes=5))
        if abandoned:
            print(f"{abandoned} abandoned job(s) marked failed", file=sys.stderr)
        ran = 0
        while (job := await jobs.run_next(url, out_root=args.out_root)) is not None:
            ran += 1
            print(f"job {job.job_id}: {job.state} ({job.rows_written} rows){_error(job.error)}")
        if not ran:
            print("no queued export jobs")
        return 0

    return run(go())


def _error(error: str | None) -> str:
    return f": {error}" if error else ""
