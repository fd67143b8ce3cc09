"""`trialstream consent`: consent documents, signatures, withdrawals, re-consents, history.

Every action is run as an authenticated user (``--as``, :mod:`gateway.commands.operator`):
their role and sites decide what they may do, exactly as for the HTTP API, which calls the
same functions. A withdrawal is signed with the same password that authenticated them.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import date
from pathlib import Path

from gateway.commands import operator
from gateway.commands.common import Subparsers, add_database_flags, iso_time, run
from gateway.errors import ConfigError
from gateway.settings import Settings

EXIT_REFUSED = 2


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from exc


def _scopes(text: str) -> frozenset[str]:
    return frozenset(s.strip() for s in text.split(",") if s.strip())


def _common(p: argparse.ArgumentParser) -> None:
    add_database_flags(p)
    operator.add_operator_flags(p)


def register(sub: Subparsers) -> None:
    co = sub.add_parser(
        "consent",
        help="consent documents, signatures, withdrawals",
        description="Manage e-consent: document versions, participants' signatures "
        "(re-authenticated with their own credential), withdrawals, pending re-consents "
        "and a participant's consent history. Every action is audited.",
    )
    co_sub = co.add_subparsers(dest="consent_command", metavar="ACTION", required=True)

    doc = co_sub.add_parser(
        "document",
        help="add a version (or a language of one) of a consent document",
        description="Add a consent document version: its text, or a PDF kept at --uri "
        "(hashed here), the scopes it covers and which of them a participant may decline.",
    )
    _common(doc)
    doc.add_argument("--study", required=True)
    doc.add_argument("--title", required=True)
    doc.add_argument("--version", required=True)
    doc.add_argument("--language", default="en")
    content = doc.add_mutually_exclusive_group(required=True)
    content.add_argument("--text-file", type=Path, help="the document's text (UTF-8)")
    content.add_argument("--pdf", type=Path, help="the document as a PDF (needs --uri)")
    doc.add_argument("--uri", help="where the PDF is kept")
    doc.add_argument("--scopes", type=_scopes, required=True, help="comma-separated scopes")
    doc.add_argument("--optional-scopes", type=_scopes, default=frozenset())
    doc.add_argument("--effective-at", type=iso_time, required=True, help="ISO 8601 with zone")
    doc.add_argument("--approved-on", type=_day, help="ethics approval date")
    doc.add_argument("--reconsent-by", type=iso_time, help="earlier versions must re-consent by")
    doc.set_defaults(handler=_cmd_document)

    sign = co_sub.add_parser(
        "sign",
        help="record a participant's e-signature",
        description="Sign a document version for a participant. The participant "
        "re-authenticates with their own account (--username): when they run the command "
        "themself (--as is --username) their password does both; else it is prompted, or "
        "read as the next line of stdin with --signer-password-stdin.",
    )
    _common(sign)
    sign.add_argument("--participant", required=True)
    sign.add_argument("--document-id", type=int, required=True)
    sign.add_argument("--scopes", type=_scopes, required=True, help="scopes granted")
    sign.add_argument("--name", required=True, help="the signer's printed name")
    sign.add_argument("--username", required=True, help="the participant's user name")
    sign.add_argument(
        "--signer-password-stdin",
        action="store_true",
        help="read the participant's password from stdin (after yours, with --password-stdin)",
    )
    sign.add_argument("--witness", help="witness or verifier, where the study requires one")
    sign.set_defaults(handler=_cmd_sign)

    wd = co_sub.add_parser(
        "withdraw",
        help="withdraw consent (all, or some scopes)",
        description="End consent now, for all scopes or only --scopes, as an e-signed act: "
        "the password that authenticates you (--as) signs it. Data already held "
        "follows the study's policy (retain, or delete with a recorded deletion).",
    )
    _common(wd)
    wd.add_argument("--participant", required=True)
    wd.add_argument("--scopes", type=_scopes, help="withdraw only these scopes")
    wd.add_argument("--initiated-by", choices=["participant", "site"], required=True)
    wd.add_argument("--reason", help="why (required when staff record the withdrawal)")
    wd.add_argument(
        "--received-via",
        choices=["in_person", "phone", "video_visit", "letter", "email"],
        help="how the participant's request reached the staff recording it",
    )
    wd.set_defaults(handler=_cmd_withdraw)

    pend = co_sub.add_parser(
        "pending",
        help="participants who must re-consent",
        description="Participants of your sites whose consent is on a version that must be "
        "re-consented, with the deadline.",
    )
    _common(pend)
    pend.add_argument("--study")
    pend.set_defaults(handler=_cmd_pending)

    hist = co_sub.add_parser(
        "history",
        help="a participant's consent history",
        description="Every consent row of a participant, with the span it governed.",
    )
    _common(hist)
    hist.add_argument("--participant", required=True)
    hist.set_defaults(handler=_cmd_history)


def _refused(exc: Exception) -> int:
    print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_REFUSED


def _run(settings: Settings, args: argparse.Namespace, action: object) -> int:
    """Connect, run ``action(conn, actor)`` as the operator; typed refusals become one line."""
    from consent.errors import ConsentError
    from consent.records import Actor
    from storage import db

    url = settings.require_database_url()
    actor = Actor.of(operator.current().require())

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            try:
                return int(await action(conn, actor))  # type: ignore[operator]
            except ConsentError as exc:
                return _refused(exc)

    return int(run(go()))


@operator.authenticated("consent document")
def _cmd_document(args: argparse.Namespace, settings: Settings) -> int:
    from consent import records

    text = args.text_file.read_text(encoding="utf-8") if args.text_file else None
    pdf = args.pdf.read_bytes() if args.pdf else None

    async def action(conn: object, actor: records.Actor) -> int:
        doc = await records.create_version(
            conn,  # type: ignore[arg-type]
            actor,
            study_id=args.study,
            title=args.title,
            version=args.version,
            language=args.language,
            text=text,
            pdf=pdf,
            uri=args.uri,
            scopes=args.scopes,
            optional_scopes=args.optional_scopes,
            effective_at=args.effective_at,
            approved_on=args.approved_on,
            reconsent_by=args.reconsent_by,
        )
        print(
            f"document {doc.document_id}: {doc.title} {doc.version} ({doc.language}) "
            f"sha256 {doc.content_sha256.hex()}"
        )
        return 0

    return _run(settings, args, action)


def _signer_password(args: argparse.Namespace) -> str:
    """The participant's password that signs: the operator's own when they sign for
    themself, else the next line of stdin (--signer-password-stdin) or a prompt."""
    op = operator.current()
    if op.actor == args.username:
        return op.password
    if args.signer_password_stdin:
        return operator.read_line(args.username)
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass(f"password for {args.username}: ")
    raise ConfigError(f"no password for the signer {args.username}: use --signer-password-stdin")


@operator.authenticated("consent sign")
def _cmd_sign(args: argparse.Namespace, settings: Settings) -> int:
    from consent import records

    password = _signer_password(args)

    async def action(conn: object, actor: records.Actor) -> int:
        rec = await records.sign(
            conn,  # type: ignore[arg-type]
            actor,
            participant_id=args.participant,
            document_id=args.document_id,
            scopes=args.scopes,
            printed_name=args.name,
            username=args.username,
            password=password,
            witness=args.witness,
        )
        print(
            f"consent {rec.consent_id}: {rec.participant_id} signed version {rec.version} "
            f"at {rec.signed_at.isoformat()} for {', '.join(sorted(rec.scopes))}"
        )
        return 0

    return _run(settings, args, action)


@operator.authenticated("consent withdraw")
def _cmd_withdraw(args: argparse.Namespace, settings: Settings) -> int:
    from consent import records

    password = operator.current().password
    received = records.ReceivedVia(args.received_via) if args.received_via else None

    async def action(conn: object, actor: records.Actor) -> int:
        w = await records.withdraw(
            conn,  # type: ignore[arg-type]
            actor,
            participant_id=args.participant,
            initiated_by=records.Initiator(args.initiated_by),
            signature=records.WithdrawalSignature(actor.user, password, received),
            scopes=args.scopes,
            reason=args.reason,
        )
        kind = "all consent" if w.full else ", ".join(sorted(w.scopes))
        deleted = f", {w.readings_deleted} readings deleted" if w.data_policy == "delete" else ""
        print(
            f"withdrawn {w.participant_id}: {kind} from {w.effective_at.isoformat()} "
            f"(data policy {w.data_policy}{deleted})"
        )
        return 0

    return _run(settings, args, action)


@operator.authenticated("consent pending")
def _cmd_pending(args: argparse.Namespace, settings: Settings) -> int:
    from consent import records

    async def action(conn: object, actor: records.Actor) -> int:
        pending = await records.pending_reconsents(
            conn,  # type: ignore[arg-type]
            actor,
            study_id=args.study,
        )
        for p in pending:
            state = "OVERDUE" if p.overdue else "due"
            print(
                f"{p.participant_id}  {p.site_id}  on {p.current_version}, needs "
                f"{p.required_version}  {state} {p.reconsent_by.isoformat()}"
            )
        if not pending:
            print("no re-consents pending")
        return 0

    return _run(settings, args, action)


@operator.authenticated("consent history")
def _cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    from consent import records

    async def action(conn: object, actor: records.Actor) -> int:
        rows = await records.history(conn, actor, args.participant)  # type: ignore[arg-type]
        for r in rows:
            until = r.valid_to.isoformat() if r.valid_to else "now"
            who = f"signed by {r.signer_name!r}" if r.action == "consent" else r.initiated_by
            print(
                f"#{r.consent_id}  {r.action:<14} v{r.version}  "
                f"{', '.join(sorted(r.scopes))}  {r.valid_from.isoformat()} -> {until}  "
                f"{who}  recorded by {r.recorded_by}"
            )
        if not rows:
            print(f"no consent records for {args.participant}")
        return 0

    return _run(settings, args, action)
