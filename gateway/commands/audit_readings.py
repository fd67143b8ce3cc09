"""`trialstream audit verify-readings`, `audit prune-originals`, `audit originals-retention`:
the stored readings against the envelopes their hubs signed, and how long those are kept."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from gateway.commands import operator
from gateway.commands.common import add_database_flags, iso_time, run
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.source_check import Report

EXIT_UNVERIFIED = 1
# Readings are checked a day at a time: a participant-day of 1 Hz readings is bounded, a
# participant-year is not.
CHUNK = timedelta(days=1)
# Unverified readings named one by one in the text output (all of them with --json).
SHOWN = 20
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
RETENTION_ACTOR = "system:originals-retention"


def register(au_sub: Any) -> None:
    vr = au_sub.add_parser(
        "verify-readings",
        help="check a participant's stored readings against what their hubs signed",
        description="Source data verification. For every stored reading of the participant "
        "(in --from..--to), the signed original of the envelope that carried it is read "
        "back, hashed against the digest recorded when it was stored, verified with the "
        "hub's key, and searched for a reading equal to the stored one (time, metric, "
        "value, unit, sensor, flags, device user). Exit 0: every reading verifies; "
        "1: some do not, each named with why (no_original, original_altered, "
        "bad_signature, not_signed).",
    )
    add_database_flags(vr)
    vr.add_argument("--participant", required=True, help="participant id")
    vr.add_argument("--from", dest="from_time", type=iso_time, help="from (ISO 8601, inclusive)")
    vr.add_argument("--to", dest="to_time", type=iso_time, help="to (ISO 8601, exclusive)")
    vr.add_argument("--json", action="store_true", help="print the result as one JSON object")
    vr.set_defaults(handler=_cmd_verify_readings)

    pr = au_sub.add_parser(
        "prune-originals",
        help="delete signed originals past their study's retention",
        description="Delete the signed originals older than their study's retention "
        "(`audit originals-retention`); studies without one keep them. Audited per study. "
        "Meant for a daily timer.",
    )
    add_database_flags(pr)
    pr.set_defaults(handler=_cmd_prune)

    rt = au_sub.add_parser(
        "originals-retention",
        help="how long a study keeps the signed originals of its readings",
        description="Signed originals let an auditor check every stored reading against "
        "what the hub signed (`audit verify-readings`); they cost storage (docs/storage.md). "
        "A study keeps them as long as its envelopes by default.",
    )
    add_database_flags(rt)
    rt.add_argument("--study", required=True, help="study id")
    how = rt.add_mutually_exclusive_group(required=True)
    how.add_argument("--days", type=_positive, help="keep them this many days")
    how.add_argument("--keep", action="store_true", help="keep them (no retention limit)")
    operator.add_operator_flags(rt)
    rt.set_defaults(handler=_cmd_retention)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from exc
    if not 0 < n <= 36_500:
        raise argparse.ArgumentTypeError("days must be 1-36500")
    return n


def _cmd_verify_readings(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.source_check import Checked, check
    from storage import db, originals

    url = settings.require_database_url()
    start: datetime = args.from_time or EPOCH
    end: datetime = args.to_time or datetime.now(UTC) + timedelta(days=1)
    if end <= start:
        print("--to must be after --from", file=sys.stderr)
        return 2

    async def go() -> list[Checked]:
        found: list[Checked] = []
        async with db.connection(url, autocommit=True) as conn:
            at = start
            while at < end:
                until = min(at + CHUNK, end)
                readings = await originals.participant_readings(conn, args.participant, at, until)
                if readings:
                    keys = sorted({(r.device_id, r.seq) for r in readings})
                    found.extend(check(readings, await originals.originals(conn, keys)).checked)
                at = until
        return found

    from gateway.source_check import Report

    report = Report(tuple(run(go())))
    _print(args, report)
    return EXIT_UNVERIFIED if report.unverified else 0


def _print(args: argparse.Namespace, report: Report) -> None:
    def described(c: Any) -> dict[str, Any]:
        r = c.reading
        return {
            "time": datetime.fromtimestamp(r.t_ms / 1000, UTC).isoformat(),
            "metric": r.metric,
            "value": r.value,
            "device_id": r.device_id,
            "seq": r.seq,
            "finding": c.finding.value,
            "detail": c.detail,
        }

    if args.json:
        print(
            json.dumps(
                {
                    "participant_id": args.participant,
                    "readings": len(report.checked),
                    "verified": report.verified,
                    "findings": report.counts(),
                    "unverified": [described(c) for c in report.unverified],
                }
            )
        )
        return
    total, bad = len(report.checked), report.unverified
    print(f"{args.participant}: {report.verified} of {total} stored readings verify")
    for name, n in sorted(report.counts().items()):
        if name != "verified":
            print(f"  {name}: {n}")
    for c in bad[:SHOWN]:
        d = described(c)
        print(
            f"  {d['time']} {d['metric']}={d['value']:g} ({d['device_id']}#{d['seq']}): "
            f"{d['finding']} {d['detail']}".rstrip()
        )
    if len(bad) > SHOWN:
        print(f"  ... and {len(bad) - SHOWN} more (--json lists all)")


def _cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db, originals

    url = settings.require_database_url()

    async def go() -> list[originals.Pruned]:
        async with db.connection(url, autocommit=True) as conn:
            return await originals.prune(conn, datetime.now(UTC), actor=RETENTION_ACTOR)

    pruned = run(go())
    for p in pruned:
        print(f"study {p.study_id}: {p.pruned} originals past retention deleted")
    if not pruned:
        print("no originals past retention")
    return 0


@operator.authenticated("audit originals-retention")
def _cmd_retention(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db, originals

    url = settings.require_database_url()
    days = None if args.keep else args.days

    async def go() -> None:
        async with db.connection(url, autocommit=True) as conn:
            await originals.set_retention(conn, args.study, days, actor=operator.current().actor)

    run(go())
    print(
        f"study {args.study}: signed originals " + ("kept" if days is None else f"kept {days} days")
    )
    return 0
