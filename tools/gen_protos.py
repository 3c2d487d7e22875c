"""Regenerate the Python code for protos/ into shepherd/v1 (messages, gRPC stubs and .pyi stubs).

One command, one output place: every service imports the same generated package, and
tests/contract/test_generated_code.py fails when the committed output differs from what this
script produces, so stale code never lands.

The Airflow executor (integrations/airflow) installs on its own, without the services, so it
carries a copy of the same generated code under its own package, shepherd_airflow.v1: the same
protoc output with the imports between the generated modules renamed to that package. Both copies
register identical descriptors, so a process may import both.

Usage: python tools/gen_protos.py [--out DIR]   (DIR defaults to the repository root)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PACKAGE_DIR = Path("shepherd") / "v1"
INIT_TEXT = '"""Generated from protos/shepherd/v1 by tools/gen_protos.py; do not edit."""\n'
AIRFLOW_SRC = Path("integrations") / "airflow" / "src"
AIRFLOW_PACKAGE_DIR = Path("shepherd_airflow") / "v1"


def generate(out_root: Path) -> list[Path]:
    """Generate into out_root/shepherd/v1 and return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    scripts = Path(sysconfig.get_path("scripts"))
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    target = out_root / PACKAGE_DIR
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    (target / "__init__.py").write_text(INIT_TEXT)
    return sorted(target.iterdir())


def generate_airflow_copy(out_root: Path) -> list[Path]:
    """Generate the executor package's copy into out_root/integrations/airflow/src/shepherd_airflow/v1."""
    import tempfile

    target = out_root / AIRFLOW_SRC / AIRFLOW_PACKAGE_DIR
    with tempfile.TemporaryDirectory() as scratch:
        generated = generate(Path(scratch))
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for path in generated:
            text = path.read_text()
            text = text.replace("from shepherd.v1 import", "from shepherd_airflow.v1 import")
            text = text.replace("import shepherd.v1.", "import shepherd_airflow.v1.")
            text = text.replace("shepherd.v1.task_pb2.", "shepherd_airflow.v1.task_pb2.")
            (target / path.name).write_text(text)
    return sorted(target.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="output root (default: the repository)")
    args = parser.parse_args()
    for path in [*generate(args.out), *generate_airflow_copy(args.out)]:
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
