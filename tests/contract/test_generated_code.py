"""The committed protobuf code must be exactly what tools/gen_protos.py produces now."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "tools" / "gen_protos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    written = _load_generator().generate(tmp_path)
    fresh = {p.name for p in written}
    committed = {p.name for p in (REPO / "shepherd" / "v1").iterdir() if p.is_file()}
    assert fresh == committed, "generated file set differs: run `make protos`"
    stale = [
        name
        for name in sorted(fresh)
        if not filecmp.cmp(
            tmp_path / "shepherd" / "v1" / name, REPO / "shepherd" / "v1" / name, shallow=False
        )
    ]
    assert not stale, f"generated code is stale ({', '.join(stale)}): run `make protos` and commit"


def test_generated_messages_carry_type_stubs() -> None:
    for proto in (REPO / "protos" / "shepherd" / "v1").glob("*.proto"):
        assert (REPO / "shepherd" / "v1" / f"{proto.stem}_pb2.pyi").exists()
        assert (REPO / "shepherd" / "v1" / f"{proto.stem}_pb2_grpc.pyi").exists()


def test_the_airflow_packages_copy_matches_the_protos(tmp_path: Path) -> None:
    """integrations/airflow carries its own copy (it installs without the services): same output,
    imports renamed to shepherd_airflow.v1."""
    written = _load_generator().generate_airflow_copy(tmp_path)
    committed_dir = REPO / "integrations" / "airflow" / "src" / "shepherd_airflow" / "v1"
    assert {p.name for p in written} == {p.name for p in committed_dir.iterdir() if p.is_file()}
    stale = [p.name for p in written if not filecmp.cmp(p, committed_dir / p.name, shallow=False)]
    assert not stale, f"the Airflow package's generated code is stale ({', '.join(stale)}): run `make protos`"
    assert not any("from shepherd.v1" in p.read_text() for p in written)
