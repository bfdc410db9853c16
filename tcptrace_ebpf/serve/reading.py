"""What one scrape reads: the kernel's arrays and counters, and what only user
space knows (sockets older than tracing, CLOSE_WAIT holders and their
containers, ports in use per destination), as one `KernelReading`."""

from __future__ import annotations

import time
from pathlib import Path

from ..host.workloads import Workloads
from ..model.owners import Workload
from .holders import CloseWaitHolders
from .metrics import CloseWaitOwner, KernelReading
from .payloads import old_workload_of, workload_of
from .tracking import SocketTracking


def ephemeral_port_count(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        low, high = (int(part) for part in Path(path).read_text().split())
    except (OSError, ValueError):
        return 0
    return max(0, high - low + 1)


def _owner(comm: str, since: float, workload: Workload) -> CloseWaitOwner:
    return CloseWaitOwner(
        comm=comm,
        since=since,
        namespace=workload.namespace,
        pod=workload.pod,
        container=workload.container,
    )


def read_kernel(
    tracking: SocketTracking, holders: CloseWaitHolders, workloads: Workloads
) -> KernelReading:
    """What one scrape needs (called from the HTTP threads)."""
    tracer = tracking.tracer
    arrays = tracer.metric_arrays()
    counters = tracer.counters()
    now = time.time()
    offset = now - time.monotonic()
    owners = [
        _owner(
            holders.comm_of(sock.pair) or sock.comm,
            sock.since_ns / 1e9 + offset,
            workload_of(sock, holders, workloads),
        )
        for sock in tracer.close_wait_sockets()
    ]
    extra: dict[int, int] = {}
    dests = tracer.dest_ports()
    preexisting = tracking.preexisting
    if preexisting is not None:
        extra = preexisting.counts()
        owners.extend(
            _owner(
                holders.comm_of(old.pair) or old.comm or "unknown",
                old.since,
                old_workload_of(old, holders, workloads),
            )
            for old in preexisting.close_wait()
        )
        for dest, count in preexisting.dests().items():
            dests[dest] = dests.get(dest, 0) + count
    return KernelReading(
        arrays=arrays,
        counters=counters,
        sockets_extra=extra,
        close_wait=owners,
        ephemeral_ports=ephemeral_port_count(),
        ephemeral_ports_in_use_max=max(dests.values(), default=0),
        programs=tracer.program_runs(),
        now=now,
    )
