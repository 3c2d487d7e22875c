"""The images the local cluster's real node runs, built from Dockerfiles in the repository on a
machine with no registry and no Docker, and imported into the real node's containerd: the
services' image (the repository's Dockerfile) and the Airflow worker image
(integrations/airflow/worker/Dockerfile: Airflow, the Kubernetes provider and the test DAGs, for
controlplane/airflow.py). Each is an `ImageRecipe`; one builder makes both.

Three steps, each cached by the hash of what goes into it, outside the checkout:
1. a Debian base with Python (mmdebstrap writes a root filesystem tar), added to buildah's own
   storage as `shepherd.local/debian-python:<hash>`, shared by every recipe;
2. the recipe's Dockerfile built by buildah with `--build-arg BASE=<that image>`, saved as a
   docker-archive tar `<repository>:<hash of the Dockerfile and everything it copies>`;
3. that tar imported into the real node's containerd, unless the node already has the image.
A second run with the same inputs only finds the tar and the node's image and returns.

buildah keeps its layers under the build cache too (not /var/lib/containers), and runs the
Dockerfile's RUN steps with chroot isolation on the host's network: `pip install .` fetches the
dependencies from the package index as on any build machine, with the machine's pip.conf and CA
bundle mounted read-only for those steps only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from controlplane import realnode
from controlplane.settings import ClusterSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_REPOSITORY = "shepherd.local/debian-python"


@dataclass(frozen=True)
class ImageRecipe:
    """One image: its Dockerfile, the build context, and what of the context goes into it."""

    repository: str  # the image's name without the tag (the tag is the input hash)
    context: str  # the build context, relative to the repository's root
    dockerfile: str  # relative to the context
    inputs: tuple[str, ...]  # what the Dockerfile copies and the build files, relative to the context
    tar_prefix: str  # cached tars are <prefix>-<hash>.tar
    # buildah's layer cache: a change to the DAGs does not reinstall Airflow (the services' image
    # is small enough to build whole).
    layers: bool = False


# What the Dockerfile copies (as .dockerignore lets through), plus the two build files themselves.
SERVICES = ImageRecipe(
    repository="shepherd.local/shepherd",
    context=".",
    dockerfile="Dockerfile",
    inputs=(
        "Dockerfile",
        ".dockerignore",
        "pyproject.toml",
        "README.md",
        "shepherd",
        "services",
        "deploy/pod-templates",
    ),
    tar_prefix="shepherd",
)
AIRFLOW_WORKER = ImageRecipe(
    repository="shepherd.local/airflow-worker",
    context="integrations/airflow",
    dockerfile="worker/Dockerfile",
    inputs=("worker/Dockerfile", ".dockerignore", "dags"),
    tar_prefix="airflow-worker",
    layers=True,
)
REPOSITORY = SERVICES.repository
INPUTS = SERVICES.inputs
# The base: Debian's own Python 3.11 with venv, and CA certificates for pip. `python` is what the
# Dockerfile and the Deployments run. Manuals and translations are left out; licences stay.
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
_DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
# Bump when the way an image is made changes, so tars made the old way are not reused.
_RECIPE = "1"
_KEEP_TARS = 3
_HOST_BUILD_CONFIG = (Path("/etc/pip.conf"), Path("/etc/ssl/certs/ca-certificates.crt"))
TOOLS = {"mmdebstrap": Path("/usr/bin/mmdebstrap"), "buildah": Path("/usr/bin/buildah")}
_FIX = "or build the Dockerfile with any container engine and import the tar with `ctr images import`"


class ImageBuildError(RuntimeError):
    """The image could not be built or imported; the message names the failing command."""


@dataclass(frozen=True)
class ServiceImage:
    name: str  # shepherd.local/shepherd:<hash>, as the Deployments name it
    tar: Path
    built: bool  # False: the cached tar was reused
    imported: bool  # False: the node already had it, or importing was not asked for
    seconds: float


def _log(msg: str) -> None:
    print(f"[image {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _files(root: Path, inputs: tuple[str, ...]) -> list[Path]:
    found: list[Path] = []
    for entry in inputs:
        path = root / entry
        if path.is_dir():
            found += [
                p
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".pyo"}
            ]
        elif path.exists():
            found.append(path)
    return sorted(found)


def input_hash(root: Path = REPO_ROOT, recipe: ImageRecipe = SERVICES) -> str:
    """The hash of everything the image is made from: the recipe, the base, and each input file's
    path and bytes. Unchanged inputs give the same image name, so the cached tar is reused."""
    digest = hashlib.sha256(f"{_RECIPE}\0{base_hash()}\0".encode())
    context = root / recipe.context
    for path in _files(context, recipe.inputs):
        digest.update(str(path.relative_to(context)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def base_hash() -> str:
    recipe = "\0".join([_RECIPE, SUITE, MIRROR, *BASE_PACKAGES, *_DPKG_OPTIONS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def image_name(root: Path = REPO_ROOT, recipe: ImageRecipe = SERVICES) -> str:
    return f"{recipe.repository}:{input_hash(root, recipe)}"


def _run(argv: list[str], *, timeout: float = 1800) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip())[-1500:]
        raise ImageBuildError(f"`{' '.join(argv)}` failed (exit {done.returncode}):\n{tail}")
    return done.stdout


class Builder:
    """Builds with buildah whose storage lives under the build cache."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.cache = settings.image_cache_dir
        self.storage = settings.cache_dir / "buildah"

    def _buildah(self, *args: str, timeout: float = 1800) -> str:
        return _run(
            [
                "buildah",
                "--root",
                str(self.storage / "storage"),
                "--runroot",
                str(self.storage / "run"),
                "--storage-driver",
                "overlay",
                *args,
            ],
            timeout=timeout,
        )

    def _has_image(self, name: str) -> bool:
        try:
            self._buildah("inspect", "--type", "image", name, timeout=60)
        except ImageBuildError:
            return False
        return True

    def base(self) -> str:
        """The Debian base in buildah's storage (made, and its tar cached, on first use)."""
        name = f"{BASE_REPOSITORY}:{base_hash()}"
        if self._has_image(name):
            return name
        tar = self.cache / f"debian-python-{base_hash()}.tar"
        if not tar.is_file():
            _log(f"making the Debian {SUITE} base with mmdebstrap ({', '.join(BASE_PACKAGES)})")
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = tar.with_suffix(f".tmp{os.getpid()}")
            _run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    "--mode=root",
                    "--format=tar",
                    f"--include={','.join(BASE_PACKAGES)}",
                    *(f"--dpkgopt={o}" for o in _DPKG_OPTIONS),
                    SUITE,
                    str(tmp),
                    MIRROR,
                ]
            )
            tmp.replace(tar)
        _log(f"adding the base to buildah's storage as {name}")
        container = self._buildah("from", "scratch").strip()
        try:
            self._buildah("add", container, str(tar), "/")
            self._buildah(
                "config", "--env", "PATH=/usr/local/bin:/usr/bin:/bin", "--cmd", "python3", container
            )
            self._buildah("commit", "--quiet", container, name)
        finally:
            self._buildah("rm", container)
        return name

    def build(self, name: str, tar: Path, root: Path, recipe: ImageRecipe = SERVICES) -> None:
        base = self.base()
        context = root / recipe.context
        _log(f"building {context / recipe.dockerfile} on {base} with buildah")
        # The machine's own package-index settings and CA bundle (a TLS-intercepting proxy's CA,
        # say) serve the RUN steps, mounted read-only: they never end up in the image.
        volumes = [f"--volume={p}:{p}:ro" for p in _HOST_BUILD_CONFIG if p.is_file()]
        self._buildah(
            "build",
            "--isolation",
            "chroot",
            "--pull=never",
            f"--layers={str(recipe.layers).lower()}",
            "--force-rm",  # a failed step leaves no working container holding the layers
            *volumes,
            "--build-arg",
            f"BASE={base}",
            "--tag",
            name,
            "--file",
            str(context / recipe.dockerfile),
            str(context),
        )
        tmp = tar.with_suffix(f".tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        self._buildah("push", "--quiet", name, f"docker-archive:{tmp}:{name}")
        tmp.replace(tar)
        # The tar is the cache; the store keeps only the base (and buildah's layers of it, and a
        # layered recipe's cached steps). The tar is made, so a tag that will not go is no failure.
        try:
            self._buildah("rmi", name)
        except ImageBuildError as err:
            _log(f"kept {name} in buildah's storage: {err}")


def ensure_tools() -> None:
    realnode.ensure_packages(TOOLS, _FIX, ImageBuildError)


def build(
    settings: ClusterSettings,
    root: Path = REPO_ROOT,
    *,
    import_to_node: bool = True,
    recipe: ImageRecipe = SERVICES,
) -> ServiceImage:
    """The recipe's image (the services' by default) for these sources: built unless its tar is
    cached, then imported into the real node's containerd unless the node already has it. Two
    processes asking for the same image at once build it once (a lock under the image cache)."""
    started = time.monotonic()
    name = image_name(root, recipe)
    tar = settings.image_cache_dir / f"{recipe.tar_prefix}-{name.rsplit(':', 1)[1]}.tar"
    built = False
    settings.image_cache_dir.mkdir(parents=True, exist_ok=True)
    with (settings.image_cache_dir / f".{recipe.tar_prefix}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tar.exists():
            ensure_tools()
            Builder(settings).build(name, tar, root, recipe)
            built = True
    if built:
        # Tars of older sources are rarely used again; a few stay for other checkouts sharing the cache.
        tars = sorted(
            settings.image_cache_dir.glob(f"{recipe.tar_prefix}-*.tar"), key=lambda t: t.stat().st_mtime
        )
        for old in tars[:-_KEEP_TARS]:
            old.unlink(missing_ok=True)
    imported = False
    if import_to_node:
        imported = import_image(name, tar)
    return ServiceImage(name, tar, built, imported, time.monotonic() - started)


def import_image(name: str, tar: Path) -> bool:
    """Import into the real node's containerd (the CRI's namespace), unless it has the image."""
    if not realnode.CONTAINERD_SOCKET.exists():
        raise ImageBuildError(
            f"the real node's containerd is not running ({realnode.CONTAINERD_SOCKET} is missing): "
            "start the cluster with its real node (`make cluster-up`) first"
        )
    present = realnode.ctr("images", "list", "--quiet", f"name=={name}").split()
    if name in present:
        return False
    _log(f"importing {name} into the real node's containerd")
    realnode.ctr("images", "import", str(tar))
    return True
