"""The `dcm-flows` command: the local stack, submitting jobs and installs, the demo, and trying components."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL
from pydantic import SecretStr

from blocks.database import ENVIRONMENT_NAME, ENVIRONMENT_PROVIDER, ENVIRONMENT_URL, DcmDatabase
from blocks.host import home_folder
from flows.backlog import current_backlog
from flows.bridge import SessionBridge
from flows.runtime.intake import set_paused, what_is_paused
from flows.runtime.names import DEFAULT_BLOCK
from flows.runtime.platform_records import PlatformRecords
from flows.submit import submit_install, submit_job, submit_removal, submit_session, wait_for_run
from ops.doctor import Doctor
from ops.find import SEARCH_FIELDS, as_json, as_text, find_work
from ops.prefect_setup import ensure_crash_automations, ensure_failure_notifications, set_up
from ops.progress import follow_run, run_link
from ops.scaled_stack import ScaledStack
from ops.stack import LocalStack

WAIT_SECONDS = 24 * 3600
PREFECT_CONNECTION = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")
"""The settings that point `prefect deploy` (a process of its own) at the same server as this one."""


def _stack(arguments: argparse.Namespace) -> LocalStack:
    """The stack of the home folder: the kind its state records, or for `stack start` the kind asked for."""
    home = Path(arguments.home)
    state = LocalStack(home).state()
    scaled = getattr(arguments, "scaled", False) or (state is not None and state.kind == ScaledStack.kind)
    return ScaledStack(home) if scaled else LocalStack(home)


@contextlib.contextmanager
def _connected(arguments: argparse.Namespace) -> Iterator[None]:
    """Point this process at the local stack when it runs and no other Prefect API is configured; stop with a
    clear message when there is no API at all (Prefect would start a temporary server of its own and answer
    for it, an empty one)."""
    stack = _stack(arguments)
    state = stack.state()
    use_stack = state is not None and os.environ.get("PREFECT_API_URL", state.api_url) == state.api_url
    with stack.connected(state) if state is not None and use_stack else contextlib.nullcontext():
        if not PREFECT_API_URL.value():
            raise SystemExit("no Prefect API to talk to: set PREFECT_API_URL (and PREFECT_API_AUTH_STRING), "
                             "or start the local stack with `dcm-flows stack start`")
        yield


def _say_what_is_paused(paused: list[str]) -> None:
    print("paused: " + ", ".join(paused) if paused else "intake: not paused")


def stack_start(arguments: argparse.Namespace) -> int:
    stack = _stack(arguments)
    state = stack.start()
    print(f"database     {state.database_url}\nPrefect API  {state.api_url}\nPrefect UI   {state.ui_url}")
    print(f"logs         {stack.logs}")
    print(f"Use it from a shell: export PREFECT_API_URL={state.api_url} "
          f"PREFECT_API_AUTH_STRING=\"$(cat {stack.api_auth_file})\"")
    print(f"The UI asks once for a password: the whole contents of {stack.api_auth_file}")
    return 0


def stack_stop(arguments: argparse.Namespace) -> int:
    _stack(arguments).stop()
    print("stack stopped")
    return 0


def stack_status(arguments: argparse.Namespace) -> int:
    stack = _stack(arguments)
    state = stack.state()
    if state is None or not stack.is_running():
        print("stack is not running")
        return 1
    print(f"running: Prefect UI {state.ui_url}, database {state.database_url}")
    with stack.connected(state), get_client(sync_client=True) as client:
        paused = what_is_paused(client)
    _say_what_is_paused(paused)
    return 0


def _report(flow_run_id: UUID, wait: bool) -> int:
    """Print the run's id and, when asked to wait, its final state; non-zero when it did not complete."""
    print(f"flow run {flow_run_id}")
    if not wait:
        return 0
    flow_run = wait_for_run(flow_run_id, timeout_seconds=WAIT_SECONDS)
    assert flow_run.state is not None
    print(f"{flow_run.state.name}: {flow_run.state.message or ''}")
    return 0 if flow_run.state.is_completed() else 1


def submit_job_command(arguments: argparse.Namespace) -> int:
    with _connected(arguments):
        return _report(submit_job(arguments.job_id, database_block=arguments.database_block), arguments.wait)


def submit_session_command(arguments: argparse.Namespace) -> int:
    with _connected(arguments):
        return _report(
            submit_session(arguments.session_id, database_block=arguments.database_block), arguments.wait
        )


def bridge(arguments: argparse.Namespace) -> int:
    with _connected(arguments):
        records = PlatformRecords(DcmDatabase.resolve(arguments.database_block).open())
        print("bridge: watching the jobs collection for new sessions", flush=True)
        SessionBridge(records, arguments.database_block, say=lambda line: print(line, flush=True)).run(
            arguments.poll_seconds, arguments.run_for_seconds
        )
    return 0


def _follow(flow_run_id: UUID, title: str) -> int:
    """Show the run's progress until it ends, then its state and its page in the UI."""
    flow_run = follow_run(flow_run_id, title)
    assert flow_run.state is not None
    print(f"{flow_run.state.name}: {flow_run.state.message or ''}")
    if PREFECT_UI_URL.value():
        print(f"see {run_link(PREFECT_UI_URL.value(), flow_run_id)}")
    return 0 if flow_run.state.is_completed() else 1


def install(arguments: argparse.Namespace) -> int:
    source = str(Path(arguments.source).resolve()) if Path(arguments.source).exists() else arguments.source
    with _connected(arguments):
        flow_run_id = submit_install(source, arguments.force, arguments.database_block, arguments.work_queue)
        return _follow(flow_run_id, f"install {Path(source).name}")


def remove(arguments: argparse.Namespace) -> int:
    with _connected(arguments):
        return _follow(submit_removal(arguments.name, arguments.database_block, arguments.work_queue),
                       f"remove {arguments.name}")


def automations(arguments: argparse.Namespace) -> int:
    with _connected(arguments):
        names = ensure_crash_automations()
        if arguments.notify:
            names += ensure_failure_notifications(arguments.notify)
        for name in names:
            print(f"automation ready: {name}")
    return 0


def _pause_or_resume(arguments: argparse.Namespace, paused: bool) -> int:
    with _connected(arguments), get_client(sync_client=True) as client:
        try:
            changed = set_paused(client, paused, arguments.queue)
        except ValueError as unknown:
            print(unknown, file=sys.stderr)
            return 1
    for what in changed:
        print(f"{'paused' if paused else 'resumed'}: {what}")
    return 0


def pause(arguments: argparse.Namespace) -> int:
    return _pause_or_resume(arguments, paused=True)


def resume(arguments: argparse.Namespace) -> int:
    return _pause_or_resume(arguments, paused=False)


def find(arguments: argparse.Namespace) -> int:
    field = next(field for field in SEARCH_FIELDS if getattr(arguments, field) is not None)
    with _connected(arguments):
        records = PlatformRecords(DcmDatabase.resolve(arguments.database_block).open())
        work = find_work(records, field, getattr(arguments, field))
        ui_url = PREFECT_UI_URL.value()
    print(as_json(work, ui_url) if arguments.json else as_text(work, ui_url))
    return 0 if work else 1


def status(arguments: argparse.Namespace) -> int:
    with _connected(arguments), get_client(sync_client=True) as client:
        records = PlatformRecords(DcmDatabase.resolve(arguments.database_block).open())
        rows = current_backlog(records, client)
        paused = what_is_paused(client)
    width = max(len(row["what"]) for row in rows)
    for row in rows:
        print(f"{row['what']:<{width}}  {row['count']}")
    _say_what_is_paused(paused)
    return 0


def setup(arguments: argparse.Namespace) -> int:
    url = os.environ.get(ENVIRONMENT_URL) or getpass.getpass("platform database URL (not shown): ")
    database = DcmDatabase(provider=os.environ.get(ENVIRONMENT_PROVIDER, "mongodb"), url=SecretStr(url),
                           database_name=os.environ.get(ENVIRONMENT_NAME, "dcm-processor"))
    with _connected(arguments):
        print(f"setting up the Prefect server at {PREFECT_API_URL.value()}")
        connection = {name: os.environ[name] for name in PREFECT_CONNECTION if name in os.environ}
        with tempfile.TemporaryDirectory(prefix="dcm-setup-") as folder:
            set_up(database, connection, Path(folder), say=lambda step: print(f"  {step}", flush=True))
    print("done; `dcm-flows doctor` checks the whole installation")
    return 0


def doctor(arguments: argparse.Namespace) -> int:
    stack = _stack(arguments)
    state = stack.state()
    socket = stack.warm_engine_socket if state is not None and stack.is_running() else None
    with _connected(arguments), get_client(sync_client=True) as client:
        findings = []
        for finding in Doctor(client, arguments.database_block, socket).findings():
            print(finding.line(), flush=True)
            findings.append(finding)
    return 1 if any(finding.problem for finding in findings) else 0


def demo(arguments: argparse.Namespace) -> int:
    # Deferred: the demo needs the `demo` extra (pydicom, the platform's scheduler), which a host that only
    # runs jobs does not install.
    from ops.demo import run_demo

    outcomes = run_demo(_stack(arguments))
    return 0 if all(state == "Completed" for _, state, _ in outcomes) else 1


def try_command(arguments: argparse.Namespace) -> int:
    from ops.demo import try_components  # deferred: the `demo` extra, as above

    outcomes = try_components(_stack(arguments), [Path(component) for component in arguments.components])
    return 0 if all(state == "Completed" for _, state, _ in outcomes) else 1


def _database_block_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--database-block", default=DEFAULT_BLOCK,
                         help="name of the dcm-database block (default: %(default)s)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="dcm-flows", description=__doc__)
    root.add_argument("--home", default=str(home_folder()),
                      help="folder of the local stack (DCM_FLOWS_HOME; default: %(default)s)")
    commands = root.add_subparsers(dest="command", required=True)

    stack = commands.add_parser("stack", help="the embedded local stack (SecantusDB, Prefect server, pool workers)")
    stack_commands = stack.add_subparsers(dest="action", required=True)
    start = stack_commands.add_parser("start", help="start it (or show where the running one is)")
    start.add_argument("--scaled", action="store_true",
                       help="Prefect's scaled shape: PostgreSQL, Redis, two API servers behind haproxy, the background "
                            "services apart (ops/scaled_stack.py)")
    start.set_defaults(handler=stack_start)
    stack_commands.add_parser("stop", help="stop it").set_defaults(handler=stack_stop)
    stack_commands.add_parser("status", help="is it running?").set_defaults(handler=stack_status)

    submit = commands.add_parser("submit", help="run platform work through Prefect")
    submit_commands = submit.add_subparsers(dest="what", required=True)
    job = submit_commands.add_parser("job", help="run one job as a dcm-job flow run")
    job.add_argument("job_id")
    _database_block_option(job)
    job.add_argument("--wait", action="store_true", help="wait for the run and exit non-zero if it failed")
    job.set_defaults(handler=submit_job_command)

    session = submit_commands.add_parser("session", help="run a session's job graph as a dcm-session flow run")
    session.add_argument("session_id")
    _database_block_option(session)
    session.add_argument("--wait", action="store_true", help="wait for the run and exit non-zero if it failed")
    session.set_defaults(handler=submit_session_command)

    bridge_parser = commands.add_parser(
        "bridge", help="run every session the platform's scheduler creates, once (drop-in for mongo-qas)"
    )
    _database_block_option(bridge_parser)
    bridge_parser.add_argument("--poll-seconds", type=float, default=2.0)
    bridge_parser.add_argument("--run-for-seconds", type=float, default=None)
    bridge_parser.set_defaults(handler=bridge)

    install_parser = commands.add_parser("install", help="install a component (folder, archive or URL)")
    install_parser.add_argument("source")
    install_parser.add_argument("--force", action="store_true", help="replace an installed one of the same name")
    _database_block_option(install_parser)
    install_parser.add_argument("--work-queue", default=None, help="queue of the host to install on (its device id)")
    install_parser.set_defaults(handler=install)
    remove_parser = commands.add_parser("remove", help="remove a component's service and worker")
    remove_parser.add_argument("name")
    _database_block_option(remove_parser)
    remove_parser.add_argument("--work-queue", default=None, help="queue of the host the component is on")
    remove_parser.set_defaults(handler=remove)

    automations_parser = commands.add_parser(
        "automations", help="create the heartbeat automation that crashes silent runs at once (crash repair, fast)"
    )
    automations_parser.add_argument(
        "--notify", metavar="URL", default=None,
        help="also post to this webhook when a session fails or a job crashes (ids, names, UI link; no patient data)",
    )
    automations_parser.set_defaults(handler=automations)
    for name, handler, meaning in (
        ("pause", pause, "stop intake: running jobs finish, nothing new starts, the bridge submits nothing"),
        ("resume", resume, "start intake again after a pause"),
    ):
        intake_parser = commands.add_parser(name, help=meaning)
        intake_parser.add_argument("--queue", default=None,
                                   help="only this host's work queue (its device id), not the whole platform")
        intake_parser.set_defaults(handler=handler)
    find_parser = commands.add_parser(
        "find", help="a patient's sessions and jobs, from the platform database (nothing of it goes to Prefect)"
    )
    searched = find_parser.add_mutually_exclusive_group(required=True)
    for field in SEARCH_FIELDS:
        searched.add_argument(f"--{field.replace('_', '-')}", dest=field, metavar="VALUE")
    find_parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    _database_block_option(find_parser)
    find_parser.set_defaults(handler=find)
    status_parser = commands.add_parser("status", help="the backlog at a glance (also the dcm-backlog artifact)")
    _database_block_option(status_parser)
    status_parser.set_defaults(handler=status)
    commands.add_parser(
        "setup", help="set the Prefect server of PREFECT_API_URL up for this project (idempotent); the database "
        "URL comes from DCM_DB_URL or a prompt that does not echo it",
    ).set_defaults(handler=setup)
    doctor_parser = commands.add_parser("doctor", help="check a running installation step by step and say what to fix")
    _database_block_option(doctor_parser)
    doctor_parser.set_defaults(handler=doctor)
    commands.add_parser("demo", help="run the example components end to end on the local stack").set_defaults(
        handler=demo
    )
    try_parser = commands.add_parser(
        "try", help="install components (replacing installed versions) and run a session of an MR series through them"
    )
    try_parser.add_argument("components", nargs="+", help="component folders (with dcm-processor.json)")
    try_parser.set_defaults(handler=try_command)
    return root


def main(argv: list[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    return arguments.handler(arguments)


if __name__ == "__main__":
    sys.exit(main())
