"""The real node's container images, built on the machine because no registry is reachable.

Two images: the sandbox (`pause`, from controlplane/pause.go) and a small shell image (Debian's
static busybox with its applets). Each is written as an OCI image-layout tar that `ctr images
import` understands. Every byte of a tar follows from its inputs (fixed timestamps and owners), so
the tars are cached by the hash of what goes in and only rebuilt when an input changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

REGISTRY = "shepherd.local"
PAUSE_IMAGE = f"{REGISTRY}/pause:v1"
SHELL_IMAGE = f"{REGISTRY}/shell:v1"
BUSYBOX = Path("/bin/busybox")
# Bump when the layout of an image changes, so cached tars of the old layout are not reused.
_RECIPE = "2"
_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A non-root user exists in the shell image, so pods that run as uid 1000 have a name and a home.
_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "worker:x:1000:1000:worker:/home/worker:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
_GROUP = "root:x:0:\nworker:x:1000:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class Image:
    name: str
    tar: Path


@dataclass(frozen=True)
class _Entry:
    path: str
    kind: bytes  # tarfile.DIRTYPE, REGTYPE or SYMTYPE
    mode: int = 0o755
    data: bytes = b""
    target: str = ""
    uid: int = 0


def _layer(entries: list[_Entry]) -> bytes:
    """A tar every byte of which follows from `entries`: sorted, owned by root, dated 1970."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(entries, key=lambda e: e.path):
            info = tarfile.TarInfo(entry.path)
            info.type = entry.kind
            info.mode = entry.mode
            info.uid = info.gid = entry.uid
            info.mtime = 0
            if entry.kind == tarfile.SYMTYPE:
                info.linkname = entry.target
                tar.addfile(info)
            elif entry.kind == tarfile.REGTYPE:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _dirs(*paths: str, mode: int = 0o755) -> list[_Entry]:
    return [_Entry(p, tarfile.DIRTYPE, mode) for p in paths]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _write_oci_tar(path: Path, name: str, layer: bytes, config: dict[str, object]) -> None:
    """An OCI image layout (one uncompressed layer) in a tar, named for `ctr images import`."""
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        "history": [{"created_by": "shepherd controlplane/images.py"}],
    }
    config_bytes = json.dumps(config_doc, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": _digest(layer),
                "size": len(layer),
            }
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _digest(manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                },
            }
        ],
    }
    files = [
        _Entry("oci-layout", tarfile.REGTYPE, 0o644, b'{"imageLayoutVersion":"1.0.0"}'),
        _Entry("index.json", tarfile.REGTYPE, 0o644, json.dumps(index, sort_keys=True).encode()),
        *_dirs("blobs", "blobs/sha256"),
        *(
            _Entry(f"blobs/sha256/{_digest(blob)[7:]}", tarfile.REGTYPE, 0o644, blob)
            for blob in (layer, config_bytes, manifest_bytes)
        ),
    ]
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(_layer(files))
    tmp.replace(path)


def _cached(cache_dir: Path, stem: str, inputs: list[bytes]) -> tuple[Path, bool]:
    """Where the tar for these inputs lives, and whether it is already there."""
    key = hashlib.sha256(_RECIPE.encode() + b"".join(hashlib.sha256(i).digest() for i in inputs))
    path = cache_dir / f"{stem}-{key.hexdigest()[:16]}.tar"
    return path, path.exists()


def pause_image(cache_dir: Path, pause_binary: Path) -> Image:
    binary = pause_binary.read_bytes()
    path, done = _cached(cache_dir, "pause", [binary])
    if not done:
        cache_dir.mkdir(parents=True, exist_ok=True)
        layer = _layer([_Entry("pause", tarfile.REGTYPE, 0o755, binary)])
        _write_oci_tar(
            path, PAUSE_IMAGE, layer, {"Entrypoint": ["/pause"], "User": "65535:65535", "Env": [_PATH]}
        )
    return Image(PAUSE_IMAGE, path)


def shell_image(cache_dir: Path, busybox: Path = BUSYBOX) -> Image:
    """busybox with every applet linked, /tmp writable by anyone and a `worker` user (uid 1000)."""
    binary = busybox.read_bytes()
    path, done = _cached(cache_dir, "shell", [binary, _PASSWD.encode(), _GROUP.encode()])
    if done:
        return Image(SHELL_IMAGE, path)
    applets = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    entries = [
        *_dirs("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "var", "home"),
        _Entry("root", tarfile.DIRTYPE, 0o700),
        _Entry("tmp", tarfile.DIRTYPE, 0o1777),
        _Entry("var/tmp", tarfile.DIRTYPE, 0o1777),
        _Entry("home/worker", tarfile.DIRTYPE, 0o755, uid=1000),
        _Entry("bin/busybox", tarfile.REGTYPE, 0o755, binary),
        _Entry("etc/passwd", tarfile.REGTYPE, 0o644, _PASSWD.encode()),
        _Entry("etc/group", tarfile.REGTYPE, 0o644, _GROUP.encode()),
        *(_Entry(a, tarfile.SYMTYPE, 0o777, target="/bin/busybox") for a in applets if a != "bin/busybox"),
    ]
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_oci_tar(path, SHELL_IMAGE, _layer(entries), {"Cmd": ["sh"], "Env": [_PATH]})
    return Image(SHELL_IMAGE, path)
