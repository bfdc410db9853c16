"""CLOSE_WAIT leaks: which process holds sockets whose peer closed, how many,
since when (pure: grouping and summaries; commands/closewait.py gathers).

A socket sits in CLOSE_WAIT when the peer has closed and the local program
never called close(). Each is dated with what the tracer measured: the time
it entered CLOSE_WAIT, or, for sockets already there when the tracer
started, a lower bound.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .addresses import AddressPair
from .owners import ProcessInfo


@dataclass(frozen=True, slots=True)
class Age:
    """When a socket entered CLOSE_WAIT, as the tracer knows it."""

    since: float  # unix seconds
    lower_bound: bool  # it was already in CLOSE_WAIT then (tracer started later)


@dataclass(frozen=True, slots=True)
class LeakedSocket:
    pair: AddressPair
    inode: int
    recv_q: int  # data bytes the program has not read
    age_s: float | None  # None: no tracer was running to measure it
    age_is_lower_bound: bool
    holders: tuple[ProcessInfo, ...]

    def to_json(self, holder: ProcessInfo | None) -> dict[str, Any]:
        pair = self.pair
        return {
            "pid": holder.pid if holder else None,
            "comm": holder.comm if holder else None,
            **pair.endpoints_json(),
            "age_s": None if self.age_s is None else round(self.age_s, 3),
            "age_is_lower_bound": self.age_is_lower_bound,
            "recv_q": self.recv_q,
            "family": pair.family_name,
            "inode": self.inode,
            "cmdline": holder.cmdline if holder else None,
            "cgroup": holder.cgroup if holder else None,
            "container_id": holder.container_id if holder else None,
            "netns": pair.netns,
            **(holder.names_json() if holder else {}),
        }


@dataclass
class ProcessGroup:
    """The CLOSE_WAIT sockets one process holds (holder None: no process holds them)."""

    holder: ProcessInfo | None
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
        return sorted({sock.pair.lport for sock in self.sockets})

    def top_peers(self, limit: int = 5) -> list[tuple[str, int, int]]:
        counts = Counter((sock.pair.raddr, sock.pair.rport) for sock in self.sockets)
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
            **(holder.names_json() if holder else {}),
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
