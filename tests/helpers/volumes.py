"""Real filesystems that misbehave on cue, for store-failure tests (they need root): a size-limited
tmpfs that a ballast file fills, and an ext4 loop volume that an injected filesystem error
remounts read-only, the way ext4 protects itself after a disk error. Every mount is undone when
the block ends, even if the test failed."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _unmount(path: Path) -> None:
    """Unmount, lazily if something still holds a file there, so no mount outlives the test."""
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, *, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _unmount(path)


def remount(path: Path, *options: str) -> None:
    _run("mount", "-o", ",".join(("remount", *options)), str(path))


def fill(directory: Path) -> Path:
    """Fill the filesystem holding `directory` with a ballast file, up to the last byte; its path."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (_CHUNK, 4096, 1):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return ballast


@dataclass
class Ext4Volume:
    """An ext4 filesystem in an image file, loop-mounted at `path` with errors=remount-ro."""

    image: Path
    path: Path

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _run("mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.path))

    def fail(self) -> None:
        """Inject a filesystem error: ext4 aborts its journal and goes read-only under open files."""
        device = subprocess.run(
            ["findmnt", "-no", "SOURCE", str(self.path)], check=True, capture_output=True, text=True
        ).stdout.strip()
        Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("shepherd fault test\n")

    def repair(self) -> None:
        """What an operator does once nothing uses the volume: unmount, check, mount again."""
        _run("umount", str(self.path))
        subprocess.run(["e2fsck", "-fy", str(self.image)], capture_output=True)  # 1: errors fixed
        self.mount()


@contextlib.contextmanager
def ext4_volume(directory: Path, *, size_mb: int = 32) -> Iterator[Ext4Volume]:
    """A fresh ext4 volume mounted at `directory`/mnt for the block."""
    directory.mkdir(parents=True, exist_ok=True)
    volume = Ext4Volume(directory / "ext4.img", directory / "mnt")
    with volume.image.open("wb") as image:
        image.truncate(size_mb << 20)
    _run("mkfs.ext4", "-q", "-F", str(volume.image))
    volume.mount()
    try:
        yield volume
    finally:
        _unmount(volume.path)
