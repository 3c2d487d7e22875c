"""The stateful services' stores on small file systems of their own, so that a store that fills up
or stops taking writes is a real one, not a mock.

Each store lives on its own loop-mounted ext4 image (in /dev/shm, so its fsyncs cost no disk
I/O). "Full" is a ballast file that takes every free block, then goes. "Read-only" cannot be a
`mount -o remount,ro`: the kernel refuses that (EBUSY) while SQLite holds the files open for
writing, which is exactly when it matters. Instead the database file, its WAL and the directory
are made immutable (chattr +i): every write to them then fails with EPERM, which SQLite reports
as a disk I/O error, as it would on a file system gone read-only under it. The shared-memory
file (-shm) is left alone: it is mmapped, and a write fault on an immutable mapping is SIGBUS, a
way to die that a read-only file system never offers.

Needs root and e2fsprogs; `available()` says whether the disk faults can run here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

_TOOLS = ("mount", "umount", "mkfs.ext4", "chattr", "truncate")
BALLAST = "ballast"


def available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in _TOOLS)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)


class StoreDisks:
    """One loop-mounted ext4 file system per store name. Use as a context manager: leaving it
    always unmounts, whatever state the faults left the file systems in."""

    def __init__(self, images: Path, mounts: Path, names: tuple[str, ...], size_mb: int = 64) -> None:
        self._images = images
        self._mounts = mounts
        self._names = names
        self._size_mb = size_mb
        self._mounted: list[Path] = []

    def __enter__(self) -> StoreDisks:
        self._images.mkdir(parents=True, exist_ok=True)
        try:
            for name in self._names:
                image = self._images / f"{name}.img"
                mount = self.directory(name)
                mount.mkdir(parents=True, exist_ok=True)
                _run("truncate", "-s", f"{self._size_mb}M", str(image))
                # -m 0: no blocks reserved for root, so "full" means full for the services too.
                _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
                _run("mount", "-o", "loop", str(image), str(mount))
                self._mounted.append(mount)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def directory(self, name: str) -> Path:
        return self._mounts / name

    def store_path(self, name: str) -> Path:
        return self.directory(name) / f"{name}.db"

    def fill(self, name: str) -> int:
        """Take every free block of the store's file system; returns the bytes taken."""
        stat = os.statvfs(self.directory(name))
        free = stat.f_bavail * stat.f_frsize
        taken = 0
        # Unbuffered: a buffered file would raise ENOSPC again when it is closed.
        with (self.directory(name) / BALLAST).open("wb", buffering=0) as ballast:
            with contextlib.suppress(OSError):
                os.posix_fallocate(ballast.fileno(), 0, max(free - 1024 * 1024, 1))
                taken = free - 1024 * 1024
            ballast.seek(0, os.SEEK_END)
            chunk = b"\0" * 65536
            try:  # the last blocks, which fallocate leaves for metadata, go by hand
                while written := ballast.write(chunk):
                    taken += written
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
            os.fsync(ballast.fileno())
        return taken

    def free(self, name: str) -> None:
        (self.directory(name) / BALLAST).unlink(missing_ok=True)

    def _writable_paths(self, name: str) -> list[Path]:
        db = self.store_path(name)
        return [p for p in (db, Path(f"{db}-wal"), self.directory(name)) if p.exists()]

    def read_only(self, name: str) -> None:
        _run("chattr", "+i", *map(str, self._writable_paths(name)))

    def writable(self, name: str) -> None:
        _run("chattr", "-i", *map(str, self._writable_paths(name)))

    def close(self) -> None:
        for mount in reversed(self._mounted):
            name = mount.name
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.writable(name)
            with contextlib.suppress(OSError):
                self.free(name)
            try:
                _run("umount", str(mount))
            except subprocess.CalledProcessError:
                # Something still holds a file there (a service that would not die): detach it
                # now, and the kernel finishes the unmount when the last file is closed.
                with contextlib.suppress(subprocess.CalledProcessError):
                    _run("umount", "-l", str(mount))
        self._mounted.clear()
        shutil.rmtree(self._images, ignore_errors=True)
