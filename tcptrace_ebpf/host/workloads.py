"""Which container, and on Kubernetes which pod, a cgroup is.

The BPF program records the owner's cgroup v2 id (`bpf_get_current_cgroup_id()`:
the inode number of the cgroup's directory in the v2 hierarchy). Here that id
becomes a path (a walk of the v2 mount, cached, walked again when an id is
unknown) and the path a workload:

- the kubelet's layouts: systemd driver
  ``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/
  cri-containerd-<id>.scope`` (``crio-<id>.scope``, ``docker-<id>.scope``; the
  uid with ``_`` for ``-``; guaranteed pods one level up), cgroupfs driver
  ``/kubepods/burstable/pod<uid>/<id>`` (``crio-<id>`` too);
- plain containers: ``docker-<id>.scope``, ``/docker/<id>``, podman's
  ``libpod-<id>.scope``, ``nerdctl-<id>.scope``;
- and, for a pod, its namespace, name and the container's name from the
  kubelet's log directories (mounted read-only in the DaemonSet):
  ``/var/log/containers/<pod>_<namespace>_<container>-<id>.log`` names a
  container by id, ``/var/log/pods/<namespace>_<pod>_<uid>/<container>/``
  names the pod by uid.

Parsing is pure (`parse_cgroup_path`, `parse_container_log`,
`parse_pod_log_dir`); the `Workloads` resolver does the I/O, with caches.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..model.owners import NO_WORKLOAD, Workload

log = logging.getLogger(__name__)

# Where the kubelet's log directories are (the root holding pods/ and
# containers/); the DaemonSet mounts the host's read-only at the same place.
DEFAULT_LOG_ROOT = os.environ.get("TCPTRACE_KUBELET_LOG_DIR", "/var/log")
# A walk of the cgroup tree happens at most this often when ids are unknown:
# a flood of events from a new cgroup must not walk the tree per event.
WALK_MIN_INTERVAL_S = 1.0

_ID = r"(?P<id>[0-9a-f]{64})"
# A container's cgroup directory (the runtime conmon monitors, crio-conmon-
# and libpod-conmon-, run outside the container and do not match).
_CONTAINER_SCOPE = re.compile(
    r"(?:(?P<runtime>docker|cri-containerd|crio|libpod|nerdctl)-)?" + _ID + r"(?:\.scope)?"
)
# A pod's cgroup directory: kubepods-<qos>-pod<uid>.slice (systemd driver,
# uid with "_") or pod<uid> (cgroupfs driver).
_POD_DIRECTORY = re.compile(
    r"(?:kubepods-(?:(?:burstable|besteffort)-)?pod(?P<slice_uid>[0-9a-f_]{36})\.slice)"
    r"|(?:pod(?P<uid>[0-9a-f-]{36}))"
)
_RUNTIME_NAMES = {
    "docker": "docker",
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "libpod": "podman",
    "nerdctl": "containerd",
}
# /var/log/containers/<pod>_<namespace>_<container>-<id>.log: Kubernetes
# names never contain "_", so the split is unambiguous.
_CONTAINER_LOG = re.compile(
    r"(?P<pod>[^_]+)_(?P<namespace>[^_]+)_(?P<container>[^_]+)-" + _ID + r"\.log"
)
# /var/log/pods/<namespace>_<pod>_<uid>
_POD_LOG_DIR = re.compile(r"(?P<namespace>[^_]+)_(?P<pod>[^_]+)_(?P<uid>[0-9a-f-]{36})")


@dataclass(frozen=True, slots=True)
class CgroupPlace:
    """What a cgroup path alone says."""

    container_id: str = ""  # 64 hex, "" when not a container
    runtime: str = ""  # containerd, cri-o, docker, podman; "" if unknown
    pod_uid: str = ""  # Kubernetes pod uid (with "-"), "" outside Kubernetes


def parse_cgroup_path(path: str) -> CgroupPlace:
    """The container and pod a cgroup v2 path belongs to (pure).

    The innermost container directory wins (nested containers, a pod in a
    kind node); the pod is the directory above it. Components of ".." (a path
    read from inside another cgroup namespace) are ignored.
    """
    parts = [part for part in path.split("/") if part and part != ".."]
    for index in range(len(parts) - 1, -1, -1):
        match = _CONTAINER_SCOPE.fullmatch(parts[index])
        if match is None:
            continue
        runtime = _RUNTIME_NAMES.get(match.group("runtime") or "", "")
        pod_uid = ""
        if index > 0:
            pod = _POD_DIRECTORY.fullmatch(parts[index - 1])
            if pod is not None:
                pod_uid = pod.group("uid") or pod.group("slice_uid").replace("_", "-")
        return CgroupPlace(match.group("id"), runtime, pod_uid)
    # A pod's own cgroup (its pause process on some runtimes): the pod without a container.
    for part in reversed(parts):
        pod = _POD_DIRECTORY.fullmatch(part)
        if pod is not None:
            return CgroupPlace(pod_uid=pod.group("uid") or pod.group("slice_uid").replace("_", "-"))
    return CgroupPlace()


def parse_container_log(name: str) -> tuple[str, str, str, str] | None:
    """(container id, namespace, pod, container) from a /var/log/containers file name."""
    match = _CONTAINER_LOG.fullmatch(name)
    if match is None:
        return None
    return match.group("id"), match.group("namespace"), match.group("pod"), match.group("container")


def parse_pod_log_dir(name: str) -> tuple[str, str, str] | None:
    """(uid, namespace, pod) from a /var/log/pods directory name."""
    match = _POD_LOG_DIR.fullmatch(name)
    if match is None:
        return None
    return match.group("uid"), match.group("namespace"), match.group("pod")


def cgroup2_mounts(mountinfo: str) -> list[str]:
    """Mount points of the cgroup v2 hierarchy in /proc/self/mountinfo text,
    those showing the whole tree (root "/") first."""
    whole: list[str] = []
    partial: list[str] = []
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields = before.split()
        if len(fields) < 5 or not after.startswith("cgroup2 "):
            continue
        point = fields[4].replace("\\040", " ")
        (whole if fields[3] == "/" else partial).append(point)
    return whole + partial


def find_cgroup2_root(mountinfo_path: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup on unified
    hosts, /sys/fs/cgroup/unified on hybrid ones); None on cgroup v1 only.
    TCPTRACE_CGROUP2_ROOT overrides it (a host's tree mounted elsewhere)."""
    override = os.environ.get("TCPTRACE_CGROUP2_ROOT")
    if override:
        # A hybrid host's whole /sys/fs/cgroup: v2 is its unified/ directory.
        unified = os.path.join(override, "unified")
        if not os.path.exists(os.path.join(override, "cgroup.controllers")) and os.path.exists(
            os.path.join(unified, "cgroup.controllers")
        ):
            return unified
        return override if os.path.isdir(override) else None
    try:
        text = Path(mountinfo_path).read_text()
    except OSError:
        return None
    mounts = cgroup2_mounts(text)
    return mounts[0] if mounts else None


def cgroup_id_of(path: str, root: str) -> int:
    """The cgroup v2 id of `path` (relative to the v2 root): its directory's inode."""
    return os.stat(os.path.join(root, path.lstrip("/"))).st_ino


def cgroup_id_of_pid(pid: int, proc: str = "/proc", root: str | None = None) -> int:
    """The cgroup v2 id a process runs in (as bpf_get_current_cgroup_id() gives
    it in that process); 0 when unknown (no v2, process gone, a path outside
    our cgroup namespace)."""
    root = find_cgroup2_root() if root is None else root
    if root is None:
        return 0
    try:
        text = Path(f"{proc}/{pid}/cgroup").read_text()
    except OSError:
        return 0
    path = next((line[3:] for line in text.splitlines() if line.startswith("0::")), None)
    if path is None or "/.." in path:
        return 0
    try:
        return cgroup_id_of(path, root)
    except OSError:
        return 0


class Workloads:
    """cgroup id or path -> Workload, cached. Thread-safe (the exporter's
    scrapes and housekeeping both ask)."""

    def __init__(self, cgroup_root: str | None = None, log_root: str = DEFAULT_LOG_ROOT) -> None:
        self.cgroup_root = find_cgroup2_root() if cgroup_root is None else cgroup_root
        self.log_root = log_root
        self._lock = threading.Lock()
        self._paths: dict[int, str] = {}
        self._last_walk = -WALK_MIN_INTERVAL_S
        self._by_path: dict[str, Workload] = {}
        self._by_id: dict[int, Workload] = {}
        # Paths named only in part (a pod not, or not yet, in the kubelet's
        # directories; a container whose log link is not there yet): named
        # again, at most once a second, until they are in full.
        self._partial: set[str] = set()
        self._containers: dict[str, tuple[str, str, str]] = {}  # id -> namespace, pod, name
        self._pods: dict[str, tuple[str, str, list[str]]] = {}  # uid -> namespace, pod, names
        self._last_logs = -WALK_MIN_INTERVAL_S

    # -- cgroup ids --------------------------------------------------------

    def path_of(self, cgroup_id: int) -> str | None:
        """The cgroup v2 path ("/a/b") of an id; None if unknown (gone, or no v2)."""
        if not cgroup_id or self.cgroup_root is None:
            return None
        with self._lock:
            path = self._paths.get(cgroup_id)
            if path is None and time.monotonic() - self._last_walk >= WALK_MIN_INTERVAL_S:
                self._walk()
                path = self._paths.get(cgroup_id)
        return path

    def _walk(self) -> None:
        assert self.cgroup_root is not None
        self._last_walk = time.monotonic()
        paths: dict[int, str] = {}
        root = self.cgroup_root
        for directory, subdirs, _files in os.walk(root):
            try:
                inode = os.stat(directory).st_ino
            except OSError:
                continue
            relative = directory[len(root) :].strip("/")
            paths[inode] = "/" + relative
            subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        self._paths = paths

    def of_id(self, cgroup_id: int) -> Workload:
        # Read at every scrape for every CLOSE_WAIT socket: one dict lookup
        # once known (kernfs ids are 64-bit and never reused).
        known = self._by_id.get(cgroup_id)
        if known is not None and known.cgroup not in self._partial:
            return known
        path = self.path_of(cgroup_id)
        if path is None:
            return NO_WORKLOAD
        workload = self.of_path(path)
        if len(self._by_id) > 65536:
            self._by_id.clear()
        self._by_id[cgroup_id] = workload
        return workload

    # -- paths ---------------------------------------------------------------

    def of_path(self, path: str) -> Workload:
        """The workload of a cgroup path (a v2 path, or /proc/PID/cgroup's)."""
        with self._lock:
            known = self._by_path.get(path)
        if known is not None and path not in self._partial:
            return known
        place = parse_cgroup_path(path)
        workload, complete = self._name(path, place)
        with self._lock:
            if len(self._by_path) > 65536:
                self._by_path.clear()
                self._partial.clear()
            self._by_path[path] = workload
            if complete:
                self._partial.discard(path)
            else:
                self._partial.add(path)
        return workload

    def of_pid(self, pid: int, proc: str = "/proc") -> Workload:
        """The workload a process runs in, from /proc/PID/cgroup."""
        from .procfs import parse_proc_cgroup

        try:
            text = Path(f"{proc}/{pid}/cgroup").read_text()
        except OSError:
            return NO_WORKLOAD
        path, _container = parse_proc_cgroup(text)
        return self.of_path(path) if path else NO_WORKLOAD

    def _name(self, path: str, place: CgroupPlace) -> tuple[Workload, bool]:
        """The workload of a path, and whether it is named in full."""
        if not place.container_id and not place.pod_uid:
            return Workload(cgroup=path), True
        if place.pod_uid:
            self._read_logs_if_needed(place)
            with self._lock:
                by_container = self._containers.get(place.container_id)
                by_pod = self._pods.get(place.pod_uid)
            complete = True
            if by_container is not None:
                namespace, pod, name = by_container
            elif by_pod is not None:
                namespace, pod, names = by_pod
                # One container in the pod: it is that one; else the short id.
                complete = len(names) == 1 or not place.container_id
                name = names[0] if len(names) == 1 else place.container_id[:12]
            else:
                namespace, pod, name = "", "", place.container_id[:12]
                complete = False
            workload = Workload(
                path, place.container_id, place.runtime, namespace, pod, name, place.pod_uid
            )
            return workload, complete
        short = place.container_id[:12]
        return Workload(path, place.container_id, place.runtime, container=short), True

    def _read_logs_if_needed(self, place: CgroupPlace) -> None:
        with self._lock:
            known = place.container_id in self._containers
            if known or time.monotonic() - self._last_logs < WALK_MIN_INTERVAL_S:
                return
            self._last_logs = time.monotonic()
        containers = dict(_scan_container_logs(os.path.join(self.log_root, "containers")))
        pods = dict(_scan_pod_logs(os.path.join(self.log_root, "pods")))
        with self._lock:
            self._containers = containers
            self._pods = pods


def _scan_container_logs(directory: str) -> Iterable[tuple[str, tuple[str, str, str]]]:
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        parsed = parse_container_log(name)
        if parsed is not None:
            container_id, namespace, pod, container = parsed
            yield container_id, (namespace, pod, container)


def _scan_pod_logs(directory: str) -> Iterable[tuple[str, tuple[str, str, list[str]]]]:
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        parsed = parse_pod_log_dir(name)
        if parsed is None:
            continue
        uid, namespace, pod = parsed
        try:
            containers = sorted(
                entry.name for entry in os.scandir(os.path.join(directory, name)) if entry.is_dir()
            )
        except OSError:
            containers = []
        yield uid, (namespace, pod, containers)


@functools.cache
def shared() -> Workloads:
    """The process-wide resolver (one cache for every command's needs)."""
    return Workloads()
