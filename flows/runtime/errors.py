"""Why a job could not run, as exceptions whose messages are written to the job record.

Messages name ids, fields and causes; they never quote `headers` or other patient data.
"""

from __future__ import annotations

from collections.abc import Callable


class JobError(Exception):
    """A job cannot run or did not succeed; the message is what the job record will say."""


class JobNotFound(JobError):
    """No job record has the requested id."""


class InvalidRecord(JobError):
    """A job, service or worker record is missing a field, or a field has the wrong type."""


class UnknownWorkerType(JobError):
    """The job's worker has a type this runtime cannot run."""


class JobNotRunnable(JobError):
    """The job is already done, already claimed by another run, or waits for a dependency."""


class AlreadyClaimed(JobNotRunnable):
    """Another live flow run holds the job or session, or the job is done: this run must not run it.

    Such a run ends Cancelled with the state name `Duplicate`, so it reads as a harmless repeat
    rather than as a failure that needs attention.
    """

    state_name = "Duplicate"


class InstallError(InvalidRecord):
    """A component could not be installed; nothing of it was left behind."""


class ArchiveError(JobError):
    """An archive is corrupt, too large, or has an entry that would land outside its folder."""


class CallbackFailed(JobError):
    """The callback raised, crashed, timed out, was killed or returned something that is not JSON."""

    def __init__(self, message: str, traceback: str = "", recorded: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback
        self.recorded = message if recorded is None else recorded
        """The full message, for the job record; the message itself is what Prefect may see (see `redacted`)."""

    def redacted(self, redact: Callable[[str], str]) -> CallbackFailed:
        """A copy for Prefect, with what the callback said about its patient cut out (flows/runtime/redaction.py)."""
        return CallbackFailed(redact(self.recorded), redact(self.traceback), recorded=self.recorded)


class RunCancelled(JobError):
    """The flow run was cancelled while the callback ran; the callback's process tree was killed."""


class ClaimLost(Exception):
    """The run no longer holds its job (crash repair failed it, another run claimed it): its outcome was not
    written. Such a run ends Cancelled with the state name `Superseded`: the job's record follows its holder."""

    state_name = "Superseded"


class DatabaseUnavailable(Exception):
    """The platform database did not answer; an infrastructure failure that is worth retrying."""
