"""A scheduler written in Go drives launch -> success and launch -> failure over mutual TLS, with a
scheduler certificate of its own from the local PKI.

Its gRPC code is generated here, from protos/ alone, by protoc-gen-go and protoc-gen-go-grpc (built
from the Go module proxy by controlplane/build.sh) with no option but the output directory: the
protos' go_package says where the code goes and what its package is called. So this is what a Go
team gets from the contract, and nothing of Shepherd's Python code is involved.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controlplane import Cluster
from controlplane.stack import ServiceStack
from tests.helpers import unique_name
from tests.helpers.audit import LAUNCHER, calls_by_pod
from tests.helpers.tools import built_tool, go_environment

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "tests" / "clients" / "go"
# Where protoc-gen-go writes the package, by the protos' go_package; the client's go.mod replaces
# the module with this directory.
GO_MODULE = "github.com/shepherd-dev/shepherd/gen/go"


def well_known_protos() -> Path:
    """The well-known types (google/protobuf/*.proto) that grpcio-tools ships with its protoc,
    the protoc tools/gen_protos.py runs too."""
    spec = importlib.util.find_spec("grpc_tools")
    assert spec is not None, "grpcio-tools is not installed"
    assert spec.origin is not None
    return Path(spec.origin).parent / "_proto"


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client, built in a scratch copy of tests/clients/go from freshly generated code."""
    work = tmp_path_factory.mktemp("goclient")
    for name in ("go.mod", "go.sum", "main.go"):
        shutil.copy(CLIENT / name, work / name)
    generated = work / "gen"
    generated.mkdir()
    protos = sorted(
        str(p.relative_to(REPO / "protos")) for p in (REPO / "protos" / "shepherd" / "v1").glob("*.proto")
    )
    protoc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'protos'}",
            f"-I{well_known_protos()}",
            f"--plugin=protoc-gen-go={built_tool('protoc-gen-go')}",
            f"--plugin=protoc-gen-go-grpc={built_tool('protoc-gen-go-grpc')}",
            f"--go_out={generated}",
            f"--go-grpc_out={generated}",
            *protos,
        ],
        cwd=REPO / "protos",
        capture_output=True,
        text=True,
        check=False,
    )
    assert protoc.returncode == 0, f"protoc failed:\n{protoc.stderr}"
    package = generated / GO_MODULE
    assert sorted(p.name for p in (package / "shepherd" / "v1").iterdir()) == sorted(
        [f"{Path(p).stem}.pb.go" for p in protos]
        + [f"{Path(p).stem}_grpc.pb.go" for p in protos if Path(p).stem.endswith("_service")]
    )
    (package / "go.mod").write_text(f"module {GO_MODULE}\n\ngo 1.24\n")
    build = subprocess.run(
        ["go", "build", "-o", str(work / "goclient"), "."],
        cwd=work,
        env=go_environment(),
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert build.returncode == 0, f"go build failed:\n{build.stderr}"
    return work / "goclient"


@pytest.fixture(scope="module")
def outcomes(go_client: Path, stack: ServiceStack) -> dict[str, Any]:
    """What the client saw of its two tasks; it also checks them itself and exits 1 if wrong."""
    identity = stack.authority.scheduler("go-client")
    result = subprocess.run(
        [
            str(go_client),
            "-launcher",
            stack.address("launcher"),
            "-reconciler",
            stack.address("reconciler"),
            "-ca",
            str(identity.ca),
            "-cert",
            str(identity.cert),
            "-key",
            str(identity.key),
            "-run-id",
            unique_name("go"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"go client failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    seen: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return seen


def test_a_go_client_sees_a_launch_succeed(outcomes: dict[str, Any]) -> None:
    succeeded = outcomes["succeeds"]
    assert succeeded["states"] == ["TASK_STATE_QUEUED", "TASK_STATE_RUNNING", "TASK_STATE_SUCCEEDED"]
    assert succeeded["failure"] is None


def test_a_go_client_sees_a_launch_fail_with_details(outcomes: dict[str, Any]) -> None:
    failed = outcomes["fails"]
    # Exactly one terminal state, the last one (the client also refuses a change after it).
    assert failed["states"][-1] == "TASK_STATE_FAILED"
    assert failed["states"].count("TASK_STATE_FAILED") == 1
    assert failed["failure"]["reason"] == "PodFailed"
    assert failed["failure"]["container"]["exit_code"] == 4
    assert failed["failure"]["container"]["kind"] == "CONTAINER_KIND_MAIN"


def test_each_of_its_tasks_had_one_pod_created_once(outcomes: dict[str, Any]) -> None:
    pods = {outcomes[task]["pod_name"] for task in ("succeeds", "fails")}
    assert len(pods) == 2, outcomes
    # The API server's audit log is the witness, whatever the services recorded.
    assert calls_by_pod(Cluster().audit_log, "create", LAUNCHER, pods) == dict.fromkeys(pods, 1)
