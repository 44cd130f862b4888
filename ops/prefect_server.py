"""The Prefect server of the embedded stack: `prefect server start`, with SQLite transactions that take
the database's write lock when they begin.

Prefect's server begins its SQLite transactions DEFERRED: a transaction starts as a reader and becomes a
writer at its first write. In WAL mode that upgrade fails at once, without waiting out the busy timeout,
when another connection has written since the transaction's first read; the API answers `503` and
Prefect's clients wait 2, 4, then 8 seconds before they try again (PrefectHQ/prefect#18934). The job runs
of a session write concurrently, so they spent most of a session in those waits and ran one at a time.
Begun IMMEDIATE, a transaction takes the write lock first, waiting for it as long as the busy timeout
allows, so concurrent writers queue for milliseconds instead of failing. Prefect itself begins
IMMEDIATE the transactions it marks `with_for_update`; here every transaction is begun so. The BEGIN is sent
at once, on the transaction's own connection; a session opened inside the transaction (Prefect reads in one to
build an event while a work queue's update holds the lock) begins DEFERRED, as shipped: begun IMMEDIATE it
would wait for the lock its caller holds. Only the SQLite configuration changes: on PostgreSQL this is
`prefect server start` as shipped, but for one header: every answer carries `X-Dcm-Flows-Server`, by which the runs
and `dcm-flows doctor` tell this server from a stock `prefect server start`, whose SQLite writers fail instead of
queueing (flows/runtime/fast_path.py).

Usage: `python -m ops.prefect_server [options of prefect server start]`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prefect.server.database.configurations import SQLITE_BEGIN_MODE, AioSqliteConfiguration
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flows.runtime.names import SERVER_HEADER

_TAKES_WRITE_LOCK = "_dcm_flows_takes_write_lock"
_NAMES_THE_SERVER = "_dcm_flows_names_the_server"


def sqlite_transactions_take_the_write_lock() -> None:
    """Make every transaction of Prefect's SQLite configuration begin IMMEDIATE (in this process)."""
    begin_transaction = AioSqliteConfiguration.begin_transaction
    if getattr(begin_transaction, _TAKES_WRITE_LOCK, False):
        return

    @asynccontextmanager
    async def begin_immediate(
        self: AioSqliteConfiguration, session: Any, with_for_update: bool = False
    ) -> AsyncIterator[Any]:
        async with begin_transaction(self, session, with_for_update=True) as transaction:
            await session.connection()
            sessions_begun_inside = SQLITE_BEGIN_MODE.set("DEFERRED")
            try:
                yield transaction
            finally:
                SQLITE_BEGIN_MODE.reset(sessions_begun_inside)

    setattr(begin_immediate, _TAKES_WRITE_LOCK, True)
    AioSqliteConfiguration.begin_transaction = begin_immediate  # type: ignore[method-assign]


class NameTheServer:
    """ASGI middleware that adds `SERVER_HEADER` to every HTTP answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (SERVER_HEADER.lower().encode(), b"1")]
            await send(message)

        await self.app(scope, receive, send_named)


def answers_name_the_server() -> None:
    """Make the application Prefect's server builds (in this process) answer with `SERVER_HEADER`."""
    from prefect.server.api import server

    create_app = server.create_app
    if getattr(create_app, _NAMES_THE_SERVER, False):
        return

    @functools.wraps(create_app)
    def create_named_app(*args: Any, **kwargs: Any) -> FastAPI:
        app = create_app(*args, **kwargs)
        if not getattr(app.state, _NAMES_THE_SERVER, False):
            app.add_middleware(NameTheServer)
            setattr(app.state, _NAMES_THE_SERVER, True)
        return app

    setattr(create_named_app, _NAMES_THE_SERVER, True)
    server.create_app = create_named_app


def main() -> None:
    """Run `prefect server start` with this command's arguments in this process, its SQLite writers queueing and
    its answers naming it."""
    sqlite_transactions_take_the_write_lock()
    answers_name_the_server()
    from prefect.cli import app  # deferred: about 1 s, and the tests import this module for the change alone

    sys.argv = ["prefect", "server", "start", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
