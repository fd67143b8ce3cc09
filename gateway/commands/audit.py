"""`trialstream audit`: verify the audit trail against its hash chain and its signed
checkpoints, write a checkpoint, show a participant's history."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.commands import audit_readings
from gateway.commands.common import Subparsers, add_database_flags, run
from gateway.settings import Settings

if TYPE_CHECKING:
    from storage.audit import AnchorFailure, VerifyReport
    from storage.audit_checkpoints import Checkpoint, CheckpointFile

EXIT_BROKEN = 1
# `verify --require-checkpoints` found the chain consistent but nothing to anchor it.
EXIT_NO_CHECKPOINTS = 3
# How many failing checkpoints `verify` names one by one before it just counts the rest.
SHOWN_FAILURES = 5


def _add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoints",
        type=Path,
        metavar="FILE",
        help="the checkpoint file (default: $TRIALSTREAM_AUDIT_CHECKPOINTS, else "
        "<data dir>/audit/checkpoints.jsonl)",
    )
    p.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="the checkpoint signing key (default: $TRIALSTREAM_AUDIT_CHECKPOINT_KEY, else "
        "<data dir>/keys/audit-checkpoint.key)",
    )


def register(sub: Subparsers) -> None:
    au = sub.add_parser(
        "audit",
        help="verify, checkpoint or show the audit trail",
        description="The audit trail is append-only and hash-chained. The chain alone "
        "cannot show a rewrite by the database owner, who can recompute every hash: "
        "`checkpoint` records the chain head signed with a key kept outside the database, "
        "and `verify` checks the chain and every checkpoint. `show` prints a readable "
        "history.",
    )
    au_sub = au.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    ver = au_sub.add_parser(
        "verify",
        help="check the hash chain and the signed checkpoints; exit 1 on tampering",
        description="Recompute every row's hash from its content and the previous row's "
        "hash, then check each signed checkpoint: its signature, and that the row it names "
        "still carries the hash it recorded. A rewrite of history before a checkpoint is "
        "found even if the whole chain was recomputed in the database. Exit 0: all holds "
        "(with a warning when there are no checkpoints); 1: tampering, naming the first "
        "broken row and every failing checkpoint; 2: a setting or file is unusable; "
        "3: no checkpoints and --require-checkpoints.",
    )
    add_database_flags(ver)
    _add_checkpoint_flags(ver)
    ver.add_argument(
        "--public-key",
        type=Path,
        metavar="FILE",
        help="check signatures with this PEM public key (e.g. a copy kept by the auditor) "
        "instead of the signing key or its .pub beside it",
    )
    ver.add_argument(
        "--require-checkpoints",
        action="store_true",
        help="exit 3 when there is no checkpoint to check the chain against",
    )
    ver.set_defaults(handler=_cmd_verify)
    cp = au_sub.add_parser(
        "checkpoint",
        help="sign the chain head and append it to the checkpoint file",
        description="Verify the chain (and the checkpoints so far), then sign its head "
        "(last row id, its hash, the row count, the time) with the checkpoint key and "
        "append it as one JSON line to the checkpoint file. The key is created on first "
        "use (mode 0600, public half in <key>.pub). Keep both off the database host, and "
        "run this from cron or a systemd timer (hourly, say): a rewrite of anything before "
        "the latest checkpoint is then found by `audit verify`. Refuses, exit 1, when the "
        "trail does not verify.",
    )
    add_database_flags(cp)
    _add_checkpoint_flags(cp)
    cp.set_defaults(handler=_cmd_checkpoint)
    show = au_sub.add_parser(
        "show",
        help="a participant's audit history",
        description="Print every audit record about one participant, oldest first.",
    )
    add_database_flags(show)
    show.add_argument("--participant", required=True, help="participant id")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.set_defaults(handler=_cmd_show)
    audit_readings.register(au_sub)


def _paths(args: argparse.Namespace, settings: Settings) -> tuple[Path, Path]:
    checkpoints: Path = args.checkpoints or settings.audit_checkpoints_path
    key: Path = args.key or settings.audit_checkpoint_key_path
    return checkpoints, key


def _describe_failure(failure: AnchorFailure, report: VerifyReport, cps: CheckpointFile) -> str:
    checkpoint = cps.checkpoints[failure.index]
    anchor = failure.anchor
    name = (
        f"checkpoint #{checkpoint.seq} ({cps.path} line {checkpoint.seq}, signed "
        f"{checkpoint.at.isoformat(timespec='seconds')})"
    )
    if failure.found is None:
        what = f"audit row {anchor.audit_id} is gone from the database (removed or cut back)"
    elif failure.problem == "hash_differs":
        what = (
            f"audit row {anchor.audit_id} has hash {failure.found.hash.hex()[:16]}..., "
            f"the checkpoint signed {anchor.hash.hex()[:16]}...: the history up to row "
            f"{anchor.audit_id} was rewritten and rehashed"
        )
    else:
        what = (
            f"audit row {anchor.audit_id} has {failure.found.count} rows up to it, the "
            f"checkpoint signed {anchor.count}"
        )
    held = [
        cps.checkpoints[i].head.audit_id
        for i in report.anchors_held
        if cps.checkpoints[i].head.audit_id < anchor.audit_id
    ]
    since = f" (after row {max(held)}, which an earlier checkpoint confirms)" if held else ""
    return f"broken: {name}: {what}{since}"


def _report_broken_chain(report: VerifyReport) -> None:
    b = report.broken
    if b is None:
        return
    what = (
        "its content does not match its hash (altered)"
        if b.problem == "content_changed"
        else "its prev_hash is not the previous row's hash (a row removed or inserted)"
    )
    print(
        f"broken: audit row {b.audit_id}: {what}; {report.rows_checked} rows before it verified",
        file=sys.stderr,
    )


def _cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from storage import audit, audit_checkpoints, db

    url = settings.require_database_url()
    checkpoints_path, key_path = _paths(args, settings)
    public_key = audit_checkpoints.load_verification_key(key_path, args.public_key)
    cps = audit_checkpoints.read(checkpoints_path, public_key)

    async def go() -> VerifyReport:
        async with db.connection(url, autocommit=True) as conn:
            return await audit.verify(conn, [c.head for c in cps.checkpoints])

    report = run(go())
    _report_broken_chain(report)
    for problem in cps.problems:
        print(f"broken: {cps.path} line {problem.line}: {problem.message}", file=sys.stderr)
    for failure in report.anchor_failures[:SHOWN_FAILURES]:
        print(_describe_failure(failure, report, cps), file=sys.stderr)
    if len(report.anchor_failures) > SHOWN_FAILURES:
        more = len(report.anchor_failures) - SHOWN_FAILURES
        print(f"broken: {more} more checkpoints fail the same way", file=sys.stderr)
    if report.anchors_unchecked:
        print(
            f"{report.anchors_unchecked} checkpoints not checked: their rows come after the "
            "broken row",
            file=sys.stderr,
        )
    if not report.ok or cps.problems:
        return EXIT_BROKEN
    print(f"ok: {report.rows_checked} rows, head {report.head_hash.hex()}")
    if not cps.checkpoints:
        where = "absent" if not cps.exists else "empty"
        print(
            f"warning: no checkpoints ({cps.path} is {where}): the chain is only "
            "self-consistent, and a database owner could have rewritten and rehashed it. "
            "Run `trialstream audit checkpoint` periodically (docs/storage.md).",
            file=sys.stderr,
        )
        return EXIT_NO_CHECKPOINTS if args.require_checkpoints else 0
    latest = max(cps.checkpoints, key=lambda c: c.head.audit_id)
    after = report.rows_checked - latest.head.count
    print(
        f"ok: {len(cps.checkpoints)} checkpoints hold; the latest, #{latest.seq} of "
        f"{latest.at.isoformat(timespec='seconds')}, covers rows up to {latest.head.audit_id}; "
        f"{after} rows after it rest on the hash chain alone"
    )
    return 0


def _cmd_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    from storage import audit, audit_checkpoints, db

    url = settings.require_database_url()
    checkpoints_path, key_path = _paths(args, settings)
    key, created = audit_checkpoints.load_or_create_signing_key(key_path)
    if created:
        print(
            f"created the audit checkpoint key {key_path} (public half "
            f"{audit_checkpoints.public_key_path(key_path)}: give a copy to the auditors)",
            file=sys.stderr,
        )
    cps = audit_checkpoints.read(checkpoints_path, key.public_key())

    async def go() -> VerifyReport:
        async with db.connection(url, autocommit=True) as conn:
            return await audit.verify(conn, [c.head for c in cps.checkpoints])

    report = run(go())
    if not report.ok or cps.problems:
        _report_broken_chain(report)
        for problem in cps.problems:
            print(f"broken: {cps.path} line {problem.line}: {problem.message}", file=sys.stderr)
        for failure in report.anchor_failures[:SHOWN_FAILURES]:
            print(_describe_failure(failure, report, cps), file=sys.stderr)
        print(
            "refused: the audit trail does not verify, so no checkpoint was written "
            "(signing it would vouch for the tampering)",
            file=sys.stderr,
        )
        return EXIT_BROKEN
    if report.rows_checked == 0:
        print("nothing to checkpoint: the audit trail is empty")
        return 0
    checkpoint: Checkpoint = audit_checkpoints.append(checkpoints_path, key, report.head)
    print(
        f"checkpoint #{checkpoint.seq}: row {checkpoint.head.audit_id}, "
        f"{checkpoint.head.count} rows, head {checkpoint.head.hash.hex()} -> {checkpoints_path}"
    )
    return 0


def _cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from storage import audit, db

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            rows = await audit.participant_history(conn, args.participant)
        for r in rows:
            if args.json:
                print(
                    json.dumps(
                        {
                            "audit_id": r.audit_id,
                            "at": r.at.isoformat(),
                            "actor": r.actor,
                            "action": r.action,
                            "entity": r.entity,
                            "entity_id": r.entity_id,
                            "detail": r.detail,
                            "reason": r.reason,
                        },
                        default=str,
                    )
                )
                continue
            detail = ", ".join(
                f"{k}={v}" for k, v in sorted(r.detail.items()) if k != "participant_id"
            )
            why = f" because {r.reason!r}" if r.reason else ""
            print(
                f"{r.at.isoformat(timespec='seconds')}  #{r.audit_id}  {r.actor}  {r.action}"
                f"  {r.entity} {r.entity_id}{why}" + (f"  [{detail}]" if detail else "")
            )
        if not rows:
            print(f"no audit records about {args.participant}")
        return 0

    return int(run(go()))
