"""What Prefect deploys and what callers call: the job, session, install, bridge and crash-repair flows, and the
submit functions the scheduler uses. Plain Python under them lives in `flows.runtime`."""
