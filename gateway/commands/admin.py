"""`trialstream admin`: accounts of the people who use the pages and the API.

Account changes are made by an admin, authenticated (``--as``, :mod:`gateway.commands.operator`)
and audited. The first admin account is created without ``--as`` while no admin exists.

A new account's password is read from standard input (``--new-password-stdin``: the line after
the operator's own password when ``--password-stdin`` is given too) or asked for twice without
echo; it is never a command-line argument, where other users of the machine could read it.
"""

from __future__ import annotations

import argparse
import getpass

from gateway.commands import operator
from gateway.commands.common import Subparsers, add_database_flags, run
from gateway.errors import ConfigError
from gateway.settings import Settings
from storage import db, sessions, users


def register(sub: Subparsers) -> None:
    admin = sub.add_parser(
        "admin",
        help="user accounts: create, disable, list",
        description="Accounts of the people who use trialstream. Changes are audited.",
    )
    actions = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "create-user",
        help="create an account",
        description="Create an account with a role; staff belong to sites (--site, repeatable), "
        "a participant account names its participant. Run as an admin (--as); without --as "
        "only the first admin account, while no admin account exists.",
    )
    add_database_flags(p)
    operator.add_operator_flags(p, bootstrap=True)
    p.add_argument("--username", required=True, help="sign-in name")
    p.add_argument("--display-name", help="name shown on pages (default: the user name)")
    p.add_argument("--role", required=True, choices=[r.value for r in users.Role])
    p.add_argument("--site", action="append", default=[], help="a site the user works for")
    p.add_argument("--participant", help="the participant (role participant only)")
    p.add_argument(
        "--new-password-stdin",
        action="store_true",
        help="read the new account's password from standard input (after yours, with "
        "--password-stdin)",
    )
    p.set_defaults(handler=_create_user)

    p = actions.add_parser("disable-user", help="disable an account (it stays for attribution)")
    add_database_flags(p)
    operator.add_operator_flags(p)
    p.add_argument("--username", required=True)
    p.add_argument("--reason", required=True, help="why (recorded)")
    p.set_defaults(handler=_disable_user)

    p = actions.add_parser("list-users", help="list accounts")
    add_database_flags(p)
    p.set_defaults(handler=_list_users)


def _password(args: argparse.Namespace) -> str:
    if args.new_password_stdin:
        password = operator.read_line("the new account")
    else:
        password = getpass.getpass("new account's password: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the two passwords differ")
    if len(password) < users.MIN_PASSWORD_LENGTH:
        raise ConfigError(f"the password needs at least {users.MIN_PASSWORD_LENGTH} characters")
    return password


@operator.authenticated("admin create-user", bootstrap=True)
def _create_user(args: argparse.Namespace, settings: Settings) -> int:
    op = operator.current()
    role = users.Role(args.role)
    if op.user is None and role is not users.Role.ADMIN:
        raise operator.Refused("without --as only the first admin account can be created", "NoUser")
    if role is users.Role.PARTICIPANT and not args.participant:
        raise ConfigError("a participant account needs --participant")
    if role is not users.Role.PARTICIPANT and args.participant:
        raise ConfigError("--participant is for participant accounts only")
    if role in (users.Role.PARTICIPANT, users.Role.ADMIN) and args.site:
        raise ConfigError(f"a {role.value} account belongs to no site: drop --site")
    password = _password(args)

    async def go() -> users.User:
        async with db.connection(settings.require_database_url()) as conn:
            if op.user is None:
                return await users.create_first_admin(
                    conn,
                    actor=op.actor,
                    username=args.username,
                    display_name=args.display_name or args.username,
                    password=password,
                )
            return await users.create_user(
                conn,
                actor=op.actor,
                username=args.username,
                display_name=args.display_name or args.username,
                role=role,
                password=password,
                participant_id=args.participant,
                sites=args.site,
            )

    user = run(go())
    where = f" at {', '.join(sorted(user.sites))}" if user.sites else ""
    first = " (the first admin)" if op.user is None else ""
    print(f"user {user.username} created: {user.role.value}{where}{first}")
    return 0


@operator.authenticated("admin disable-user")
def _disable_user(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> None:
        async with db.connection(settings.require_database_url()) as conn:
            await users.disable_user(
                conn, actor=operator.current().actor, username=args.username, reason=args.reason
            )
            user = await users.get_user(conn, args.username)
            if user is not None:
                async with conn.transaction():
                    await sessions.end_user_sessions(conn, user.user_id, reason="user_disabled")

    run(go())
    print(f"user {args.username} disabled; their sessions ended")
    return 0


def _list_users(args: argparse.Namespace, settings: Settings) -> int:
    from storage import views

    async def go() -> list[views.UserRow]:
        async with db.connection(settings.require_database_url()) as conn:
            return await views.user_list(conn)

    for u in run(go()):
        flags = [f for f, on in (("locked", u.locked), ("disabled", u.disabled)) if on]
        scope = u.participant_id or ",".join(u.sites) or "-"
        print(f"{u.username}\t{u.role}\t{scope}\t{' '.join(flags) or 'active'}")
    return 0
