"""A throw-away virtualenv with a real Airflow and the executor package, and nothing of Shepherd's.

The executor's tests run the executor class in it, and the real Airflow deployment
(controlplane/airflow.py) runs its scheduler, DAG processor and API server from it.

Built once per Airflow release and package requirements, outside the checkout under
`~/.cache/shepherd/airflow/` (or `$SHEPHERD_CACHE_DIR/airflow/`), so a test run after the first
starts warm; a build that did not finish leaves no stamp and is redone. The package is installed
when the venv is built (so its dependencies resolve with Airflow's), but the venv's processes run
this checkout's package source, first on their path (see `AirflowVenv.env`): several checkouts
share the venv, and nothing of the services' packages is on that path.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "integrations" / "airflow"

# What the issue targets: the current Airflow 3 release with the current Kubernetes provider (its
# kubernetes client builds the pod_override V1Pods in the tests, and its KubernetesExecutor is the
# benchmark's baseline), and the last 2.10. Airflow 3's PostgreSQL drivers: psycopg2 for the
# metadata database's sync engine, asyncpg for the API server's async one.
AIRFLOW_3 = (
    "3.3.2",
    ["apache-airflow-providers-cncf-kubernetes==10.25.0", "psycopg2-binary==2.9.13", "asyncpg==0.32.0"],
)
AIRFLOW_2 = ("2.10.5", ["apache-airflow-providers-cncf-kubernetes==10.1.0"])


def cache_root() -> Path:
    base = os.environ.get("SHEPHERD_CACHE_DIR") or str(Path.home() / ".cache" / "shepherd")
    return Path(base) / "airflow"


@dataclass(frozen=True)
class AirflowVenv:
    path: Path
    airflow_version: str
    build_seconds: float | None  # None: reused from the cache

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def env(self, home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean environment for the venv's processes, Airflow's home in `home`. Its PYTHONPATH
        is this checkout's executor package source and nothing else: the venv is shared by every
        checkout using the cache, so the code under test is put first on the path rather than
        installed into it (two checkouts installing their own copies in turn ran each other's
        code), and the services' packages at the repository's root stay out of reach."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "AIRFLOW", "VIRTUAL_ENV"))}
        env.update(
            {
                "PYTHONPATH": str(PACKAGE / "src"),
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__API_AUTH__JWT_SECRET": "shepherd-test-secret-not-for-production",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra or {})
        return env

    def run(self, args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
        """The venv's Python with `args`, in `home`, in the clean environment; output captured."""
        return subprocess.run(
            [str(self.python), *args],
            env=self.env(home),
            cwd=home,
            capture_output=True,
            text=True,
            check=False,
        )


def _key(airflow_version: str, extras: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(f"{sys.version_info[:2]}|{airflow_version}|{extras}".encode())
    digest.update((PACKAGE / "pyproject.toml").read_bytes())
    return f"{airflow_version}-py{sys.version_info[0]}{sys.version_info[1]}-{digest.hexdigest()[:12]}"


def _pip(venv: Path, *args: str) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _package_copy(into: Path) -> Path:
    """The package's tree, copied: building it leaves build/ and egg-info behind, not in the checkout."""
    target = into / "shepherd-airflow"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    return target


def ensure(airflow_version: str, extras: list[str]) -> AirflowVenv:
    """The cached venv for this Airflow, built now if missing (with the package, for its
    dependencies); its processes run this checkout's package source (see `AirflowVenv.env`)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / _key(airflow_version, extras)
    stamp = path / ".complete"
    build_seconds: float | None = None
    with (root / ".lock").open("w") as lock, tempfile.TemporaryDirectory() as scratch:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test sessions never build the same venv at once
        if not stamp.exists():
            package = _package_copy(Path(scratch))
            shutil.rmtree(path, ignore_errors=True)
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
            # The package's own requirements resolve together with this Airflow release, exactly
            # as `pip install apache-airflow==X shepherd-airflow` would in a deployment.
            _pip(path, "install", f"apache-airflow=={airflow_version}", *extras, str(package))
            build_seconds = time.monotonic() - started
            stamp.write_text(f"{build_seconds:.1f}\n")
    return AirflowVenv(path, airflow_version, build_seconds)
