"""What the kernel program cannot see for itself: sockets that existed before it.

At start-up (before the probes are attached) a sock_diag snapshot tells
which listeners exist, and /proc which processes hold them, so children
accepted later get their listener's owner. Only a listener held by a single
process gets an owner; one shared by several (a master and its workers)
gets none, and its children learn theirs when their holder closes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

from ..model.owners import ListenerSeed
from ..model.states import TcpState
from .sockdiag import DiagSocket

log = logging.getLogger(__name__)


def own_netns_inum() -> int:
    """Inode number of this process's network namespace (as the BPF program reads it)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def listener_seeds(
    sockets: Iterable[DiagSocket],
    holders: dict[int, list[int]],
    comm_of: Callable[[int], str | None],
    netns: int,
    cgroup_of: Callable[[int], int] = lambda pid: 0,
) -> list[ListenerSeed]:
    """One seed per listening port: its count and, if unambiguous, its owner."""
    by_port: dict[int, list[DiagSocket]] = {}
    for sock in sockets:
        if sock.state == TcpState.LISTEN:
            by_port.setdefault(sock.lport, []).append(sock)
    seeds = []
    for port, listening in sorted(by_port.items()):
        pids = sorted({pid for sock in listening for pid in holders.get(sock.inode, [])})
        comm = comm_of(pids[0]) if len(pids) == 1 else None
        if comm is not None:
            seeds.append(
                ListenerSeed(netns, port, pids[0], comm, len(listening), False, cgroup_of(pids[0]))
            )
        else:
            seeds.append(ListenerSeed(netns, port, 0, "", len(listening), True))
    return seeds


def collect_listener_seeds(every_netns: bool = True) -> list[ListenerSeed]:
    """Snapshot the listeners of this network namespace and (`every_netns`)
    every other one (pods have their own), and their holders; empty on failure."""
    from ..errors import UserError
    from . import procfs, sockdiag
    from .netns import in_each_netns
    from .workloads import cgroup_id_of_pid

    def listed(_netns: int) -> list[DiagSocket]:
        return sockdiag.snapshot(states=[TcpState.LISTEN])

    try:
        per_netns = in_each_netns(own_netns_inum(), listed, every_netns)
    except (UserError, OSError) as err:
        log.warning("could not list existing listeners (%s): their children get no owner", err)
        return []
    inodes = {sock.inode for _netns, sockets in per_netns for sock in sockets if sock.inode}
    try:
        holders = procfs.socket_holders(inodes)
    except OSError as err:
        log.warning("could not find the owners of existing listeners (%s)", err)
        return []

    def comm_of(pid: int) -> str | None:
        info = procfs.process_info(pid)
        return info.comm if info is not None else None

    seeds: list[ListenerSeed] = []
    for netns, sockets in per_netns:
        seeds += listener_seeds(sockets, holders, comm_of, netns, cgroup_id_of_pid)
    return seeds
