"""`trialstream notify`: how people are reached about alerts, who is on call, what was sent.

Contacts and on-call assignments are changed as an authenticated user (``--as``) and audited;
the lists are read-only (docs/notifications.md)."""

from __future__ import annotations

import argparse
import json
import secrets
from datetime import UTC, datetime, timedelta

from gateway.commands import operator
from gateway.commands.common import Subparsers, add_database_flags, iso_time, run
from gateway.settings import Settings

# The choices of storage.notifications, spelled out so that `trialstream --help` does not
# import it; tests/test_cli_notify.py keeps them equal.
EVENTS = ("escalated", "critical")
STATES = ("pending", "sent", "failed", "no_recipient")
MAX_LIST = 1000


def _when(text: str) -> datetime:
    """``now``, or an ISO 8601 time with its zone (``common.iso_time``: bounded, years the
    database and Python share)."""
    return datetime.now(UTC) if text == "now" else iso_time(text)


def _hours(text: str) -> timedelta:
    hours = int(text) if text.isascii() and text.isdigit() and len(text) <= 4 else 0
    if not 1 <= hours <= 8784:
        raise argparse.ArgumentTypeError(f"expected whole hours from 1 to 8784: {text[:20]!r}")
    return timedelta(hours=hours)


def _events(text: str) -> list[str]:
    chosen = [e.strip() for e in text.split(",") if e.strip()]
    wrong = [e for e in chosen if e not in EVENTS]
    if not chosen or wrong:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(EVENTS)}: {text[:60]!r}"
        )
    return chosen


def _id(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an id: {text[:20]!r}")
    return value


def _limit(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 5 else 0
    if not 1 <= value <= MAX_LIST:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_LIST}: {text[:20]!r}")
    return value


def register(sub: Subparsers) -> None:
    no = sub.add_parser(
        "notify",
        help="alert e-mail and webhooks: contacts, on call, deliveries",
        description="Escalated alerts and critical alerts reach whoever is on call for the "
        "alert's site, by e-mail and by signed webhook as each person chose. Every delivery "
        "is recorded; failed ones are retried, then shown on the monitor board.",
    )
    no_sub = no.add_subparsers(dest="notify_command", metavar="ACTION", required=True)

    contact = no_sub.add_parser(
        "contact",
        help="set how a user is reached",
        description="Set a user's e-mail address and/or webhook URL and the events sent there "
        "(admins for anyone; others for themselves). A webhook gets a new signing secret, "
        "printed once: give it to the paging system, which checks each request's "
        "Trialstream-Signature with it (docs/notifications.md). Without --email and "
        "--webhook-url, the user is no longer reached.",
    )
    add_database_flags(contact)
    contact.add_argument("--user", required=True, help="the user to reach")
    contact.add_argument("--email", help="e-mail address")
    contact.add_argument("--webhook-url", help="https URL the alert is POSTed to")
    contact.add_argument(
        "--events",
        type=_events,
        default=list(EVENTS),
        help="comma-separated: escalated (left unacknowledged), critical (a critical alert "
        "opened); default both",
    )
    operator.add_operator_flags(contact)
    contact.set_defaults(handler=_cmd_contact)

    contacts = no_sub.add_parser(
        "contacts", help="list contacts", description="Every user's contact (no secrets)."
    )
    add_database_flags(contacts)
    contacts.add_argument("--json", action="store_true", help="print JSON lines")
    contacts.set_defaults(handler=_cmd_contacts)

    oc = no_sub.add_parser(
        "on-call", help="who is on call for a site", description="On-call assignments."
    )
    oc_sub = oc.add_subparsers(dest="on_call_command", metavar="ACTION", required=True)
    add = oc_sub.add_parser(
        "add",
        help="put a user on call for a site",
        description="From --from (default now) for --hours, or to --to. Several people may "
        "be on call at once: each is told.",
    )
    add_database_flags(add)
    add.add_argument("--site", required=True, help="site id")
    add.add_argument("--user", required=True, help="who is on call")
    add.add_argument("--from", dest="from_time", type=_when, default="now", help="ISO time")
    end = add.add_mutually_exclusive_group(required=True)
    end.add_argument("--to", dest="to_time", type=_when, help="ISO time with offset")
    end.add_argument("--hours", type=_hours, help="how long, in whole hours")
    operator.add_operator_flags(add)
    add.set_defaults(handler=_cmd_on_call_add)
    remove = oc_sub.add_parser(
        "remove", help="end an assignment", description="Remove an on-call assignment."
    )
    add_database_flags(remove)
    remove.add_argument("on_call_id", type=_id, metavar="ID", help="assignment id")
    operator.add_operator_flags(remove)
    remove.set_defaults(handler=_cmd_on_call_remove)
    ls = oc_sub.add_parser(
        "list", help="current and coming assignments", description="Assignments not yet over."
    )
    add_database_flags(ls)
    ls.add_argument("--site", help="only this site")
    ls.add_argument("--json", action="store_true", help="print JSON lines")
    ls.set_defaults(handler=_cmd_on_call_list)

    dl = no_sub.add_parser(
        "deliveries",
        help="what was sent, to whom, and what failed",
        description="The latest deliveries, newest first.",
    )
    add_database_flags(dl)
    dl.add_argument("--site", help="only this site")
    dl.add_argument("--state", action="append", choices=STATES, help="only these (repeatable)")
    dl.add_argument("--limit", type=_limit, default=50, help=f"at most this many (1-{MAX_LIST})")
    dl.add_argument("--json", action="store_true", help="print JSON lines")
    dl.set_defaults(handler=_cmd_deliveries)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


@operator.authenticated("notify contact")
def _cmd_contact(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db, notifications
    from storage.users import Role

    url = settings.require_database_url()
    op = operator.current()
    if op.user is not None and op.user.role is not Role.ADMIN and op.user.username != args.user:
        raise operator.Refused("only an admin sets another user's contact", "NotPermitted")
    secret = secrets.token_bytes(notifications.SECRET_BYTES) if args.webhook_url else None

    async def go() -> None:
        async with db.connection(url, autocommit=True) as conn:
            await notifications.set_contact(
                conn,
                username=args.user,
                email=args.email,
                webhook_url=args.webhook_url,
                webhook_secret=secret,
                events=[notifications.Event(e) for e in args.events],
                actor=op.actor,
            )

    run(go())
    if args.email is None and args.webhook_url is None:
        print(f"{args.user} is no longer reached about alerts")
        return 0
    ways = [w for w in (args.email, args.webhook_url) if w]
    print(f"{args.user} is reached at {' and '.join(ways)} for: {', '.join(args.events)}")
    if secret is not None:
        print(f"webhook signing secret (shown once): {secret.hex()}")
    return 0


def _cmd_contacts(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db, notifications

    url = settings.require_database_url()

    async def go() -> list[notifications.Contact]:
        async with db.connection(url, autocommit=True) as conn:
            return await notifications.contacts(conn)

    for c in run(go()):
        if args.json:
            print(
                json.dumps(
                    {
                        "user": c.username,
                        "email": c.email,
                        "webhook_url": c.webhook_url,
                        "events": c.events,
                        "updated_by": c.updated_by,
                        "updated_at": _iso(c.updated_at),
                    }
                )
            )
        else:
            ways = ", ".join(w for w in (c.email, c.webhook_url) if w)
            print(f"{c.username:<20} {ways}  [{', '.join(c.events)}]")
    return 0


@operator.authenticated("notify on-call add")
def _cmd_on_call_add(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db, notifications

    url = settings.require_database_url()
    op = operator.current()
    op.check_site(args.site)
    end = args.to_time if args.to_time is not None else args.from_time + args.hours

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            return await notifications.add_on_call(
                conn,
                site_id=args.site,
                username=args.user,
                from_time=args.from_time,
                to_time=end,
                actor=op.actor,
            )

    on_call_id = run(go())
    print(
        f"on call {on_call_id}: {args.user} for site {args.site} from"
        f" {args.from_time.isoformat(timespec='minutes')} to {end.isoformat(timespec='minutes')}"
    )
    return 0


@operator.authenticated("notify on-call remove")
def _cmd_on_call_remove(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db, notifications
    from storage.users import Role

    url = settings.require_database_url()
    op = operator.current()
    sites = None if op.user is None or op.user.role is Role.ADMIN else op.user.sites

    async def go() -> None:
        async with db.connection(url, autocommit=True) as conn:
            await notifications.remove_on_call(conn, args.on_call_id, actor=op.actor, sites=sites)

    run(go())
    print(f"on call {args.on_call_id} removed")
    return 0


def _cmd_on_call_list(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db, notifications

    url = settings.require_database_url()

    async def go() -> list[notifications.OnCall]:
        async with db.connection(url, autocommit=True) as conn:
            return await notifications.on_call(conn, args.site, datetime.now(UTC))

    for o in run(go()):
        if args.json:
            print(
                json.dumps(
                    {
                        "on_call_id": o.on_call_id,
                        "site_id": o.site_id,
                        "user": o.username,
                        "from": _iso(o.from_time),
                        "to": _iso(o.to_time),
                        "created_by": o.created_by,
                    }
                )
            )
        else:
            print(
                f"{o.on_call_id:>6}  {o.site_id:<12} {o.username:<20}"
                f" {o.from_time.isoformat(timespec='minutes')} .."
                f" {o.to_time.isoformat(timespec='minutes')}"
            )
    return 0


def _cmd_deliveries(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db, notifications
    from storage.notifications import State

    url = settings.require_database_url()

    async def go() -> list[notifications.Delivery]:
        async with db.connection(url, autocommit=True) as conn:
            return await notifications.deliveries(
                conn,
                sites=[args.site] if args.site else None,
                states=[State(s) for s in args.state] if args.state else None,
                limit=args.limit,
            )

    for d in run(go()):
        if args.json:
            print(json.dumps(d.as_json()))
        else:
            to = f"{d.username} by {d.channel}" if d.username else "nobody"
            why = f"  ({d.last_error})" if d.last_error else ""
            print(
                f"{d.delivery_id:>6}  alert {d.alert_id} {d.event} [{d.severity}]"
                f" site {d.site_id}: {to}: {d.state}, {d.attempts} attempt(s){why}"
            )
    return 0
