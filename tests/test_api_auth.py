"""The embedded stack's Prefect API answers only those who hold its secret: any local user who reached it could
create a `dcm-install-component` run, and so run code as the workers' user."""

from __future__ import annotations

import base64
import stat
import urllib.error
import urllib.request

import pytest

from ops.stack import LocalStack, StackState


def status_of(url: str, authorization: str | None = None, method: str = "GET") -> int:
    request = urllib.request.Request(url, data=b"{}" if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json"})
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_api_refuses_requests_without_the_stacks_secret_which_only_its_owner_can_read(
    local_stack: LocalStack, stack: StackState
) -> None:
    secret = local_stack.api_auth_file.read_text().strip()
    signed = "Basic " + base64.b64encode(secret.encode()).decode()
    wrong = "Basic " + base64.b64encode(b"dcm-flows:guess").decode()

    assert stat.S_IMODE(local_stack.api_auth_file.stat().st_mode) == 0o600
    assert status_of(f"{stack.api_url}/deployments/filter", method="POST") == 401
    assert status_of(f"{stack.api_url}/deployments/filter", wrong, method="POST") == 401
    assert status_of(f"{stack.api_url}/deployments/filter", signed, method="POST") == 200
    assert status_of(f"{stack.api_url}/health") == 200, "health checks stay open"


@pytest.mark.parametrize("readers", [0o644, 0o640])
def test_a_secret_file_others_could_read_is_refused(tmp_path, readers: int) -> None:
    stack = LocalStack(tmp_path)
    stack.api_auth()
    stack.api_auth_file.chmod(readers)

    with pytest.raises(PermissionError, match="readable by others"):
        stack.api_auth()
