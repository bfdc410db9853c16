"""CLOSE_WAIT leaks: which process holds sockets whose peer closed, how many, since when.

A socket sits in CLOSE_WAIT when the peer has closed and the local program
never called close(). `gather()` lists them (a sock_diag snapshot filtered
by the kernel), finds the processes holding each one (its inode in
/proc/PID/fd, as `ss -p` does) and dates them with what the tracer measured:
the time each socket entered CLOSE_WAIT, or, for sockets already there when
the tracer started, a lower bound. Grouping and summaries are pure.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .states import TcpState

# (family, laddr, lport, raddr, rport): how a socket is matched across sources.
SocketKey = tuple[int, str, int, str, int]
# The same in one network namespace (its inode number): pods reuse addresses.
NetnsKey = tuple[int, SocketKey]


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    comm: str
    cmdline: str
    cgroup: str
    container_id: str | None
    # Its Kubernetes namespace, pod and container name ("" elsewhere; the
    # container is the short container id outside Kubernetes).
    namespace: str = ""
    pod: str = ""
    container: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "cmdline": self.cmdline,
            "cgroup": self.cgroup,
            "container_id": self.container_id,
            **self.workload_json(),
        }

    def workload_json(self) -> dict[str, str | None]:
        return {
            "namespace": self.namespace or None,
            "pod": self.pod or None,
            "container": self.container or None,
        }

    def matches(self, pod: str | None, container: str | None) -> bool:
        """The --pod (NAME or NAMESPACE/NAME) and --container filters."""
        if pod is not None and pod not in (self.pod, f"{self.namespace}/{self.pod}"):
            return False
        return container is None or container in (self.container, self.container_id)


@dataclass(frozen=True, slots=True)
class Age:
    """When a socket entered CLOSE_WAIT, as the tracer knows it."""

    since: float  # unix seconds
    lower_bound: bool  # it was already in CLOSE_WAIT then (tracer started later)


@dataclass(frozen=True, slots=True)
class LeakedSocket:
    family: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    inode: int
    recv_q: int  # data bytes the program has not read
    age_s: float | None  # None: no tracer was running to measure it
    age_is_lower_bound: bool
    holders: tuple[Holder, ...]
    netns: int = 0  # network namespace inode number

    @property
    def key(self) -> SocketKey:
        return (self.family, self.laddr, self.lport, self.raddr, self.rport)

    def to_json(self, holder: Holder | None) -> dict[str, Any]:
        return {
            "pid": holder.pid if holder else None,
            "comm": holder.comm if holder else None,
            "laddr": self.laddr,
            "lport": self.lport,
            "raddr": self.raddr,
            "rport": self.rport,
            "age_s": None if self.age_s is None else round(self.age_s, 3),
            "age_is_lower_bound": self.age_is_lower_bound,
            "recv_q": self.recv_q,
            "family": "ipv6" if self.family == socket.AF_INET6 else "ipv4",
            "inode": self.inode,
            "cmdline": holder.cmdline if holder else None,
            "cgroup": holder.cgroup if holder else None,
            "container_id": holder.container_id if holder else None,
            "netns": self.netns,
            **(holder.workload_json() if holder else {}),
        }


@dataclass
class ProcessGroup:
    """The CLOSE_WAIT sockets one process holds (holder None: no process holds them)."""

    holder: Holder | None
    sockets: list[LeakedSocket] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.sockets)

    def _ages(self) -> list[float]:
        return [sock.age_s for sock in self.sockets if sock.age_s is not None]

    @property
    def oldest_age_s(self) -> float | None:
        ages = self._ages()
        return max(ages) if ages else None

    @property
    def oldest_is_lower_bound(self) -> bool:
        oldest = self.oldest_age_s
        return any(
            sock.age_is_lower_bound
            for sock in self.sockets
            if sock.age_s is not None and sock.age_s == oldest
        )

    @property
    def median_age_s(self) -> float | None:
        ages = self._ages()
        return statistics.median(ages) if ages else None

    @property
    def local_ports(self) -> list[int]:
        return sorted({sock.lport for sock in self.sockets})

    def top_peers(self, limit: int = 5) -> list[tuple[str, int, int]]:
        counts = Counter((sock.raddr, sock.rport) for sock in self.sockets)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return [(raddr, rport, count) for (raddr, rport), count in ranked[:limit]]

    def to_json(self) -> dict[str, Any]:
        holder = self.holder
        return {
            "pid": holder.pid if holder else None,
            "comm": holder.comm if holder else "unknown",
            "cmdline": holder.cmdline if holder else None,
            "cgroup": holder.cgroup if holder else None,
            "container_id": holder.container_id if holder else None,
            **(holder.workload_json() if holder else {}),
            "count": self.count,
            "oldest_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s, 3),
            "oldest_age_is_lower_bound": self.oldest_is_lower_bound,
            "median_age_s": None if self.median_age_s is None else round(self.median_age_s, 3),
            "local_ports": self.local_ports,
            "top_peers": [
                {"raddr": raddr, "rport": rport, "count": count}
                for raddr, rport, count in self.top_peers()
            ],
        }


def old_enough(sockets: Iterable[LeakedSocket], min_age_s: float) -> list[LeakedSocket]:
    """Sockets in CLOSE_WAIT for at least min_age_s. Unmeasured ones are kept:
    without a tracer nothing can be said about their age, and hiding them
    would hide every leak."""
    return [sock for sock in sockets if sock.age_s is None or sock.age_s >= min_age_s]


def group_by_process(sockets: Iterable[LeakedSocket]) -> list[ProcessGroup]:
    """One group per holding process (a shared socket is under each holder),
    biggest first, then oldest."""
    groups: dict[int, ProcessGroup] = {}
    orphans = ProcessGroup(holder=None)
    for sock in sockets:
        if not sock.holders:
            orphans.sockets.append(sock)
        for holder in sock.holders:
            groups.setdefault(holder.pid, ProcessGroup(holder)).sockets.append(sock)
    ranked = sorted(
        groups.values(),
        key=lambda group: (
            -group.count,
            -(group.oldest_age_s or 0),
            group.holder.pid if group.holder else 0,
        ),
    )
    if orphans.sockets:
        ranked.append(orphans)
    return ranked


def key_of(family: int, laddr: str, lport: int, raddr: str, rport: int) -> SocketKey:
    return (family, laddr, lport, raddr, rport)


def gather(
    ages: Mapping[NetnsKey, Age],
    now: float | None = None,
    holder_info: Callable[[int], Holder | None] | None = None,
    every_netns: bool = True,
) -> list[LeakedSocket]:
    """Sockets in CLOSE_WAIT in this network namespace and (`every_netns`)
    every other one (pods have their own), with holders, their containers
    and ages."""
    from . import procfs, sockdiag
    from .errors import UserError
    from .netns import established, namespaces, run_in
    from .seed import own_netns_inum
    from .workloads import shared as shared_workloads

    now = time.time() if now is None else now

    def listed() -> list[sockdiag.DiagSocket]:
        return sockdiag.snapshot(states=[TcpState.CLOSE_WAIT])

    own = own_netns_inum()
    per_netns = [(own, listed())]
    if every_netns:
        for inode, path in namespaces().items():
            # A namespace with no ESTABLISHED or CLOSE_WAIT socket (CurrEstab
            # counts both) is not entered: each costs a thread and a netlink dump.
            if inode != own and established(path) != 0:
                try:
                    per_netns.append((inode, run_in(path, listed)))
                except (UserError, OSError):
                    continue  # gone meanwhile
    inodes = {sock.inode for _netns, snapshot in per_netns for sock in snapshot if sock.inode}
    holders = procfs.socket_holders(inodes)
    cache: dict[int, Holder | None] = {}
    workloads = shared_workloads()

    def info(pid: int) -> Holder | None:
        if pid not in cache:
            if holder_info is not None:
                cache[pid] = holder_info(pid)
            else:
                process = procfs.process_info(pid)
                if process is None:
                    cache[pid] = None
                else:
                    workload = workloads.of_path(process.cgroup)
                    cache[pid] = Holder(
                        pid,
                        process.comm,
                        process.cmdline,
                        process.cgroup,
                        process.container_id,
                        workload.namespace,
                        workload.pod,
                        workload.container,
                    )
        return cache[pid]

    result = []
    for netns, snapshot in per_netns:
        for sock in snapshot:
            key = key_of(sock.family, sock.laddr, sock.lport, sock.raddr, sock.rport)
            age = ages.get((netns, key))
            found = tuple(
                holder for pid in holders.get(sock.inode, []) if (holder := info(pid)) is not None
            )
            result.append(
                LeakedSocket(
                    family=sock.family,
                    laddr=sock.laddr,
                    lport=sock.lport,
                    raddr=sock.raddr,
                    rport=sock.rport,
                    inode=sock.inode,
                    # sock_diag counts the peer's FIN as one unread byte while it
                    # is unread, and it is unread whenever anything is (it comes last).
                    recv_q=max(0, sock.recv_q - 1),
                    age_s=None if age is None else max(0.0, now - age.since),
                    age_is_lower_bound=age.lower_bound if age else False,
                    holders=found,
                    netns=netns,
                )
            )
    return result


def ages_from_api(data: Iterable[Mapping[str, Any]], netns: int) -> dict[NetnsKey, Age]:
    """The daemon's CLOSE_WAIT list, keyed by network namespace (`netns`, ours,
    for entries without one) and address pair, for matching with snapshots."""
    ages = {}
    for item in data:
        family = socket.AF_INET6 if item["family"] == "ipv6" else socket.AF_INET
        key = key_of(family, item["laddr"], item["lport"], item["raddr"], item["rport"])
        ages[(int(item.get("netns") or netns), key)] = Age(
            float(item["since"]), bool(item["lower_bound"])
        )
    return ages


def format_age(seconds: float | None, lower_bound: bool) -> str:
    from .render import format_duration

    if seconds is None:
        return "?"
    return (">" if lower_bound else "") + format_duration(seconds)
