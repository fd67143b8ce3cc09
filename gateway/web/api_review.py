"""The API's review and lock operations (docs/review.md): an investigator or monitor signs off
a participant's data over a period; an admin, as the study's data manager, locks a study's
period to new data and lifts the lock, and sets what happens to data that arrives late for a
locked period (refused, or held for the unlock).

Sign-offs, locks and unlocks are e-signed acts: the body carries the caller's own user name
and password, checked again (``storage.users.verify_password``: a wrong one counts toward the
account's lockout, as a failed sign-in does, is audited ``user.login_failed`` and shares the
sign-in rate limit per account). A user name that is not the caller's own is refused before
any password is checked, so no one can spend another account's attempts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from aiohttp import web

from gateway.web.access import STAFF_AND_ADMIN, require_participant, require_study
from gateway.web.api_common import ID_PATTERN, PARTICIPANT_ID, TIME_PATTERN, V1, iso, pool_of, when
from gateway.web.errors import BadInput, Conflict, Forbidden, NotFound
from gateway.web.ratelimit import check_request, client_address
from gateway.web.schemas import INT, NULL_STR, NULL_TIME, STR, TIME, arr, obj
from gateway.web.spec import Ctx, Endpoint, Field
from storage import audit, locks, review, users
from storage.db import Conn
from storage.errors import UnknownStudy
from storage.locks import LateDataPolicy
from storage.users import Role

# The site's investigator (a clinician) and its monitors sign their review of its data.
SIGNERS: Final = frozenset({Role.CLINICIAN, Role.MONITOR})
# Locks are the study's data manager's: an admin.
DATA_MANAGERS: Final = frozenset({Role.ADMIN})

CHANGE = obj(
    {
        "device_id": STR,
        "seq": INT,
        "readings": INT,
        "first_time": TIME,
        "last_time": TIME,
        "recorded_at": TIME,
    }
)
SIGNOFF = obj(
    {
        "signoff_id": INT,
        "participant_id": STR,
        "from": TIME,
        "to": TIME,
        "meaning": STR,
        "signer": STR,
        "signer_name": STR,
        "signer_role": STR,
        "signed_at": TIME,
        "readings": INT,
        "outdated_at": NULL_TIME,
        "changes": arr(CHANGE),
    }
)
SIGNOFF_LIST = obj({"participant_id": STR, "reviews": arr(SIGNOFF)})
LOCK = obj(
    {
        "lock_id": INT,
        "study_id": STR,
        "from": TIME,
        "to": TIME,
        "reason": STR,
        "locked_by": STR,
        "locked_at": TIME,
        "unlocked_by": NULL_STR,
        "unlocked_at": NULL_TIME,
        "unlock_reason": NULL_STR,
        "held": INT,
    }
)
POLICY_ENUM = tuple(p.value for p in LateDataPolicy)
POLICY = obj({"study_id": STR, "late_data_policy": {"type": "string", "enum": list(POLICY_ENUM)}})
LOCK_LIST = obj(
    {
        "study_id": STR,
        "late_data_policy": {"type": "string", "enum": list(POLICY_ENUM)},
        "locks": arr(LOCK),
    }
)
UNLOCKED = obj({"lock": LOCK, "released": INT})


def change_json(c: review.Change) -> dict[str, Any]:
    return {
        "device_id": c.device_id,
        "seq": c.seq,
        "readings": c.readings,
        "first_time": iso(c.first_time),
        "last_time": iso(c.last_time),
        "recorded_at": iso(c.recorded_at),
    }


def signoff_json(s: review.SignOff, changed: list[review.Change]) -> dict[str, Any]:
    return {
        "signoff_id": s.signoff_id,
        "participant_id": s.participant_id,
        "from": iso(s.from_time),
        "to": iso(s.to_time),
        "meaning": s.meaning,
        "signer": s.signer,
        "signer_name": s.signer_name,
        "signer_role": s.signer_role,
        "signed_at": iso(s.signed_at),
        "readings": s.readings,
        "outdated_at": iso(s.outdated_at),
        "changes": [change_json(c) for c in changed],
    }


def lock_json(lock: locks.PeriodLock) -> dict[str, Any]:
    return {
        "lock_id": lock.lock_id,
        "study_id": lock.study_id,
        "from": iso(lock.from_time),
        "to": iso(lock.to_time),
        "reason": lock.reason,
        "locked_by": lock.locked_by,
        "locked_at": iso(lock.locked_at),
        "unlocked_by": lock.unlocked_by,
        "unlocked_at": iso(lock.unlocked_at),
        "unlock_reason": lock.unlock_reason,
        "held": lock.held,
    }


# --- re-authentication ----------------------------------------------------------------------


def _refused(title: str) -> Forbidden:
    err = Forbidden(title)
    err.kind = "reauthentication-failed"
    return err


async def reauthenticate(ctx: Ctx, conn: Conn, act: str) -> users.User:
    """The caller, signing ``act`` with their own user name and password checked again.
    Call with no transaction open: a failure is counted and audited in transactions of its
    own, which must outlive the refusal."""
    username: str = ctx.body["username"]
    if username != ctx.user.username:
        raise _refused("the signature needs your own user name and password")
    check_request(ctx.request, lambda limits: limits.login_per_account, username)
    try:
        return await users.verify_password(conn, username, ctx.body["password"])
    except users.UserError as exc:
        async with conn.transaction():
            await audit.append(
                conn,
                actor=username,
                action="user.login_failed",
                entity="user",
                entity_id=username,
                detail={
                    "cause": type(exc).__name__,
                    "remote": client_address(ctx.request),
                    "reauthentication": act,
                },
            )
        raise _refused(
            "re-authentication failed: wrong password, or the account is locked or disabled"
        ) from exc


# --- checks made before a password is spent -------------------------------------------------


def _period(ctx: Ctx) -> tuple[datetime, datetime]:
    start = when("from", ctx.body["from"])
    end = when("to", ctx.body["to"])
    assert start is not None
    assert end is not None
    if start >= end:
        raise BadInput("'to' must be after 'from'", field="to")
    return start, end


def _said(ctx: Ctx, name: str) -> str:
    text: str = ctx.body[name]
    if not text.strip():
        raise BadInput(f"{name!r} must not be blank", field=name)
    return text


# --- handlers -------------------------------------------------------------------------------


async def sign_off(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    start, end = _period(ctx)
    meaning = _said(ctx, "meaning")
    async with pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        await conn.commit()
        signer = await reauthenticate(ctx, conn, "review.sign")
        try:
            signoff_id = await review.sign_off(
                conn,
                pid,
                start,
                end,
                meaning,
                signer=review.Signer(signer.username, signer.display_name, signer.role.value),
            )
        except review.ReviewError as exc:
            raise BadInput(str(exc)) from exc
        found = next(s for s in await review.signoffs(conn, pid) if s.signoff_id == signoff_id)
    return web.json_response(signoff_json(found, []), status=201)


async def list_reviews(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    async with pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        found = await review.signoffs(conn, pid)
        changed = await review.changes(conn, [s.signoff_id for s in found])
    return web.json_response(
        {
            "participant_id": pid,
            "reviews": [signoff_json(s, changed[s.signoff_id]) for s in found],
        }
    )


async def lock_period(ctx: Ctx) -> web.StreamResponse:
    study_id = ctx.path["study_id"]
    start, end = _period(ctx)
    reason = _said(ctx, "reason")
    async with pool_of(ctx).connection() as conn:
        await require_study(ctx.user, study_id, conn)
        await conn.commit()
        signer = await reauthenticate(ctx, conn, "period.lock")
        try:
            lock_id = await locks.lock_period(
                conn, study_id, start, end, reason, actor=signer.username
            )
        except UnknownStudy as exc:
            raise NotFound(f"no study {study_id!r}") from exc
        except locks.LockError as exc:
            raise BadInput(str(exc)) from exc
        found = await locks.lock_of(conn, lock_id)
    assert found is not None
    return web.json_response(lock_json(found), status=201)


async def list_locks(ctx: Ctx) -> web.StreamResponse:
    study_id = ctx.path["study_id"]
    async with pool_of(ctx).connection() as conn:
        policy = await require_study(ctx.user, study_id, conn)
        found = await locks.locks(conn, study_id)
    return web.json_response(
        {
            "study_id": study_id,
            "late_data_policy": policy.value,
            "locks": [lock_json(x) for x in found],
        }
    )


async def unlock_period(ctx: Ctx) -> web.StreamResponse:
    from gateway.app import MODE  # gateway.app imports the web package that holds this one

    lock_id: int = ctx.path["lock_id"]
    reason = _said(ctx, "reason")
    mode = ctx.request.app[MODE]
    async with pool_of(ctx).connection() as conn:
        found = await locks.lock_of(conn, lock_id)
        if found is None:
            raise NotFound(f"no lock {lock_id}")
        if found.unlocked_at is not None:
            raise Conflict(f"lock {lock_id} was lifted already")
        await conn.commit()
        signer = await reauthenticate(ctx, conn, "period.unlock")
        try:
            released = await locks.unlock(conn, lock_id, reason, actor=signer.username, mode=mode)
        except locks.LockError as exc:  # lifted meanwhile (the reason was checked above)
            raise Conflict(str(exc)) from exc
        found = await locks.lock_of(conn, lock_id)
    assert found is not None
    return web.json_response({"lock": lock_json(found), "released": len(released)})


async def set_late_data_policy(ctx: Ctx) -> web.StreamResponse:
    study_id = ctx.path["study_id"]
    policy = LateDataPolicy(ctx.body["policy"])
    async with pool_of(ctx).connection() as conn:
        await require_study(ctx.user, study_id, conn)
        await conn.commit()
        try:
            await locks.set_late_data_policy(conn, study_id, policy, actor=ctx.user.username)
        except UnknownStudy as exc:
            raise NotFound(f"no study {study_id!r}") from exc
    return web.json_response({"study_id": study_id, "late_data_policy": policy.value})


# --- the operations -------------------------------------------------------------------------

STUDY_ID = Field("study_id", pattern=ID_PATTERN, max_len=64)
LOCK_ID = Field("lock_id", kind="integer", minimum=1, maximum=2**62)
FROM = Field("from", max_len=40, pattern=TIME_PATTERN, description="start of the period")
TO = Field("to", max_len=40, pattern=TIME_PATTERN, description="end of the period (excluded)")
# The e-signature: the caller's own credential, checked again.
SIGNATURE = (
    Field("username", max_len=128, description="your own user name"),
    Field("password", max_len=1024, description="your password, checked again"),
)
REASON = Field("reason", max_len=locks.MAX_REASON, description="why (recorded)")

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        f"{V1}/participants/{{participant_id}}/reviews",
        "sign_off_review",
        "Sign off a review of a participant's data",
        sign_off,
        SIGNERS,
        "review",
        path_params=(PARTICIPANT_ID,),
        body=(
            FROM,
            TO,
            Field(
                "meaning",
                max_len=review.MAX_MEANING,
                description="what the signature means, e.g. 'Reviewed, no concerns'",
            ),
            *SIGNATURE,
        ),
        ok_status=201,
        ok_schema=SIGNOFF,
        extra_statuses=(429,),
        description="An e-signature of the site's investigator or a monitor over the "
        "participant's data of [from, to): re-authenticated with the caller's own user name "
        "and password; the signer's name and role are recorded, and the readings of the "
        "period counted. Data stored later for the period marks it outdated.",
    ),
    Endpoint(
        "GET",
        f"{V1}/participants/{{participant_id}}/reviews",
        "list_reviews",
        "List a participant's sign-offs",
        list_reviews,
        STAFF_AND_ADMIN,
        "review",
        path_params=(PARTICIPANT_ID,),
        ok_schema=SIGNOFF_LIST,
        audit_read=True,
        description="Each sign-off with `outdated_at` (when data for its period was first "
        "stored after it) and `changes`: what was stored since, envelope by envelope.",
    ),
    Endpoint(
        "POST",
        f"{V1}/studies/{{study_id}}/locks",
        "lock_period",
        "Lock a study's period",
        lock_period,
        DATA_MANAGERS,
        "review",
        path_params=(STUDY_ID,),
        body=(FROM, TO, REASON, *SIGNATURE),
        ok_status=201,
        ok_schema=LOCK,
        extra_statuses=(429,),
        description="Close [from, to) of the study to new data, e-signed (re-authenticated "
        "with the caller's own credential). Readings of the period that arrive later are "
        "refused as period_locked, or held for an unlock where the study holds late data.",
    ),
    Endpoint(
        "GET",
        f"{V1}/studies/{{study_id}}/locks",
        "list_locks",
        "List a study's locks",
        list_locks,
        STAFF_AND_ADMIN,
        "review",
        path_params=(STUDY_ID,),
        ok_schema=LOCK_LIST,
        description="The study's locks, lifted ones included, with the readings each holds, "
        "and its late data policy. For admins, and staff with a site in the study.",
    ),
    Endpoint(
        "POST",
        f"{V1}/locks/{{lock_id}}/unlock",
        "unlock_period",
        "Lift a lock",
        unlock_period,
        DATA_MANAGERS,
        "review",
        path_params=(LOCK_ID,),
        body=(REASON, *SIGNATURE),
        ok_schema=UNLOCKED,
        conflicts=True,
        extra_statuses=(429,),
        description="E-signed like the lock. Data for the period is stored again as it "
        "arrives, and the readings held for the lock are stored now (`released`).",
    ),
    Endpoint(
        "PUT",
        f"{V1}/studies/{{study_id}}/late-data-policy",
        "set_late_data_policy",
        "Set a study's late data policy",
        set_late_data_policy,
        DATA_MANAGERS,
        "review",
        path_params=(STUDY_ID,),
        body=(
            Field(
                "policy",
                enum=POLICY_ENUM,
                description="refuse readings of a locked period, or hold them for an unlock",
            ),
        ),
        ok_schema=POLICY,
    ),
)
