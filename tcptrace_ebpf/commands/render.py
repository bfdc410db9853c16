"""Human-readable lines for terminals: one per event, one per lifecycle, and
the tables of closewait and timewait.

Event lines fit 80 columns: ``ss``'s short state names, and the address
pair shortened in the middle when a line would not fit otherwise. The JSON
outputs carry every detail.
"""

from __future__ import annotations

import time
from functools import lru_cache

from ..kernel.interface import EventFlag
from ..model.addresses import AddressPair
from ..model.closewait import ProcessGroup
from ..model.events import AF_INET6, Event
from ..model.lifecycle import Lifecycle
from ..model.states import short_name, state_name
from ..model.timewait import Pressure

WIDTH = 80


def format_duration(seconds: float | None) -> str:
    """Compact duration: 45us, 12.3ms, 2.3s, 1m02s, 3h04m, 2d03h; '?' when unknown."""
    if seconds is None:
        return "?"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        value = seconds * 1e3
        return f"{value:.1f}ms" if value < 100 else f"{value:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_endpoint(family: int, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == AF_INET6 else f"{addr}:{port}"


def local_endpoint(pair: AddressPair) -> str:
    return format_endpoint(pair.family, pair.laddr, pair.lport)


def remote_endpoint(pair: AddressPair) -> str:
    return format_endpoint(pair.family, pair.raddr, pair.rport)


@lru_cache(maxsize=4)
def _clock_of_second(second: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(second))


def format_clock(ts: float) -> str:
    return _clock_of_second(int(ts))


def _shorten_host(endpoint: str, drop: int) -> str:
    """Drop `drop` characters from the left of an endpoint's address, keeping the port."""
    host, _, port = endpoint.rpartition(":")
    if drop <= 0 or len(host) <= 2:
        return endpoint
    keep = max(1, len(host) - drop - 1)
    return "…" + host[len(host) - keep :] + ":" + port


def fit_pair(local: str, remote: str, room: int) -> str:
    """`local>remote` in at most `room` columns: ports stay, addresses lose their left end,
    the local one first (the reader knows which host they are on)."""
    excess = len(local) + 1 + len(remote) - room
    if excess > 0:
        local = _shorten_host(local, excess)
        excess = len(local) + 1 + len(remote) - room
    if excess > 0:
        remote = _shorten_host(remote, excess)
    return f"{local}>{remote}"


def who(pid: int, comm: str) -> str:
    if not pid:
        return "?"
    return f"{comm[:10]}[{pid}]" if comm else f"[{pid}]"


TRACE_HEADER = "TIME     PROCESS[PID] LOCAL>REMOTE OLD>NEW TIME-IN-OLD"


def trace_line(event: Event, width: int = WIDTH) -> str:
    """One state change: time, owner, address pair, OLD>NEW, time spent in OLD."""
    transition = f"{short_name(event.old_state)}>{short_name(event.new_state)}"
    duration = format_duration(event.duration_s)
    if event.flags & EventFlag.INFERRED_TIME:
        duration = "~" + duration
    head = f"{format_clock(event.ts)} {who(event.pid, event.comm)}"
    tail = f"{transition} {duration}"
    pair = fit_pair(
        local_endpoint(event.pair), remote_endpoint(event.pair), width - len(head) - len(tail) - 2
    )
    return f"{head} {pair} {tail}"


def lifecycle_line(life: Lifecycle) -> str:
    """One lifecycle: when it started, owner, role, pair, how it closed, and its path."""
    start = next((span.start for span in life.states if span.start is not None), life.last_ts)
    path = " > ".join(
        f"{state_name(span.state)} {format_duration(span.duration_s)}" for span in life.states
    )
    pair = f"{local_endpoint(life.pair)}>{remote_endpoint(life.pair)}"
    close = life.close or "open"
    if life.time_wait_end:
        close += f"/tw-{life.time_wait_end}"
    notes = []
    if life.preexisting:
        notes.append("started before tracing")
    if life.lost:
        notes.append("events lost")
    if not life.complete and not notes and not life.ended:
        notes.append("still open")
    suffix = f" [incomplete: {', '.join(notes)}]" if not life.complete else ""
    return (
        f"{format_clock(start)} {who(life.pid, life.comm)} {life.role} {pair} "
        f"{close}: {path}{suffix}"
    )


def format_age(seconds: float | None, lower_bound: bool) -> str:
    """A CLOSE_WAIT age; '>' when only a lower bound is known."""
    if seconds is None:
        return "?"
    return (">" if lower_bound else "") + format_duration(seconds)


def close_wait_table(
    groups: list[ProcessGroup], count: int, min_age: float, source: str, per_socket: bool
) -> list[str]:
    """closewait's table: one line per holding process (with its command line
    and container), or with `per_socket` one per socket."""
    held = sum(group.count for group in groups if group.holder is not None)
    what = f"ages from {source}" if source else "ages unknown"
    lines = [
        f"{count} sockets in CLOSE_WAIT for at least {min_age:g}s "
        f"({len([g for g in groups if g.holder])} processes hold {held}); {what}"
    ]
    if per_socket:
        lines.append(
            f"{'PID':>7} {'COMM':<15} {'LOCAL':<23} {'REMOTE':<23} {'AGE':>8} {'RECV-Q':>7}"
        )
        for group in groups:
            for sock in sorted(group.sockets, key=lambda s: -(s.age_s or 0)):
                lines.append(
                    f"{group.holder.pid if group.holder else '-':>7} "
                    f"{(group.holder.comm if group.holder else 'unknown')[:15]:<15} "
                    f"{local_endpoint(sock.pair):<23} {remote_endpoint(sock.pair):<23} "
                    f"{format_age(sock.age_s, sock.age_is_lower_bound):>8} {sock.recv_q:>7}"
                )
        return lines
    lines.append(
        f"{'PID':>7} {'COMM':<15} {'COUNT':>6} {'OLDEST':>8} {'MEDIAN':>8}  PORTS  TOP PEERS"
    )
    for group in groups:
        holder = group.holder
        peers = ", ".join(f"{raddr}:{rport} x{count}" for raddr, rport, count in group.top_peers(3))
        ports = ",".join(str(port) for port in group.local_ports[:4])
        lines.append(
            f"{holder.pid if holder else '-':>7} {(holder.comm if holder else 'unknown')[:15]:<15} "
            f"{group.count:>6} {format_age(group.oldest_age_s, group.oldest_is_lower_bound):>8} "
            f"{format_age(group.median_age_s, False):>8}  {ports}  {peers}"
        )
        if holder is not None:
            if holder.pod:
                where = f"pod: {holder.namespace}/{holder.pod}  container: {holder.container}"
            elif holder.container_id:
                where = f"container: {holder.container_id[:12]}"
            else:
                where = f"cgroup: {holder.cgroup}"
            lines.append(f"{'':>7} cmd: {holder.cmdline[:60]}  {where}")
    return lines


def time_wait_table(view: Pressure, top: int) -> list[str]:
    """timewait's tables: ports in use per destination, TIME_WAIT per local
    service port, per program and per container."""
    size = view.range_size
    low, high = view.range
    lines = [
        f"ephemeral ports {low}-{high}: {size} per destination",
        f"{'DESTINATION':<40} {'IN USE':>7} {'TIME_WAIT':>9} {'OF RANGE':>8}",
    ]
    for use in view.destinations[:top]:
        dest = use.dest
        where = format_endpoint(dest.family, dest.raddr, dest.rport)
        share = f"{100 * use.in_use / size:.1f}%" if size else "?"
        lines.append(f"{where:<40} {use.in_use:>7} {use.time_wait:>9} {share:>8}")
    if view.service_ports:
        lines.append(f"{'LOCAL SERVICE PORT':<40} {'TIME_WAIT':>9}")
        lines.extend(f"{port:<40} {count:>9}" for port, count in view.service_ports[:top])
    if view.programs:
        lines.append(f"{'PROGRAM':<40} {'TIME_WAIT':>9}")
        lines.extend(f"{comm:<40} {count:>9}" for comm, count in view.programs[:top])
    if any(any(workload) for workload, _count in view.workloads):
        # Every network namespace: pods have their own.
        lines.append(f"{'POD/CONTAINER (ALL NETWORK NAMESPACES)':<40} {'TIME_WAIT':>9}")
        for (namespace, pod, container), count in view.workloads[:top]:
            where = f"{namespace}/{pod}/{container}" if pod else (container or "(host)")
            lines.append(f"{where:<40} {count:>9}")
    return lines
