"""`trialstream site`: a site coordinator's work: studies, sites, participants, enrollment
codes (text and QR), device revocation. Every change is made as an authenticated user
(``--as``, :mod:`gateway.commands.operator`) and audited with who did it."""

from __future__ import annotations

import argparse
import functools
import io
import json
import sys
from datetime import UTC, datetime, timedelta

from gateway.commands import operator
from gateway.commands.common import Subparsers, iso_time, run
from gateway.errors import ConfigError
from gateway.settings import Settings
from storage import audit, db, registry, time_zones


def _actor() -> str:
    return operator.current().actor


def register(sub: Subparsers) -> None:
    site = sub.add_parser(
        "site",
        help="studies, sites, participants, enrollment codes, revocation",
        description="A site coordinator's commands, run as your user account (--as USER, a "
        "site coordinator or an admin, authenticated with its password). Every change is "
        "recorded in the audit trail with that user and your login name.",
    )
    actions = site.add_subparsers(dest="site_command", metavar="ACTION", required=True)

    action = functools.partial(operator.add_action, actions)

    p = action("create-study", "create a study")
    p.add_argument("--study", required=True, help="study id, e.g. CARDIO-01")
    p.add_argument("--name", required=True, help="the study's title")
    p.add_argument(
        "--withdrawal-policy",
        choices=["retain", "delete"],
        default="retain",
        help="what happens to data already held when a participant withdraws "
        "(default: retain, as FDA guidance allows)",
    )
    p.add_argument(
        "--backfill-days",
        type=_backfill_days,
        default=registry.BACKFILL_DAYS_DEFAULT,
        metavar="DAYS",
        help="how old data a hub may still deliver, in days before it arrives; older data is "
        f"refused as implausible_time (default: {registry.BACKFILL_DAYS_DEFAULT}, at most "
        f"{registry.BACKFILL_DAYS_MAX})",
    )
    p.set_defaults(handler=_create_study)

    p = action("add-site", "add a site to a study")
    p.add_argument("--site", required=True, help="site id")
    p.add_argument("--study", required=True, help="study id")
    p.add_argument("--name", required=True, help="the site's name")
    p.set_defaults(handler=_add_site)

    p = action("add-participant", "register a participant at a site")
    p.add_argument("--participant", required=True, help="pseudonymous participant id")
    p.add_argument("--site", required=True, help="site id")
    p.add_argument(
        "--time-zone",
        help="the participant's IANA time zone from now on, e.g. Europe/Berlin (default: "
        "none, which counts as UTC, until set with `site time-zone` or reported by the hub)",
    )
    p.set_defaults(handler=_add_participant)

    p = action(
        "time-zone",
        "set a participant's time zone from a time on (they travel or move)",
    )
    p.add_argument("--participant", required=True, help="participant id")
    p.add_argument("--zone", required=True, help="IANA time zone name, e.g. Europe/Berlin")
    p.add_argument(
        "--from",
        dest="from_time",
        type=iso_time,
        help="from this time on (ISO 8601 with zone; default: now). The first zone set "
        "also covers the times before it.",
    )
    p.set_defaults(handler=_time_zone)

    p = action("enroll-code", "make a single-use enrollment code for a participant's hub")
    p.add_argument("--participant", required=True, help="participant id")
    p.add_argument("--ttl-hours", type=float, default=72.0, help="validity (default: 72 h)")
    p.add_argument(
        "--gateway-url",
        help="gateway URL put in the QR code "
        "(default: $TRIALSTREAM_PUBLIC_URL or http://HTTP_HOST:HTTP_PORT)",
    )
    p.add_argument("--no-qr", action="store_true", help="print the code only")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=_enroll_code)

    p = action(
        "revoke",
        "revoke a hub: its next envelope is rejected (device_revoked), the study CA's CRL "
        "lists its certificate and the broker reloads it and ends the hub's connection",
    )
    p.add_argument("--device", required=True, help="device id")
    p.add_argument("--reason", required=True, help="why (recorded)")
    p.set_defaults(handler=_revoke)


def _backfill_days(text: str) -> int:
    """A whole number of days within the schema's bounds, checked before it goes anywhere."""
    if not text.isdigit() or len(text) > 4 or not 1 <= int(text) <= registry.BACKFILL_DAYS_MAX:
        most = registry.BACKFILL_DAYS_MAX
        raise argparse.ArgumentTypeError(f"a whole number of days from 1 to {most}")
    return int(text)


@operator.authenticated("site create-study")
def _create_study(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> None:
        async with db.connection(settings.require_database_url()) as conn, conn.transaction():
            await registry.create_study(
                conn,
                args.study,
                args.name,
                withdrawal_policy=args.withdrawal_policy,
                backfill_days=args.backfill_days,
            )
            await audit.append(
                conn,
                actor=_actor(),
                action="study.create",
                entity="study",
                entity_id=args.study,
                detail={
                    "name": args.name,
                    "withdrawal_policy": args.withdrawal_policy,
                    "backfill_days": args.backfill_days,
                },
            )

    run(go())
    print(f"study {args.study} created")
    return 0


@operator.authenticated("site add-site")
def _add_site(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> None:
        async with db.connection(settings.require_database_url()) as conn, conn.transaction():
            await registry.create_site(conn, args.site, args.study, args.name)
            await audit.append(
                conn,
                actor=_actor(),
                action="site.create",
                entity="site",
                entity_id=args.site,
                detail={"study_id": args.study, "name": args.name},
            )

    run(go())
    print(f"site {args.site} added to {args.study}")
    return 0


@operator.authenticated("site add-participant")
def _add_participant(args: argparse.Namespace, settings: Settings) -> int:
    operator.current().check_site(args.site)

    async def go() -> str:
        async with db.connection(settings.require_database_url()) as conn, conn.transaction():
            cur = await conn.execute("SELECT study_id FROM sites WHERE site_id = %s", (args.site,))
            row = await cur.fetchone()
            if row is None:
                raise ConfigError(f"no site {args.site!r}: add it with `trialstream site add-site`")
            await registry.create_participant(conn, args.participant, str(row[0]), args.site)
            await audit.append(
                conn,
                actor=_actor(),
                action="participant.create",
                entity="participant",
                entity_id=args.participant,
                detail={"site_id": args.site},
            )
            if args.time_zone is not None:
                await time_zones.set_time_zone(
                    conn, args.participant, args.time_zone, datetime.now(UTC), actor=_actor()
                )
            return str(row[0])

    study = run(go())
    zone = f", time zone {args.time_zone}" if args.time_zone else ""
    print(f"participant {args.participant} registered at {args.site} ({study}){zone}")
    return 0


@operator.authenticated("site time-zone")
def _time_zone(args: argparse.Namespace, settings: Settings) -> int:
    from storage import views

    valid_from = args.from_time or datetime.now(UTC)

    async def go() -> None:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            home = await views.participant_home(conn, args.participant)
            if home is None:
                raise ConfigError(f"no participant {args.participant!r}")
            operator.current().check_site(home[1])
            await time_zones.set_time_zone(
                conn, args.participant, args.zone, valid_from, actor=_actor()
            )

    run(go())
    print(f"participant {args.participant}: {args.zone} from {valid_from.isoformat()}")
    return 0


@operator.authenticated("site enroll-code")
def _enroll_code(args: argparse.Namespace, settings: Settings) -> int:
    from gateway import enrollment
    from gateway.pki import StudyCA
    from storage import views

    if args.ttl_hours <= 0:
        raise ConfigError("--ttl-hours must be positive")

    async def go() -> enrollment.IssuedCode:
        async with db.connection(settings.require_database_url(), autocommit=True) as conn:
            home = await views.participant_home(conn, args.participant)
            if home is not None:
                operator.current().check_site(home[1])
            return await enrollment.issue_code(
                conn, args.participant, created_by=_actor(), ttl=timedelta(hours=args.ttl_hours)
            )

    try:
        issued = run(go())
    except enrollment.EnrollmentError as exc:
        raise ConfigError(str(exc)) from exc
    gateway_url = args.gateway_url or settings.gateway_url
    uri = enrollment.enrollment_uri(
        gateway_url, issued.code, StudyCA.load_or_create(settings.ca_path)
    )
    if args.json:
        print(
            json.dumps(
                {
                    "code": issued.code,
                    "participant_id": issued.participant_id,
                    "study_id": issued.study_id,
                    "expires_at": issued.expires_at.isoformat(),
                    "gateway_url": gateway_url,
                    "uri": uri,
                }
            )
        )
        return 0
    print(f"enrollment code for {issued.participant_id} ({issued.study_id}): {issued.code}")
    print(f"valid until {issued.expires_at:%Y-%m-%d %H:%M} UTC, once. On the hub:")
    print(f"  trialstream hub enroll '{uri}'")
    if not args.no_qr:
        import qrcode

        qr = qrcode.QRCode(border=1)
        qr.add_data(uri)
        buffer = io.StringIO()
        qr.print_ascii(out=buffer, invert=True)
        sys.stdout.write(buffer.getvalue())
    return 0


@operator.authenticated("site revoke")
def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    from gateway import enrollment, revocation

    async def site_of_device() -> str | None:
        async with db.connection(settings.require_database_url()) as conn:
            return await registry.device_site(conn, args.device)

    site = run(site_of_device())
    if site is None:
        raise ConfigError(f"no device {args.device!r}")
    operator.current().check_site(site)
    try:
        outcome = run(
            revocation.revoke_hub(settings, args.device, actor=_actor(), reason=args.reason)
        )
    except enrollment.EnrollmentError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"device {args.device} revoked: its next envelope is rejected (device_revoked)")
    if outcome.crl_loaded_after_s is not None and outcome.certificate_listed:
        print(
            f"broker reloaded ({outcome.reload}): it refuses the hub's certificate "
            f"(after {outcome.crl_loaded_after_s:.1f} s)"
        )
    if outcome.identity_removed:
        print(
            "its RabbitMQ identity was removed: it cannot log in again, and "
            f"{outcome.connections_closed} open connection(s) of it were closed"
        )
    elif outcome.session_ended:
        print("the hub's open connection to the broker, if any, was ended")
    for problem in outcome.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if outcome.crl_loaded_after_s is None and outcome.reload != "rabbitmq":
        print(
            "warning: the CRL is published; the broker refuses the hub only once it reloads "
            "(systemctl reload mosquitto, or SIGHUP), and `trialstream broker publish-crl` "
            "does that with a check",
            file=sys.stderr,
        )
    return 1 if outcome.problems else 0
