"""Installing and removing components through the deployments, with real virtualenv, uv, Docker and GridFS."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import shutil
import threading
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import LogCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.states import Completed
from rich.console import Console

from blocks.database import DcmDatabase
from blocks.host import WorkerHost
from flows.install import host_settings, install_component_flow, remove_component_flow
from flows.runtime.environments.docker import WORKER_LABEL
from flows.runtime.names import INSTALL_FLOW, deployment
from flows.submit import submit_job
from ops.progress import follow_run
from ops.stack import docker_engine_answers
from tests.conftest import BASE_IMAGE, containers_matching, eventually, finished
from tests.platform import Platform

pytestmark = pytest.mark.integration

ECHO_SERVICE = """
import sys
import six

def echo(session_id, job_name, headers, params, added_params, **kwargs):
    return {"six": six.__version__, "python": sys.executable}
"""


def component(folder: Path, name: str, requirements: str = "six==1.16.0", worker: dict | None = None,
              files: dict[str, str] | None = None) -> Path:
    (folder / "module").mkdir(parents=True)
    (folder / "registry").mkdir()
    (folder / "worker").mkdir()
    (folder / "module" / "__init__.py").write_text(ECHO_SERVICE)
    (folder / "registry" / "__init__.py").write_text("def accept(**kwargs):\n    return True, {}\n")
    settings = worker or {"name": name, "params": {}, "python_version": "3.11"}
    (folder / "worker" / "settings.json").write_text(json.dumps(settings))
    (folder / "worker" / "requirements.txt").write_text(requirements)
    for relative, text in (files or {}).items():
        (folder / "worker" / relative).write_text(text)
    manifest = {
        "name": name, "version": "1.0.0",
        "worker": {"path": "worker", "type": "docker" if worker and "build" in worker else "venv"},
        "service": {"module": "module", "registry": "registry", "jobs": [
            {"jobName": "echo", "workerEntry": "echo", "registryEntry": "accept", "events": ["stable-series"],
             "worker": name},
        ]},
    }
    (folder / "dcm-processor.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def environments(stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("environments")
    WorkerHost(environments_folder=str(folder)).save("default", overwrite=True)
    return folder


def component_files(platform: Platform) -> int:
    return platform.manager.db.count("componentfiles.files")


def test_a_component_installed_through_the_deployment_runs_its_job_and_the_platform_reads_it(
    platform: Platform, environments: Path, tmp_path: Path
) -> None:
    source = component(tmp_path / "echo", "venv-echo")

    run = run_deployment("dcm-install-component/process", parameters={"source": str(source)}, timeout=0)
    final = finished(run.id, timeout=400)

    assert final.state.is_completed(), final.state.message
    worker = platform.manager.get_worker("venv-echo")
    service = platform.manager.get_service("venv-echo")
    assert worker["type"] == "venv" and worker["device_id"] and worker["python_version"].startswith("3.11.")
    assert "six==1.16.0" in worker["packages"]
    assert Path(worker["venv_python_path"]).is_file()
    assert service["jobs"][0]["worker"] == "venv-echo" and service["module"] and service["registry"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run.id])))
    assert [artifact.data for artifact in artifacts if artifact.type == "progress"] == [100.0]

    job_id = platform.service_job(str(service["_id"]), worker_id=str(worker["_id"]), entry="echo")
    assert finished(submit_job(job_id)).state.is_completed()
    result = platform.job(job_id)["result"]
    assert result == {"six": "1.16.0", "python": worker["venv_python_path"]}


def test_reinstalling_needs_force_and_removing_leaves_nothing(
    platform: Platform, environments: Path, tmp_path: Path
) -> None:
    files_before = component_files(platform)
    source = str(component(tmp_path / "again", "venv-again"))
    first = install_component_flow(source)

    unchanged = install_component_flow(source)
    replaced = install_component_flow(source, force=True)

    assert unchanged["worker_id"] == first["worker_id"] and unchanged["service_id"] is None
    assert "already installed" in " ".join(unchanged["skipped"])
    assert replaced["worker_id"] != first["worker_id"] and replaced["service_id"] != first["service_id"]
    assert component_files(platform) == files_before + 2, "the replaced module and registry zips are gone"
    venv = Path(platform.manager.get_worker("venv-again")["path"])

    removed = remove_component_flow("venv-again")

    assert removed == ["service 'venv-again'", "worker 'venv-again'"]
    assert platform.manager.get_worker("venv-again") is None and platform.manager.get_service("venv-again") is None
    assert not venv.exists() and component_files(platform) == files_before


def test_a_broken_requirement_fails_the_install_and_leaves_nothing(
    platform: Platform, environments: Path, tmp_path: Path
) -> None:
    files_before = component_files(platform)
    source = component(tmp_path / "broken", "venv-broken", requirements="dcm-no-such-package-anywhere==9.9.9\n")

    with pytest.raises(Exception, match="installing the worker's packages failed"):
        install_component_flow(str(source))

    assert platform.manager.get_worker("venv-broken") is None
    assert platform.manager.get_service("venv-broken") is None
    assert not (environments / "venv-broken").exists() and component_files(platform) == files_before


def test_an_archive_with_an_entry_escaping_its_folder_is_refused(
    platform: Platform, environments: Path, tmp_path: Path
) -> None:
    source = component(tmp_path / "escaping", "venv-escaping")
    archive = tmp_path / "escaping.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in source.rglob("*"):
            if path.is_file():
                bundle.write(path, path.relative_to(tmp_path).as_posix())
        bundle.writestr("escaping/../../dcm-install-escape.txt", "x")

    with pytest.raises(Exception, match="escapes the destination folder"):
        install_component_flow(str(archive))

    assert not (tmp_path.parent / "dcm-install-escape.txt").exists()
    assert platform.manager.get_worker("venv-escaping") is None


def test_no_python_of_the_asked_version_names_the_versions_found(
    platform: Platform, environments: Path, tmp_path: Path
) -> None:
    settings = {"name": "venv-old", "params": {}, "python_version": "2.5"}
    source = component(tmp_path / "old", "venv-old", worker=settings)

    with pytest.raises(Exception, match=r"no Python 2\.5 on this host; the versions found are .*3\.11"):
        install_component_flow(str(source))


@pytest.mark.docker
def test_a_docker_worker_whose_dockerfile_fails_leaves_no_image_record_or_file(
    platform: Platform, environments: Path, tmp_path: Path, database: DcmDatabase
) -> None:
    if not docker_engine_answers():
        pytest.skip("no Docker engine could be reached (run .ci/docker-engine.sh as root to start one)")
    import docker

    files_before = component_files(platform)
    settings = {"name": "docker-broken", "build": "Dockerfile", "params": {"command": [], "run_kwargs": {}},
                "pre_scripts": ["pre.py"], "post_scripts": [], "build_kwargs": {"GREETING": "hello"}}
    source = component(tmp_path / "docker", "docker-broken", worker=settings, files={
        "Dockerfile": "FROM dcm-flows/python-base:bookworm\nARG GREETING\nRUN echo $GREETING && exit 3\n",
        "pre.py": "def callback(**kwargs):\n    pass\n",
    })

    with pytest.raises(Exception, match="failed to build"):
        install_component_flow(str(source))

    client = docker.from_env()
    assert client.images.list(filters={"label": f"{WORKER_LABEL}=docker-broken"}) == []
    assert containers_matching(client, {"ancestor": BASE_IMAGE}) == []
    assert platform.manager.get_worker("docker-broken") is None and component_files(platform) == files_before
    shutil.rmtree(tmp_path / "docker")


@pytest.mark.docker
def test_a_docker_component_is_built_with_its_build_args_and_its_job_runs_in_the_result(
    platform: Platform, environments: Path, tmp_path: Path, worker_image: str, wheelhouse: Path, docker_client
) -> None:
    WorkerHost(environments_folder=str(environments), wheelhouse=str(wheelhouse)).save("offline", overwrite=True)
    settings = {"name": "docker-greeter", "build": "Dockerfile", "build_kwargs": {"GREETING": "hello from the build"},
                "params": {"command": [], "run_kwargs": {}}, "pre_scripts": [], "post_scripts": []}
    source = component(tmp_path / "greeter", "docker-greeter", worker=settings, files={
        "Dockerfile": f"FROM {worker_image}\nARG GREETING\nRUN echo $GREETING > /greeting.txt\n",
    })
    (source / "module" / "__init__.py").write_text(
        "def echo(**kwargs):\n    return open('/greeting.txt').read().strip()\n"
    )

    report = install_component_flow(str(source), host_block="offline")

    worker = platform.manager.get_worker("docker-greeter")
    assert worker["type"] == "docker" and worker["image"].startswith("sha256:") and worker["runtime_image"]
    assert docker_client.images.list(filters={"label": f"{WORKER_LABEL}=docker-greeter"})
    job_id = platform.service_job(report["service_id"], worker_id=report["worker_id"], entry="echo")
    platform.manager.db.update("jobs", job_id, {"$set": {"data.kwargs.worker_type": "docker"}})
    assert finished(submit_job(job_id), timeout=300).state.is_completed()
    assert platform.job(job_id)["result"] == "hello from the build"
    eventually(lambda: containers_matching(docker_client, {"ancestor": worker["runtime_image"]}) == [], timeout=60)

    remove_component_flow("docker-greeter")

    assert docker_client.images.list(filters={"label": f"{WORKER_LABEL}=docker-greeter"}) == []


def test_plain_pip_installs_when_uv_is_not_wanted_and_required_components_come_first(
    platform: Platform, environments: Path, tmp_path: Path
) -> None:
    WorkerHost(environments_folder=str(environments), installer="pip").save("pip-host", overwrite=True)
    component(tmp_path / "base", "venv-base")
    dependent = component(tmp_path / "dependent", "venv-dependent")
    manifest = json.loads((dependent / "dcm-processor.json").read_text())
    (dependent / "dcm-processor.json").write_text(json.dumps({**manifest, "requires": ["../base"]}))

    install_component_flow(str(dependent), host_block="pip-host")

    for name in ("venv-base", "venv-dependent"):
        worker = platform.manager.get_worker(name)
        assert worker["installer"] == "pip" and "six==1.16.0" in worker["packages"]
        assert platform.manager.get_service(name) is not None


def test_a_forced_reinstall_that_fails_leaves_the_installed_component_working(
    platform: Platform, environments: Path, tmp_path: Path
) -> None:
    source = component(tmp_path / "kept", "venv-kept")
    installed = install_component_flow(str(source))
    (source / "worker" / "requirements.txt").write_text("dcm-no-such-package-anywhere==9.9.9\n")

    with pytest.raises(Exception, match="installing the worker's packages failed"):
        install_component_flow(str(source), force=True)

    worker, service = platform.manager.get_worker("venv-kept"), platform.manager.get_service("venv-kept")
    assert str(worker["_id"]) == installed["worker_id"] and str(service["_id"]) == installed["service_id"]
    assert platform.manager.db.count("workers", {"query": {"name": "venv-kept"}}) == 1
    job_id = platform.service_job(installed["service_id"], worker_id=installed["worker_id"], entry="echo")
    assert finished(submit_job(job_id)).state.is_completed()
    assert platform.job(job_id)["result"]["python"] == worker["venv_python_path"]


def test_a_failed_part_undoes_the_whole_install_required_components_included(
    platform: Platform, environments: Path, tmp_path: Path
) -> None:
    files_before = component_files(platform)
    component(tmp_path / "required", "venv-required")
    dependent = component(tmp_path / "unregistrable", "venv-unregistrable")
    shutil.rmtree(dependent / "registry")
    manifest = json.loads((dependent / "dcm-processor.json").read_text())
    (dependent / "dcm-processor.json").write_text(json.dumps({**manifest, "requires": ["../required"]}))

    with pytest.raises(Exception, match=r"service\.registry must name a folder"):
        install_component_flow(str(dependent))

    for name in ("venv-required", "venv-unregistrable"):
        assert platform.manager.get_worker(name) is None and platform.manager.get_service(name) is None
        assert not (environments / name).exists()
    assert component_files(platform) == files_before


@pytest.mark.parametrize(("requires", "refused"), [
    ({"cycle-a": ["../cycle-b"], "cycle-b": ["../cycle-a"]}, "in a cycle: cycle-a -> cycle-b -> cycle-a"),
    ({"escaping": ["../../../etc"]}, "which is outside"),
])
def test_requires_that_loop_or_leave_the_components_folder_are_refused_and_leave_nothing(
    platform: Platform, environments: Path, tmp_path: Path, requires: dict[str, list[str]], refused: str
) -> None:
    for name, required in requires.items():
        folder = tmp_path / "components" / name
        folder.mkdir(parents=True)
        (folder / "dcm-processor.json").write_text(json.dumps({"name": name, "version": "1", "requires": required}))

    with pytest.raises(Exception, match=refused):
        install_component_flow(str(tmp_path / "components" / next(iter(requires))))


@pytest.mark.parametrize("name", ["..", "/srv/data", "a/b", ".hidden", "", "x" * 300, "caf\u00e9"])
@pytest.mark.parametrize("named", ["component", "worker"])
def test_a_component_or_worker_name_that_is_not_a_plain_name_is_refused_before_anything_is_touched(
    platform: Platform, environments: Path, tmp_path: Path, named: str, name: str
) -> None:
    worker_name = name if named == "worker" else "plain-worker"
    folder = component(tmp_path / "hostile", name if named == "component" else "plain-component",
                       worker={"name": worker_name, "params": {}, "python_version": "3.11"})
    around, inside = environments.parent, environments
    before = [sorted(path.name for path in folder.iterdir()) for folder in (around, inside)]
    files = component_files(platform)

    with pytest.raises(Exception, match="letters, digits"):
        install_component_flow(str(folder))

    assert [sorted(path.name for path in folder.iterdir()) for folder in (around, inside)] == before
    assert component_files(platform) == files
    assert platform.manager.db.count("workers", {"query": {"name": worker_name}}) == 0


def test_a_service_whose_name_differs_only_in_case_from_an_installed_one_is_refused(
    platform: Platform, environments: Path, tmp_path: Path
) -> None:
    def service_only(name: str) -> Path:
        folder = component(tmp_path / name.lower() / name, name)
        manifest = json.loads((folder / "dcm-processor.json").read_text())
        del manifest["worker"]
        (folder / "dcm-processor.json").write_text(json.dumps(manifest))
        return folder

    install_component_flow(str(service_only("Case-Service")))
    try:
        with pytest.raises(Exception, match="differs only in case from the installed service 'Case-Service'"):
            install_component_flow(str(service_only("case-service")))
        assert "case-service" not in [service["name"] for service in platform.manager.db.find("services", {})]
    finally:
        remove_component_flow("Case-Service")


def test_the_progress_view_shows_log_lines_and_titles_with_brackets_as_they_are(stack) -> None:
    with get_client(sync_client=True) as client:
        install = client.read_deployment_by_name(deployment(INSTALL_FLOW))
        flow_run = client.create_flow_run_from_deployment(install.id, parameters={"source": "x"}, state=Completed())
        client.create_logs([LogCreate(name="test", level=20, message="[/usr/lib] copied [bold]",
                                      flow_run_id=flow_run.id, timestamp=datetime.now(timezone.utc))])
    screen = io.StringIO()

    follow_run(flow_run.id, "installing [/x]", console=Console(file=screen, width=200))

    assert "[/usr/lib] copied [bold]" in screen.getvalue() and "installing [/x]" in screen.getvalue()


@pytest.mark.parametrize("requirement", [
    "--extra-index-url https://elsewhere.example/packages", "-i https://elsewhere.example/packages",
    "--find-links=/srv/other-wheels", "six @ https://elsewhere.example/six.whl", "git+https://elsewhere.example/x",
    "-r more.txt",
])
def test_with_a_wheelhouse_a_requirement_naming_another_source_is_refused_before_anything_is_built(
    platform: Platform, environments: Path, tmp_path: Path, requirement: str
) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    WorkerHost(environments_folder=str(environments), wheelhouse=str(wheelhouse)).save("air-gapped", overwrite=True)
    folder = component(tmp_path / "sourced", "sourced", requirements=requirement,
                       files={"more.txt": "--index-url https://elsewhere.example/packages\n"})
    before = sorted(path.name for path in environments.iterdir())

    with pytest.raises(Exception, match="with a wheelhouse configured, installs use only the wheelhouse"):
        install_component_flow(str(folder), host_block="air-gapped")

    assert sorted(path.name for path in environments.iterdir()) == before
    assert platform.manager.db.count("workers", {"query": {"name": "sourced"}}) == 0


def test_a_downloaded_component_is_installed_only_when_its_sha256_matches(
    platform: Platform, environments: Path, tmp_path: Path
) -> None:
    folder = component(tmp_path / "served" / "hashed", "hashed")
    manifest = json.loads((folder / "dcm-processor.json").read_text())
    del manifest["worker"]
    (folder / "dcm-processor.json").write_text(json.dumps(manifest))
    archive = shutil.make_archive(str(tmp_path / "served" / "hashed"), "zip", folder.parent, "hashed")
    digest = hashlib.sha256(Path(archive).read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/hashed.zip"
        try:
            with pytest.raises(Exception, match="sha256 is not the one given"):
                install_component_flow(f"{url}#sha256={'0' * 64}")
            assert platform.manager.db.count("services", {"query": {"name": "hashed"}}) == 0

            install_component_flow(f"{url}#sha256={digest}")
            assert "hashed" in [service["name"] for service in platform.manager.db.find("services", {})]
        finally:
            server.shutdown()
            remove_component_flow("hashed")


@pytest.mark.parametrize(("asked", "refused"), [
    ({"user": "0"}, "does not allow user '0' \\(root\\)"),
    ({"user": "root:root"}, "does not allow user 'root:root' \\(root\\)"),
    ({"network_mode": "container:database"}, "does not allow network_mode 'container:database'"),
    ({"params": {"run_kwargs": {"ipc_mode": "host"}}}, "does not allow params.run_kwargs.ipc_mode 'host'"),
    ({"params": {"run_kwargs": {"environment": {"PREFECT_API_URL": "http://elsewhere/api"}}}},
     "may not set PREFECT_API_URL"),
    ({"params": {"run_kwargs": {"environment": {"DCM_DB_URL": "mongodb://elsewhere"}}}}, "may not set DCM_DB_URL"),
])
def test_a_docker_worker_asking_for_more_than_the_hosts_policy_allows_is_refused_naming_the_setting(
    platform: Platform, environments: Path, tmp_path: Path, asked: dict, refused: str
) -> None:
    folder = component(tmp_path / "greedy", "greedy", worker={"name": "greedy", "build": "Dockerfile", **asked},
                       files={"Dockerfile": "FROM scratch\n"})

    with pytest.raises(Exception, match=refused):
        install_component_flow(str(folder))

    assert platform.manager.db.count("workers", {"query": {"name": "greedy"}}) == 0


def test_a_host_may_allow_root_containers_in_its_policy(environments: Path) -> None:
    policy = host_settings(WorkerHost(environments_folder=str(environments), allow_root_containers=True,
                                      container_network_modes=["bridge"])).container_policy

    assert policy.allow_root and policy.network_modes == ("bridge",) and not policy.allow_host_ipc
