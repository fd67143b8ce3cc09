"""`trialstream alerts`: rules, the study's escalation time, and the alert lifecycle.

Changes are made as an authenticated clinician, monitor or admin (``--as``,
:mod:`gateway.commands.operator`) and audited with that user."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import TYPE_CHECKING

from gateway.commands import operator
from gateway.commands.common import Subparsers, add_database_flags, run
from gateway.settings import Settings

if TYPE_CHECKING:
    from ingest.rules import Rule
    from storage.db import Conn

# The choices of ingest.rules and storage.alerts, spelled out so that `trialstream --help`
# does not import the rule engine; tests/alerts/test_cli.py keeps them equal.
KINDS = ("range", "missing_data", "adherence")
SEVERITIES = ("info", "warning", "critical")
STATES = ("open", "acknowledged", "resolved")
DEFAULT_MAX_GAP_S = 60
DAY_S = 86_400
MAX_ADHERENCE_DAYS = 31


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds > 0: {text!r}")
    return value


def _days(text: str) -> int:
    """An adherence rule's span: 1-31 whole days."""
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 2 else 0
    if not 1 <= value <= MAX_ADHERENCE_DAYS:
        raise argparse.ArgumentTypeError(
            f"expected whole days from 1 to {MAX_ADHERENCE_DAYS}: {text[:20]!r}"
        )
    return value


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds >= 0: {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc


def _as(p: argparse.ArgumentParser) -> None:
    operator.add_operator_flags(p)


def register(sub: Subparsers) -> None:
    al = sub.add_parser(
        "alerts",
        help="alert rules and alerts to monitors",
        description="Define alert rules per study (with per-participant overrides), list "
        "alerts, acknowledge and resolve them. Every change is audited.",
    )
    al_sub = al.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)

    rules = al_sub.add_parser(
        "rules", help="alert rules of a study", description="Add and list alert rules."
    )
    rules_sub = rules.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    add = rules_sub.add_parser(
        "add",
        help="add a study rule, or a participant's override of one",
        description="A range rule opens when the metric stays outside [low, high] for "
        "--sustained-s (readings no further apart than --max-gap-s) and clears inside "
        "[low + hysteresis, high - hysteresis]. A missing_data rule opens when no reading "
        "of the metric is newer than --sustained-s. An adherence rule opens when the "
        "participant met less than --low percent of the schedule's expectation for the "
        "metric on each of the last --days local days it was expected, and clears when that "
        "no longer holds (docs/adherence.md). With --participant, the rule replaces the "
        "study rule of the same name for that participant.",
    )
    add_database_flags(add)
    add.add_argument("--study", required=True, help="study id")
    add.add_argument("--name", required=True, help="rule name (unique in the study)")
    add.add_argument("--metric", required=True, help="metric, e.g. heart_rate")
    add.add_argument("--participant", help="make it this participant's override")
    add.add_argument("--kind", choices=KINDS, default=KINDS[0])
    add.add_argument("--low", type=_number, help="lower bound (range rules)")
    add.add_argument("--high", type=_number, help="upper bound (range rules)")
    add.add_argument(
        "--sustained-s", type=_seconds, default=0, help="how long the condition must hold"
    )
    add.add_argument("--hysteresis", type=_number, default=0.0, help="clearing margin")
    add.add_argument(
        "--days",
        type=_days,
        help=f"adherence rules: how many expected days in a row (1-{MAX_ADHERENCE_DAYS})",
    )
    add.add_argument(
        "--max-gap-s",
        type=_positive,
        default=DEFAULT_MAX_GAP_S,
        help=f"longest spacing of readings in a sustained run (default {DEFAULT_MAX_GAP_S})",
    )
    add.add_argument("--severity", choices=SEVERITIES, default="warning")
    add.add_argument(
        "--escalate-after-s",
        type=_positive,
        help="escalate when unacknowledged this long (default: the study's time)",
    )
    _as(add)
    add.set_defaults(handler=_cmd_rules_add)
    ls_rules = rules_sub.add_parser(
        "list", help="list rules", description="List alert rules, of one study or all."
    )
    add_database_flags(ls_rules)
    ls_rules.add_argument("--study", help="only this study")
    ls_rules.add_argument("--json", action="store_true", help="print JSON")
    ls_rules.set_defaults(handler=_cmd_rules_list)

    esc = al_sub.add_parser(
        "escalation",
        help="set the study's escalation time",
        description="How long an alert of the study may stay unacknowledged before it "
        "escalates (a rule's --escalate-after-s wins over it).",
    )
    add_database_flags(esc)
    esc.add_argument("--study", required=True, help="study id")
    when = esc.add_mutually_exclusive_group(required=True)
    when.add_argument("--after-s", type=_positive, help="seconds unacknowledged")
    when.add_argument("--never", action="store_true", help="no escalation")
    _as(esc)
    esc.set_defaults(handler=_cmd_escalation)

    doubt = al_sub.add_parser(
        "doubtful",
        help="whether the study's rules judge readings the device doubted",
        description="Readings a wearable marks invalid or questionable (no skin contact, "
        "a loose cuff, a weak signal: docs/alerts.md) are stored and shown, but by default "
        "no alert rule judges them; `alerts rules list` says how many each rule skipped.",
    )
    add_database_flags(doubt)
    doubt.add_argument("--study", required=True, help="study id")
    choice = doubt.add_mutually_exclusive_group(required=True)
    choice.add_argument("--judge", action="store_true", help="rules judge them too")
    choice.add_argument("--skip", action="store_true", help="rules skip them (the default)")
    _as(doubt)
    doubt.set_defaults(handler=_cmd_doubtful)

    ls = al_sub.add_parser("list", help="list alerts", description="List alerts, oldest first.")
    add_database_flags(ls)
    ls.add_argument("--study", help="only this study")
    ls.add_argument(
        "--state",
        action="append",
        choices=STATES,
        help="only alerts in this state (repeatable; default: all)",
    )
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(handler=_cmd_list)

    for name, verb, handler in (
        ("ack", "acknowledge an open alert", _cmd_ack),
        ("resolve", "resolve an acknowledged alert", _cmd_resolve),
    ):
        p = al_sub.add_parser(name, help=verb, description=f"{verb.capitalize()} (audited).")
        add_database_flags(p)
        p.add_argument("alert_id", type=_positive, metavar="ID", help="alert id")
        _as(p)
        p.add_argument("--note", help="what was done, or why")
        p.set_defaults(handler=handler)


@operator.authenticated("alerts rules add")
def _cmd_rules_add(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.rules import RuleKind, Severity
    from storage import alerts, db

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            rule = await alerts.add_rule(
                conn,
                study_id=args.study,
                name=args.name,
                metric=args.metric,
                created_by=operator.current().actor,
                kind=RuleKind(args.kind),
                low=args.low,
                high=args.high,
                sustained_s=args.days * DAY_S if args.days else args.sustained_s,
                hysteresis=args.hysteresis,
                max_gap_s=args.max_gap_s,
                severity=Severity(args.severity),
                participant_id=args.participant,
                escalate_after_s=args.escalate_after_s,
            )
        print(f"rule {rule.rule_id} added: {_describe(rule)}")
        return 0

    return int(run(go()))


def _describe(rule: Rule) -> str:
    from ingest.rules import RuleKind

    who = f"participant {rule.participant_id}" if rule.participant_id else "study"
    if rule.kind is RuleKind.MISSING_DATA:
        what = f"no {rule.metric} for {rule.sustained_s} s"
    elif rule.kind is RuleKind.ADHERENCE:
        days = rule.sustained_s // DAY_S
        what = f"{rule.metric} adherence < {rule.low:g} % on {days} expected day(s) in a row"
    else:
        bounds = " or ".join(
            b
            for b in (
                None if rule.low is None else f"< {rule.low:g}",
                None if rule.high is None else f"> {rule.high:g}",
            )
            if b
        )
        what = f"{rule.metric} {bounds} for {rule.sustained_s} s"
        if rule.hysteresis:
            what += f", hysteresis {rule.hysteresis:g}"
    return f"{rule.study_id} {rule.name!r} ({who}): {what} [{rule.severity.value}]"


def _cmd_rules_list(args: argparse.Namespace, settings: Settings) -> int:
    from storage import alert_state, alerts, db

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            rules = await alerts.list_rules(conn, args.study)
            skipped = await alert_state.skipped_by_rule(conn, [r.rule_id for r in rules])
        for r in rules:
            if args.json:
                print(
                    json.dumps(
                        {
                            "rule_id": r.rule_id,
                            "study_id": r.study_id,
                            "participant_id": r.participant_id,
                            "name": r.name,
                            "kind": r.kind.value,
                            "metric": r.metric,
                            "low": r.low,
                            "high": r.high,
                            "sustained_s": r.sustained_s,
                            "hysteresis": r.hysteresis,
                            "max_gap_s": r.max_gap_s,
                            "severity": r.severity.value,
                            "escalate_after_s": r.escalate_after_s,
                            "doubtful_skipped": skipped.get(r.rule_id, 0),
                        }
                    )
                )
            else:
                n = skipped.get(r.rule_id, 0)
                note = f"  (skipped {n} doubtful reading{'' if n == 1 else 's'})" if n else ""
                print(f"{r.rule_id:>6}  {_describe(r)}{note}")
        return 0

    return int(run(go()))


@operator.authenticated("alerts escalation")
def _cmd_escalation(args: argparse.Namespace, settings: Settings) -> int:
    from storage import alerts, db

    url = settings.require_database_url()
    seconds = None if args.never else args.after_s

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            await alerts.set_study_escalation(
                conn, args.study, seconds, actor=operator.current().actor
            )
        print(
            f"study {args.study}: "
            + ("alerts never escalate" if seconds is None else f"escalate after {seconds} s")
        )
        return 0

    return int(run(go()))


@operator.authenticated("alerts doubtful")
def _cmd_doubtful(args: argparse.Namespace, settings: Settings) -> int:
    from storage import alert_state, db

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            await alert_state.set_study_judging_doubtful(
                conn, args.study, args.judge, actor=operator.current().actor
            )
        verb = "judge" if args.judge else "skip"
        print(f"study {args.study}: alert rules {verb} readings the device doubted")
        return 0

    return int(run(go()))


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from storage import alerts, db

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            found = await alerts.list_alerts(conn, study_id=args.study, states=args.state)
        for a in found:
            if args.json:
                print(
                    json.dumps(
                        {
                            "alert_id": a.alert_id,
                            "rule_id": a.rule_id,
                            "rule": a.rule_name,
                            "metric": a.metric,
                            "study_id": a.study_id,
                            "site_id": a.site_id,
                            "participant_id": a.participant_id,
                            "state": a.state,
                            "severity": a.severity,
                            "opened_at": _iso(a.opened_at),
                            "first_time": _iso(a.first_time),
                            "condition_time": _iso(a.condition_time),
                            "acknowledged_at": _iso(a.acknowledged_at),
                            "acknowledged_by": a.acknowledged_by,
                            "ack_note": a.ack_note,
                            "resolved_at": _iso(a.resolved_at),
                            "resolved_by": a.resolved_by,
                            "resolve_note": a.resolve_note,
                            "cleared_time": _iso(a.cleared_time),
                            "escalated_at": _iso(a.escalated_at),
                        }
                    )
                )
            else:
                escalated = " ESCALATED" if a.escalated_at and a.state == "open" else ""
                print(
                    f"{a.alert_id:>6}  {a.state:<12} {a.severity:<8} {a.study_id}/{a.site_id}/"
                    f"{a.participant_id}  {a.rule_name} ({a.metric}) since "
                    f"{a.first_time.isoformat()}{escalated}"
                )
        return 0

    return int(run(go()))


async def _check_alert_site(conn: Conn, alert_id: int) -> None:
    """Staff act on their own sites' alerts only (an unknown alert is left to the action)."""
    from storage import alerts

    found = await alerts.list_alerts(conn, alert_id=alert_id)
    if found:
        operator.current().check_site(found[0].site_id)


@operator.authenticated("alerts ack")
def _cmd_ack(args: argparse.Namespace, settings: Settings) -> int:
    from storage import alerts, db

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            await _check_alert_site(conn, args.alert_id)
            ev = await alerts.acknowledge(
                conn, args.alert_id, by=operator.current().actor, note=args.note
            )
        print(f"alert {ev.alert_id} acknowledged by {ev.actor} (event {ev.event_id})")
        return 0

    return int(run(go()))


@operator.authenticated("alerts resolve")
def _cmd_resolve(args: argparse.Namespace, settings: Settings) -> int:
    from storage import alerts, db

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            await _check_alert_site(conn, args.alert_id)
            ev = await alerts.resolve(
                conn, args.alert_id, by=operator.current().actor, note=args.note
            )
        print(f"alert {ev.alert_id} resolved by {ev.actor} (event {ev.event_id})")
        return 0

    return int(run(go()))
