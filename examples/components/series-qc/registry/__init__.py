"""Registry callback: the scheduler runs it to decide whether a series gets the job."""


def accept_any(session_id, job_name, headers, params, added_params, **kwargs):
    return True, {}
