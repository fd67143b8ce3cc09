"""Exports never hold a reading whose consent did not hold at its time; withdrawn
participants' data follows the study's policy (retain or delete)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped]

from consent import records
from consent.gate import (
    CONSENT,
    WITHDRAW,
    WITHDRAW_SCOPE,
    ConsentEvent,
    ConsentSnapshot,
    ReconsentRequirement,
)
from storage import db
from storage.exports import ExportKind, ExportRequest, export
from storage.exports.selection import Window, windows
from tests.exports.conftest import (
    ADMIN,
    MONITOR_A,
    consent_id_of,
    hr,
    ms,
    now_ms,
    read_dataset,
    store,
)
from tests.fixtures import signers
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until

ALL = frozenset({"heart_rate", "spo2"})


def ev(cid: int, action: str, scopes: set[str], at: int, **kw: object) -> ConsentEvent:
    return ConsentEvent(cid, "P", action, frozenset(scopes), at, "doc", **kw)  # type: ignore[arg-type]


def spans(found: list[Window], metric: str) -> list[tuple[int, int | None]]:
    return [(w.lo_ms, w.hi_ms) for w in found if w.metric == metric]


def test_windows_follow_consent_partial_withdrawal_and_reconsent() -> None:
    events = [
        ev(1, CONSENT, {"heart_rate", "spo2"}, 100, version_rank=1),
        ev(2, WITHDRAW_SCOPE, {"spo2"}, 200, version_rank=1),
        ev(3, CONSENT, {"heart_rate", "spo2"}, 300, version_rank=1),
        ev(4, WITHDRAW, {"heart_rate", "spo2"}, 400, version_rank=1),
        ev(5, CONSENT, {"heart_rate"}, 500, version_rank=1),
    ]
    # Version 2 must be signed by 600: the consent of 500 (version 1) stops counting there.
    snap = ConsentSnapshot.from_events(events, [ReconsentRequirement("doc", 2, 600)])
    points = [e.effective_ms for e in events] + [600]
    found = windows(snap, "P", points, metrics=["heart_rate", "spo2"])
    assert spans(found, "heart_rate") == [(100, 400), (500, 600)]
    assert spans(found, "spo2") == [(100, 200), (300, 400)]
    # Clipped to an export's [from, to).
    clipped = windows(snap, "P", points, metrics=["heart_rate"], start_ms=150, end_ms=550)
    assert spans(clipped, "heart_rate") == [(150, 400), (500, 550)]
    # Nothing at all for someone without consent events.
    assert windows(snap, "Q", points, metrics=["heart_rate"]) == []


def test_a_purging_withdrawal_takes_its_scopes_from_all_earlier_time() -> None:
    events = [
        ev(1, CONSENT, {"heart_rate", "spo2"}, 100),
        ev(2, WITHDRAW_SCOPE, {"spo2"}, 300, purge=True),
    ]
    snap = ConsentSnapshot.from_events(events)
    found = windows(snap, "P", [100, 300], metrics=["heart_rate", "spo2"])
    assert spans(found, "heart_rate") == [(100, None)]
    assert spans(found, "spo2") == []


def test_an_open_ended_consent_clipped_at_the_end() -> None:
    snap = ConsentSnapshot.from_events([ev(1, CONSENT, {"heart_rate"}, 100)])
    assert spans(windows(snap, "P", [100], metrics=["heart_rate"], end_ms=50), "heart_rate") == []
    assert spans(windows(snap, "P", [100], metrics=["heart_rate"], end_ms=150), "heart_rate") == [
        (100, 150)
    ]


async def _withdraw(url: str, participant_id: str, scopes: set[str] | None = None) -> int:
    """Withdraw now; returns the withdrawal's effective time (ms)."""
    async with db.connection(url, autocommit=True) as conn:
        w = await signers.withdraw(
            conn,
            ADMIN,
            participant_id=participant_id,
            initiated_by=records.Initiator.PARTICIPANT,
            scopes=scopes,
            reason="test",
        )
    return ms(w.effective_at)


def values(table: pa.Table, participant_id: str) -> list[tuple[str, float]]:
    return [
        (r["metric"], r["value"])
        for r in table.to_pylist()
        if r["participant_id"] == participant_id
    ]


async def test_retain_keeps_what_was_measured_under_consent_and_nothing_after(
    trial: Trial, tmp_path: Path
) -> None:
    cid = await consent_id_of(trial.url, "P1")
    before = now_ms() - 60_000
    await store(
        trial.url,
        "P1",
        "hub-1",
        1,
        [hr(before, 70.0), hr(before, 97.0, metric="spo2")],
        consent_id=cid,
    )
    partial = await _withdraw(trial.url, "P1", {"spo2"})
    after = partial + 1
    # Stored behind the gate's back (as a bug or a hand-made insert would): never exported.
    await store(
        trial.url,
        "P1",
        "hub-1",
        2,
        [hr(after, 71.0), hr(after, 96.0, metric="spo2")],
        consent_id=cid,
    )
    await wait_until(lambda: now_ms() > after + 1, "the clock to pass the readings")
    full = await _withdraw(trial.url, "P1")
    assert full > after
    late = full + 1000
    await store(trial.url, "P1", "hub-1", 3, [hr(late, 72.0)], consent_id=cid)

    out = tmp_path / "retain"
    await export(trial.url, MONITOR_A, ExportRequest(ExportKind.PARQUET, "S1"), out)
    assert sorted(values(read_dataset(out), "P1")) == [
        ("heart_rate", 70.0),
        ("heart_rate", 71.0),
        ("spo2", 97.0),
    ]
    fhir_out = tmp_path / "retain-fhir"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.FHIR, "S1"), fhir_out)
    assert result.rows == 3


async def test_delete_policy_exports_nothing_of_the_withdrawn_participant(
    trial: Trial, tmp_path: Path
) -> None:
    async with db.connection(trial.url) as conn:
        await conn.execute("UPDATE studies SET withdrawal_policy = 'delete'")
        await conn.commit()
    await trial.add_participant("P2", "hub-2")
    before = now_ms() - 60_000
    for pid, dev in (("P1", "hub-1"), ("P2", "hub-2")):
        cid = await consent_id_of(trial.url, pid)
        await store(trial.url, pid, dev, 1, [hr(before, 70.0)], consent_id=cid)
    await _withdraw(trial.url, "P1")
    async with db.connection(trial.url) as conn:
        cur = await conn.execute("SELECT count(*) FROM readings WHERE participant_id = 'P1'")
        assert await cur.fetchone() == (0,)  # the consent module deleted them
    # Rows the deletion did not see (written afterwards, measured before the withdrawal).
    cid = await consent_id_of(trial.url, "P1")
    await store(trial.url, "P1", "hub-1", 2, [hr(before, 70.5)], consent_id=cid)

    for kind in ExportKind:
        out = tmp_path / kind
        result = await export(trial.url, MONITOR_A, ExportRequest(kind, "S1"), out)
        if kind is ExportKind.ADHERENCE:
            # Counts, not readings (none here: no schedule, no refresh), and none of P1's.
            assert result.participants == ("P2",)
            continue
        # SDTM: mean, minimum, maximum, count and doubtful count of P2's one day, and the
        # record of the reading itself.
        assert result.rows == (6 if kind is ExportKind.SDTM else 1), kind
    table = read_dataset(tmp_path / "parquet")
    assert values(table, "P1") == []
    assert values(table, "P2") == [("heart_rate", 70.0)]
    assert "S1-P1" not in (tmp_path / "sdtm" / "vs.csv").read_text()
