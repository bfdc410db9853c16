"""What the daemon's local API answers (`closewait` and `timewait` ask it):
the sockets in CLOSE_WAIT with when they entered it, and the timewait
sockets with the program that made each connection."""

from __future__ import annotations

import time

from ..host.snapshot import OldCloseWait
from ..host.workloads import Workloads
from ..kernel.probe import KernelCloseWait
from ..model.addresses import AddressPair
from ..model.owners import Workload
from .holders import CloseWaitHolders
from .tracking import SocketTracking


def _described(
    pair: AddressPair, since: float, lower_bound: bool, pid: int, comm: str
) -> dict[str, object]:
    return {
        "family": pair.family_name,
        **pair.endpoints_json(),
        "netns": pair.netns,
        "since": since,
        "lower_bound": lower_bound,
        "pid": pid,
        "comm": comm,
    }


def workload_of(
    sock: KernelCloseWait, holders: CloseWaitHolders | None, workloads: Workloads
) -> Workload:
    """The container of the process holding it (from /proc), or else of the
    owner the kernel saw (its cgroup id)."""
    path = holders.cgroup_of(sock.pair) if holders is not None else None
    if path:
        return workloads.of_path(path)
    return workloads.of_id(sock.cgroup_id)


def old_workload_of(
    old: OldCloseWait, holders: CloseWaitHolders | None, workloads: Workloads
) -> Workload:
    path = (holders.cgroup_of(old.pair) if holders is not None else None) or old.cgroup
    return workloads.of_path(path) if path else Workload()


def close_wait_list(
    tracking: SocketTracking, holders: CloseWaitHolders | None, workloads: Workloads
) -> list[dict[str, object]]:
    """Sockets in CLOSE_WAIT and when they entered it."""
    offset = time.time() - time.monotonic()
    result: list[dict[str, object]] = []
    for sock in tracking.tracer.close_wait_sockets():
        described = _described(sock.pair, sock.since_ns / 1e9 + offset, False, sock.pid, sock.comm)
        described.update(workload_of(sock, holders, workloads).to_json())
        result.append(described)
    if tracking.preexisting is not None:
        for old in tracking.preexisting.close_wait():
            described = _described(old.pair, old.since, True, 0, old.comm)
            described.update(old_workload_of(old, holders, workloads).to_json())
            result.append(described)
    return result


def time_wait_list(tracking: SocketTracking, workloads: Workloads) -> list[dict[str, object]]:
    """Timewait sockets and the program that made each connection."""
    return [
        {
            "netns": pair.netns,
            **pair.endpoints_json(),
            "comm": comm,
            **workloads.of_id(cgroup_id).to_json(),
        }
        for pair, comm, cgroup_id in tracking.tracer.timewait_owners()
    ]
