"""The database block: saved with a secret URL, with the worker's environment as the fallback."""

from __future__ import annotations

import contextvars
import threading
import uuid

import pytest
from pydantic import SecretStr

from blocks.database import DatabaseNotConfigured, DcmDatabase, resolved_once, with_server_wait
from ops.stack import StackState


def test_the_saved_block_keeps_the_url_secret_and_opens_the_platform_database(
    stack: StackState, database: DcmDatabase
) -> None:
    assert database.url.get_secret_value() == stack.database_url
    assert stack.database_url not in repr(database)
    assert database.open().db.count("jobs") >= 0


def test_without_a_block_the_environment_names_the_database(
    stack: StackState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCM_DB_URL", "mongodb://elsewhere:27017")
    monkeypatch.setenv("DCM_DB_NAME", "other")

    resolved = DcmDatabase.resolve("no-such-block")

    assert resolved.url == SecretStr("mongodb://elsewhere:27017") and resolved.database_name == "other"


def test_without_block_or_environment_the_error_says_what_to_configure(
    stack: StackState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DCM_DB_URL", raising=False)

    with pytest.raises(DatabaseNotConfigured, match="DCM_DB_URL"):
        DcmDatabase.resolve("no-such-block")


def test_a_session_and_the_jobs_in_its_threads_read_a_block_once_and_later_runs_see_its_changes(
    stack: StackState, database: DcmDatabase
) -> None:
    name = f"resolved-once-{uuid.uuid4().hex[:8]}"
    database.save(name)
    in_thread: list[DcmDatabase] = []
    with resolved_once():
        first = DcmDatabase.resolve(name)
        database.with_database_name("renamed").save(name, overwrite=True)
        worker = threading.Thread(target=contextvars.copy_context().run,
                                  args=(lambda: in_thread.append(DcmDatabase.resolve(name)),))
        worker.start()
        worker.join()

    assert in_thread[0] is first and first.database_name == database.database_name
    assert DcmDatabase.resolve(name).database_name == "renamed"


def test_operations_wait_five_seconds_for_a_server_unless_the_url_says_otherwise() -> None:
    assert with_server_wait("mongodb://u:p%40ss@db:27017/?replicaSet=rs0", 5) == (
        "mongodb://u:p%40ss@db:27017/?replicaSet=rs0&serverSelectionTimeoutMS=5000"
    )
    assert with_server_wait("mongodb://db/?serverSelectionTimeoutMS=900", 5) == "mongodb://db/?serverSelectionTimeoutMS=900"
