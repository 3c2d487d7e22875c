"""One real node (kubelet + containerd + runc + CNI bridge) beside the kwok nodes.

kwok nodes make scale cheap but run nothing: no exit codes, no logs, no OOM kills, no image pulls.
The real node runs real containers, tainted so that only pods asking for it land there.

A kubelet changes the host it runs on: sysctls, mounts, network namespaces, a bridge, cgroups,
CNI caches. Before anything starts, what the host looked like is written to a machine-wide record
in /run (which a reboot clears, as it clears those changes), so `down`, or the next `up` after a
crash, puts the host back as it was. The record also says which cluster owns the node: only one
kubelet can run on a machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane import images
from controlplane.kubeapi import AdminClient, ApiError
from controlplane.processes import Daemon, Supervisor
from controlplane.settings import ClusterSettings

RUN_DIR = Path("/run/shepherd-real-node")
RECORD = RUN_DIR / "host.json"
CONTAINERD_SOCKET = RUN_DIR / "containerd.sock"
CNI_BIN_DIR = Path("/usr/lib/cni")
TAINT_KEY = "shepherd.dev/real-node"
NODE_LABEL = "shepherd.dev/real-node"
CGROUP_ROOT = "shepherd-real-node"
CNI_NETWORK = "shepherd-real-node"
# Debian package -> a file it installs: what the node needs from the host.
PACKAGES = {
    "containerd": Path("/usr/bin/containerd"),
    "runc": Path("/usr/sbin/runc"),
    "containernetworking-plugins": CNI_BIN_DIR / "bridge",
    "busybox-static": images.BUSYBOX,
    "iproute2": Path("/usr/sbin/ip"),
}
# Host settings the kubelet (first five) and the CNI bridge plugin (the last) change.
SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
)
# Host directories the kubelet, containerd or the CNI plugins create when missing.
# (/var/lib/kubelet/device-plugins and /var/log/containers are fixed paths in the kubelet; /run/containerd
# holds the shims' sockets; /var/lib/cni the CNI result cache.)
HOST_DIRS = (
    Path("/run/netns"),
    Path("/var/lib/cni"),
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/run/containerd"),
)
_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21
_MNT_DETACH = 2
_FIX = "set SHEPHERD_CLUSTER_REAL_NODE=false to run with the kwok nodes only"


class RealNodeUnavailable(RuntimeError):
    """This machine cannot run the real node; the message says why and what would fix it."""


class RealNodeError(RuntimeError):
    """The real node failed to start on a machine that should run it (a bug, or a broken host)."""


@dataclass
class HostRecord:
    """What the host looked like before the node started, and who owns the node."""

    state_dir: str
    node_dir: str
    sysctls: dict[str, str]
    bridge: str
    bridge_existed: bool
    netns_before: list[str]
    dirs_existed: dict[str, bool]
    cgroups_created: list[str] = field(default_factory=list)


def _log(msg: str) -> None:
    import sys

    print(f"[real-node {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- can this machine run it? ----------------------------------------------------------------


def _capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def node_ip() -> str | None:
    """The machine's first global IPv4 address: a kubelet may not use loopback as its node IP."""
    try:
        out = subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "scope", "global"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for link in json.loads(out or "[]"):
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet" and not link.get("ifname", "").startswith(
                ("shepherd", "cni", "veth")
            ):
                return str(addr["local"])
    return None


def unavailable_reason(settings: ClusterSettings) -> str | None:
    """Why this machine cannot run the real node right now, with what would fix it; None if it can."""
    if not settings.real_node:
        return "the real node is switched off (SHEPHERD_CLUSTER_REAL_NODE=false)"
    if os.uname().sysname != "Linux":
        return f"the real node needs Linux (this is {os.uname().sysname}); {_FIX}"
    if os.geteuid() != 0:
        return (
            "the real node needs root (the kubelet and containerd manage mounts, cgroups and network "
            f"namespaces): run `make test`/`make cluster-up` as root, or {_FIX}"
        )
    caps = _capabilities()
    missing = [
        n
        for n, bit in (("CAP_SYS_ADMIN", _CAP_SYS_ADMIN), ("CAP_NET_ADMIN", _CAP_NET_ADMIN))
        if not caps >> bit & 1
    ]
    if missing:
        return (
            f"root here lacks {' and '.join(missing)} (an unprivileged container?): run on a VM or in a "
            f"privileged container, or {_FIX}"
        )
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--pid", "--fork", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return (
            "this machine cannot create Linux namespaces (`unshare --net --mount --pid --fork true` "
            f"said: {probe.stderr.strip() or probe.returncode}): run on a VM or in a privileged "
            f"container, or {_FIX}"
        )
    if not _memory_cgroup():
        return f"no memory cgroup controller is mounted under /sys/fs/cgroup (cgroup v1 or v2 needed); {_FIX}"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return (
            "the kernel has no overlay filesystem (containerd's snapshotter needs it: "
            f"`modprobe overlay`); {_FIX}"
        )
    if node_ip() is None:
        return (
            "the machine has no global IPv4 address for the kubelet's node IP (loopback is not "
            f"allowed); {_FIX}"
        )
    missing_pkgs = [p for p, f in PACKAGES.items() if not f.exists()]
    if missing_pkgs and shutil.which("apt-get") is None:
        return f"missing {', '.join(missing_pkgs)} and no apt-get to install them: install them, or {_FIX}"
    record = _read_record()
    if record is not None and record.state_dir != str(settings.state_dir) and _owner_alive(record):
        return (
            f"the machine's one real node belongs to the cluster in {record.state_dir} (only one kubelet can "
            f"run on a machine): stop that cluster, or {_FIX}"
        )
    return None


def _memory_cgroup() -> bool:
    unified = Path("/sys/fs/cgroup/cgroup.controllers")
    if unified.exists():
        return "memory" in unified.read_text().split()
    return Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()


def ensure_packages(
    packages: dict[str, Path] = PACKAGES,
    fix: str = _FIX,
    error: type[Exception] = RealNodeUnavailable,
) -> None:
    """`apt-get install` what is missing of `packages` (Debian package -> a file it installs; root
    only). Fails with `error`, saying what to install by hand, or `fix`."""
    missing = [p for p, f in packages.items() if not f.exists()]
    if not missing:
        return
    _log(f"installing {' '.join(missing)} with apt-get (first start only)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise error(
                f"`{' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}; "
                f"install {' '.join(missing)} by hand, or {fix}"
            )
    still = [p for p, f in packages.items() if not f.exists()]
    if still:
        raise error(f"apt-get installed {' '.join(missing)} but {', '.join(still)} still lack files; {fix}")


def ctr(*args: str) -> str:
    """`ctr` against the real node's containerd, in the namespace the CRI (the kubelet) uses."""
    done = subprocess.run(
        ["ctr", "--address", str(CONTAINERD_SOCKET), "--namespace", "k8s.io", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if done.returncode != 0:
        raise RealNodeError(f"`ctr {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


# ---- the host record -------------------------------------------------------------------------


# The executables a real node runs itself. Leftovers are looked for among these only, so a user's
# `tail -f` of a node log, or anything else that merely names the node's directories, is never hit.
_NODE_EXECUTABLES = ("containerd", "containerd-shim", "kubelet", "runc")


def owned_pids(path: str) -> list[int]:
    """Live node processes (containerd, its shims, the kubelet, runc) with an argument that is
    `path` or lies under it: what an earlier node run, perhaps killed, left behind."""
    under = path.rstrip("/") + "/"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or not os.path.basename(argv[0]).startswith(_NODE_EXECUTABLES):
            continue
        for arg in argv[1:]:
            value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
            if value.rstrip("/") == path.rstrip("/") or value.startswith(under):
                pids.append(int(entry.name))
                break
    return pids


def _read_record() -> HostRecord | None:
    try:
        return HostRecord(**json.loads(RECORD.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _owner_alive(record: HostRecord) -> bool:
    return bool(owned_pids(record.node_dir)) or bool(owned_pids(str(CONTAINERD_SOCKET)))


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _netns() -> list[str]:
    base = Path("/run/netns")
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (each v1 controller, or the v2 root)."""
    roots = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0] if right else ""
        if fstype in ("cgroup", "cgroup2"):
            mount_point = Path(left.split()[4])
            if fstype == "cgroup2" and Path("/sys/fs/cgroup/cgroup.controllers").exists() is False:
                continue  # an empty v2 mount beside v1 controllers: the kubelet does not use it
            roots.append(mount_point)
    return roots


def _record_host(settings: ClusterSettings, bridge: str) -> HostRecord:
    record = HostRecord(
        state_dir=str(settings.state_dir),
        node_dir=str(settings.node_dir),
        sysctls={n: _sysctl_path(n).read_text().strip() for n in SYSCTLS if _sysctl_path(n).exists()},
        bridge=bridge,
        bridge_existed=_link_exists(bridge),
        netns_before=_netns(),
        dirs_existed={str(d): d.exists() for d in HOST_DIRS},
    )
    RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    _save(record)
    return record


def _save(record: HostRecord) -> None:
    tmp = RECORD.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    tmp.replace(RECORD)


# ---- mounts, processes, cgroups --------------------------------------------------------------


def _mounts_under(*roots: Path) -> list[Path]:
    prefixes = [str(r).rstrip("/") + "/" for r in roots]
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Octal escapes (\040 for a space) are how mountinfo writes odd characters.
        point = line.split()[4].encode().decode("unicode_escape")
        if any(point.startswith(p) or point == p.rstrip("/") for p in prefixes):
            found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_under(*roots: Path) -> int:
    """Detach every mount at or below `roots`, deepest first, so removing the directories cannot
    reach into a mounted filesystem. Returns how many were unmounted."""
    libc = ctypes.CDLL(None, use_errno=True)
    count = 0
    for _ in range(5):  # a detached parent can reveal mounts that were shadowed
        points = _mounts_under(*roots)
        if not points:
            break
        for point in points:
            if libc.umount2(str(point).encode(), _MNT_DETACH) == 0:
                count += 1
    return count


def _kill_cgroup_processes(hierarchies: list[Path]) -> int:
    pids: set[int] = set()
    for root in hierarchies:
        base = root / CGROUP_ROOT
        if base.is_dir():
            for procs in base.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in procs.read_text().split())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _remove_cgroups(hierarchies: list[Path]) -> None:
    for root in hierarchies:
        base = root / CGROUP_ROOT
        if not base.is_dir():
            continue
        # cgroup directories hold only pseudo-files: rmdir them deepest first.
        for directory in sorted(
            (p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        deadline = time.monotonic() + 5
        while base.exists() and time.monotonic() < deadline:
            try:
                base.rmdir()
            except OSError:
                time.sleep(0.1)  # a killed process leaves its cgroup a moment later


def _create_cgroup_root(hierarchies: list[Path]) -> list[str]:
    """The kubelet insists that its cgroupRoot exists in every hierarchy."""
    created = []
    for root in hierarchies:
        base = root / CGROUP_ROOT
        if base.exists():
            continue
        base.mkdir()
        created.append(str(base))
        # A new cpuset cgroup starts with no CPUs and no memory nodes; give it its parent's.
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (root / name).exists():
                (base / name).write_text((root / name).read_text())
    return created


def _terminate(pids: list[int], timeout: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- configuration files ---------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def toml(doc: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for containerd's configuration: scalars, lists and nested tables."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for key, value in doc.items():
        if isinstance(value, dict):
            name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
            lines.append(f"\n[{name}]")
            lines.append(toml(value, name))
    return "\n".join(line for line in lines if line)


# ---- the node --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeCredentials:
    """What the cluster issues for the node: its kubeconfig and its serving certificate."""

    kubeconfig: Path
    ca_cert: Path
    serving_cert: Path
    serving_key: Path


class RealNode:
    """Starts and stops the real node of one cluster."""

    def __init__(self, settings: ClusterSettings, supervisor: Supervisor) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.dir = settings.node_dir

    def start(
        self,
        ip: str,
        credentials: NodeCredentials,
        admin: AdminClient,
        wait: Callable[[str, Callable[[], bool], str | None], None],
    ) -> None:
        """Record the host, start containerd, import the images, start the kubelet, wait for Ready.
        `wait(what, ready, daemon)` polls like the rest of the cluster's start-up."""
        s = self.settings
        ensure_packages()
        shell = images.shell_image(s.image_cache_dir)
        pause = images.pause_image(s.image_cache_dir, s.bin_dir / "pause")
        record = _record_host(s, s.real_node_bridge)
        record.cgroups_created = _create_cgroup_root(_cgroup_hierarchies())
        _save(record)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.supervisor.start(
            Daemon("containerd", ["/usr/bin/containerd", "--config", str(self._containerd_config())], None)
        )
        wait("containerd", self._containerd_ready, "containerd")
        for image in (pause, shell):
            self._ctr("images", "import", str(image.tar))
        self.supervisor.start(
            Daemon(
                "kubelet",
                [
                    str(s.bin_dir / "kubelet"),
                    f"--config={self._kubelet_config(ip, credentials)}",
                    f"--kubeconfig={credentials.kubeconfig}",
                    f"--root-dir={self.dir / 'kubelet'}",
                    f"--cert-dir={self.dir / 'kubelet-pki'}",
                    f"--hostname-override={s.real_node_name}",
                    f"--node-ip={ip}",
                    f"--node-labels=type=real,{NODE_LABEL}=true",
                ],
                s.kubelet_port,
                host=ip,
            )
        )
        wait(f"real node {s.real_node_name} Ready", lambda: self.ready(admin), "kubelet")

    def ready(self, admin: AdminClient) -> bool:
        """Readiness is the Node's Ready condition, as for any node."""
        node = admin.request("GET", f"/api/v1/nodes/{self.settings.real_node_name}")
        conditions = node.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _ctr(self, *args: str) -> str:
        return ctr(*args)

    def _containerd_ready(self) -> bool:
        if not CONTAINERD_SOCKET.exists():
            return False
        self._ctr("version")
        return True

    def _containerd_config(self) -> Path:
        s = self.settings
        cni_dir = self.dir / "cni"
        cni_dir.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": s.real_node_bridge,
                    # The host reaches pods directly and pods reach the host at the gateway;
                    # no masquerading, so no iptables rules are added.
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": s.real_node_pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.dir / "cni-ipam"),
                    },
                }
            ],
        }
        (cni_dir / "10-shepherd.conflist").write_text(json.dumps(conflist, indent=2))
        cri = {
            "sandbox_image": images.PAUSE_IMAGE,
            "stream_server_address": "127.0.0.1",
            "stream_server_port": "0",
            "enable_selinux": False,
            # Without CAP_SYS_RESOURCE, root cannot lower a process's oom_score_adj, and every
            # sandbox (which asks for -998) would fail to start; then keep the current floor.
            "restrict_oom_score_adj": not _capabilities() >> 24 & 1,
            "containerd": {
                "snapshotter": "overlayfs",
                "default_runtime_name": "runc",
                "runtimes": {
                    "runc": {
                        "runtime_type": "io.containerd.runc.v2",
                        # PID 1 is not systemd on these machines: plain cgroupfs, as the kubelet.
                        "options": {
                            "SystemdCgroup": False,
                            "BinaryName": shutil.which("runc") or "runc",
                            "Root": str(RUN_DIR / "runc"),
                        },
                    }
                },
            },
            "cni": {"bin_dir": str(CNI_BIN_DIR), "conf_dir": str(cni_dir), "max_conf_num": 1},
        }
        doc = {
            "version": 2,
            "root": str(self.dir / "containerd"),
            "state": str(RUN_DIR / "containerd"),
            "grpc": {"address": str(CONTAINERD_SOCKET)},
            "ttrpc": {"address": str(RUN_DIR / "containerd-ttrpc.sock")},
            "debug": {"address": "", "level": "warn"},
            "metrics": {"address": ""},
            "plugins": {
                "io.containerd.grpc.v1.cri": cri,
                "io.containerd.internal.v1.opt": {"path": str(self.dir / "opt")},
            },
        }
        path = self.dir / "containerd.toml"
        path.write_text(toml(doc) + "\n")
        return path

    def _kubelet_config(self, ip: str, credentials: NodeCredentials) -> Path:
        s = self.settings
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": ip,
            "port": s.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": s.kubelet_healthz_port,
            "tlsCertFile": str(credentials.serving_cert),
            "tlsPrivateKeyFile": str(credentials.serving_key),
            # Nobody reaches the kubelet anonymously: clients present a certificate from the
            # cluster CA or a token, and the API server decides what they may do.
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True, "cacheTTL": "30s"},
                "x509": {"clientCAFile": str(credentials.ca_cert)},
            },
            "authorization": {
                "mode": "Webhook",
                "webhook": {"cacheAuthorizedTTL": "30s", "cacheUnauthorizedTTL": "5s"},
            },
            "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            # Kubelet 1.35 refuses cgroup v1 unless told otherwise; these machines have v1.
            "failCgroupV1": False,
            "failSwapOn": False,
            "podLogsDir": str(self.dir / "pod-logs"),
            "registerWithTaints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
            # The images cannot be pulled back once removed: never collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            # A development disk may be fuller than a server's; only evict on real exhaustion.
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "makeIPTablesUtilChains": False,
            "resolvConf": "/etc/resolv.conf",
            "maxPods": 110,
        }
        path = self.dir / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    # ---- stopping ----------------------------------------------------------------------------

    def drain(self, admin: AdminClient, timeout: float = 30.0) -> None:
        """Delete the node's pods through the API, so the kubelet stops their containers and
        tears down their networks itself; wait until they are gone (or the timeout)."""
        query = {"fieldSelector": f"spec.nodeName={self.settings.real_node_name}"}
        try:
            pods = admin.request("GET", "/api/v1/pods", query=query)["items"]
            for pod in pods:
                meta = pod["metadata"]
                with contextlib.suppress(ApiError):
                    admin.request(
                        "DELETE",
                        f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                        query={"gracePeriodSeconds": "2"},
                    )
            deadline = time.monotonic() + timeout
            while pods and time.monotonic() < deadline:
                time.sleep(0.5)
                pods = admin.request("GET", "/api/v1/pods", query=query)["items"]
        except (OSError, ApiError):
            return  # the API server is gone: the fallbacks below clean up instead

    def teardown(self, admin: AdminClient | None) -> bool:
        """Stop the node if this cluster owns it (or it was left by a run whose processes are all
        gone) and restore the host from the record. Returns whether anything was undone."""
        record = _read_record()
        if record is None:
            return False
        ours = record.state_dir == str(self.settings.state_dir)
        if not ours and _owner_alive(record):
            return False
        if ours and admin is not None and self.supervisor.pid("kubelet") is not None:
            self.drain(admin)
        for name in ("kubelet", "containerd"):
            pid = self.supervisor.pid(name) if ours else None
            if pid is not None:
                _terminate([pid])
        _terminate(owned_pids(record.node_dir))
        hierarchies = _cgroup_hierarchies()
        # Container processes outlive a killed shim: kill them by cgroup, then the shims.
        _kill_cgroup_processes(hierarchies)
        _terminate(owned_pids(str(RUN_DIR)), timeout=5)
        unmount_under(Path(record.node_dir), RUN_DIR)
        for name in sorted(set(_netns()) - set(record.netns_before)):
            path = Path("/run/netns") / name
            unmount_under(path)
            with contextlib.suppress(OSError):
                path.unlink()
        if not record.bridge_existed and _link_exists(record.bridge):
            subprocess.run(["ip", "link", "delete", record.bridge], check=False, capture_output=True)
        for name, value in record.sysctls.items():
            with contextlib.suppress(OSError):
                if _sysctl_path(name).read_text().strip() != value:
                    _sysctl_path(name).write_text(value)
        self._restore_dirs(record)
        _remove_cgroups(hierarchies)
        shutil.rmtree(record.node_dir, ignore_errors=True)
        shutil.rmtree(RUN_DIR, ignore_errors=True)
        return True

    @staticmethod
    def _restore_dirs(record: HostRecord) -> None:
        node_dir = record.node_dir
        for directory, existed in record.dirs_existed.items():
            path = Path(directory)
            if not path.exists():
                continue
            if not existed:
                unmount_under(path)
                shutil.rmtree(path, ignore_errors=True)
                continue
            # A directory that was there before keeps everything but what the node put in it.
            for entry in path.iterdir():
                if entry.is_symlink() and os.readlink(entry).startswith(node_dir):
                    entry.unlink()
            results = path / "results"
            if results.is_dir():
                for cached in results.glob(f"{CNI_NETWORK}-*"):
                    cached.unlink()
