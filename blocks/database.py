"""The platform database as a Prefect block.

Flows receive only the *name* of this block as a parameter: the URL, which usually carries a
password, stays in the block's secret field (or in the worker's environment) and never becomes a
flow-run parameter, log line or artifact.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dcm_processor_db_provider import DBManager
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

ENVIRONMENT_PROVIDER = "DCM_DB_PROVIDER"
ENVIRONMENT_URL = "DCM_DB_URL"
ENVIRONMENT_NAME = "DCM_DB_NAME"

_managers: dict[tuple[str, str, str], DBManager] = {}
_managers_lock = threading.Lock()
_resolved_here: ContextVar[dict[str, DcmDatabase] | None] = ContextVar("dcm_resolved_databases", default=None)


def with_server_wait(url: str, seconds: float) -> str:
    """The MongoDB URL with `serverSelectionTimeoutMS`, unless it sets one: the driver's default of 30 s
    per operation would stretch every retry of an outage."""
    parts = urlsplit(url)
    options = parse_qsl(parts.query, keep_blank_values=True)
    if any(key.lower() == "serverselectiontimeoutms" for key, _ in options):
        return url
    options.append(("serverSelectionTimeoutMS", str(int(seconds * 1000))))
    return urlunsplit(parts._replace(query=urlencode(options)))


class DatabaseNotConfigured(RuntimeError):
    """Neither a database block nor the DCM_DB_* environment variables name a database."""


class DcmDatabase(Block):
    """Where the dcm-processor platform keeps its jobs, services, workers, sessions and files."""

    _block_type_name = "DCM Database"
    _block_type_slug = "dcm-database"
    _description = (
        "Connection to the dcm-processor platform database (MongoDB wire protocol). "
        "The URL is stored as a secret."
    )

    provider: str = Field(
        default="mongodb",
        description="dcm_processor_db_provider provider name; `mongodb` for MongoDB and SecantusDB.",
    )
    url: SecretStr = Field(
        description="Connection URL, e.g. mongodb://user:password@host:27017/?directConnection=true",
    )
    database_name: str = Field(
        default="dcm-processor",
        description="Name of the database that holds the platform's collections and GridFS buckets.",
    )
    server_wait_seconds: float = Field(
        default=5.0,
        gt=0,
        description=(
            "How long one database operation waits for a reachable server before it counts as an outage "
            "(a MongoDB URL's own serverSelectionTimeoutMS wins). The job's tasks then retry with backoff."
        ),
    )

    def open(self) -> DBManager:
        """The DBManager of this database in this process; connections are opened lazily by the driver.

        One per process and database: a session runs many jobs in its process, and each DBManager
        holds a MongoClient with its own connection pool and monitor thread (pymongo clients are
        thread-safe and reconnect after an outage).
        """
        url = self.url.get_secret_value()
        if self.provider == "mongodb":
            url = with_server_wait(url, self.server_wait_seconds)
        key = (self.provider, url, self.database_name)
        with _managers_lock:
            if key not in _managers:
                _managers[key] = DBManager(dburl=url, dbname=self.database_name, dbprovider=self.provider)
            return _managers[key]

    def with_database_name(self, database_name: str) -> DcmDatabase:
        """The same server and credentials with another database, e.g. to keep a test or a load run apart."""
        return DcmDatabase(provider=self.provider, url=self.url, database_name=database_name,
                           server_wait_seconds=self.server_wait_seconds)

    @classmethod
    def from_environment(cls) -> DcmDatabase:
        """The database named by DCM_DB_PROVIDER, DCM_DB_URL and DCM_DB_NAME."""
        url = os.environ.get(ENVIRONMENT_URL)
        if not url:
            raise DatabaseNotConfigured(
                f"no database block found and {ENVIRONMENT_URL} is not set in the worker's environment"
            )
        return cls(
            provider=os.environ.get(ENVIRONMENT_PROVIDER, "mongodb"),
            url=SecretStr(url),
            database_name=os.environ.get(ENVIRONMENT_NAME, "dcm-processor"),
        )

    @classmethod
    def resolve(cls, block_name: str) -> DcmDatabase:
        """The saved block called `block_name`, or the environment's database when no such block exists.

        Inside `resolved_once()` each name is read from the Prefect API once, not once per caller.
        """
        resolved = _resolved_here.get()
        if resolved is not None and block_name in resolved:
            return resolved[block_name]
        try:
            database = cls.load(block_name)
        except ValueError:
            database = cls.from_environment()
        if resolved is not None:
            resolved[block_name] = database
        return database


@contextmanager
def resolved_once() -> Iterator[None]:
    """Share resolved database blocks with everything run in this context, threads started from a copy of
    it included: a session run and the job runs in its process read the block once, not once per job."""
    token = _resolved_here.set({})
    try:
        yield
    finally:
        _resolved_here.reset(token)
