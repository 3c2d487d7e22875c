"""buf STANDARD + COMMENTS lint of protos/ runs with the tests, not only in an editor."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_protos_pass_buf_lint() -> None:
    buf = REPO / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "buf is not installed: run `make tools`"
    result = subprocess.run(
        [str(buf), "lint", "protos"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"buf lint found problems:\n{result.stdout}{result.stderr}"


def test_proto_package_is_versioned() -> None:
    for proto in (REPO / "protos" / "shepherd" / "v1").glob("*.proto"):
        assert "package shepherd.v1;" in proto.read_text(), proto.name
