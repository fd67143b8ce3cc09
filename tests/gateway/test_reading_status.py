"""What the device said about a reading, through the real gateway (Mosquitto, PostgreSQL):
flags and the device user are stored with it; a shared cuff's readings of other users are
refused as ``other_user``; readings the device doubted open no alert unless the study says
so, and each rule counts what it skipped; a v1 hub is still heard."""

from __future__ import annotations

import time

from ingest.model import Gap, Payload, Reading, SensorReport
from ingest.rules import Rule
from storage import alert_state, db
from tests.alerts.test_engine import add_hr_rule, rows
from tests.fixtures.trial import Trial
from tests.fixtures.uplink import Uplink
from tests.fixtures.waiting import wait_until

CUFF = SensorReport("cuff", "Acme", "BP-7", "SN1", "1.0", None, 80, paired_user=1)


def now_ms() -> int:
    return int(time.time() * 1000)


def bp(t: int, value: float, user: int | None, *flags: str) -> Reading:
    return Reading(t, "systolic_bp", value, "mm[Hg]", "cuff", tuple(sorted(flags)), user)


async def test_flags_and_device_user_are_stored_with_the_reading(
    trial: Trial, uplink: Uplink
) -> None:
    t = now_ms() - 60_000
    spo2 = Reading(t, "spo2", 91.0, "%", "oxi", ("low_perfusion", "questionable_measurement"))
    plain = Reading(t + 1000, "spo2", 97.0, "%", "oxi")
    cuff = bp(t, 121.0, 3, "cuff_loose")
    receipt = await uplink.send(Payload("hub-1", 1, t + 5000, (spo2, plain, cuff)))
    assert (receipt.stored, receipt.refused) == (3, 0)
    assert await rows(
        trial.url, "SELECT metric, value, flags, device_user FROM readings ORDER BY time, metric"
    ) == [
        ("spo2", 91.0, ["low_perfusion", "questionable_measurement"], None),
        ("systolic_bp", 121.0, ["cuff_loose"], 3),
        ("spo2", 97.0, None, None),
    ]


async def test_a_shared_cuff_stores_only_the_participants_readings(
    trial: Trial, uplink: Uplink
) -> None:
    t = now_ms() - 120_000
    mine, spouse, unknown = bp(t, 128.0, 1), bp(t + 1000, 151.0, 2), bp(t + 2000, 140.0, 255)
    first = Payload("hub-1", 1, t + 5000, (mine, spouse, unknown), sensors=(CUFF,))
    receipt = await uplink.send(first)
    assert (receipt.stored, receipt.refused) == (1, 2)
    # A later envelope carries no report: the stored pairing judges it.
    later = Payload("hub-1", 2, t + 9000, (bp(t + 6000, 150.0, 2), bp(t + 7000, 126.0, 1)))
    receipt = await uplink.send(later)
    assert (receipt.stored, receipt.refused) == (1, 1)
    assert await rows(trial.url, "SELECT value, device_user FROM readings ORDER BY time") == [
        (128.0, 1),
        (126.0, 1),
    ]
    refusals = await rows(
        trial.url,
        "SELECT seq, reason, metric, reading_count, detail FROM rejections ORDER BY seq",
    )
    assert [r[:4] for r in refusals] == [
        (1, "other_user", "systolic_bp", 2),
        (2, "other_user", "systolic_bp", 1),
    ]
    assert "paired for device user 1" in str(refusals[0][4])
    # No value of another person is kept anywhere: a rejection row holds counts and times.
    assert await rows(
        trial.url, "SELECT count(*) FROM readings WHERE value IN (151, 140, 150)"
    ) == [(0,)]
    assert await rows(trial.url, "SELECT paired_user FROM sensors WHERE sensor = 'cuff'") == [(1,)]


async def test_unpairing_the_user_accepts_every_reading_again(trial: Trial, uplink: Uplink) -> None:
    """A report without a paired user says the wearable is no longer shared."""
    t = now_ms() - 120_000
    await uplink.send(Payload("hub-1", 1, t, (), sensors=(CUFF,)))
    alone = SensorReport("cuff", "Acme", "BP-7", "SN1", "1.0", None, 80)
    receipt = await uplink.send(
        Payload("hub-1", 2, t + 1000, (bp(t + 500, 130.0, 2),), (), sensors=(alone,)),
    )
    assert (receipt.stored, receipt.refused) == (1, 0)


async def test_a_v1_hub_is_still_heard(trial: Trial, uplink: Uplink) -> None:
    t = now_ms() - 60_000
    v1 = Payload("hub-1", 1, t + 1000, (Reading(t, "heart_rate", 64.0, "/min", "strap"),), v=1)
    receipt = await uplink.send(v1)
    assert receipt.stored == 1
    assert await rows(trial.url, "SELECT value, flags, device_user FROM readings") == [
        (64.0, None, None)
    ]


async def hr_rule(trial: Trial) -> Rule:
    return await add_hr_rule(trial.url, sustained_s=3)


def racing(t0: int, *flags: str) -> tuple[Reading, ...]:
    return tuple(
        Reading(t0 + i * 1000, "heart_rate", 150.0, "/min", "strap", tuple(flags)) for i in range(5)
    )


async def test_readings_the_device_doubted_open_no_alert_and_are_counted(
    trial: Trial, uplink: Uplink
) -> None:
    rule = await hr_rule(trial)
    t0 = now_ms() - 120_000
    # No skin contact (invalid), then a weak signal (questionable): 150/min either way.
    await uplink.send(Payload("hub-1", 1, t0 + 6000, racing(t0, "no_sensor_contact")))
    await uplink.send(Payload("hub-1", 2, t0 + 12000, racing(t0 + 6000, "poor_signal")))
    # A flag that only informs (where the reading was taken) does not stop the rule.
    assert await rows(trial.url, "SELECT count(*) FROM alerts") == [(0,)]
    async with db.connection(trial.url) as conn:
        assert await alert_state.skipped_by_rule(conn, [rule.rule_id]) == {rule.rule_id: 10}
    await uplink.send(Payload("hub-1", 3, t0 + 18000, racing(t0 + 12000, "site_finger")))

    async def opened() -> bool:
        return await rows(trial.url, "SELECT count(*) FROM alerts") == [(1,)]

    await wait_until(opened, "the alert of the readings the device did not doubt")


async def test_a_study_can_have_its_rules_judge_doubted_readings(
    trial: Trial, uplink: Uplink
) -> None:
    rule = await hr_rule(trial)
    async with db.connection(trial.url) as conn:
        await alert_state.set_study_judging_doubtful(conn, "S1", True, actor="tester")
    t0 = now_ms() - 120_000
    await uplink.send(Payload("hub-1", 1, t0 + 6000, racing(t0, "no_sensor_contact")))
    assert await rows(trial.url, "SELECT rule_id FROM alerts") == [(rule.rule_id,)]
    async with db.connection(trial.url) as conn:
        assert await alert_state.skipped_by_rule(conn, [rule.rule_id]) == {}
    assert await rows(
        trial.url,
        "SELECT action, detail->>'alerts_on_doubtful' FROM audit_log WHERE entity = 'study'",
    ) == [("study.alerts_on_doubtful_set", "true")]


async def test_a_gap_is_stored_with_its_wearable(trial: Trial, uplink: Uplink) -> None:
    t = now_ms() - 60_000
    gaps = (Gap(t - 5000, t, "out_of_range", "strap"), Gap(t - 3000, t - 2000, "clock_jump"))
    await uplink.send(Payload("hub-1", 1, t + 1000, (), gaps))
    assert await rows(trial.url, "SELECT reason, sensor FROM gaps ORDER BY from_time") == [
        ("out_of_range", "strap"),
        ("clock_jump", None),
    ]
