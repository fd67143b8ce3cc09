"""`trialstream audit`: verify the hash chain of the audit trail, show a participant's history."""

from __future__ import annotations

import argparse
import json
import sys

from gateway.commands.common import Subparsers, add_database_flags, run
from gateway.settings import Settings

EXIT_BROKEN = 1


def register(sub: Subparsers) -> None:
    au = sub.add_parser(
        "audit",
        help="verify or show the audit trail",
        description="The audit trail is append-only and hash-chained: `verify` walks the "
        "chain and names the first row that does not hold; `show` prints a readable history.",
    )
    au_sub = au.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    ver = au_sub.add_parser(
        "verify",
        help="walk the hash chain; exit 1 naming the first broken row",
        description="Recompute every row's hash from its content and the previous row's "
        "hash. Prints the number of rows and the head hash (keep it elsewhere to detect a "
        "rewritten tail), or the first broken row and exits 1.",
    )
    add_database_flags(ver)
    ver.set_defaults(handler=_cmd_verify)
    show = au_sub.add_parser(
        "show",
        help="a participant's audit history",
        description="Print every audit record about one participant, oldest first.",
    )
    add_database_flags(show)
    show.add_argument("--participant", required=True, help="participant id")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.set_defaults(handler=_cmd_show)


def _cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from storage import audit, db

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            report = await audit.verify(conn)
        if report.broken is None:
            print(f"ok: {report.rows_checked} rows, head {report.head_hash.hex()}")
            return 0
        b = report.broken
        what = (
            "its content does not match its hash (altered)"
            if b.problem == "content_changed"
            else "its prev_hash is not the previous row's hash (a row removed or inserted)"
        )
        print(
            f"broken: audit row {b.audit_id}: {what}; "
            f"{report.rows_checked} rows before it verified",
            file=sys.stderr,
        )
        return EXIT_BROKEN

    return int(run(go()))


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
