"""TIME_WAIT pressure: where TIME_WAIT piles up, against the ephemeral port range.

A connect() takes a local port from the ephemeral range, and that port stays
taken towards the same remote address and port until the connection's
TIME_WAIT ends. So exhaustion is per destination: once the ports in use
towards one remote address:port reach the size of the range, connect()
there fails with EADDRNOTAVAIL. TIME_WAIT on the server side (the server
closed first) holds no ephemeral port and is shown per local service port.

No process holds a TIME_WAIT socket; the daemon knows which program made
each connection, so with it running the view also says which programs
leave TIME_WAIT behind.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .addresses import AddressPair, Destination, HasEndpoints
from .states import TcpState


class Listed(HasEndpoints, Protocol):
    """A socket of a sock_diag listing, as far as the view needs it."""

    @property
    def state(self) -> int: ...
    @property
    def is_timewait(self) -> bool: ...


@dataclass
class DestinationUse:
    """The connections towards one destination, each holding a local port."""

    dest: Destination
    time_wait: int = 0
    other: int = 0  # connections still open (or closing) to it

    @property
    def in_use(self) -> int:
        return self.time_wait + self.other


@dataclass
class Pressure:
    range: tuple[int, int]
    destinations: list[DestinationUse] = field(default_factory=list)
    service_ports: list[tuple[int, int]] = field(default_factory=list)  # (local port, TIME_WAIT)
    programs: list[tuple[str, int]] = field(default_factory=list)  # (comm, TIME_WAIT)
    # ((namespace, pod, container), TIME_WAIT) in every network namespace, from the daemon.
    workloads: list[tuple[tuple[str, str, str], int]] = field(default_factory=list)

    @property
    def range_size(self) -> int:
        return self.range[1] - self.range[0] + 1

    def to_json(self, top: int) -> dict[str, Any]:
        size = self.range_size
        return {
            "ephemeral_range": list(self.range),
            "ephemeral_ports": size,
            "destinations": [
                {
                    "raddr": use.dest.raddr,
                    "rport": use.dest.rport,
                    "time_wait": use.time_wait,
                    "other": use.other,
                    "in_use": use.in_use,
                    "used_fraction": round(use.in_use / size, 4) if size else None,
                }
                for use in self.destinations[:top]
            ],
            "service_ports": [
                {"lport": port, "time_wait": count} for port, count in self.service_ports[:top]
            ],
            "programs": [{"comm": comm, "time_wait": count} for comm, count in self.programs[:top]],
            "workloads": [
                {"namespace": ns or None, "pod": pod or None, "container": name or None,
                 "time_wait": count}
                for (ns, pod, name), count in self.workloads[:top]
            ],
        }  # fmt: skip


def pressure(
    sockets: Iterable[Listed],
    port_range: tuple[int, int],
    owners: Mapping[AddressPair, str] | None = None,
    netns: int = 0,
) -> Pressure:
    """Group a snapshot of network namespace `netns` (pure): client-side ports
    in use per destination, server-side TIME_WAIT per local port, TIME_WAIT
    per program (from owners, by address pair)."""
    low, high = port_range
    sockets = list(sockets)
    listening = {sock.lport for sock in sockets if sock.state == TcpState.LISTEN}
    uses: dict[Destination, DestinationUse] = {}
    service: Counter[int] = Counter()
    programs: Counter[str] = Counter()
    for sock in sockets:
        if sock.state in (TcpState.LISTEN, TcpState.CLOSE, TcpState.SYN_RECV):
            continue
        waiting = sock.is_timewait
        if low <= sock.lport <= high and sock.lport not in listening:
            dest = Destination(netns, sock.family, sock.raddr, sock.rport)
            use = uses.get(dest)
            if use is None:
                use = uses[dest] = DestinationUse(dest)
            if waiting:
                use.time_wait += 1
            else:
                use.other += 1
        elif waiting:
            service[sock.lport] += 1
        if waiting and owners is not None:
            comm = owners.get(AddressPair.of(sock, netns))
            programs[comm or "unknown"] += 1
    ranked = sorted(uses.values(), key=lambda use: (-use.in_use, use.dest.raddr, use.dest.rport))
    return Pressure(
        range=port_range,
        destinations=ranked,
        service_ports=sorted(service.items(), key=lambda item: (-item[1], item[0])),
        programs=sorted(programs.items(), key=lambda item: (-item[1], item[0])),
    )


def by_workload(items: Iterable[Mapping[str, Any]]) -> list[tuple[tuple[str, str, str], int]]:
    """TIME_WAIT per container and pod, from the daemon's list of followed
    timewait sockets (every network namespace), biggest first (pure)."""
    counts: Counter[tuple[str, str, str]] = Counter(
        (item.get("namespace") or "", item.get("pod") or "", item.get("container") or "")
        for item in items
    )
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))
