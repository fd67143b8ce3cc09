"""Alert deliveries to whoever is on call (docs/notifications.md): planned from the alert
events, sent by e-mail to a real SMTP server (aiosmtpd) and by signed webhook to a real HTTP
server, every attempt recorded, failures retried and then given up, nothing dropped without
a row saying why; contacts and on-call assignments validated and audited."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path

import aiohttp
import pytest
from psycopg_pool import AsyncConnectionPool

from gateway.broker import free_port
from gateway.commands.operator import PASSWORD_FILE_ENV
from gateway.errors import ConfigError
from gateway.notify import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    Notifier,
    Senders,
    SmtpConfig,
    notify_once,
    sign,
    verify,
)
from gateway.settings import Settings
from ingest.rules import Severity
from storage import db, notifications, registry
from storage.notifications import Event, NotificationError, State
from storage.users import Role
from tests.alerts.conftest import Ingest, S
from tests.alerts.test_engine import rows
from tests.alerts.test_lifecycle import open_alert, set_escalation, sweep
from tests.fixtures.notify import Hook, Mailbox
from tests.fixtures.signers import add_operators, password_file
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until
from tests.test_cli import trialstream

SECRET = bytes(range(32))
BOARD = "https://gw.example/monitor"


@pytest.fixture
async def notify_pool(trial: Trial) -> AsyncIterator[AsyncConnectionPool]:
    pool = await db.open_pool(trial.url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def people(trial: Trial) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        await registry.create_site(conn, "SITE-B", "S1", "Site B")
    await add_operators(
        trial.url,
        ("ada", Role.ADMIN, []),
        ("mona", Role.MONITOR, ["SITE-A"]),
        ("cleo", Role.CLINICIAN, ["SITE-A"]),
        ("omar", Role.MONITOR, ["SITE-B"]),
    )


async def reach(
    trial: Trial,
    user: str,
    *,
    email: str | None = None,
    webhook: str | None = None,
    events: tuple[Event, ...] = (Event.ESCALATED, Event.CRITICAL),
    on_call: str | None = "SITE-A",
) -> None:
    now = datetime.now(UTC)
    async with db.connection(trial.url, autocommit=True) as conn:
        await notifications.set_contact(
            conn,
            username=user,
            email=email,
            webhook_url=webhook,
            webhook_secret=SECRET if webhook else None,
            events=events,
            actor="ada",
        )
        if on_call:
            await notifications.add_on_call(
                conn,
                site_id=on_call,
                username=user,
                from_time=now - timedelta(hours=2),
                to_time=now + timedelta(hours=2),
                actor="ada",
            )


# The reading that opens the alert: it must not leave the system in a message.
VALUE = 173.25


async def deliveries(trial: Trial) -> list[notifications.Delivery]:
    async with db.connection(trial.url) as conn:
        return list(reversed(await notifications.deliveries(conn)))


async def change(url: str, statement: str) -> None:
    async with db.connection(url, autocommit=True) as conn:
        await conn.execute(statement)


async def make_due(trial: Trial) -> None:
    """The retry's wait over."""
    await change(
        trial.url,
        "UPDATE notification_deliveries SET next_attempt_at = now() WHERE state = 'pending'",
    )


async def test_an_escalation_reaches_whoever_is_on_call_by_email_and_signed_webhook(
    trial: Trial,
    ingest: Ingest,
    notify_pool: AsyncConnectionPool,
    smtp: tuple[SmtpConfig, Mailbox],
    hook: Hook,
) -> None:
    config, box = smtp
    await people(trial)
    await reach(trial, "mona", email="mona@site-a.example", webhook=hook.url)
    await reach(trial, "omar", email="omar@site-b.example", on_call="SITE-B")  # another site
    await set_escalation(trial.url, 600)
    # A warning (its opening is not sent), opened by a value no time or number in a message
    # can spell by chance (a time's seconds have two digits before the point).
    alert_id = await open_alert(trial, ingest, value=VALUE)
    await sweep(trial.url, ingest.engine, ingest.clock.now_ms + 600 * S)
    async with aiohttp.ClientSession() as session:
        sent = await notify_once(notify_pool, Senders(config, BOARD, session=session))
    assert sent == 2
    got = await deliveries(trial)
    assert [(d.event, d.username, d.channel, d.address, d.state, d.attempts) for d in got] == [
        ("escalated", "mona", "email", "mona@site-a.example", "sent", 1),
        ("escalated", "mona", "webhook", hook.url, "sent", 1),
    ]
    ((sender, to, raw),) = box.messages
    assert (sender, to) == ("alerts@trial.example", ["mona@site-a.example"])
    mail = message_from_bytes(raw, policy=policy.default)
    assert mail["Subject"].strip() == (
        "[trialstream] WARNING alert escalated: hr-high, participant P1 (site SITE-A)"
    )
    payload_bytes = mail.get_payload(decode=True)
    assert isinstance(payload_bytes, bytes)
    text = payload_bytes.decode()
    assert f"Alert {alert_id} (rule 'hr-high', warning)" in text
    assert "it has not been acknowledged" in text
    assert BOARD in text
    assert str(VALUE) not in text  # no reading value leaves the system
    ((headers, body),) = hook.requests
    assert verify(SECRET, headers[SIGNATURE_HEADER], body, now=time.time())
    assert headers[DELIVERY_HEADER] == str(got[1].delivery_id)
    payload = json.loads(body)
    assert (payload["alert_id"], payload["event"], payload["participant_id"]) == (
        alert_id,
        "escalated",
        "P1",
    )
    assert str(VALUE) not in body.decode()
    assert VALUE not in payload.values()
    # Nothing is sent twice.
    async with aiohttp.ClientSession() as session:
        assert await notify_once(notify_pool, Senders(config, BOARD, session=session)) == 0


async def test_an_event_that_reaches_no_one_leaves_a_row_saying_so(
    trial: Trial, ingest: Ingest, notify_pool: AsyncConnectionPool
) -> None:
    await people(trial)
    # cleo is on call but asked only for escalations; omar asked for everything, elsewhere.
    await reach(trial, "cleo", email="cleo@site-a.example", events=(Event.ESCALATED,))
    await reach(trial, "omar", email="omar@site-b.example", on_call="SITE-B")
    await open_alert(trial, ingest, severity=Severity.CRITICAL)
    assert await notify_once(notify_pool, Senders(None, BOARD)) == 0
    (row,) = await deliveries(trial)
    assert (row.event, row.severity, row.username, row.channel, row.state) == (
        "opened",
        "critical",
        None,
        None,
        "no_recipient",
    )
    assert row.last_error == "nobody on call for the site at the time asked for this event"


async def test_a_disabled_account_or_one_no_longer_at_the_site_is_not_told(
    trial: Trial, ingest: Ingest, notify_pool: AsyncConnectionPool
) -> None:
    await people(trial)
    await reach(trial, "mona", email="mona@site-a.example")
    await reach(trial, "cleo", email="cleo@site-a.example")
    await change(trial.url, "UPDATE users SET disabled_at = now() WHERE username = 'cleo'")
    await change(
        trial.url,
        "DELETE FROM user_sites WHERE user_id = (SELECT user_id FROM users WHERE username ="
        " 'mona')",
    )
    await open_alert(trial, ingest, severity=Severity.CRITICAL)
    await notify_once(notify_pool, Senders(None, BOARD))
    assert [d.state for d in await deliveries(trial)] == ["no_recipient"]


async def test_failures_are_recorded_retried_and_at_last_given_up(
    trial: Trial,
    ingest: Ingest,
    notify_pool: AsyncConnectionPool,
    hook: Hook,
) -> None:
    await people(trial)
    down = f"smtp://127.0.0.1:{free_port()}"  # nothing listens there
    await reach(trial, "mona", email="mona@site-a.example", webhook=hook.url)
    await open_alert(trial, ingest, severity=Severity.CRITICAL)
    hook.statuses = [503, 500]
    async with aiohttp.ClientSession() as session:
        send = Senders(SmtpConfig.from_url(down, "alerts@trial.example"), BOARD, session=session)
        assert await notify_once(notify_pool, send) == 2
        email, webhook = await deliveries(trial)
        assert (email.state, email.attempts) == ("pending", 1)
        assert email.last_error is not None
        assert "SMTPConnect" in email.last_error
        assert (webhook.state, webhook.attempts, webhook.last_error) == ("pending", 1, "HTTP 503")
        assert webhook.next_attempt_at is not None
        wait = (webhook.next_attempt_at - datetime.now(UTC)).total_seconds()
        assert notifications.RETRY_DELAYS_S[0] - 5 < wait <= notifications.RETRY_DELAYS_S[0]
        assert await notify_once(notify_pool, send) == 0  # not due yet
        await make_due(trial)
        assert await notify_once(notify_pool, send) == 2
        await make_due(trial)
        assert await notify_once(notify_pool, send) == 2  # the hook answers 200 now
        email, webhook = await deliveries(trial)
        assert (webhook.state, webhook.attempts, webhook.last_error) == ("sent", 3, None)
        assert (email.state, email.attempts) == ("pending", 3)
        for _ in range(notifications.MAX_ATTEMPTS - 3):
            await make_due(trial)
            assert await notify_once(notify_pool, send) == 1
        email, _ = await deliveries(trial)
    assert (email.state, email.attempts, email.next_attempt_at) == (
        "failed",
        notifications.MAX_ATTEMPTS,
        None,
    )


@pytest.mark.parametrize(
    ("status", "state"), [(404, "failed"), (410, "failed"), (429, "pending"), (502, "pending")]
)
async def test_a_webhook_answer_says_whether_to_retry(
    trial: Trial,
    ingest: Ingest,
    notify_pool: AsyncConnectionPool,
    hook: Hook,
    status: int,
    state: str,
) -> None:
    await people(trial)
    await reach(trial, "mona", webhook=hook.url)
    await open_alert(trial, ingest, severity=Severity.CRITICAL)
    hook.statuses = [status]
    async with aiohttp.ClientSession() as session:
        await notify_once(notify_pool, Senders(None, BOARD, session=session))
    (row,) = await deliveries(trial)
    assert (row.state, row.last_error) == (state, f"HTTP {status}")


async def test_email_without_an_smtp_server_configured_fails_with_the_reason(
    trial: Trial, ingest: Ingest, notify_pool: AsyncConnectionPool
) -> None:
    await people(trial)
    await reach(trial, "mona", email="mona@site-a.example")
    await open_alert(trial, ingest, severity=Severity.CRITICAL)
    await notify_once(notify_pool, Senders(None, BOARD))
    (row,) = await deliveries(trial)
    assert (row.state, row.last_error) == (
        "failed",
        "no SMTP server configured (TRIALSTREAM_SMTP_URL)",
    )


async def test_a_notifier_that_dies_mid_send_leaves_the_delivery_due_after_its_lease(
    trial: Trial, ingest: Ingest
) -> None:
    await people(trial)
    await reach(trial, "mona", email="mona@site-a.example")
    await open_alert(trial, ingest, severity=Severity.CRITICAL)
    async with db.connection(trial.url, autocommit=True) as conn:
        await notifications.plan(conn)
        (first,) = await notifications.claim(conn, lease_s=3600)
        assert await notifications.claim(conn) == []  # someone's for the lease
        # The lease runs out: the first notifier never recorded anything.
        await change(trial.url, "UPDATE notification_deliveries SET next_attempt_at = now()")
        (again,) = await notifications.claim(conn)
    assert (again.delivery_id, again.attempts) == (first.delivery_id, 2)


async def test_concurrent_planners_plan_each_event_once(
    trial: Trial, ingest: Ingest, notify_pool: AsyncConnectionPool
) -> None:
    await people(trial)
    await reach(trial, "mona", email="mona@site-a.example")
    await open_alert(trial, ingest, severity=Severity.CRITICAL)

    async def plan() -> notifications.Planned:
        async with db.connection(trial.url, autocommit=True) as conn:
            return await notifications.plan(conn)

    planned = await asyncio.gather(*(plan() for _ in range(4)))
    assert sorted(p.deliveries for p in planned) == [0, 0, 0, 1]
    assert len(await deliveries(trial)) == 1


def test_a_signature_verifies_only_for_its_body_secret_and_time() -> None:
    body = b'{"alert_id":1}'
    header = sign(SECRET, 1_800_000_000, body)
    assert verify(SECRET, header, body, now=1_800_000_100)
    assert not verify(SECRET, header, body + b" ", now=1_800_000_100)
    assert not verify(bytes(32), header, body, now=1_800_000_100)
    assert not verify(SECRET, header, body, now=1_800_000_400)  # replayed later
    for forged in ("", "t=,v1=", "v1=00", "t=1800000000", "t=9" * 40 + ",v1=00"):
        assert not verify(SECRET, forged, body, now=1_800_000_000)


@pytest.mark.parametrize(
    ("email", "webhook", "said"),
    [
        ("not-an-address", None, "not an e-mail address"),
        ("a@b", None, "not an e-mail address"),
        ("mona@site-a.example\r\nBcc: x@evil.example", None, "not an e-mail address"),
        ("x" * 250 + "@a.example", None, "not an e-mail address"),
        (None, "http://pager.example/hook", "must use https"),
        (None, "ftp://pager.example/hook", "must be https://"),
        (None, "https://user:pw@pager.example/hook", "may not carry credentials"),
        (None, "https://pager.example/ho ok", "not a usable webhook URL"),
        (None, "https://pager.example/\x00", "not a usable webhook URL"),
        (None, "https://pager.example:99999/", "not a usable webhook URL"),
        (None, "https://" + "a" * 2050 + ".example/", "not a usable webhook URL"),
        (None, "https:///nohost", "must be https://"),
    ],
)
async def test_hostile_contacts_are_refused_and_nothing_is_stored(
    trial: Trial, email: str | None, webhook: str | None, said: str
) -> None:
    await people(trial)
    async with db.connection(trial.url, autocommit=True) as conn:
        with pytest.raises(NotificationError, match=said):
            await notifications.set_contact(
                conn,
                username="mona",
                email=email,
                webhook_url=webhook,
                webhook_secret=SECRET,
                events=[Event.ESCALATED],
                actor="ada",
            )
    assert await rows(trial.url, "SELECT count(*) FROM notification_contacts") == [(0,)]


@pytest.mark.parametrize(
    ("site", "user", "hours", "said"),
    [
        ("SITE-Z", "mona", 1, "no site"),
        ("SITE-B", "mona", 1, "does not work at site"),
        ("SITE-A", "nobody", 1, "no user"),
        ("SITE-A", "mona", -1, "must end after it starts"),
        ("SITE-A", "mona", 24 * 400, "at most a year"),
    ],
)
async def test_on_call_assignments_that_cannot_be_are_refused(
    trial: Trial, site: str, user: str, hours: int, said: str
) -> None:
    await people(trial)
    now = datetime.now(UTC)
    async with db.connection(trial.url, autocommit=True) as conn:
        with pytest.raises(NotificationError, match=said):
            await notifications.add_on_call(
                conn,
                site_id=site,
                username=user,
                from_time=now,
                to_time=now + timedelta(hours=hours),
                actor="ada",
            )
    assert await rows(trial.url, "SELECT count(*) FROM on_call") == [(0,)]


# --- the command line -------------------------------------------------------------------------


@pytest.fixture
async def env(trial: Trial, tmp_path: Path) -> dict[str, str]:
    await people(trial)
    await add_operators(trial.url, ("cora", Role.SITE_COORDINATOR, ["SITE-A"]))
    return {PASSWORD_FILE_ENV: str(password_file(tmp_path))}


def notify(url: str, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    done = trialstream("notify", *args, "--database-url", url, env=env)
    assert "Traceback" not in done.stderr
    return done.returncode, done.stdout, done.stderr


async def test_cli_sets_contacts_and_on_call_audited_each_refused_outside_its_role(
    trial: Trial, env: dict[str, str]
) -> None:
    url = trial.url
    hook = "https://pager.site-a.example/hooks/trialstream"
    code, out, err = notify(
        url, env, "contact", "--user", "mona", "--email", "mona@site-a.example",
        "--webhook-url", hook, "--as", "ada",
    )  # fmt: skip
    assert code == 0, err
    assert f"mona is reached at mona@site-a.example and {hook} for: escalated, critical" in out
    secret = out.split("webhook signing secret (shown once): ")[1].strip()
    assert await rows(url, "SELECT encode(webhook_secret, 'hex') FROM notification_contacts") == [
        (secret,)
    ]
    # A monitor sets her own; not another's.
    code, out, err = notify(
        url, env, "contact", "--user", "mona", "--email", "m@site-a.example", "--events",
        "escalated", "--as", "mona",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = notify(
        url, env, "contact", "--user", "cleo", "--email", "c@a.example", "--as", "mona"
    )
    assert code == 2
    assert "only an admin sets another user's contact" in err
    code, out, err = notify(
        url, env, "on-call", "add", "--site", "SITE-A", "--user", "mona", "--hours", "12",
        "--as", "cora",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("on call 1: mona for site SITE-A from ")
    code, _, err = notify(
        url, env, "on-call", "add", "--site", "SITE-B", "--user", "omar", "--hours", "12",
        "--as", "cora",
    )  # fmt: skip
    assert code == 2
    assert "does not work for site 'SITE-B'" in err
    code, _, err = notify(url, env, "on-call", "add", "--site", "SITE-A", "--user", "mona",
                          "--hours", "1", "--as", "mona")  # fmt: skip
    assert code == 2
    assert "monitor" in err
    code, out, err = notify(url, env, "on-call", "list", "--json")
    assert code == 0, err
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert (listed["on_call_id"], listed["site_id"], listed["user"]) == (1, "SITE-A", "mona")
    code, out, err = notify(url, env, "contacts", "--json")
    assert code == 0
    assert secret not in out
    code, out, err = notify(url, env, "on-call", "remove", "1", "--as", "cora")
    assert code == 0, err
    assert await rows(
        url,
        "SELECT actor, action, entity_id FROM audit_log WHERE action LIKE 'notification.%%'"
        " ORDER BY audit_id",
    ) == [
        ("ada", "notification.contact_set", "mona"),
        ("mona", "notification.contact_set", "mona"),
        ("cora", "notification.on_call_added", "SITE-A"),
        ("cora", "notification.on_call_removed", "SITE-A"),
    ]
    assert await rows(url, "SELECT count(*) FROM audit_log WHERE action = 'cli.refused'") == [(3,)]


@pytest.mark.parametrize(
    "args",
    [
        ("on-call", "add", "--site", "S", "--user", "mona", "--from", "yesterday", "--hours", "1"),
        ("on-call", "add", "--site", "S", "--user", "m", "--from", "2026-12-07T08:00", "--to", "1"),
        ("on-call", "add", "--site", "S", "--user", "m", "--hours", "9",
         "--from", "9999-12-31T23:00+00:00"),
        ("on-call", "add", "--site", "S", "--user", "m", "--hours", "1",
         "--from", "0001-01-01T00:00+00:00"),
        ("on-call", "add", "--site", "SITE-A", "--user", "mona", "--hours", "0"),
        ("on-call", "add", "--site", "SITE-A", "--user", "mona", "--hours", "9" * 30),
        ("on-call", "add", "--site", "SITE-A", "--user", "mona"),
        ("on-call", "remove", "-1"),
        ("contact", "--user", "mona", "--events", "everything"),
        ("contact", "--user", "mona", "--events", ","),
        ("deliveries", "--limit", "0"),
        ("deliveries", "--state", "lost"),
    ],
)  # fmt: skip
def test_cli_input_that_cannot_be_is_refused_in_one_line(args: tuple[str, ...]) -> None:
    done = trialstream("notify", *args, "--database-url", "postgresql://nowhere/x")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("trialstream notify")


async def test_cli_lists_deliveries_with_their_state(
    trial: Trial, ingest: Ingest, env: dict[str, str], notify_pool: AsyncConnectionPool
) -> None:
    await open_alert(trial, ingest, severity=Severity.CRITICAL)
    await notify_once(notify_pool, Senders(None, BOARD))
    code, out, err = notify(trial.url, env, "deliveries", "--state", "no_recipient")
    assert code == 0, err
    assert "alert 1 opened [critical] site SITE-A: nobody: no_recipient, 0 attempt(s)" in out
    code, out, _ = notify(trial.url, env, "deliveries", "--state", "sent", "--json")
    assert out == ""
    code, out, _ = notify(trial.url, env, "deliveries", "--json")
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["user"] is None
    assert (row["alert_id"], row["state"], row["last_error"]) == (
        1,
        "no_recipient",
        "nobody on call for the site at the time asked for this event",
    )
    assert row["created_at"].endswith("+00:00")


def test_the_cli_choices_are_the_stores() -> None:
    from gateway.commands import notify as cli

    assert tuple(e.value for e in Event) == cli.EVENTS
    assert tuple(s.value for s in State) == cli.STATES


# --- the gateway's SMTP settings ---------------------------------------------------------------


def test_smtp_settings_name_the_server_its_tls_and_login() -> None:
    settings = Settings.from_env(
        {
            "TRIALSTREAM_SMTP_URL": "smtp+starttls://alerts%40site.example:p%40ss@mail.example",
            "TRIALSTREAM_NOTIFY_FROM": "alerts@site.example",
        }
    )
    assert settings.smtp() == SmtpConfig(
        "mail.example", 587, True, False, "alerts@site.example", "p@ss", "alerts@site.example"
    )
    assert Settings.from_env({"TRIALSTREAM_SMTP_URL": "smtps://mail.example"}).smtp() == (
        SmtpConfig("mail.example", 465, False, True, None, None, "trialstream@localhost")
    )
    assert Settings.from_env({}).smtp() is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TRIALSTREAM_SMTP_URL", "http://mail.example"),
        ("TRIALSTREAM_SMTP_URL", "smtp://"),
        ("TRIALSTREAM_SMTP_URL", "smtp://user:secret-pw@mail.example:99999"),
        ("TRIALSTREAM_SMTP_URL", "mail.example:25"),
        ("TRIALSTREAM_NOTIFY_FROM", "not an address"),
        ("TRIALSTREAM_NOTIFY_FROM", "alerts@site.example\r\nBcc: all@evil.example"),
    ],
)
def test_smtp_settings_that_cannot_work_stop_the_gateway_naming_the_variable(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert variable in str(info.value)
    assert "secret-pw" not in str(info.value)


async def test_a_notifier_fault_is_logged_and_the_notifier_goes_on(
    trial: Trial,
    ingest: Ingest,
    notify_pool: AsyncConnectionPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await people(trial)
    await open_alert(trial, ingest, severity=Severity.CRITICAL)
    shipped = notifications.plan
    calls = 0

    async def plan_failing_once(conn: object, **kw: object) -> notifications.Planned:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected: a fault in planning")
        return await shipped(conn, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(notifications, "plan", plan_failing_once)
    notifier = Notifier(notify_pool, trial.url, None, BOARD, interval_s=0.2)
    task = asyncio.create_task(notifier.run())
    try:
        await wait_until(lambda: deliveries(trial), "the event planned after the fault")
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert calls >= 2
    assert [d.state for d in await deliveries(trial)] == ["no_recipient"]
