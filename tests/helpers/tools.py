"""The Go-built tools some tests run (helm, the protoc plugins for Go) and the environment their
Go builds use.

`make test` builds every tool first (controlplane/build.sh, cached outside the checkout by
version); a plain `pytest` on a machine where the cache lacks a newly added tool builds it here,
the same way, instead of failing on a missing file.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from controlplane.settings import ClusterSettings

REPO = Path(__file__).resolve().parents[2]


def built_tool(name: str) -> Path:
    """The path of a binary controlplane/build.sh provides, building what is missing."""
    path = ClusterSettings().bin_dir / name
    if not path.exists():
        subprocess.run(
            ["bash", str(REPO / "controlplane" / "build.sh")], check=True, stdout=subprocess.DEVNULL
        )
    assert path.exists(), f"controlplane/build.sh did not provide {name} in {path.parent}"
    return path


def go_environment() -> dict[str, str]:
    """The environment for a test's `go build`: GOPATH (so the module cache) and GOCACHE under
    Shepherd's cache directory, keyed by the Go version, so that a repeat run (and CI on the same
    machine) compiles nothing again; module versions come only from the committed go.sum."""
    version = subprocess.run(
        ["go", "env", "GOVERSION"], capture_output=True, text=True, check=True
    ).stdout.strip()
    root = ClusterSettings().cache_dir / "go" / version
    return {
        **os.environ,
        "GOPATH": str(root / "path"),
        "GOCACHE": str(root / "build"),
        "GOFLAGS": "-buildvcs=false -mod=readonly",
        "CGO_ENABLED": "0",
    }
