"""The API's consent operations: the documents to sign, signing and withdrawing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from consent import errors as consent_errors
from consent import records
from gateway.web.access import EVERYONE, require_participant
from gateway.web.api_common import PARTICIPANT_ID, V1, actor_of, iso, pool_of
from gateway.web.errors import BadInput, Conflict, Forbidden, NotFound, WebError
from gateway.web.ratelimit import check_request
from gateway.web.schemas import BOOL, CONSENT_DOCUMENTS, INT, STR, STRS, TIME, obj
from gateway.web.spec import Ctx, Endpoint, Field
from storage import consent_views, users
from storage.timeconv import to_ms


async def list_consent_documents(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    async with pool_of(ctx).connection() as conn:
        study_id, _site = await require_participant(ctx.user, pid, conn)
        docs = await consent_views.consent_documents_in_effect(conn, study_id)
        deadlines = await consent_views.reconsent_deadlines(conn, study_id)
        witness = await consent_views.consent_witness_required(conn, study_id)
        await conn.commit()
        now = datetime.now(UTC)
        async with conn.transaction():
            state = (await records.snapshot(conn, [pid])).state_at(pid, to_ms(now))
            signed_doc = None
            if state is not None and state.consent_id is not None:
                signed_doc = await consent_views.consent_document_of(conn, state.consent_id)
    out = []
    for d in docs:
        signed = signed_doc == d.document_id
        # Re-consent: the consent in force is on an older version of this document and a
        # version up to this one set a deadline (the earliest such deadline applies).
        due = None
        if state is not None and state.document == records.document_key(study_id, d.title):
            by = [
                x.reconsent_by
                for x in deadlines
                if x.title == d.title and state.rank < x.rank <= d.rank
            ]
            due = min(by) if by else None
        out.append(
            {
                "document_id": d.document_id,
                "title": d.title,
                "version": d.version,
                "language": d.language,
                "text": d.text,
                "uri": d.uri,
                "sha256": d.sha256.hex(),
                "scopes": list(d.scopes),
                "optional_scopes": list(d.optional_scopes),
                "effective_at": iso(d.effective_at),
                "signed": signed,
                "signed_scopes": sorted(state.scopes) if signed and state is not None else [],
                "reconsent_by": iso(due),
                "overdue": due is not None and due <= now,
            }
        )
    in_force = None
    if state is not None and state.consent_id is not None and signed_doc is not None:
        in_force = {
            "consent_id": state.consent_id,
            "document_id": signed_doc,
            "scopes": sorted(state.scopes),
        }
    return web.json_response(
        {
            "participant_id": pid,
            "witness_required": witness,
            "in_force": in_force,
            "documents": out,
        }
    )


_CONSENT_ERRORS: dict[type[consent_errors.ConsentError], tuple[type[WebError], str]] = {
    consent_errors.ReauthenticationFailed: (Forbidden, "reauthentication-failed"),
    consent_errors.AlreadySigned: (Conflict, "already-signed"),
    consent_errors.UnknownVersion: (BadInput, "unknown-version"),
    consent_errors.VersionNotEffective: (BadInput, "version-not-effective"),
    consent_errors.SupersededVersion: (BadInput, "superseded-version"),
    consent_errors.InvalidScopes: (BadInput, "invalid-scopes"),
    consent_errors.WitnessRequired: (BadInput, "witness-required"),
    consent_errors.NotPermitted: (NotFound, "not-found"),
    consent_errors.UnknownParticipant: (NotFound, "not-found"),
    consent_errors.IncompleteWithdrawal: (BadInput, "incomplete-withdrawal"),
    consent_errors.ScopeNotGranted: (BadInput, "scope-not-granted"),
    consent_errors.NotConsented: (Conflict, "not-consented"),
}


def _consent_refusal(exc: consent_errors.ConsentError) -> WebError:
    """The HTTP answer to a refused consent act (a type not mapped is a fault: re-raised)."""
    for kind, (error, name) in _CONSENT_ERRORS.items():
        if isinstance(exc, kind):
            err = error(str(exc))
            err.kind = name
            return err
    raise exc


T = TypeVar("T")


async def _consent_act(ctx: Ctx, act: Callable[[Any, records.Actor], Awaitable[T]]) -> T:
    """A signed consent act on the path's participant (signing, withdrawing): rate limited
    per account, the participant checked within the user's sites, refusals as problems."""
    check_request(ctx.request, lambda limits: limits.consent_per_account, ctx.user.username)
    async with pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, ctx.path["participant_id"], conn)
        await conn.commit()
        try:
            return await act(conn, actor_of(ctx.user))
        except consent_errors.ConsentError as exc:
            raise _consent_refusal(exc) from exc


async def sign_consent(ctx: Ctx) -> web.StreamResponse:
    b = ctx.body
    rec = await _consent_act(
        ctx,
        lambda conn, actor: records.sign(
            conn,
            actor,
            participant_id=ctx.path["participant_id"],
            document_id=b["document_id"],
            scopes=b["scopes"],
            printed_name=b["printed_name"],
            username=b["username"],
            password=b["password"],
            witness=b["witness"],
        ),
    )
    return web.json_response(
        {
            "consent_id": rec.consent_id,
            "version": rec.version,
            "scopes": sorted(rec.scopes),
            "effective_at": iso(rec.valid_from),
        },
        status=201,
    )


async def withdraw_consent(ctx: Ctx) -> web.StreamResponse:
    b = ctx.body
    received = records.ReceivedVia(b["received_via"]) if b["received_via"] else None
    w = await _consent_act(
        ctx,
        lambda conn, actor: records.withdraw(
            conn,
            actor,
            participant_id=ctx.path["participant_id"],
            initiated_by=records.Initiator(b["initiated_by"]),
            signature=records.WithdrawalSignature(b["username"], b["password"], received),
            scopes=b["scopes"],
            reason=b["reason"],
        ),
    )
    return web.json_response(
        {
            "consent_id": w.consent_id,
            "participant_id": w.participant_id,
            "scopes": sorted(w.scopes),
            "full": w.full,
            "data_policy": w.data_policy,
            "readings_deleted": w.readings_deleted,
            "effective_at": iso(w.effective_at),
        },
        status=201,
    )


# --- the operations -----------------------------------------------------------------------

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        f"{V1}/participants/{{participant_id}}/consent-documents",
        "list_consent_documents",
        "List consent documents to sign",
        list_consent_documents,
        EVERYONE,
        "participants",
        path_params=(PARTICIPANT_ID,),
        ok_schema=CONSENT_DOCUMENTS,
        description="The consent document versions in effect for the participant's study "
        "(the newest version of each document, in each language): text or uri, scopes and "
        "optional scopes, whether the consent in force is on that version, and the "
        "re-consent deadline when the consent in force is on an older version.",
    ),
    Endpoint(
        "POST",
        f"{V1}/participants/{{participant_id}}/consents",
        "sign_consent",
        "Sign consent",
        sign_consent,
        frozenset({users.Role.PARTICIPANT, users.Role.SITE_COORDINATOR, users.Role.ADMIN}),
        "participants",
        path_params=(PARTICIPANT_ID,),
        body=(
            Field("document_id", kind="integer", minimum=1, maximum=2**62),
            Field("scopes", kind="array", max_len=64),
            Field("printed_name", max_len=200),
            Field("username", max_len=128),
            Field("password", max_len=1024),
            Field("witness", required=False, max_len=200),
        ),
        ok_status=201,
        ok_schema=obj({"consent_id": INT, "version": STR, "scopes": STRS, "effective_at": TIME}),
        conflicts=True,
        description="The participant's e-signature: re-authenticates with the participant's "
        "own user name and password.",
        extra_statuses=(429,),
    ),
    Endpoint(
        "POST",
        f"{V1}/participants/{{participant_id}}/withdrawals",
        "withdraw_consent",
        "Withdraw consent",
        withdraw_consent,
        frozenset({users.Role.PARTICIPANT, users.Role.SITE_COORDINATOR, users.Role.ADMIN}),
        "participants",
        path_params=(PARTICIPANT_ID,),
        body=(
            Field("initiated_by", enum=tuple(i.value for i in records.Initiator)),
            Field(
                "received_via",
                required=False,
                enum=tuple(r.value for r in records.ReceivedVia),
                description="staff recording a participant's request: how it came",
            ),
            Field("reason", required=False, max_len=500),
            Field(
                "scopes",
                kind="array",
                required=False,
                max_len=64,
                description="withdraw only these scopes (default: all consent)",
            ),
            Field("username", max_len=128),
            Field("password", max_len=1024),
        ),
        ok_status=201,
        ok_schema=obj(
            {
                "consent_id": INT,
                "participant_id": STR,
                "scopes": STRS,
                "full": BOOL,
                "data_policy": STR,
                "readings_deleted": INT,
                "effective_at": TIME,
            }
        ),
        conflicts=True,
        extra_statuses=(429,),
        description="An e-signed act: whoever records it re-authenticates with their own user "
        "name and password. A participant withdraws for themself; site staff record a "
        "withdrawal for their sites with a reason, and for a participant's request, how it "
        "was received. Data already held follows the study's withdrawal policy.",
    ),
)
