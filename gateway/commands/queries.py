"""`trialstream queries`: data queries on a participant's data (docs/queries.md), the command
line's twin of the API's (gateway/web/api_queries.py).

A monitor (or an admin) opens a query on one reading, a metric over a time range, or a gap the
hub reported; the site's coordinator or clinician (or an admin) answers; the monitor closes or
reopens it. Staff of the participant's site and admins list and read them. Every step is run
as a user account (``--as USER``), in the roles the API asks for the same step, for the sites
the account works for; each is a message and an audit record (storage.queries).

Every argument is bounded before it is converted: ids as ``review``'s, times by
``iso_time``, the text as the API bounds it (1 to ``storage.queries.MAX_TEXT`` characters, no
control characters but tab and line ends), query ids and envelope sequence numbers as bounded
whole numbers."""

from __future__ import annotations

import argparse
import functools
import json
import re
from datetime import datetime
from typing import Final

from gateway.commands import operator
from gateway.commands.common import Handler, Subparsers, iso_time, run
from gateway.commands.review import an_id
from gateway.errors import ConfigError
from gateway.settings import Settings
from ingest.metrics import METRICS
from ingest.wire import TEXT_CONTROL_RE
from storage import db, queries, views
from storage.db import Conn
from storage.queries import Step, Target

# The states a query can be in (storage.queries; the data_queries.state check), and those
# listed when none is asked for: the ones still waiting for someone, as the API's default.
STATES: Final = ("open", "answered", "closed")
UNRESOLVED: Final = ("open", "answered")
MAX_QUERY_ID: Final = 2**62  # the API's bound on a query id
MAX_SEQ: Final = 2**63 - 1  # an envelope's sequence number: a bigint, >= 0
METRIC_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
# In human output, every control character left after lines are split is shown as U+FFFD,
# whatever a row holds: nothing stored moves a terminal's cursor or changes its colours.
_SHOWN_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
SUMMARY_CHARS: Final = 60


def a_query_id(text: str) -> int:
    """An argparse type: a query id, a whole number from 1 to 2**62."""
    if not (text.isascii() and text.isdigit() and len(text) <= 19) or not (
        1 <= int(text) <= MAX_QUERY_ID
    ):
        raise argparse.ArgumentTypeError(f"not a query id: {text[:30]!r}")
    return int(text)


def a_seq(text: str) -> int:
    """An argparse type: an envelope's sequence number, a whole number from 0 to 2**63 - 1."""
    if not (text.isascii() and text.isdigit() and len(text) <= 19) or int(text) > MAX_SEQ:
        raise argparse.ArgumentTypeError(f"not a sequence number: {text[:30]!r}")
    return int(text)


def a_metric(text: str) -> str:
    """An argparse type: a metric's name, in the form the API takes (storage.queries then
    refuses one it does not know)."""
    if not METRIC_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a metric name: {text[:70]!r}")
    return text


def a_text(text: str) -> str:
    """An argparse type: a question, answer or reason of 1 to ``MAX_TEXT`` characters without
    control characters (tab and line ends are allowed)."""
    if not 1 <= len(text) <= queries.MAX_TEXT:
        raise argparse.ArgumentTypeError(
            f"a text of 1 to {queries.MAX_TEXT} characters, not {len(text)}"
        )
    found = TEXT_CONTROL_RE.search(text)
    if found:
        raise argparse.ArgumentTypeError(
            f"the text has a control character ({found.group()!r} at {found.start()})"
        )
    return text


def register(sub: Subparsers) -> None:
    group = sub.add_parser(
        "queries",
        help="data queries: ask a site about a participant's data, answer, close, reopen",
        description="A monitor (or an admin) opens a query on a participant's reading, a "
        "metric over a time range, or a gap the hub reported; the site's coordinator or "
        "clinician answers it; the monitor closes it, or reopens it when the answer does not "
        "settle it. Staff of the participant's site and admins list and read them. Run as "
        "your user account (--as USER); every step is recorded with its text in the query "
        "and in the audit trail (docs/queries.md).",
    )
    actions = group.add_subparsers(dest="queries_command", metavar="ACTION", required=True)

    action = functools.partial(operator.add_action, actions)

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--json", action="store_true", help="print JSON (as the API answers) instead of text"
        )

    def text_flag(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--text",
            type=a_text,
            required=True,
            help=f"{what} (recorded; 1 to {queries.MAX_TEXT} characters, no control "
            "characters but tab and line ends; --text=... for one that starts with -)",
        )

    p = action(
        "list",
        "list a participant's or a site's queries, newest first (the site's staff, admins)",
    )
    whose = p.add_mutually_exclusive_group(required=True)
    whose.add_argument("--participant", type=an_id, help="a participant's queries")
    whose.add_argument("--site", type=an_id, help="a site's queries")
    p.add_argument(
        "--state",
        dest="states",
        action="append",
        choices=STATES,
        help="only queries in this state; repeat for several (default: open and answered, "
        "the unresolved ones; give all three for every query)",
    )
    json_flag(p)
    p.set_defaults(handler=_list)

    p = action("show", "show a query and its messages (the site's staff, admins)")
    p.add_argument("query", type=a_query_id, metavar="ID", help="query id (`queries list`)")
    json_flag(p)
    p.set_defaults(handler=_show)

    metrics = ", ".join(METRICS)
    p = action(
        "open",
        "open a query on a participant's reading, range or gap (the site's monitors, admins)",
    )
    p.description = (
        "Open a query on a participant's data, with a question (the site's monitors, "
        "admins): one reading (--target reading --metric --from --device-id --seq: its "
        "time and the envelope that carried it), a metric over a time range (--target range "
        "--metric --from --to), or a gap the hub reported (--target gap --device-id --seq "
        "--from --to). A reading or gap must exist for the participant."
    )
    p.add_argument("--participant", type=an_id, required=True, help="participant id")
    p.add_argument(
        "--target",
        choices=[t.value for t in Target],
        required=True,
        help="what the query is about: one reading, a metric over a range, or a gap",
    )
    p.add_argument(
        "--metric", type=a_metric, help=f"the reading's or the range's metric ({metrics})"
    )
    p.add_argument(
        "--from",
        dest="from_time",
        type=iso_time,
        required=True,
        metavar="TIME",
        help="the reading's time, or the range's or the gap's start (ISO 8601, with its zone)",
    )
    p.add_argument(
        "--to",
        dest="to_time",
        type=iso_time,
        metavar="TIME",
        help="the range's or the gap's end (ISO 8601, with its zone; default: --from)",
    )
    p.add_argument(
        "--device-id", type=an_id, help="the hub of the envelope that carried the reading or gap"
    )
    p.add_argument("--seq", type=a_seq, help="the sequence number of the envelope that carried it")
    text_flag(p, "the question")
    json_flag(p)
    p.set_defaults(handler=_open)

    steps = (
        (Step.ANSWER, "answer an open query (the site's coordinators and clinicians, admins)",
         "the answer"),
        (Step.CLOSE, "close an open or answered query (the site's monitors, admins)",
         "why it is closed"),
        (Step.REOPEN, "reopen an answered or closed query (the site's monitors, admins)",
         "what is still asked"),
    )  # fmt: skip
    for step, help_text, what in steps:
        p = action(step.value, help_text)
        p.add_argument("query", type=a_query_id, metavar="ID", help="query id (`queries list`)")
        text_flag(p, what)
        json_flag(p)
        p.set_defaults(handler=_STEP_HANDLERS[step])


# --- reading and checking ------------------------------------------------------------------


async def _participant_site(conn: Conn, participant_id: str) -> None:
    """Refused unless the participant exists and the operator works for their site."""
    home = await views.participant_home(conn, participant_id)
    if home is None:
        raise ConfigError(f"no participant {participant_id!r}")
    operator.current().check_site(home[1])


async def _site(conn: Conn, site_id: str) -> None:
    """Refused unless the operator works for the site (staff are refused another site's,
    whether it exists or not) and it exists."""
    operator.current().check_site(site_id)
    if not await views.sites(conn, [site_id]):
        raise ConfigError(f"no site {site_id!r}")


async def _query(conn: Conn, query_id: int) -> queries.Query:
    """The query, if it exists and the operator works for its participant's site."""
    found = await queries.queries(conn, query_ids=[query_id])
    if not found:
        raise ConfigError(f"no query {query_id}")
    operator.current().check_site(found[0].site_id)
    return found[0]


async def _with_messages(
    conn: Conn, found: list[queries.Query]
) -> list[tuple[queries.Query, list[queries.Message]]]:
    said = await queries.messages(conn, [q.query_id for q in found])
    return [(q, said[q.query_id]) for q in found]


# --- output --------------------------------------------------------------------------------


def _iso(t: datetime) -> str:
    return t.isoformat()


query_json = queries.as_json


def _shown(text: str) -> str:
    """Text for a terminal: control characters (what no command stores, but a row may hold)
    shown as U+FFFD."""
    return _SHOWN_CONTROL.sub("\ufffd", text)


def _summary(text: str) -> str:
    """A text on one short line."""
    one = " ".join(text.split())
    return one if len(one) <= SUMMARY_CHARS else one[: SUMMARY_CHARS - 3] + "..."


def _at(t: datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M %Z}".rstrip()


def _envelope(q: queries.Query) -> str:
    return f"{q.device_id} seq {q.seq}"


def target_text(q: queries.Query) -> str:
    """What the query is about, in words."""
    if q.target == Target.READING:
        return f"{q.metric} reading at {_iso(q.from_time)} ({_envelope(q)})"
    if q.target == Target.RANGE:
        return f"{q.metric} from {_iso(q.from_time)} to {_iso(q.to_time)}"
    return f"gap from {_iso(q.from_time)} to {_iso(q.to_time)} ({_envelope(q)})"


def _line(q: queries.Query, said: list[queries.Message]) -> str:
    line = (
        f"{q.query_id:>5}  {q.state:<8}  {q.participant_id}  {target_text(q)}  "
        f"opened by {q.opened_by} {_at(q.opened_at)}"
    )
    if said:
        last = said[-1]
        line += f"; last: {last.action} by {last.actor} {_at(last.at)}: {_summary(last.text)}"
    return _shown(line)


def _print_query(q: queries.Query, said: list[queries.Message]) -> None:
    lines = [
        f"query {q.query_id}: {q.state}",
        f"  participant {q.participant_id} (site {q.site_id})",
        f"  about: {target_text(q)}",
        f"  opened by {q.opened_by} {_at(q.opened_at)}; last change {_at(q.updated_at)}",
    ]
    for m in said:
        lines.append(f"  {m.action} by {m.actor} {_at(m.at)}:")
        lines.extend(f"    {text_line}" for text_line in m.text.splitlines())
    for line in lines:
        print(_shown(line))


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


# --- the actions ---------------------------------------------------------------------------


@operator.authenticated("queries list")
def _list(args: argparse.Namespace, settings: Settings) -> int:
    states = sorted(set(args.states or UNRESOLVED), key=STATES.index)

    async def go() -> list[tuple[queries.Query, list[queries.Message]]]:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            if args.participant is not None:
                await _participant_site(conn, args.participant)
                found = await queries.queries(conn, participant_id=args.participant, states=states)
            else:
                await _site(conn, args.site)
                found = await queries.queries(conn, site_ids=[args.site], states=states)
            return await _with_messages(conn, found)

    listed = run(go())
    if args.json:
        _print_json({"queries": [query_json(q, said) for q, said in listed]})
        return 0
    whose = f"participant {args.participant}" if args.participant else f"site {args.site}"
    if not listed:
        print(f"{whose} has no {' or '.join(states)} queries")
    for q, said in listed:
        print(_line(q, said))
    return 0


@operator.authenticated("queries show")
def _show(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> tuple[queries.Query, list[queries.Message]]:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            q = await _query(conn, args.query)
            return (await _with_messages(conn, [q]))[0]

    q, said = run(go())
    if args.json:
        _print_json(query_json(q, said))
    else:
        _print_query(q, said)
    return 0


@operator.authenticated("queries open")
def _open(args: argparse.Namespace, settings: Settings) -> int:
    subject = queries.Subject(
        Target(args.target),
        args.from_time,
        args.to_time or args.from_time,
        args.metric,
        args.device_id,
        args.seq,
    )

    async def go() -> tuple[queries.Query, list[queries.Message]]:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            await _participant_site(conn, args.participant)
            query_id = await queries.open_query(
                conn, args.participant, subject, args.text, actor=operator.current().actor
            )
            opened = await queries.queries(conn, query_ids=[query_id])
            return (await _with_messages(conn, opened))[0]

    try:
        q, said = run(go())
    except queries.QueryError as exc:
        raise ConfigError(str(exc)) from exc
    if args.json:
        _print_json(query_json(q, said))
    else:
        print(f"query {q.query_id} opened on {q.participant_id}: {target_text(q)}")
    return 0


def _stepper(step: Step) -> Handler:
    @operator.authenticated(f"queries {step.value}")
    def handle(args: argparse.Namespace, settings: Settings) -> int:
        async def go() -> tuple[queries.Query, list[queries.Message]]:
            async with db.connection(settings.require_database_url(), autocommit=True) as conn:
                await _query(conn, args.query)
                await queries.step(
                    conn, args.query, step, args.text, actor=operator.current().actor
                )
                return (await _with_messages(conn, [await _query(conn, args.query)]))[0]

        try:
            q, said = run(go())
        except (queries.QueryNotFound, queries.QueryStateError, queries.QueryError) as exc:
            raise ConfigError(str(exc)) from exc
        if args.json:
            _print_json(query_json(q, said))
        else:
            print(f"query {q.query_id}: {step.value} by {operator.current().actor}; now {q.state}")
        return 0

    handle.__name__ = f"_{step.value}"
    return handle


_STEP_HANDLERS: Final = {step: _stepper(step) for step in (Step.ANSWER, Step.CLOSE, Step.REOPEN)}
