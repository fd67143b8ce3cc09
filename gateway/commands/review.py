"""`trialstream review`: sign-offs of participants' data and locks of study periods
(docs/review.md).

A sign-off is an e-signature: the operator's ``--as`` authentication, with the account's
password, is its re-authentication, and the signer's name and role are recorded. Locks and
their late data policy are the study's data manager's (an admin)."""

from __future__ import annotations

import argparse
import functools
import json
import re
from typing import Any, Final

from gateway.commands import operator
from gateway.commands.common import Subparsers, iso_time, run
from gateway.errors import ConfigError
from gateway.settings import Settings
from storage import db, locks, review, views
from storage.db import Conn
from storage.errors import UnknownStudy
from storage.locks import LateDataPolicy
from storage.migrate import recorded_mode
from storage.users import Role

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_LOCK_ID: Final = 2**62


def an_id(text: str) -> str:
    """An argparse type: a participant or study id (letters, digits, ``_.-``, at most 64)."""
    if not ID_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not an id: {text[:70]!r}")
    return text


def a_lock_id(text: str) -> int:
    if not text.isdigit() or len(text) > 19 or not 1 <= int(text) <= MAX_LOCK_ID:
        raise argparse.ArgumentTypeError(f"not a lock id: {text[:30]!r}")
    return int(text)


def register(sub: Subparsers) -> None:
    group = sub.add_parser(
        "review",
        help="sign-offs of participants' data, and locks of study periods",
        description="An investigator or monitor signs off their review of a participant's "
        "data over a period; an admin locks a study's period to new data before an "
        "analysis, and lifts the lock. Run as your user account (--as USER): signing with "
        "it is the e-signature's re-authentication.",
    )
    actions = group.add_subparsers(dest="review_command", metavar="ACTION", required=True)

    action = functools.partial(operator.add_action, actions)

    def period(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--from", dest="from_time", type=iso_time, required=True, help="start (ISO 8601, zone)"
        )
        p.add_argument(
            "--to", dest="to_time", type=iso_time, required=True, help="end, excluded (ISO 8601)"
        )

    p = action(
        "sign",
        "sign off your review of a participant's data over a period (the site's clinicians "
        "and monitors)",
    )
    p.add_argument("--participant", type=an_id, required=True, help="participant id")
    period(p)
    p.add_argument(
        "--meaning",
        required=True,
        help=f"what the signature means, e.g. 'Reviewed, no concerns' (at most "
        f"{review.MAX_MEANING} characters)",
    )
    p.set_defaults(handler=_sign)

    p = action("list", "list a participant's sign-offs and what arrived after them")
    p.add_argument("--participant", type=an_id, required=True, help="participant id")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=_list)

    p = action("lock", "lock a study's period to new data (admins)")
    p.add_argument("--study", type=an_id, required=True, help="study id")
    period(p)
    p.add_argument(
        "--reason", required=True, help=f"why (recorded; at most {locks.MAX_REASON} characters)"
    )
    p.set_defaults(handler=_lock)

    p = action("unlock", "lift a lock: held readings are stored now (admins)")
    p.add_argument("--lock", type=a_lock_id, required=True, help="lock id (`review locks`)")
    p.add_argument(
        "--reason", required=True, help=f"why (recorded; at most {locks.MAX_REASON} characters)"
    )
    p.set_defaults(handler=_unlock)

    p = action("locks", "list a study's locks and its late data policy")
    p.add_argument("--study", type=an_id, required=True, help="study id")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=_locks)

    p = action(
        "late-data", "refuse, or hold for an unlock, what arrives for a locked period (admins)"
    )
    p.add_argument("--study", type=an_id, required=True, help="study id")
    policy = p.add_mutually_exclusive_group(required=True)
    policy.add_argument(
        "--refuse",
        dest="policy",
        action="store_const",
        const=LateDataPolicy.REFUSE,
        help="refuse it (period_locked; the default of a study)",
    )
    policy.add_argument(
        "--hold",
        dest="policy",
        action="store_const",
        const=LateDataPolicy.HOLD,
        help="hold it, and store it when the lock is lifted",
    )
    p.set_defaults(handler=_late_data)


def _actor() -> str:
    return operator.current().actor


async def _participant_site(conn: Conn, participant_id: str) -> None:
    """Refused unless the participant exists and the operator works for their site."""
    home = await views.participant_home(conn, participant_id)
    if home is None:
        raise ConfigError(f"no participant {participant_id!r}")
    operator.current().check_site(home[1])


async def _study_policy(conn: Conn, study_id: str) -> LateDataPolicy:
    """The study's policy, if the operator may see the study (staff: a site in it)."""
    policy = await locks.study_policy(conn, study_id)
    if policy is None:
        raise ConfigError(f"no study {study_id!r}")
    user = operator.current().require()
    if user.role is not Role.ADMIN:
        mine = await views.sites(conn, sorted(user.sites))
        if not any(s.study_id == study_id for s in mine):
            raise operator.Refused(
                f"{user.username} has no site in study {study_id!r}", "NotPermitted"
            )
    return policy


@operator.authenticated("review sign")
def _sign(args: argparse.Namespace, settings: Settings) -> int:
    user = operator.current().require()

    async def go() -> review.SignOff:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            await _participant_site(conn, args.participant)
            signoff_id = await review.sign_off(
                conn,
                args.participant,
                args.from_time,
                args.to_time,
                args.meaning,
                signer=review.Signer(user.username, user.display_name, user.role.value),
            )
            return next(
                s
                for s in await review.signoffs(conn, args.participant)
                if s.signoff_id == signoff_id
            )

    try:
        s = run(go())
    except review.ReviewError as exc:
        raise ConfigError(str(exc)) from exc
    print(
        f"sign-off {s.signoff_id}: {s.participant_id} {s.from_time.isoformat()} to "
        f"{s.to_time.isoformat()}, {s.readings} readings, signed by {s.signer_name} "
        f"({s.signer}, {s.signer_role}): {s.meaning}"
    )
    return 0


def _signoff_json(s: review.SignOff, changed: list[review.Change]) -> dict[str, Any]:
    return {
        "signoff_id": s.signoff_id,
        "participant_id": s.participant_id,
        "from": s.from_time.isoformat(),
        "to": s.to_time.isoformat(),
        "meaning": s.meaning,
        "signer": s.signer,
        "signer_name": s.signer_name,
        "signer_role": s.signer_role,
        "signed_at": s.signed_at.isoformat(),
        "readings": s.readings,
        "outdated_at": s.outdated_at.isoformat() if s.outdated_at else None,
        "changes": [
            {
                "device_id": c.device_id,
                "seq": c.seq,
                "readings": c.readings,
                "first_time": c.first_time.isoformat(),
                "last_time": c.last_time.isoformat(),
                "recorded_at": c.recorded_at.isoformat(),
            }
            for c in changed
        ],
    }


@operator.authenticated("review list")
def _list(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> tuple[list[review.SignOff], dict[int, list[review.Change]]]:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            await _participant_site(conn, args.participant)
            found = await review.signoffs(conn, args.participant)
            return found, await review.changes(conn, [s.signoff_id for s in found])

    found, changed = run(go())
    if args.json:
        print(json.dumps([_signoff_json(s, changed[s.signoff_id]) for s in found], indent=2))
        return 0
    if not found:
        print(f"participant {args.participant} has no sign-offs")
    for s in found:
        state = f"OUTDATED since {s.outdated_at.isoformat()}" if s.outdated_at else "current"
        print(
            f"{s.signoff_id:>5}  {s.from_time.isoformat()} to {s.to_time.isoformat()}  "
            f"{s.readings} readings  {s.signer_name} ({s.signer_role}), "
            f"{s.signed_at:%Y-%m-%d %H:%M}  {state}: {s.meaning}"
        )
        for c in changed[s.signoff_id]:
            print(
                f"       + {c.readings} readings from {c.device_id} seq {c.seq}, "
                f"{c.first_time.isoformat()} to {c.last_time.isoformat()}, "
                f"stored {c.recorded_at:%Y-%m-%d %H:%M}"
            )
    return 0


@operator.authenticated("review lock")
def _lock(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> int:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            return await locks.lock_period(
                conn, args.study, args.from_time, args.to_time, args.reason, actor=_actor()
            )

    try:
        lock_id = run(go())
    except (locks.LockError, UnknownStudy) as exc:
        raise ConfigError(str(exc)) from exc
    print(
        f"lock {lock_id}: {args.study} {args.from_time.isoformat()} to "
        f"{args.to_time.isoformat()} is closed to new data"
    )
    return 0


@operator.authenticated("review unlock")
def _unlock(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> int:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            mode = await recorded_mode(conn)
            if mode is None:
                raise ConfigError("the database has no schema: run `trialstream db migrate`")
            released = await locks.unlock(conn, args.lock, args.reason, actor=_actor(), mode=mode)
            return len(released)

    try:
        released = run(go())
    except locks.LockError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"lock {args.lock} lifted: {released} held readings stored")
    return 0


def _lock_json(x: locks.PeriodLock) -> dict[str, Any]:
    return {
        "lock_id": x.lock_id,
        "study_id": x.study_id,
        "from": x.from_time.isoformat(),
        "to": x.to_time.isoformat(),
        "reason": x.reason,
        "locked_by": x.locked_by,
        "locked_at": x.locked_at.isoformat(),
        "unlocked_by": x.unlocked_by,
        "unlocked_at": x.unlocked_at.isoformat() if x.unlocked_at else None,
        "unlock_reason": x.unlock_reason,
        "held": x.held,
    }


@operator.authenticated("review locks")
def _locks(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> tuple[LateDataPolicy, list[locks.PeriodLock]]:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            policy = await _study_policy(conn, args.study)
            return policy, await locks.locks(conn, args.study)

    policy, found = run(go())
    if args.json:
        print(
            json.dumps(
                {
                    "study_id": args.study,
                    "late_data_policy": policy.value,
                    "locks": [_lock_json(x) for x in found],
                },
                indent=2,
            )
        )
        return 0
    print(f"study {args.study}: late data for a locked period is {policy.value}d")
    if not found:
        print("no locks")
    for x in found:
        state = (
            f"lifted {x.unlocked_at:%Y-%m-%d %H:%M} by {x.unlocked_by}: {x.unlock_reason}"
            if x.unlocked_at
            else f"in force, {x.held} readings held"
        )
        print(
            f"{x.lock_id:>5}  {x.from_time.isoformat()} to {x.to_time.isoformat()}  locked "
            f"{x.locked_at:%Y-%m-%d %H:%M} by {x.locked_by}: {x.reason}  ({state})"
        )
    return 0


@operator.authenticated("review late-data")
def _late_data(args: argparse.Namespace, settings: Settings) -> int:
    policy: LateDataPolicy = args.policy

    async def go() -> None:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            await locks.set_late_data_policy(conn, args.study, policy, actor=_actor())

    try:
        run(go())
    except UnknownStudy as exc:
        raise ConfigError(str(exc)) from exc
    told = "refused (period_locked)" if policy is LateDataPolicy.REFUSE else "held for an unlock"
    print(f"study {args.study}: late data for a locked period is {told}")
    return 0
