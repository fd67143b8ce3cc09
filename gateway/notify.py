"""The notifier: alert deliveries by e-mail and signed webhook (docs/notifications.md).

Each gateway worker runs a ``Notifier``: every ``INTERVAL_S`` (and when an alert event is
committed: ``NOTIFY trialstream_alerts``) it plans the deliveries of new alert events
(``storage.notifications.plan``), claims those due, sends each, and records what happened.

- E-mail over SMTP (``TRIALSTREAM_SMTP_URL``: ``smtp://`` plain, ``smtp+starttls://`` or
  ``smtps://``, with ``user:password@`` when the server wants a login), from
  ``TRIALSTREAM_NOTIFY_FROM``. A server that refuses the recipient (5xx) gives the delivery up;
  anything else is retried.
- Webhooks: ``POST`` of the event as JSON, signed ``Trialstream-Signature: t=<unix
  time>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the contact's secret>``, with
  ``Trialstream-Delivery: <id>`` for de-duplication (delivery is at least once). A 2xx is
  sent; 408, 429 and 5xx are retried; any other status gives the delivery up.

Messages carry no reading value: the alert, its rule, participant, site and a link.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Final
from urllib.parse import unquote, urlsplit

import aiohttp
import aiosmtplib
from psycopg_pool import AsyncConnectionPool

from gateway.alerts import CONNECTION_ERRORS, pause
from ingest.wire import TEXT_CONTROL_RE
from storage import db, notifications
from storage.alerts import NOTIFY_CHANNEL
from storage.notifications import Channel, Due, State

log = logging.getLogger(__name__)

INTERVAL_S: Final = 5.0
SEND_TIMEOUT_S: Final = 10.0
CLAIM_BATCH: Final = 20
SIGNATURE_HEADER: Final = "Trialstream-Signature"
DELIVERY_HEADER: Final = "Trialstream-Delivery"
_RETRIED_STATUS: Final = frozenset({408, 425, 429})
_SCHEMES: Final = {"smtp": (False, False), "smtp+starttls": (True, False), "smtps": (False, True)}


class NotConfigured(Exception):
    """The gateway has no way to send on this channel."""


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    start_tls: bool
    use_tls: bool
    username: str | None
    password: str | None
    sender: str

    @classmethod
    def from_url(cls, url: str, sender: str) -> SmtpConfig:
        """``smtp[+starttls]://[user:password@]host[:port]`` or ``smtps://...``; raises
        ``ValueError`` saying what is wrong."""
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES or not parts.hostname:
            raise ValueError("expected smtp://host[:port], smtp+starttls://... or smtps://...")
        start_tls, use_tls = _SCHEMES[parts.scheme]
        try:
            notifications.check_email(sender)
        except notifications.NotificationError as exc:
            raise ValueError(f"the sender: {exc}") from None
        port = parts.port  # raises ValueError when out of range
        return cls(
            host=parts.hostname,
            port=port or (465 if use_tls else 587 if start_tls else 25),
            start_tls=start_tls,
            use_tls=use_tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            sender=sender,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    error: str | None = None
    permanent: bool = False


def _clean(text: str) -> str:
    """People's text (rule names, display names) as a header or line can carry it."""
    return TEXT_CONTROL_RE.sub(" ", text)[:200]


def describe(due: Due) -> tuple[str, str]:
    """The subject and the first line of a delivery's message."""
    what = "escalated" if due.event == "escalated" else "opened"
    subject = (
        f"[trialstream] {due.severity.upper()} alert {what}: {_clean(due.rule_name)},"
        f" participant {due.participant_id} (site {due.site_id})"
    )
    when = due.at.strftime("%Y-%m-%d %H:%M:%S %Z")
    line = (
        f"Alert {due.alert_id} (rule {_clean(due.rule_name)!r}, {due.severity}) for participant"
        f" {due.participant_id} at site {due.site_id} was {what} at {when}"
        + (": it has not been acknowledged." if what == "escalated" else ".")
    )
    return subject, line


def email_message(due: Due, sender: str, board_url: str) -> EmailMessage:
    subject, line = describe(due)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = due.address
    msg["Subject"] = subject
    msg["Trialstream-Delivery"] = str(due.delivery_id)
    msg.set_content(
        f"{line}\n\nThe monitor board: {board_url}\n\n"
        f"You receive this because you ({_clean(due.display_name)}, {due.username}) are on call"
        f" for site {due.site_id}. Delivery {due.delivery_id}, event {due.event_id}.\n"
    )
    return msg


def webhook_body(due: Due, board_url: str) -> bytes:
    subject, _ = describe(due)
    return json.dumps(
        {
            "delivery_id": due.delivery_id,
            "event_id": due.event_id,
            "alert_id": due.alert_id,
            "event": due.event,
            "at": due.at.isoformat(),
            "study_id": due.study_id,
            "site_id": due.site_id,
            "participant_id": due.participant_id,
            "rule_id": due.rule_id,
            "rule_name": due.rule_name,
            "severity": due.severity,
            "summary": subject,
            "board_url": board_url,
        },
        separators=(",", ":"),
    ).encode()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Trialstream-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, *, now: float, tolerance_s: int = 300) -> bool:
    """What a receiver checks: the signature matches and is at most ``tolerance_s`` old."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    stamp = fields.get("t", "")
    if not stamp.isdigit() or len(stamp) > 12 or abs(now - int(stamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(stamp), body), header)


Send = Callable[[Due], Awaitable[Outcome]]


class Senders:
    """Sends one claimed delivery on its channel."""

    def __init__(
        self,
        smtp: SmtpConfig | None,
        board_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._smtp = smtp
        self._board_url = board_url
        self._session = session
        self._clock = clock

    async def __call__(self, due: Due) -> Outcome:
        try:
            if due.channel == Channel.EMAIL:
                return await self._email(due)
            return await self._webhook(due)
        except NotConfigured as exc:
            return Outcome(str(exc), permanent=True)
        except (TimeoutError, OSError, aiohttp.ClientError, aiosmtplib.SMTPException) as exc:
            return Outcome(f"{type(exc).__name__}: {_clean(str(exc))}")
        except Exception as exc:  # one delivery's surprise never stops the others
            log.exception("notification send failed delivery=%d", due.delivery_id)
            return Outcome(f"{type(exc).__name__}: {_clean(str(exc))}")

    async def _email(self, due: Due) -> Outcome:
        if self._smtp is None:
            raise NotConfigured("no SMTP server configured (TRIALSTREAM_SMTP_URL)")
        smtp = self._smtp
        try:
            await aiosmtplib.send(
                email_message(due, smtp.sender, self._board_url),
                hostname=smtp.host,
                port=smtp.port,
                username=smtp.username,
                password=smtp.password,
                start_tls=smtp.start_tls,
                use_tls=smtp.use_tls,
                timeout=SEND_TIMEOUT_S,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            return Outcome(f"recipient refused: {codes}", permanent=all(c >= 500 for c in codes))
        return Outcome()

    async def _webhook(self, due: Due) -> Outcome:
        if due.webhook_secret is None:
            return Outcome("the contact no longer has a webhook", permanent=True)
        session = self._session
        if session is None:
            raise NotConfigured("no HTTP client")
        body = webhook_body(due, self._board_url)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(due.webhook_secret, int(self._clock()), body),
            DELIVERY_HEADER: str(due.delivery_id),
        }
        async with session.post(
            due.address,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S),
        ) as resp:
            await resp.read()
            if 200 <= resp.status < 300:
                return Outcome()
            retried = resp.status >= 500 or resp.status in _RETRIED_STATUS
            return Outcome(f"HTTP {resp.status}", permanent=not retried)


async def notify_once(pool: AsyncConnectionPool, send: Send) -> int:
    """Plan new events' deliveries, then send what is due until nothing is; returns how many
    attempts were made."""
    async with pool.connection() as conn:
        while (await notifications.plan(conn)).events == notifications.PLAN_BATCH:
            pass
    attempts = 0
    while True:
        async with pool.connection() as conn:
            due = await notifications.claim(conn, limit=CLAIM_BATCH)
        if not due:
            return attempts
        outcomes = await asyncio.gather(*(send(d) for d in due))
        async with pool.connection() as conn:
            for d, outcome in zip(due, outcomes, strict=True):
                state = await notifications.record(
                    conn, d, error=outcome.error, permanent=outcome.permanent
                )
                if state is not State.SENT:
                    log.warning(
                        "notification not delivered delivery=%d channel=%s state=%s error=%s",
                        d.delivery_id,
                        d.channel,
                        state.value,
                        outcome.error,
                    )
        attempts += len(due)


class Notifier:
    """One worker's notifier, until cancelled."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        database_url: str,
        smtp: SmtpConfig | None,
        board_url: str,
        *,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self._pool = pool
        self._url = database_url
        self._smtp = smtp
        self._board_url = board_url
        self._interval_s = interval_s

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            send = Senders(self._smtp, self._board_url, session=session)
            delay = 0.1
            while True:
                try:
                    async with db.connection(self._url, autocommit=True) as listener:
                        await listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
                        while True:
                            await notify_once(self._pool, send)
                            delay = 0.1
                            async for _ in listener.notifies(
                                timeout=self._interval_s, stop_after=1
                            ):
                                pass
                except CONNECTION_ERRORS as exc:
                    delay = await pause("alert notification", delay, exc)
                except Exception:  # a notifier's fault never stops the worker's ingest
                    log.exception("alert notification failed; trying again")
                    await asyncio.sleep(self._interval_s)
