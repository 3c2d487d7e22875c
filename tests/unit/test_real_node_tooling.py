"""The real node's pure parts: images built byte for byte from their inputs, the configuration
it writes, and the reasons it gives where a machine cannot run it."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from controlplane import images, realnode
from controlplane.processes import Daemon, Supervisor
from controlplane.settings import ClusterSettings
from tests.helpers import eventually

needs_busybox = pytest.mark.skipif(not images.BUSYBOX.exists(), reason="busybox-static is not installed")


@needs_busybox
def test_images_are_cached_by_content_and_identical_for_the_same_inputs(tmp_path: Path) -> None:
    first = images.shell_image(tmp_path / "a")
    second = images.shell_image(tmp_path / "b")
    assert first.tar.name == second.tar.name
    assert first.tar.read_bytes() == second.tar.read_bytes()
    fake_pause = tmp_path / "pause"
    fake_pause.write_bytes(b"one")
    one = images.pause_image(tmp_path / "a", fake_pause)
    fake_pause.write_bytes(b"two")
    two = images.pause_image(tmp_path / "a", fake_pause)
    assert one.tar != two.tar  # a changed input is a new image, never a stale cached one


@needs_busybox
def test_the_shell_image_works_for_a_non_root_user(tmp_path: Path) -> None:
    image = images.shell_image(tmp_path)
    with tarfile.open(image.tar) as outer:
        index = json.loads(outer.extractfile("index.json").read())  # type: ignore[union-attr]
        assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == images.SHELL_IMAGE
        manifest_digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.loads(outer.extractfile(f"blobs/sha256/{manifest_digest}").read())  # type: ignore[union-attr]
        layer_digest = manifest["layers"][0]["digest"].split(":")[1]
        blob = outer.extractfile(f"blobs/sha256/{layer_digest}").read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(blob)) as layer:
        members = {m.name: m for m in layer.getmembers()}
        passwd = layer.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
    assert members["bin/sh"].issym()
    assert members["bin/sh"].linkname == "/bin/busybox"
    assert members["bin/busybox"].mode & stat.S_IXOTH  # anyone may run it
    assert members["tmp"].mode == 0o1777
    assert members["home/worker"].uid == 1000
    assert "worker:x:1000:1000:" in passwd


def test_containerd_configuration_is_toml_with_quoted_plugin_names() -> None:
    text = realnode.toml(
        {"version": 2, "plugins": {"io.containerd.grpc.v1.cri": {"sandbox_image": "p:v1", "on": True}}}
    )
    assert text.splitlines() == [
        "version = 2",
        "",
        "[plugins]",
        "",
        '[plugins."io.containerd.grpc.v1.cri"]',
        'sandbox_image = "p:v1"',
        "on = true",
    ]


def test_a_switched_off_real_node_says_how_it_was_switched_off(tmp_path: Path) -> None:
    settings = ClusterSettings(state_dir=tmp_path, real_node=False)
    assert "SHEPHERD_CLUSTER_REAL_NODE=false" in (realnode.unavailable_reason(settings) or "")


def test_without_root_the_reason_says_why_and_what_would_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = realnode.unavailable_reason(ClusterSettings(state_dir=tmp_path, real_node=True)) or ""
    assert "needs root" in reason
    assert "SHEPHERD_CLUSTER_REAL_NODE=false" in reason


def test_a_daemon_without_a_port_starts_and_stops(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path)
    pid = supervisor.start(Daemon("sleeper", ["/bin/sh", "-c", "sleep 60", str(tmp_path)], None))
    assert eventually(lambda: supervisor.pid("sleeper"), what="the daemon to run", timeout=10) == pid
    assert pid in supervisor.stop_all(["sleeper"], timeout=5)
