"""Who runs an audited command: ``--as USER``, authenticated with that account's password.

Every command that changes records, or acts with a user's rights, names a ``users`` account
with ``--as`` and proves it with the account's password (21 CFR 11.10(d), 11.10(e), 11.200):

1. ``--password-stdin``: one line read from standard input (``echo ... | trialstream ...``);
2. else ``$TRIALSTREAM_OPERATOR_PASSWORD_FILE``: the first line of a file that belongs to the
   invoking operating-system user and that no one else may read or write (mode 0600 or 0400);
   any other file is refused, unread;
3. else, when standard input is a terminal, a prompt without echo.

The password is checked by ``storage.users.verify_password`` (argon2 off the event loop; a
wrong password counts toward the account's lockout). The account's role must be one of the
roles :data:`ROLES` lists for the command: the roles the web API asks for the same act.

A refusal (no ``--as``, no password, a wrong one, an unknown, locked or disabled account, a
role or site the account lacks) is one ``error:`` line, exit status 2, and an audit record
``cli.refused`` naming the command, the claimed user and the operating-system user.

While an authenticated command runs, every audit record it appends (directly, or through
``consent.records``, ``storage.alerts``, ``storage.users``, the exports, enrollment and
revocation) carries ``via: "cli"``, ``os_user`` and ``host`` in its detail, and its actor is
the authenticated user (:func:`stamped`).

The first admin account is the one exception to ``--as``: ``admin create-user --role admin``
without ``--as`` succeeds while the ``users`` table holds no admin (disabled ones count),
recorded with actor ``cli:<os user>`` and ``bootstrap: true``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import io
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

from gateway.commands.common import Handler, Subparsers, add_database_flags, run
from gateway.errors import GatewayError
from gateway.settings import Settings
from storage import audit, db, users
from storage.users import Role

PASSWORD_FILE_ENV = "TRIALSTREAM_OPERATOR_PASSWORD_FILE"  # noqa: S105 (a variable name)
EXIT_REFUSED = 2
# A longer line is not a password anyone typed; reading stops there.
MAX_PASSWORD_CHARS = 1024

EVERYONE = frozenset(Role)
STAFF_AND_ADMIN = frozenset(
    {Role.SITE_COORDINATOR, Role.CLINICIAN, Role.MONITOR, Role.ADMIN},
)
CLINICAL = frozenset({Role.CLINICIAN, Role.MONITOR, Role.ADMIN})
COORDINATION = frozenset({Role.SITE_COORDINATOR, Role.ADMIN})
ADMIN_ONLY = frozenset({Role.ADMIN})

# The roles each audited command requires: those the web API requires for the same act
# (gateway.web.api ENDPOINTS; tests/test_cli_operator.py keeps them equal), and for acts
# with no API route, those of the nearest one.
ROLES: Mapping[str, frozenset[Role]] = {
    "site create-study": COORDINATION,
    "site add-site": COORDINATION,
    "site add-participant": COORDINATION,  # POST /sites/{site_id}/participants
    "site enroll-code": COORDINATION,  # POST /participants/{p}/enrollment-codes
    "site revoke": COORDINATION,
    "site time-zone": COORDINATION,
    "adherence schedule": ADMIN_ONLY,  # the protocol's design, as consent documents are
    "adherence schedules": STAFF_AND_ADMIN,
    "adherence arm": COORDINATION,
    "adherence show": STAFF_AND_ADMIN,  # GET /participants/{p}/adherence
    "admin create-user": ADMIN_ONLY,  # POST /users
    "admin disable-user": ADMIN_ONLY,
    "alerts rules add": CLINICAL,
    "alerts escalation": CLINICAL,
    "alerts doubtful": CLINICAL,
    "audit originals-retention": ADMIN_ONLY,
    "notify contact": STAFF_AND_ADMIN,  # admins for anyone, others for themselves
    "notify on-call add": COORDINATION,  # a site's operations, as enrolment is
    "notify on-call remove": COORDINATION,
    "alerts ack": CLINICAL,  # POST /alerts/{id}/acknowledge
    "alerts resolve": CLINICAL,  # POST /alerts/{id}/resolve
    "consent document": ADMIN_ONLY,  # consent.records.create_version: admins only
    "consent sign": COORDINATION | {Role.PARTICIPANT},  # POST /participants/{p}/consents
    "consent withdraw": COORDINATION | {Role.PARTICIPANT},  # POST /participants/{p}/withdrawals
    "consent pending": STAFF_AND_ADMIN,
    "consent history": EVERYONE,
    "export parquet": CLINICAL,  # POST /exports
    "export fhir": CLINICAL,
    "export sdtm": CLINICAL,
    "export adherence": CLINICAL,
    "review sign": frozenset({Role.CLINICIAN, Role.MONITOR}),  # POST /participants/{p}/reviews
    "review list": STAFF_AND_ADMIN,  # GET /participants/{p}/reviews
    "review lock": ADMIN_ONLY,  # POST /studies/{study}/locks
    "review unlock": ADMIN_ONLY,  # POST /locks/{lock_id}/unlock
    "review locks": STAFF_AND_ADMIN,  # GET /studies/{study}/locks
    "review late-data": ADMIN_ONLY,  # PUT /studies/{study}/late-data-policy
    "queries list": STAFF_AND_ADMIN,  # GET /participants/{p}/queries, /sites/{site}/queries
    "queries show": STAFF_AND_ADMIN,  # GET /queries/{id}
    "queries open": frozenset({Role.MONITOR, Role.ADMIN}),  # POST /participants/{p}/queries
    "queries answer": COORDINATION | {Role.CLINICIAN},  # POST /queries/{id}/answer
    "queries close": frozenset({Role.MONITOR, Role.ADMIN}),  # POST /queries/{id}/close
    "queries reopen": frozenset({Role.MONITOR, Role.ADMIN}),  # POST /queries/{id}/reopen
}


# The authenticated commands that read participants' data: each leaves a ``data.read`` audit
# record (as the API's reads do, gateway/web/trail.py) before it shows what it found, and a
# read whose record cannot be written is not shown.
READS: frozenset[str] = frozenset(
    {
        "adherence schedules",
        "adherence show",
        "consent pending",
        "consent history",
        "review list",
        "review locks",
        "queries list",
        "queries show",
    }
)
READ_ACTION = "data.read"
# Arguments that say nothing about what was read.
_NOT_ASKED = frozenset(
    {"handler", "database_url", "as_user", "password_stdin", "log_level", "mode"}
)


class Refused(GatewayError):
    """The command may not run as asked; ``error`` is a short kind, recorded in the audit."""

    def __init__(self, message: str, error: str) -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True, slots=True)
class Operator:
    """The person running a command: an authenticated account (None only while the first
    admin is created), the operating-system user and the host."""

    user: users.User | None
    os_user: str
    host: str
    # The password that authenticated ``user``: the same person signs with it (a withdrawal).
    password: str = field(default="", repr=False)

    @property
    def actor(self) -> str:
        """The audit actor: the account, or ``cli:<os user>`` for the first admin."""
        return self.user.username if self.user is not None else f"cli:{self.os_user}"

    def stamp(self) -> dict[str, object]:
        """What every audit record of the command carries in its detail."""
        detail: dict[str, object] = {
            "via": "cli",
            "os_user": self.os_user,
            # The login name comes from the environment; the numeric id from the kernel.
            "os_uid": os.getuid(),
            "host": self.host,
        }
        if self.user is None:
            detail["bootstrap"] = True
        return detail

    def require(self) -> users.User:
        if self.user is None:
            raise RuntimeError("this command needs an authenticated operator")
        return self.user

    def check_site(self, site_id: str) -> None:
        """Staff act for the sites they belong to; an admin for every site."""
        user = self.require()
        if user.role is not Role.ADMIN and site_id not in user.sites:
            raise Refused(f"{user.username} does not work for site {site_id!r}", "NotPermitted")


_CURRENT: ContextVar[Operator | None] = ContextVar("trialstream_cli_operator", default=None)


def current() -> Operator:
    """The operator of the running command (set by :func:`authenticated`)."""
    op = _CURRENT.get()
    if op is None:
        raise RuntimeError("no authenticated operator: wrap the handler with authenticated()")
    return op


def os_identity() -> tuple[str, str]:
    """``(operating-system user, host name)`` of this process."""
    try:
        os_user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (a bare container)
        os_user = f"uid:{os.getuid()}"
    return os_user, socket.gethostname()


def add_operator_flags(p: argparse.ArgumentParser, *, bootstrap: bool = False) -> None:
    """``--as USER`` and ``--password-stdin``; ``--by`` and ``--actor`` remain as hidden
    aliases of ``--as``."""
    first = " (optional only for the first admin account)" if bootstrap else ""
    p.add_argument(
        "--as",
        dest="as_user",
        metavar="USER",
        help="your user account; its password is asked for, read from stdin with "
        f"--password-stdin, or from ${PASSWORD_FILE_ENV}{first}",
    )
    p.add_argument("--by", "--actor", dest="as_user", help=argparse.SUPPRESS)
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read your password as the first line of standard input",
    )


# --- the password --------------------------------------------------------------------------


def read_line(prompt_for: str) -> str:
    """One line of standard input without its line end; refused when there is none."""
    line = sys.stdin.readline(MAX_PASSWORD_CHARS + 1)
    if not line:
        raise Refused(f"no password on standard input for {prompt_for}", "NoPassword")
    return line.rstrip("\r\n")


def read_password_file(path: str) -> str:
    """The first line of ``path``, if the invoking user owns it and only they may read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise Refused(
            f"cannot open {PASSWORD_FILE_ENV} {path!r}: {exc.strerror}", "PasswordFile"
        ) from exc
    with os.fdopen(fd, encoding="utf-8") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{PASSWORD_FILE_ENV} {path!r} is not a regular file", "PasswordFile")
        if st.st_uid != os.geteuid():
            raise Refused(
                f"{PASSWORD_FILE_ENV} {path!r} belongs to another user (uid {st.st_uid})",
                "PasswordFile",
            )
        if st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise Refused(
                f"{PASSWORD_FILE_ENV} {path!r} has mode {mode:04o}: others may read or change "
                f"it; chmod 600 {path}",
                "PasswordFile",
            )
        return f.readline(MAX_PASSWORD_CHARS + 1).rstrip("\r\n")


def read_password(args: argparse.Namespace, username: str) -> str:
    """The operator's password: --password-stdin, else the password file, else a prompt."""
    if getattr(args, "password_stdin", False):
        return read_line(username)
    path = os.environ.get(PASSWORD_FILE_ENV)
    if path:
        return read_password_file(path)
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass(f"password for {username}: ")
    raise Refused(
        f"no password for {username}: standard input is not a terminal; use "
        f"--password-stdin or {PASSWORD_FILE_ENV}",
        "NoPassword",
    )


# --- authentication, refusal, the audit stamp ------------------------------------------------


async def _verify(url: str, username: str, password: str) -> users.User:
    async with db.connection(url, autocommit=True) as conn:
        return await users.verify_password(conn, username, password)


async def _has_admin(url: str) -> bool:
    async with db.connection(url, autocommit=True) as conn:
        return await users.has_admin(conn)


def _asked(args: argparse.Namespace) -> dict[str, object]:
    """What a read asked for: its arguments, as text, numbers and flags."""
    out: dict[str, object] = {}
    for key, value in sorted(vars(args).items()):
        if key in _NOT_ASKED or key.endswith("_command") or key == "command" or value is None:
            continue
        if isinstance(value, bool | int | float | str):
            out[key] = value
        elif isinstance(value, list | tuple):
            out[key] = [str(v) for v in value]
        else:
            out[key] = str(value)
    return out


def _answer_read(
    url: str, op: Operator, command: str, args: argparse.Namespace, answer: Callable[[], int]
) -> int:
    """Run a read, and show what it found only once its ``data.read`` record is written."""
    found = io.StringIO()
    with contextlib.redirect_stdout(found):
        code = answer()
    if code == 0:
        run(_record_read(url, op, command, args))
    sys.stdout.write(found.getvalue())
    return code


async def _record_read(url: str, op: Operator, command: str, args: argparse.Namespace) -> None:
    participant = getattr(args, "participant", None)
    entity, entity_id = ("participant", participant) if participant else ("data", command)
    async with db.connection(url, autocommit=True) as conn:
        await audit.append(
            conn,
            actor=op.actor,
            action=READ_ACTION,
            entity=entity,
            entity_id=str(entity_id),
            detail={"operation": command, "query": _asked(args)},
        )


async def _record_refusal(
    url: str, command: str, claimed: str | None, exc: Refused, os_user: str, host: str
) -> None:
    clean = (claimed or "").replace("\x00", "")
    async with db.connection(url, autocommit=True) as conn, conn.transaction():
        await audit.append(
            conn,
            actor=clean or f"cli:{os_user}",
            action="cli.refused",
            entity="cli",
            entity_id=command,
            detail={
                "command": command,
                "user": clean or None,
                "error": exc.error,
                "via": "cli",
                "os_user": os_user,
                "host": host,
            },
            reason=str(exc),
        )


def _refuse(
    url: str, command: str, claimed: str | None, exc: Refused, os_user: str, host: str
) -> int:
    run(_record_refusal(url, command, claimed, exc, os_user, host))
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_REFUSED


@contextlib.contextmanager
def stamped(op: Operator) -> Iterator[Operator]:
    """Run as ``op``: :func:`current` returns it and audit records carry its stamp."""
    token = _CURRENT.set(op)
    try:
        with audit.origin(op.stamp()):
            yield op
    finally:
        _CURRENT.reset(token)


def add_action(actions: Subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    """An action of a command group run as a user account: its parser, with the database
    and operator flags, described by ``help_text`` as a sentence."""
    p = actions.add_parser(
        name, help=help_text, description=help_text[0].upper() + help_text[1:] + "."
    )
    add_database_flags(p)
    add_operator_flags(p)
    return p


def authenticated(command: str, *, bootstrap: bool = False) -> Callable[[Handler], Handler]:
    """Wrap a command's handler: authenticate ``--as``, check the role of ``command`` in
    :data:`ROLES`, then run the handler as that operator. A :class:`Refused` raised by the
    handler (a site the operator lacks) is refused the same way."""
    roles = ROLES[command]

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run_as(args: argparse.Namespace, settings: Settings) -> int:
            url = settings.require_database_url()
            os_user, host = os_identity()
            claimed: str | None = args.as_user
            try:
                op = _authenticate(args, url, claimed, roles, command, bootstrap, os_user, host)
                with stamped(op):
                    if command in READS:
                        return _answer_read(url, op, command, args, lambda: handler(args, settings))
                    return handler(args, settings)
            except Refused as exc:
                return _refuse(url, command, claimed, exc, os_user, host)

        return run_as

    return decorate


def _authenticate(
    args: argparse.Namespace,
    url: str,
    claimed: str | None,
    roles: frozenset[Role],
    command: str,
    bootstrap: bool,
    os_user: str,
    host: str,
) -> Operator:
    if not claimed:
        if bootstrap and not run(_has_admin(url)):
            return Operator(None, os_user, host)
        first = "" if not bootstrap else " (an admin account exists)"
        raise Refused(f"`{command}` needs --as USER: your user account{first}", "NoUser")
    password = read_password(args, claimed)
    try:
        user = run(_verify(url, claimed, password))
    except users.UserError as exc:
        raise Refused(f"authentication failed for {claimed!r}: {exc}", type(exc).__name__) from exc
    if user.role not in roles:
        allowed = ", ".join(sorted(r.value for r in roles))
        raise Refused(
            f"{user.username} ({user.role.value}) may not run `{command}`: it needs {allowed}",
            "NotPermitted",
        )
    return Operator(user, os_user, host, password)


__all__ = [
    "EXIT_REFUSED",
    "PASSWORD_FILE_ENV",
    "ROLES",
    "Operator",
    "Refused",
    "add_operator_flags",
    "authenticated",
    "current",
    "os_identity",
    "read_line",
    "read_password",
    "read_password_file",
    "stamped",
]
