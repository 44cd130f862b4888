"""The embedded Prefect server's SQLite writers queue for the write lock instead of failing (ops/prefect_server.py).

Both tests drive Prefect's own SQLite database configuration on a real database file: one transaction
reads, another connection writes and commits, then the first writes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy
from prefect.server.database.configurations import AioSqliteConfiguration

from ops.prefect_server import sqlite_transactions_take_the_write_lock


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
