"""The `dcm-flows` command: the local stack, submitting jobs and installs, the demo, and trying components."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from uuid import UUID

from prefect.settings import PREFECT_UI_URL

from blocks.database import DcmDatabase
from blocks.host import home_folder
from flows.bridge import SessionBridge
from flows.runtime.names import DEFAULT_BLOCK
from flows.runtime.platform_records import PlatformRecords
from flows.submit import submit_install, submit_job, submit_removal, submit_session, wait_for_run
from ops.prefect_setup import ensure_crash_automations
from ops.progress import follow_run, run_link
from ops.stack import LocalStack

WAIT_SECONDS = 24 * 3600


def _stack(arguments: argparse.Namespace) -> LocalStack:
    return LocalStack(Path(arguments.home))


def _connected(arguments: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    """Point this process at the local stack when it runs and no other Prefect API is configured."""
    stack = _stack(arguments)
    state = stack.state()
    if state is not None and os.environ.get("PREFECT_API_URL", state.api_url) == state.api_url:
        return stack.connected(state)
    return contextlib.nullcontext()


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
        for name in ensure_crash_automations():
            print(f"automation ready: {name}")
    return 0


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
    stack_commands.add_parser("start", help="start it (or show where the running one is)").set_defaults(
        handler=stack_start
    )
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

    commands.add_parser(
        "automations", help="create the heartbeat automation that crashes silent runs at once (crash repair, fast)"
    ).set_defaults(handler=automations)
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
