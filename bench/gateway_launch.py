"""``python -m bench.gateway_launch BURST PER_MINUTE gateway --workers N``: the gateway as
``trialstream gateway --workers N`` runs it (the same command line, settings, supervisor and
workers), except that each worker sets its sign-in limits, per client address and per
account, to ``BURST`` at once refilled at ``PER_MINUTE`` a minute: on ``app[RATE_LIMITER]``
right after it creates its application, as ``gateway.demo`` raises the enrollment limit.

``bench login-flood`` runs its "unlimited" flood against it: the worst case, a flood from
so many addresses and accounts that no limit holds it back.

The supervisor spawns its workers (``gateway.serve.run``); here it spawns
``_worker_main`` of this module instead, which wraps ``gateway.app.create_app`` in its own
process, then runs the gateway's worker.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from gateway import cli, serve
from gateway.settings import Settings
from gateway.web.ratelimit import RATE_LIMITER, Limit


def raise_login_limits(app: web.Application, limit: Limit) -> None:
    limiter = app[RATE_LIMITER]
    limiter.login_per_address.limit = limit
    limiter.login_per_account.limit = limit


def _worker_main(
    limit: Limit,
    settings: Settings,
    worker: int,
    restarts: int = 0,
    last_exit_code: int | None = None,
) -> None:
    from gateway import app as gateway_app

    create_app = gateway_app.create_app

    def create_with_limit(*args: Any, **kwargs: Any) -> web.Application:
        app = create_app(*args, **kwargs)
        raise_login_limits(app, limit)
        return app

    # gateway.serve.serve_worker imports create_app from gateway.app when it runs.
    gateway_app.create_app = create_with_limit
    serve._worker_main(settings, worker, restarts, last_exit_code)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m bench.gateway_launch BURST PER_MINUTE ARGS...", file=sys.stderr)
        return 2
    limit = Limit(burst=int(argv[0]), per_minute=float(argv[1]))
    # The supervisor starts each worker with gateway.serve._worker_main as its target.
    serve._worker_main = functools.partial(_worker_main, limit)
    return cli.main(argv[2:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
