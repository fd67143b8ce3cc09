"""Consent documents, signatures and withdrawals on a real database: what is stored, and a
typed error (with an audited attempt) for every bad input."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from consent import errors, records
from consent.records import Initiator
from storage import audit, db, partitions, registry, rollups, users
from storage.db import Conn
from storage.migrate import StorageMode
from tests.consent.conftest import (
    ADMIN,
    CHEAP_HASHER,
    COORDINATOR,
    OTHER_COORDINATOR,
    PASSWORD,
    Accounts,
)
from tests.fixtures.pgtrace import protocol_trace, waits
from tests.fixtures.signers import add_signer, signed, withdraw
from tests.fixtures.trial import ALL_SCOPES, Trial

NOW = datetime.now(UTC)


async def new_version(
    conn: Conn,
    version: str,
    *,
    effective_at: datetime,
    optional: frozenset[str] = frozenset({"glucose"}),
    reconsent_by: datetime | None = None,
    title: str = "Main ICF",
    language: str = "en",
) -> records.DocumentVersion:
    return await records.create_version(
        conn,
        ADMIN,
        study_id="S1",
        title=title,
        version=version,
        scopes=ALL_SCOPES,
        optional_scopes=optional,
        effective_at=effective_at,
        text=f"Consent form version {version}",
        language=language,
        reconsent_by=reconsent_by,
    )


async def sign(
    conn: Conn, actor: records.Actor, pid: str, document_id: int, **kw: object
) -> records.ConsentRecord:
    args: dict[str, object] = {
        "scopes": ALL_SCOPES - {"glucose"},
        "printed_name": f"Participant {pid}",
        "username": f"user-{pid}",
        "password": PASSWORD,
    }
    args.update(kw)
    return await records.sign(
        conn,
        actor,
        participant_id=pid,
        document_id=document_id,
        hasher=CHEAP_HASHER,
        **args,  # type: ignore[arg-type]
    )


async def audit_actions(conn: Conn) -> list[tuple[str, str]]:
    cur = await conn.execute("SELECT action, coalesce(detail->>'error', '') FROM audit_log")
    return [(str(a), str(e)) for a, e in await cur.fetchall()]


async def test_signing_records_a_part_11_signature_with_declined_optional_scope(
    trial: Trial, accounts: Accounts, conn: Conn
) -> None:
    await trial.add_participant("P2", "hub-2", scopes=frozenset())
    me = await accounts.participant("P2")
    v2 = await new_version(conn, "2.0", effective_at=NOW - timedelta(days=1))
    assert v2.required_scopes == ALL_SCOPES - {"glucose"}
    rec = await sign(conn, me, "P2", v2.document_id)
    assert rec.scopes == ALL_SCOPES - {"glucose"}
    assert (rec.signer_name, rec.meaning, rec.document_sha256) == (
        "Participant P2",
        "consent",
        v2.content_sha256,
    )
    history = await records.history(conn, me, "P2")
    assert [(h.consent_id, h.action, h.version, h.valid_to) for h in history] == [
        (rec.consent_id, "consent", "2.0", None)
    ]
    cur = await conn.execute(
        "SELECT c.signer_user_id = u.user_id, c.recorded_by FROM consents c, users u"
        " WHERE c.consent_id = %s AND u.username = 'user-P2'",
        (rec.consent_id,),
    )
    assert await cur.fetchone() == (True, "user-P2")
    row = (await audit.participant_history(conn, "P2"))[-1]
    assert (row.action, row.entity_id, row.detail["declined"]) == (
        "consent.sign",
        str(rec.consent_id),
        ["glucose"],
    )


async def test_bad_signing_attempts_are_typed_errors_and_audited(
    trial: Trial, accounts: Accounts, conn: Conn
) -> None:
    await trial.add_participant("P2", "hub-2", scopes=frozenset())
    me = await accounts.participant("P2")
    await accounts.participant("P1")
    v1_id = trial.document_id
    v2 = await new_version(conn, "2.0", effective_at=NOW - timedelta(days=1))

    with pytest.raises(errors.UnknownVersion):
        await sign(conn, me, "P2", 999_999)
    with pytest.raises(errors.SupersededVersion):
        await sign(conn, me, "P2", v1_id, scopes=ALL_SCOPES)
    with pytest.raises(errors.UnknownParticipant):
        await sign(conn, COORDINATOR, "P-nobody", v2.document_id)
    with pytest.raises(errors.UnknownParticipant):
        await sign(conn, COORDINATOR, "bad\x00id", v2.document_id)
    with pytest.raises(errors.NotPermitted):
        await sign(conn, OTHER_COORDINATOR, "P2", v2.document_id)
    with pytest.raises(errors.NotPermitted):  # a participant acting for another
        await sign(conn, me, "P1", v2.document_id, username="user-P2")
    with pytest.raises(errors.InvalidScopes):  # a required scope declined
        await sign(conn, me, "P2", v2.document_id, scopes=frozenset({"heart_rate"}))
    with pytest.raises(errors.InvalidScopes):
        await sign(conn, me, "P2", v2.document_id, printed_name="  ")
    with pytest.raises(errors.ReauthenticationFailed):
        await sign(conn, me, "P2", v2.document_id, password="wrong password!")
    with pytest.raises(errors.ReauthenticationFailed):
        await sign(conn, me, "P2", v2.document_id, username="user\x00P2")
    with pytest.raises(errors.ReauthenticationFailed):  # someone else's credential
        await sign(conn, COORDINATOR, "P2", v2.document_id, username="user-P1")
    await sign(conn, me, "P2", v2.document_id)
    with pytest.raises(errors.AlreadySigned):
        await sign(conn, me, "P2", v2.document_id)
    # Opting in to the declined optional scope later is a new signature, not a duplicate.
    again = await sign(conn, me, "P2", v2.document_id, scopes=ALL_SCOPES)
    assert again.scopes == ALL_SCOPES

    refused = [e for a, e in await audit_actions(conn) if a == "consent.sign.refused"]
    assert refused == [
        "UnknownVersion",
        "SupersededVersion",
        "UnknownParticipant",
        "UnknownParticipant",
        "NotPermitted",
        "NotPermitted",
        "InvalidScopes",
        "InvalidScopes",
        "ReauthenticationFailed",
        "ReauthenticationFailed",
        "ReauthenticationFailed",
        "AlreadySigned",
    ]
    cur = await conn.execute("SELECT failed_logins FROM users WHERE username = 'user-P2'")
    assert await cur.fetchone() == (0,)  # reset by the successful signature


async def test_version_not_yet_effective_and_witness_rules(
    trial: Trial, accounts: Accounts, conn: Conn
) -> None:
    await trial.add_participant("P2", "hub-2", scopes=frozenset())
    me = await accounts.participant("P2")
    future = await new_version(conn, "3.0", effective_at=NOW + timedelta(days=10))
    with pytest.raises(errors.VersionNotEffective):
        await sign(conn, me, "P2", future.document_id)
    await conn.execute("UPDATE studies SET consent_witness_required = true")
    other = await new_version(
        conn, "1.0", title="Sub-study ICF", effective_at=NOW - timedelta(days=1)
    )
    with pytest.raises(errors.WitnessRequired):
        await sign(conn, me, "P2", other.document_id)
    rec = await sign(conn, COORDINATOR, "P2", other.document_id, witness="coord-a")
    assert (rec.witness, rec.recorded_by) == ("coord-a", "coord-a")


async def test_document_versions_are_validated(trial: Trial, conn: Conn) -> None:
    with pytest.raises(errors.NotPermitted):
        await records.create_version(
            conn,
            COORDINATOR,
            study_id="S1",
            title="X",
            version="1",
            scopes={"spo2"},
            effective_at=NOW,
            text="x",
        )
    base: dict[str, object] = {
        "study_id": "S1",
        "title": "Main ICF",
        "scopes": {"spo2"},
        "effective_at": NOW,
    }
    bad: list[tuple[type[errors.ConsentError], dict[str, object]]] = [
        (errors.InvalidDocument, {"version": "2"}),  # neither text nor pdf
        (errors.InvalidDocument, {"version": "2", "text": "t", "pdf": b"%PDF"}),
        (errors.InvalidDocument, {"version": "2", "pdf": b"%PDF-1.7"}),  # no uri
        (errors.InvalidDocument, {"version": "2", "text": "   "}),
        (errors.InvalidDocument, {"version": "2", "text": "t", "scopes": set()}),
        (errors.InvalidScopes, {"version": "2", "text": "t", "scopes": {"mood"}}),
        (errors.InvalidScopes, {"version": "2", "text": "t", "optional_scopes": {"glucose"}}),
        (
            errors.InvalidDocument,
            {"version": "2", "text": "t", "reconsent_by": NOW - timedelta(days=1)},
        ),
        # Not after version 1.0 (effective 30 days ago).
        (
            errors.InvalidDocument,
            {"version": "2", "text": "t", "effective_at": NOW - timedelta(days=40)},
        ),
        (errors.InvalidDocument, {"version": "1", "text": "t", "study_id": "S-none"}),
    ]
    for error, changes in bad:
        with pytest.raises(error):
            await records.create_version(conn, ADMIN, **{**base, **changes})  # type: ignore[arg-type]
    pdf = await records.create_version(
        conn,
        ADMIN,
        **{**base, "version": "2", "pdf": b"%PDF-1.7 ...", "uri": "s3://icf/v2.pdf"},  # type: ignore[arg-type]
    )
    assert pdf.uri == "s3://icf/v2.pdf"
    # Another language of version 2: same scopes and dates, or refused.
    fr = await records.create_version(
        conn,
        ADMIN,
        **{**base, "version": "2", "text": "Formulaire", "language": "fr"},  # type: ignore[arg-type]
    )
    assert fr.content_sha256 != pdf.content_sha256
    with pytest.raises(errors.InvalidDocument):
        await records.create_version(
            conn,
            ADMIN,
            **{**base, "version": "2", "text": "t", "language": "de", "scopes": {"glucose"}},  # type: ignore[arg-type]
        )
    with pytest.raises(errors.InvalidDocument):  # same version and language twice
        await records.create_version(
            conn,
            ADMIN,
            **{**base, "version": "2", "text": "again", "language": "fr"},  # type: ignore[arg-type]
        )
    actions = [a for a, _ in await audit_actions(conn)]
    assert actions.count("consent.document.create") == 2


async def test_withdrawal_full_partial_and_twice(
    trial: Trial, accounts: Accounts, conn: Conn
) -> None:
    await trial.add_participant("P2", "hub-2")
    p1 = await accounts.participant("P1")
    with pytest.raises(errors.ScopeNotGranted):
        await withdraw(
            conn, p1, participant_id="P1", initiated_by=Initiator.PARTICIPANT, scopes={"mood"}
        )
    with pytest.raises(errors.InvalidScopes):
        await withdraw(
            conn, p1, participant_id="P1", initiated_by=Initiator.PARTICIPANT, scopes=set()
        )
    part = await withdraw(
        conn, p1, participant_id="P1", initiated_by=Initiator.PARTICIPANT, scopes={"glucose"}
    )
    assert (part.full, part.scopes, part.data_policy) == (False, frozenset({"glucose"}), "retain")
    with pytest.raises(errors.ScopeNotGranted):  # that scope is gone already
        await withdraw(
            conn, p1, participant_id="P1", initiated_by=Initiator.PARTICIPANT, scopes={"glucose"}
        )
    with pytest.raises(errors.NotPermitted):  # participants withdraw only themselves
        await withdraw(conn, p1, participant_id="P2", initiated_by=Initiator.PARTICIPANT)
    with pytest.raises(errors.NotPermitted):  # nor claim the site initiated it
        await withdraw(conn, p1, participant_id="P1", initiated_by=Initiator.SITE)
    with pytest.raises(errors.NotPermitted):
        await withdraw(conn, OTHER_COORDINATOR, participant_id="P1", initiated_by=Initiator.SITE)
    full = await withdraw(
        conn, COORDINATOR, participant_id="P1", initiated_by=Initiator.SITE, reason="moved away"
    )
    assert full.full
    assert full.scopes == ALL_SCOPES - {"glucose"}
    with pytest.raises(errors.NotConsented):
        await withdraw(conn, COORDINATOR, participant_id="P1", initiated_by=Initiator.SITE)

    history = await records.history(conn, COORDINATOR, "P1")
    assert [(h.action, h.initiated_by, h.valid_to is None) for h in history] == [
        ("consent", None, False),
        ("withdraw_scope", "participant", False),
        ("withdraw", "site", True),
    ]
    assert history[0].valid_to == history[2].valid_from == full.effective_at
    with pytest.raises(errors.NotPermitted):
        await records.history(conn, OTHER_COORDINATOR, "P1")
    refused = [e for a, e in await audit_actions(conn) if a == "consent.withdraw.refused"]
    assert refused == [
        "ScopeNotGranted",
        "InvalidScopes",
        "ScopeNotGranted",
        "NotPermitted",
        "NotPermitted",
        "NotPermitted",
        "NotConsented",
    ]
    # Consent rows are append-only, for the database owner's connections too.
    with pytest.raises(Exception, match="append-only"):
        await conn.execute("UPDATE consents SET scopes = '{}'")


async def test_withdrawal_under_delete_policy_deletes_held_readings_with_a_record(
    trial: Trial, conn: Conn, storage_mode: StorageMode
) -> None:
    await conn.execute("UPDATE studies SET withdrawal_policy = 'delete'")
    now_ms = int(time.time() * 1000)
    if storage_mode is StorageMode.PLAIN:
        await partitions.ensure_partitions(conn, partitions.ahead(now_ms - 86_400_000))
    for metric, n in (("heart_rate", 3), ("glucose", 2)):
        for i in range(n):
            await conn.execute(
                "INSERT INTO readings (time, participant_id, metric, value, unit, device_id,"
                " seq, sensor, received_at) VALUES (now() - %s * interval '1 minute', 'P1',"
                " %s, 1, 'u', 'hub-1', 1, 's', now())",
                (i + 1, metric),
            )
    hour = now_ms // rollups.HOUR_MS  # the readings lie in this hour or the one before
    await rollups.invalidate_rollups(
        conn, ["P1"] * 4, ["heart_rate", "glucose"] * 2, [hour, hour, hour - 1, hour - 1]
    )
    await rollups.refresh_rollups(conn, storage_mode)
    cur = await conn.execute("SELECT DISTINCT metric FROM readings_1h ORDER BY metric")
    assert await cur.fetchall() == [("glucose",), ("heart_rate",)]
    part = await withdraw(
        conn, COORDINATOR, participant_id="P1", initiated_by=Initiator.SITE, scopes={"glucose"}
    )
    assert (part.data_policy, part.readings_deleted) == ("delete", 2)
    # Their hourly rollups go with them at the next refresh; the rest stay.
    await rollups.refresh_rollups(conn, storage_mode)
    cur = await conn.execute("SELECT DISTINCT metric FROM readings_1h")
    assert await cur.fetchall() == [("heart_rate",)]
    full = await withdraw(conn, COORDINATOR, participant_id="P1", initiated_by=Initiator.SITE)
    assert full.readings_deleted == 3
    cur = await conn.execute(
        "SELECT consent_id, metrics, readings_deleted FROM withdrawal_deletions"
        " ORDER BY deletion_id"
    )
    rows = await cur.fetchall()
    assert [(r[0], r[2]) for r in rows] == [(part.consent_id, 2), (full.consent_id, 3)]
    assert "glucose" in rows[0][1]
    cur = await conn.execute("SELECT count(*) FROM readings")
    assert await cur.fetchone() == (0,)
    await rollups.refresh_rollups(conn, storage_mode)
    cur = await conn.execute("SELECT count(*) FROM readings_1h")
    assert await cur.fetchone() == (0,)
    actions = [a for a, _ in await audit_actions(conn)]
    assert actions.count("consent.data_deleted") == 2


async def test_pending_reconsents_per_site(trial: Trial, accounts: Accounts, conn: Conn) -> None:
    await registry.create_site(conn, "SITE-B", "S1", "Site B")
    await trial.add_participant("P2", "hub-2")
    await conn.execute("UPDATE participants SET site_id = 'SITE-B' WHERE participant_id = 'P2'")
    await trial.add_participant("P3", "hub-3", scopes=frozenset())  # never consented
    deadline = NOW + timedelta(days=7)
    v2 = await new_version(
        conn, "2.0", effective_at=NOW - timedelta(hours=1), reconsent_by=deadline
    )
    pending = await records.pending_reconsents(conn, COORDINATOR)
    assert [
        (p.participant_id, p.current_version, p.required_version, p.overdue) for p in pending
    ] == [("P1", "1.0", "2.0", False)]
    assert pending[0].reconsent_by == deadline
    assert [p.participant_id for p in await records.pending_reconsents(conn, ADMIN)] == ["P1", "P2"]
    assert [
        p.participant_id for p in await records.pending_reconsents(conn, OTHER_COORDINATOR)
    ] == ["P2"]
    p1 = await accounts.participant("P1")
    with pytest.raises(errors.NotPermitted):
        await records.pending_reconsents(conn, p1)
    await sign(conn, p1, "P1", v2.document_id)
    assert await records.pending_reconsents(conn, COORDINATOR) == []


async def test_functions_refuse_to_run_inside_an_open_transaction(trial: Trial) -> None:
    from storage import db

    async with db.connection(trial.url) as c:
        await c.execute("SELECT 1")
        with pytest.raises(errors.TransactionOpen):
            await records.withdraw(
                c,
                COORDINATOR,
                participant_id="P1",
                initiated_by=Initiator.SITE,
                signature=signed(COORDINATOR),
            )


async def test_lockout_applies_to_signing(trial: Trial, accounts: Accounts, conn: Conn) -> None:
    await trial.add_participant("P2", "hub-2", scopes=frozenset())
    me = await accounts.participant("P2")
    v2 = await new_version(conn, "2.0", effective_at=NOW - timedelta(days=1))
    for _ in range(users.MAX_FAILED_LOGINS):
        with pytest.raises(errors.ReauthenticationFailed):
            await sign(conn, me, "P2", v2.document_id, password="not the password")
    with pytest.raises(errors.ReauthenticationFailed) as caught:
        await sign(conn, me, "P2", v2.document_id)  # right password, but locked
    assert isinstance(caught.value.__cause__, users.AccountLocked)


async def test_confirming_a_batch_s_consent_is_one_round_trip_and_holds_the_lock(
    trial: Trial,
) -> None:
    async with db.connection(trial.url) as conn:
        async with conn.transaction():
            snapshot = await records.snapshot(conn, ["P1"])
        async with conn.transaction():
            with protocol_trace(conn) as messages:
                await records.confirm_unchanged(conn, ["P1"], snapshot)
            assert waits(messages) == 1, messages
            # Held until COMMIT: a consent change cannot take the exclusive lock meanwhile.
            async with db.connection(trial.url, autocommit=True) as other:
                cur = await other.execute(
                    "SELECT pg_try_advisory_lock(%s)", (records.CONSENT_LOCK_KEY,)
                )
                assert await cur.fetchone() == (False,)
        async with db.connection(trial.url) as writer, writer.transaction():
            await registry.record_consent(
                writer,
                "P1",
                trial.document_id,
                "consent",
                ["spo2"],
                effective_at=datetime.now(UTC),
                recorded_by="test",
                signer_name="Participant P1",
                meaning="consent",
            )
        with pytest.raises(errors.ConsentChanged, match="after the batch's consent was read"):
            async with conn.transaction():
                await records.confirm_unchanged(conn, ["P1"], snapshot)


async def test_a_withdrawal_is_signed_with_the_actors_own_password(
    trial: Trial, accounts: Accounts, conn: Conn
) -> None:
    """A withdrawal ends data collection (and under the delete policy, deletes data): like
    a consent signature it is e-signed, by whoever records it, with their own password."""
    p1 = await accounts.participant("P1")
    await add_signer(conn, COORDINATOR)
    refusals: list[tuple[records.WithdrawalSignature, str | None, type[Exception]]] = [
        # A wrong password, or another person's credential.
        (
            records.WithdrawalSignature("coord-a", "wrong password", records.ReceivedVia.PHONE),
            "asked by phone",
            errors.ReauthenticationFailed,
        ),
        (
            records.WithdrawalSignature("user-P1", PASSWORD, records.ReceivedVia.PHONE),
            "asked by phone",
            errors.ReauthenticationFailed,
        ),
        # Staff recording the participant's request: how it came, and why, are required.
        (records.WithdrawalSignature("coord-a", PASSWORD), "asked", errors.IncompleteWithdrawal),
        (signed(COORDINATOR, records.ReceivedVia.PHONE), None, errors.IncompleteWithdrawal),
        (signed(COORDINATOR, records.ReceivedVia.PHONE), "  ", errors.IncompleteWithdrawal),
    ]
    for signature, reason, error in refusals:
        with pytest.raises(error):
            await records.withdraw(
                conn,
                COORDINATOR,
                participant_id="P1",
                initiated_by=Initiator.PARTICIPANT,
                signature=signature,
                reason=reason,
                hasher=CHEAP_HASHER,
            )
    # A participant's own withdrawal was not "received" by anyone.
    with pytest.raises(errors.IncompleteWithdrawal):
        await records.withdraw(
            conn,
            p1,
            participant_id="P1",
            initiated_by=Initiator.PARTICIPANT,
            signature=signed(p1, records.ReceivedVia.EMAIL),
            hasher=CHEAP_HASHER,
        )
    cur = await conn.execute("SELECT count(*) FROM consents WHERE action <> 'consent'")
    assert await cur.fetchone() == (0,)

    part = await records.withdraw(
        conn,
        COORDINATOR,
        participant_id="P1",
        initiated_by=Initiator.PARTICIPANT,
        signature=signed(COORDINATOR, records.ReceivedVia.VIDEO_VISIT),
        scopes={"glucose"},
        reason="asked during the video visit",
        hasher=CHEAP_HASHER,
    )
    full = await records.withdraw(
        conn,
        p1,
        participant_id="P1",
        initiated_by=Initiator.PARTICIPANT,
        signature=signed(p1),
        hasher=CHEAP_HASHER,
    )
    cur = await conn.execute(
        "SELECT c.consent_id, c.signer_name, u.username, c.meaning, c.received_via"
        " FROM consents c JOIN users u ON u.user_id = c.signer_user_id"
        " WHERE c.action <> 'consent' ORDER BY c.consent_id"
    )
    assert await cur.fetchall() == [
        (part.consent_id, "Coord-A", "coord-a", records.MEANING_REQUEST_RECORDED, "video_visit"),
        (full.consent_id, "Participant P1", "user-P1", records.MEANING_BY_PARTICIPANT, None),
    ]
    cur = await conn.execute(
        "SELECT detail->>'signer', detail->>'received_via' FROM audit_log"
        " WHERE action = 'consent.withdraw' ORDER BY audit_id"
    )
    assert await cur.fetchall() == [("coord-a", "video_visit"), ("user-P1", None)]
    refused = [e for a, e in await audit_actions(conn) if a == "consent.withdraw.refused"]
    assert refused == ["ReauthenticationFailed"] * 2 + ["IncompleteWithdrawal"] * 4
