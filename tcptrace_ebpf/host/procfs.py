"""Which processes hold a socket, and who those processes are (what ``ss -p`` shows).

A socket is known by its inode (DiagSocket.inode, or ``st_ino`` of the socket
file); a process holds it when one of its ``/proc/PID/fd/*`` links reads
``socket:[inode]``. Scanning is done for thread-group leaders only: listing
/proc shows one entry per process, and the threads of a process share its fd
table. Processes and fds come and go while we scan; those races, and processes
we may not look into (when not root), are skipped silently, so the answer is a
best effort that is exact only for processes that stay put.

Everything takes a ``proc`` argument so a tracer running in a container can
read the host's procfs mounted elsewhere (e.g. /host/proc).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection

from ..errors import UserError
from ..model.owners import ProcessInfo

__all__ = [
    "ProcessInfo",
    "container_id_from_cgroup",
    "parse_proc_cgroup",
    "process_info",
    "socket_holders",
]

# What reading /proc/PID/... raises when the process or fd went away while we
# looked (ENOENT, ESRCH) or when we may not look (EACCES, EPERM when not root
# or under hidepid). Anything else (EMFILE, EIO) is a real problem and is raised.
_GONE_OR_FORBIDDEN = (FileNotFoundError, ProcessLookupError, PermissionError)

_SOCKET_LINK_PREFIX = "socket:["

# A container's cgroup directory: the 64-hex container id, bare (cgroupfs
# drivers: /docker/<id>, /kubepods/burstable/pod<uid>/<id>) or as a systemd
# scope named after the runtime (docker-<id>.scope, cri-containerd-<id>.scope,
# crio-<id>.scope, libpod-<id>.scope, nerdctl-<id>.scope). The conmon
# monitors (crio-conmon-<id>.scope, libpod-conmon-<id>.scope) run on the host,
# outside the container, and do not match.
_CONTAINER_DIRECTORY = re.compile(
    r"(?:(?:docker|cri-containerd|crio|libpod|nerdctl)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?"
)


def socket_holders(
    inodes: Collection[int] | None = None,
    proc: str = "/proc",
    pids: Collection[int] | None = None,
) -> dict[int, list[int]]:
    """Map socket inode -> sorted PIDs of the processes holding an fd to it.

    With ``inodes`` only those are looked for (and an inode nobody holds is
    absent from the result); with None every socket found is reported. A
    socket shared by several processes (inherited across fork, passed over a
    unix socket) lists each of them. PIDs are process (thread-group) ids.
    With ``pids`` only those processes are searched (a cheap first look where
    the holder is probably known).
    """
    wanted = None if inodes is None else frozenset(inodes)
    if wanted is not None and not wanted:
        return {}
    holders: dict[int, set[int]] = {}
    for pid in _pids(proc) if pids is None else sorted(set(pids)):
        # Every fd link has to be read anyway: nothing cheaper says whether a
        # process has sockets, and a socket may have holders anywhere, so
        # there is no early exit either.
        for inode in _socket_inodes(f"{proc}/{pid}/fd"):
            if wanted is None or inode in wanted:
                holders.setdefault(inode, set()).add(pid)
    return {inode: sorted(pids) for inode, pids in holders.items()}


def process_info(pid: int, proc: str = "/proc") -> ProcessInfo | None:
    """Name, command line and cgroup of ``pid``; None if there is no such process.

    A file we may not read (hidepid, not root) gives an empty field rather
    than None. PIDs are reused, so this describes whoever has ``pid`` now.
    """
    directory = f"{proc}/{pid}"
    try:
        comm = _read_text(f"{directory}/comm").rstrip("\n")
        cmdline_raw = _read_text(f"{directory}/cmdline")
        cgroup_text = _read_text(f"{directory}/cgroup")
    except (FileNotFoundError, ProcessLookupError):
        return None
    cgroup, container_id = parse_proc_cgroup(cgroup_text)
    return ProcessInfo(
        pid=pid,
        comm=comm,
        cmdline=" ".join(arg for arg in cmdline_raw.split("\0") if arg),
        cgroup=cgroup,
        container_id=container_id,
    )


def parse_proc_cgroup(text: str) -> tuple[str, str | None]:
    """The cgroup path and container id in the text of /proc/PID/cgroup.

    The path is the cgroup v2 one (``0::/path``). On cgroup v1 and hybrid
    hosts, where that line is missing or just "/", it is the name=systemd
    path or else the first controller path that is not "/". The container id
    is looked for in every line, v2 first, because on hybrid hosts a cgroupfs
    container runtime records the container in the v1 hierarchies only.
    """
    unified: str | None = None
    systemd: str | None = None
    controllers: list[str] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        if not path:
            continue
        if hierarchy == "0" and not names:
            unified = path
        elif names == "name=systemd":
            systemd = path
        else:
            controllers.append(path)
    candidates = [path for path in (unified, systemd, *controllers) if path is not None]
    chosen = next((path for path in candidates if path != "/"), candidates[0] if candidates else "")
    container_id = next(
        (cid for cid in map(container_id_from_cgroup, candidates) if cid is not None), None
    )
    return chosen, container_id


def container_id_from_cgroup(path: str) -> str | None:
    """The 64-hex container id in a cgroup path of a docker, containerd (k8s),
    cri-o or podman container; None for anything else.

    The last matching directory wins, so a container nested in another one
    (docker in docker, a pod in a kind node) gives the inner container.
    """
    for directory in reversed(path.split("/")):
        match = _CONTAINER_DIRECTORY.fullmatch(directory)
        if match is not None:
            return match.group("id")
    return None


def _pids(proc: str) -> list[int]:
    try:
        with os.scandir(proc) as entries:
            # Listing /proc shows thread-group leaders only; threads live under
            # /proc/PID/task and share the leader's fd table.
            return [int(entry.name) for entry in entries if entry.name.isdecimal()]
    except OSError as err:
        raise UserError(
            f"cannot list processes in {proc} ({err.strerror}): mount procfs there "
            "or point the proc path at the host's procfs"
        ) from err


def _socket_inodes(fd_directory: str) -> list[int]:
    try:
        directory_fd = os.open(fd_directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except _GONE_OR_FORBIDDEN:
        return []
    inodes: list[int] = []
    try:
        for name in os.listdir(directory_fd):
            try:
                # Relative to the open directory: the kernel resolves one path
                # component per link instead of four.
                target = os.readlink(name, dir_fd=directory_fd)
            except _GONE_OR_FORBIDDEN:
                continue
            if target.startswith(_SOCKET_LINK_PREFIX):
                inodes.append(int(target[len(_SOCKET_LINK_PREFIX) : -1]))
    except _GONE_OR_FORBIDDEN:
        pass
    finally:
        os.close(directory_fd)
    return inodes


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except PermissionError:
        return ""
    # errors="replace": these strings end up in JSON and Prometheus labels,
    # which cannot carry undecodable bytes.
    return data.decode("utf-8", errors="replace")
