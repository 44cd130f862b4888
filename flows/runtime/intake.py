"""Intake: whether the platform takes on new work, paused and resumed with Prefect's own pause of work pools
and work queues, so that the UI shows what is paused and the pool workers pick nothing up meanwhile.

Pausing the whole platform pauses both pools: no session run and no job run is handed to a worker, the
bridge submits no new session, and a session already running starts no new job (its running jobs finish).
Pausing one host's queue (its device id) holds the jobs routed to that host; the rest of the platform goes on.
"""

from __future__ import annotations

import contextlib
import time

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolUpdate
from prefect.exceptions import ObjectNotFound, PrefectException

from flows.runtime.names import DOCKER_POOL, PROCESS_POOL

POOLS = (PROCESS_POOL, DOCKER_POOL)
RECHECK_SECONDS = 2.0
"""How long a session run or the bridge trusts what it read of the pause (one API request per this, not per job)."""


def set_paused(client: SyncPrefectClient, paused: bool, queue: str | None = None) -> list[str]:
    """Pause (or resume) both pools, or the queue `queue` in each pool that has it; what was changed, for people."""
    changed = []
    for pool in POOLS:
        if queue is None:
            client.update_work_pool(pool, WorkPoolUpdate(is_paused=paused))
            changed.append(f"pool {pool}")
            continue
        try:
            work_queue = client.read_work_queue_by_name(queue, work_pool_name=pool)
        except ObjectNotFound:
            continue
        client.update_work_queue(work_queue.id, is_paused=paused)
        changed.append(f"queue {queue} of pool {pool}")
    if queue is not None and not changed:
        raise ValueError(f"no pool has a work queue named {queue!r} (a host's queue is named by its device id)")
    return changed


def what_is_paused(client: SyncPrefectClient) -> list[str]:
    """Every paused pool and paused queue of this project's pools, for people."""
    paused = []
    for pool in POOLS:
        try:
            if client.read_work_pool(pool).is_paused:
                paused.append(f"pool {pool}")
        except ObjectNotFound:
            continue
        paused += [f"queue {queue.name} of pool {pool}" for queue in client.read_work_queues(work_pool_name=pool)
                   if queue.is_paused]
    return paused


class IntakeWatch:
    """Whether the process pool, which runs the sessions and the bridge, is paused; read at most every
    RECHECK_SECONDS through `client` (a client of its own per read when None), and taken as not paused while the
    API cannot say (a pause is no reason to stop work)."""

    def __init__(self, client: SyncPrefectClient | None = None) -> None:
        self.client = client
        self._paused = False
        self._read_at = float("-inf")

    def paused(self) -> bool:
        if time.monotonic() - self._read_at >= RECHECK_SECONDS:
            self._read_at = time.monotonic()
            with contextlib.suppress(PrefectException, httpx.HTTPError):
                self._paused = self._read()
        return self._paused

    def _read(self) -> bool:
        if self.client is not None:
            return bool(self.client.read_work_pool(PROCESS_POOL).is_paused)
        with get_client(sync_client=True) as client:
            return bool(client.read_work_pool(PROCESS_POOL).is_paused)
