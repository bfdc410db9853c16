"""Human-readable lines for terminals: one per event, one per lifecycle.

Event lines fit 80 columns: ``ss``'s short state names, and the address
pair shortened in the middle when a line would not fit otherwise. The JSON
outputs carry every detail.
"""

from __future__ import annotations

import time
from functools import lru_cache

from .events import AF_INET6, F_INFERRED_TIME, Event
from .lifecycle import Lifecycle
from .states import short_name, state_name

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
    if event.flags & F_INFERRED_TIME:
        duration = "~" + duration
    head = f"{format_clock(event.ts)} {who(event.pid, event.comm)}"
    tail = f"{transition} {duration}"
    pair = fit_pair(
        format_endpoint(event.family, event.laddr, event.lport),
        format_endpoint(event.family, event.raddr, event.rport),
        width - len(head) - len(tail) - 2,
    )
    return f"{head} {pair} {tail}"


def lifecycle_line(life: Lifecycle) -> str:
    """One lifecycle: when it started, owner, role, pair, how it closed, and its path."""
    start = next((span.start for span in life.states if span.start is not None), life.last_ts)
    path = " > ".join(
        f"{state_name(span.state)} {format_duration(span.duration_s)}" for span in life.states
    )
    pair = (
        format_endpoint(life.family, life.laddr, life.lport)
        + ">"
        + format_endpoint(life.family, life.raddr, life.rport)
    )
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
