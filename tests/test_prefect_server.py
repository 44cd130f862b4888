"""The embedded Prefect server's SQLite writers queue for the write lock instead of failing, and its answers say
it is this project's server (ops/prefect_server.py).

The transaction tests drive Prefect's own SQLite database configuration on a real database file: one transaction
reads, another connection writes and commits, then the first writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from prefect.client.orchestration import get_client
from prefect.events.worker import EventsWorker
from prefect.server.database.configurations import AioSqliteConfiguration

from bench.components import database_of_its_own
from bench.stock import Sessions, StockStack
from flows.runtime.fast_path import stock_server_advice
from flows.submit import submit_session, wait_for_run
from ops.doctor import Doctor
from ops.prefect_server import sqlite_transactions_take_the_write_lock
from ops.stack import StackState
from tests.conftest import logs_of_ended_run


async def _read_then_write_while_another_connection_writes(database: Path) -> list[str]:
    """Run the two transactions; return the rows written, in commit order."""
    configuration = AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{database}")
    engine = await configuration.engine()
    async with engine.begin() as connection:
        await connection.execute(sqlalchemy.text("CREATE TABLE runs (name TEXT)"))
    first_has_read = asyncio.Event()

    async def write(name: str) -> None:
        session = await configuration.session(engine)
        async with session, configuration.begin_transaction(session):
            await session.execute(sqlalchemy.text("INSERT INTO runs VALUES (:name)"), {"name": name})

    async def read_then_write() -> None:
        session = await configuration.session(engine)
        async with session, configuration.begin_transaction(session):
            await session.execute(sqlalchemy.text("SELECT count(*) FROM runs"))
            first_has_read.set()
            await asyncio.sleep(0.5)
            await session.execute(sqlalchemy.text("INSERT INTO runs VALUES ('first')"))

    async def write_after_the_first_read() -> None:
        await first_has_read.wait()
        await write("second")

    try:
        await asyncio.gather(read_then_write(), write_after_the_first_read())
        async with engine.connect() as connection:
            return list((await connection.execute(sqlalchemy.text("SELECT name FROM runs ORDER BY rowid"))).scalars())
    finally:
        await engine.dispose()


@pytest.fixture
def sqlite_configuration_as_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect's SQLite configuration as installed, and as installed again after the test."""
    monkeypatch.setattr(AioSqliteConfiguration, "begin_transaction", AioSqliteConfiguration.begin_transaction)


@pytest.mark.usefixtures("sqlite_configuration_as_shipped")
def test_stock_prefect_fails_a_sqlite_transaction_that_reads_before_another_connection_writes(tmp_path: Path) -> None:
    """Why the embedded server changes the transactions: as shipped, the first writer's upgrade is refused."""
    with pytest.raises(sqlalchemy.exc.OperationalError, match="database is locked"):
        asyncio.run(_read_then_write_while_another_connection_writes(tmp_path / "prefect.db"))


@pytest.mark.usefixtures("sqlite_configuration_as_shipped")
def test_the_embedded_servers_sqlite_transactions_wait_for_the_write_lock_and_both_commit(tmp_path: Path) -> None:
    sqlite_transactions_take_the_write_lock()
    sqlite_transactions_take_the_write_lock()

    assert asyncio.run(_read_then_write_while_another_connection_writes(tmp_path / "prefect.db")) == [
        "first", "second"
    ]


async def _read_in_a_new_session_inside_a_write_transaction(database: Path) -> list[str]:
    """What Prefect's PATCH of a work queue does when its status changes: inside a write transaction, a new
    session reads (to build the status event); return the rows the transaction wrote."""
    configuration = AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{database}")
    engine = await configuration.engine()
    async with engine.begin() as connection:
        await connection.execute(sqlalchemy.text("CREATE TABLE queues (name TEXT)"))
    try:
        session = await configuration.session(engine)
        async with session, configuration.begin_transaction(session):
            await session.execute(sqlalchemy.text("INSERT INTO queues VALUES ('paused')"))
            reader = await configuration.session(engine)
            async with reader:
                await asyncio.wait_for(reader.execute(sqlalchemy.text("SELECT count(*) FROM queues")), timeout=3)
        async with engine.connect() as connection:
            return list((await connection.execute(sqlalchemy.text("SELECT name FROM queues"))).scalars())
    finally:
        await engine.dispose()


@pytest.mark.usefixtures("sqlite_configuration_as_shipped")
def test_a_read_in_a_new_session_inside_a_write_transaction_of_the_embedded_server_does_not_wait_for_its_lock(
    tmp_path: Path,
) -> None:
    sqlite_transactions_take_the_write_lock()

    assert asyncio.run(_read_in_a_new_session_inside_a_write_transaction(tmp_path / "prefect.db")) == ["paused"]


@pytest.fixture(scope="module")
def stock_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StockStack, StackState]]:
    """This project's set-up under stock Prefect: `prefect server start` as shipped and Prefect's process worker."""
    stock = StockStack(tmp_path_factory.mktemp("stock"))
    try:
        yield stock, stock.start()
    finally:
        stock.stop()


def test_runs_and_the_doctor_tell_this_projects_server_from_a_stock_one(
    stack: StackState, stock_prefect: tuple[StockStack, StackState]
) -> None:
    stock, stock_state = stock_prefect
    with stock.connected(stock_state), get_client(sync_client=True) as client:
        stock_answer = client.request("GET", "/health").headers
        stock_finding = Doctor(client).server()
    with get_client(sync_client=True) as client:
        own_answer = client.request("GET", "/health").headers
        own_finding = Doctor(client).server()

    assert stock_server_advice(own_answer) is None and own_finding.problem is None
    advice = stock_server_advice(stock_answer)
    assert advice is not None and "`python -m ops.prefect_server`" in advice
    assert stock_finding.problem is not None and "stock `prefect server start`" in stock_finding.problem
    assert "python -m ops.prefect_server" in stock_finding.fix


def test_a_session_on_stock_prefect_says_once_which_server_and_worker_to_start_instead(
    stock_prefect: tuple[StockStack, StackState], tmp_path: Path
) -> None:
    stock, stock_state = stock_prefect
    with stock.connected(stock_state), database_of_its_own("stock") as (database, block):
        flow_run_id = submit_session(Sessions(database, tmp_path / "sessions", 2, None).scheduled(), block)
        final = wait_for_run(flow_run_id, timeout_seconds=300)
        warnings = [log.message for log in logs_of_ended_run(flow_run_id) if log.level >= logging.WARNING]
        EventsWorker.drain_all()

    assert final.state is not None and final.state.is_completed(), final.state
    server_advice = [message for message in warnings if "stock `prefect server start`" in message]
    assert len(server_advice) == 1 and "`python -m ops.prefect_server`" in server_advice[0]
    assert len([message for message in warnings if "Prefect's stock worker" in message]) == 1
