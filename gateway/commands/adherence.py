"""`trialstream adherence`: the protocol's collection schedule, participants' arms, and a
participant's adherence by local day (docs/adherence.md)."""

from __future__ import annotations

import argparse
import functools
import json
from datetime import UTC, date, datetime, timedelta

from gateway.commands import operator
from gateway.commands.common import Subparsers, run
from gateway.errors import ConfigError
from gateway.settings import Settings
from storage import adherence, db, schedules, views
from storage.adherence import MetricDay
from storage.schedules import Expectation, ScheduleError, ScheduleKind

DEFAULT_DAYS = 14
MAX_DAYS = 92


def iso_day(text: str) -> date:
    """An argparse type: a calendar day, YYYY-MM-DD."""
    if len(text) != 10:
        raise argparse.ArgumentTypeError(f"not a day (YYYY-MM-DD): {text[:40]!r}")
    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a day (YYYY-MM-DD): {text!r}") from exc
    if not adherence.FIRST_DAY <= day <= adherence.LAST_DAY:
        raise argparse.ArgumentTypeError(
            f"a day from {adherence.FIRST_DAY} to {adherence.LAST_DAY}, not {text}"
        )
    return day


def register(sub: Subparsers) -> None:
    group = sub.add_parser(
        "adherence",
        help="the collection schedule, arms, and participants' adherence",
        description="What the protocol expects each participant to collect (continuous "
        "streams worn so many hours a day, spot checks so many times a day), and how each "
        "participant's local days measure up. Run as your user account (--as USER).",
    )
    actions = group.add_subparsers(dest="adherence_command", metavar="ACTION", required=True)

    action = functools.partial(operator.add_action, actions)

    p = action(
        "schedule",
        "expect a metric of a study, an arm or one participant from a day on (admins)",
    )
    p.add_argument("--study", required=True, help="study id")
    p.add_argument("--metric", required=True, help="metric, e.g. heart_rate, glucose")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--continuous",
        action="store_true",
        help="a stream: give --rate-hz and --wear-hours",
    )
    kind.add_argument("--spot", action="store_true", help="spot checks: give --per-day")
    kind.add_argument(
        "--none", action="store_true", help="nothing expected (exempts an arm or a participant)"
    )
    p.add_argument("--rate-hz", type=float, help="the stream's expected rate, e.g. 1")
    p.add_argument("--wear-hours", type=float, help="hours a day it should be worn, up to 24")
    p.add_argument("--per-day", type=int, help="spot checks a day, 1 to 96")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--arm", help="for this arm only")
    scope.add_argument("--participant", help="for this participant only (an override)")
    p.add_argument(
        "--from",
        dest="from_day",
        type=iso_day,
        help="from this local day on (YYYY-MM-DD; default: today, UTC)",
    )
    p.set_defaults(handler=_schedule)

    p = action("schedules", "list a study's schedule")
    p.add_argument("--study", required=True, help="study id")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=_schedules)

    p = action("arm", "assign a participant to an arm of the study (coordinators)")
    p.add_argument("--participant", required=True, help="participant id")
    arm = p.add_mutually_exclusive_group(required=True)
    arm.add_argument("--arm", help="the arm's name, e.g. A")
    arm.add_argument("--no-arm", action="store_true", help="take the participant out of arms")
    p.set_defaults(handler=_arm)

    p = action("show", "show a participant's adherence by local day")
    p.add_argument("--participant", required=True, help="participant id")
    p.add_argument(
        "--from", dest="from_day", type=iso_day, help="first day (default: 13 before --to)"
    )
    p.add_argument("--to", dest="to_day", type=iso_day, help="last day (default: today, UTC)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=_show)


def _expectation(args: argparse.Namespace) -> Expectation:
    kind = (
        ScheduleKind.CONTINUOUS
        if args.continuous
        else ScheduleKind.SPOT
        if args.spot
        else ScheduleKind.NONE
    )
    try:
        return Expectation(kind, args.rate_hz, args.wear_hours, args.per_day)
    except ScheduleError as exc:
        raise ConfigError(str(exc)) from exc


@operator.authenticated("adherence schedule")
def _schedule(args: argparse.Namespace, settings: Settings) -> int:
    expectation = _expectation(args)
    from_day = args.from_day or datetime.now(UTC).date()

    async def go() -> int:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            return await schedules.set_schedule(
                conn,
                args.study,
                args.metric,
                expectation,
                effective_from=from_day,
                actor=operator.current().actor,
                arm=args.arm,
                participant_id=args.participant,
            )

    try:
        schedule_id = run(go())
    except ScheduleError as exc:
        raise ConfigError(str(exc)) from exc
    scope = (
        f"participant {args.participant}"
        if args.participant
        else f"arm {args.arm}"
        if args.arm
        else "the study"
    )
    what = _describe(expectation)
    print(f"schedule {schedule_id}: {args.metric} {what} for {scope} from {from_day}")
    return 0


def _describe(e: Expectation) -> str:
    if e.kind is ScheduleKind.CONTINUOUS:
        return f"continuous at {e.rate_hz:g} Hz, worn {e.wear_hours:g} h a day"
    if e.kind is ScheduleKind.SPOT:
        return f"{e.per_day} spot checks a day"
    return "not expected"


@operator.authenticated("adherence schedules")
def _schedules(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> list[schedules.ScheduleEntry]:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            return await schedules.schedule(conn, args.study)

    entries = run(go())
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "metric": e.metric,
                        "scope": e.scope,
                        "effective_from": e.effective_from.isoformat(),
                        "kind": e.kind,
                        "rate_hz": e.rate_hz,
                        "wear_hours": e.wear_hours,
                        "per_day": e.per_day,
                        "recorded_by": e.recorded_by,
                        "recorded_at": e.recorded_at.isoformat(),
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return 0
    if not entries:
        print(f"study {args.study} has no schedule: `trialstream adherence schedule --help`")
    for e in entries:
        expectation = Expectation(ScheduleKind(e.kind), e.rate_hz, e.wear_hours, e.per_day)
        print(f"{e.metric:<18} {e.scope:<24} from {e.effective_from}  {_describe(expectation)}")
    return 0


@operator.authenticated("adherence arm")
def _arm(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> None:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            home = await views.participant_home(conn, args.participant)
            if home is None:
                raise ConfigError(f"no participant {args.participant!r}")
            operator.current().check_site(home[1])
            arm = None if args.no_arm else args.arm
            await schedules.set_arm(conn, args.participant, arm, actor=operator.current().actor)

    try:
        run(go())
    except ScheduleError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"participant {args.participant}: {'no arm' if args.no_arm else 'arm ' + args.arm}")
    return 0


def _span(args: argparse.Namespace) -> tuple[date, date]:
    last = args.to_day or datetime.now(UTC).date()
    first = args.from_day or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise ConfigError("--from must not be after --to")
    if (last - first).days >= MAX_DAYS:
        raise ConfigError(f"at most {MAX_DAYS} days at once")
    return first, last


@operator.authenticated("adherence show")
def _show(args: argparse.Namespace, settings: Settings) -> int:
    first, last = _span(args)

    async def go() -> list[MetricDay]:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            home = await views.participant_home(conn, args.participant)
            if home is None:
                raise ConfigError(f"no participant {args.participant!r}")
            operator.current().check_site(home[1])
            return await adherence.days(conn, [args.participant], first, last)

    rows = run(go())
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "day": r.day.isoformat(),
                        "metric": r.metric,
                        "kind": r.kind,
                        "readings": r.readings,
                        "invalid": r.invalid,
                        "worn_minutes": r.worn_minutes,
                        "expected_minutes": r.expected_minutes,
                        "expected_count": r.expected_count,
                        "adherence": r.adherence,
                        "completeness": r.completeness,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    print(f"participant {args.participant}, {first} to {last} (local days)")
    for r in rows:
        print(f"  {r.day}  {r.metric:<18} {_line(r)}")
    return 0


def _line(r: MetricDay) -> str:
    share = "" if r.adherence is None else f"{r.adherence:6.0%}  "
    if r.expected_minutes is not None:
        return f"{share}worn {r.worn_minutes / 60:.1f} h of {r.expected_minutes / 60:.1f} h" + (
            f", {r.invalid} invalid readings" if r.invalid else ""
        )
    if r.expected_count is not None:
        done = r.readings - r.invalid
        return f"{share}{done} of {r.expected_count} done" + (
            f", {r.invalid} invalid" if r.invalid else ""
        )
    return f"       {r.readings} readings (nothing expected)"
