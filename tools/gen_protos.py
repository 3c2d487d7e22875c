"""Regenerate the Python code for protos/ into shepherd/v1 (messages, gRPC stubs and .pyi stubs).

One command, one output place: every service imports the same generated package, and
tests/contract/test_generated_code.py fails when the committed output differs from what this
script produces, so stale code never lands.

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="output root (default: the repository)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
