"""Rebuild each socket's lifecycle from its state-change events.

Pure logic, no bcc and no I/O, so it runs on recorded event streams.

Each event carries its lifecycle id (`sock`) and its position in that
lifecycle (`seq`). The engine applies a lifecycle's events in seq order,
whatever order they arrive in, ignores duplicates, and treats a gap as lost
events once the kernel says an event of that lifecycle was lost (flag
`lost_before`), or when the stream ends. A lifecycle touched by a loss, or
first seen after tracing started, is reported with ``complete: false``.

Memory is bounded: at most `max_open` lifecycles are held; beyond that the
least recently active one is reported, incomplete, and dropped.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ..kernel.interface import EventFlag
from .addresses import AddressPair
from .events import OWNER_SOURCE_NAMES, ROLE_NAMES, TW_END_NAMES, Event
from .owners import NO_WORKLOAD, Workload
from .states import TcpState, state_name

CLOSE = int(TcpState.CLOSE)
LISTEN = int(TcpState.LISTEN)
SYN_SENT = int(TcpState.SYN_SENT)
SYN_RECV = int(TcpState.SYN_RECV)
ACTIVE_CLOSE_STATES = frozenset(
    {int(TcpState.FIN_WAIT1), int(TcpState.FIN_WAIT2), int(TcpState.TIME_WAIT)}
)
PASSIVE_CLOSE_STATES = frozenset({int(TcpState.CLOSE_WAIT), int(TcpState.LAST_ACK)})
CLOSING = int(TcpState.CLOSING)


@dataclass(slots=True)
class StateSpan:
    """A stay in one state: when it began and how long it lasted (None: unknown)."""

    state: int
    start: float | None
    duration_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": state_name(self.state),
            "start": None if self.start is None else round(self.start, 6),
            "duration_s": None if self.duration_s is None else round(self.duration_s, 9),
        }


@dataclass(slots=True)
class Lifecycle:
    sock: int
    pid: int
    comm: str
    owner_source: int
    pair: AddressPair  # its first event's; the local end filled in once known
    role: str
    states: list[StateSpan] = field(default_factory=list)
    close: str | None = None
    complete: bool = False
    time_wait_end: str | None = None
    syn_retrans: int = 0
    preexisting: bool = False
    lost: bool = False
    ended: bool = False
    last_ts: float = 0.0
    cgroup_id: int = 0  # the owner's cgroup v2 id (0: unknown)

    def to_json(self, workload: Workload = NO_WORKLOAD) -> dict[str, Any]:
        """The `lifecycles --json` object: the documented keys, then details,
        then the owner's cgroup id and its container and pod (`workload`)."""
        return {
            "sock": self.sock,
            "pid": self.pid or None,
            "comm": self.comm or None,
            "family": self.pair.family_name,
            **self.pair.endpoints_json(),
            "role": self.role,
            "states": [span.to_json() for span in self.states],
            "close": self.close,
            "complete": self.complete,
            "owner": OWNER_SOURCE_NAMES.get(self.owner_source, "unknown"),
            "time_wait_end": self.time_wait_end,
            "syn_retrans": self.syn_retrans,
            "preexisting": self.preexisting,
            "events_lost": self.lost,
            "cgroup_id": self.cgroup_id or None,
            **workload.names_json(),
        }


def classify_close(
    *,
    role: str,
    visited: list[int],
    last_old_state: int,
    reset_sent: bool,
    reset_received: bool,
    lport: int,
    no_syn: bool = False,
) -> str:
    """How a connection ended: the BPF program's close_kind(), which is the
    rule (it is what tcptrace_connections_closed_total counts), told from
    events. It stays in Python because lifecycles are rebuilt from events
    alone: trace and lifecycles load the program without its metrics (where
    close_kind() runs), and recorded streams carry no close kind;
    tests/test_interface.py compiles the program's function and checks the two
    agree on the recorded streams. `no_syn`: the kernel program saw connect()
    fail before its SYN left (flag no_syn); kernels without that count leave a
    missing local port as the sign."""
    if role == "listener":
        return "listener_closed"
    if reset_received:
        return "refused" if last_old_state == SYN_SENT else "reset_received"
    if reset_sent:
        return "reset_sent"
    if last_old_state == SYN_SENT:
        return "connect_failed" if no_syn or lport == 0 else "timeout"
    if CLOSING in visited:
        return "simultaneous"
    for state in visited:
        if state in ACTIVE_CLOSE_STATES:
            return "active"
        if state in PASSIVE_CLOSE_STATES:
            return "passive"
    # Gone from ESTABLISHED or SYN_RECV without FIN or RST: the peer stopped answering.
    return "timeout"


def _role_of(first: Event) -> str:
    if first.old_state == CLOSE and first.new_state == SYN_SENT:
        return "client"
    if first.old_state == CLOSE and first.new_state == LISTEN:
        return "listener"
    if first.old_state == LISTEN and first.new_state == SYN_RECV:
        return "server"
    return ROLE_NAMES.get(first.role, "unknown")


class _Open:
    """A lifecycle being rebuilt."""

    __slots__ = ("events_lost", "life", "next_seq", "pending", "visited")

    def __init__(self, life: Lifecycle) -> None:
        self.life = life
        self.next_seq = 0
        self.pending: dict[int, Event] = {}
        self.visited: list[int] = []
        self.events_lost = False


@dataclass
class EngineStats:
    events: int = 0
    duplicates: int = 0
    untracked: int = 0
    evicted: int = 0
    lifecycles: int = 0


class LifecycleEngine:
    def __init__(self, max_open: int = 200_000, remember_finished: int = 65_536) -> None:
        self.max_open = max_open
        self.stats = EngineStats()
        self._open: OrderedDict[int, _Open] = OrderedDict()
        self._finished: set[int] = set()
        self._finished_order: deque[int] = deque(maxlen=remember_finished)

    @property
    def open_count(self) -> int:
        return len(self._open)

    def feed(self, event: Event) -> list[Lifecycle]:
        """Take one event; return the lifecycles it completes (usually none)."""
        self.stats.events += 1
        if event.flags & EventFlag.UNTRACKED or event.sock == 0:
            self.stats.untracked += 1
            return []
        sock = event.sock
        entry = self._open.get(sock)
        if entry is None:
            if sock in self._finished:
                self.stats.duplicates += 1
                return []
            entry = self._start(event)
            self._open[sock] = entry
        else:
            self._open.move_to_end(sock)
        if event.seq < entry.next_seq or event.seq in entry.pending:
            self.stats.duplicates += 1
            return []
        entry.pending[event.seq] = event
        if event.flags & EventFlag.LOST_BEFORE:
            entry.events_lost = True
        done = self._drain(entry, give_up_gaps=entry.events_lost)
        finished = [self._finish(sock, entry)] if done else []
        while len(self._open) > self.max_open:
            old_sock, old_entry = next(iter(self._open.items()))
            self._drain(old_entry, give_up_gaps=True)
            self.stats.evicted += 1
            finished.append(self._finish(old_sock, old_entry))
        return finished

    def flush(self, lost_socks: Collection[int] = ()) -> list[Lifecycle]:
        """The stream ended: report every lifecycle still open. `lost_socks` are
        lifecycles the source knows lost events (their last ones, say)."""
        result = []
        for sock, entry in list(self._open.items()):
            if sock in lost_socks:
                entry.events_lost = True
            self._drain(entry, give_up_gaps=True)
            result.append(self._finish(sock, entry))
        return result

    # -- internals -------------------------------------------------------

    def _start(self, event: Event) -> _Open:
        life = Lifecycle(
            sock=event.sock,
            pid=event.pid,
            comm=event.comm,
            owner_source=event.owner_source,
            pair=event.pair,
            role=ROLE_NAMES.get(event.role, "unknown"),
            cgroup_id=event.cgroup_id,
        )
        return _Open(life)

    def _drain(self, entry: _Open, give_up_gaps: bool) -> bool:
        """Apply pending events in order; True when the lifecycle has ended."""
        pending = entry.pending
        while pending:
            event = pending.pop(entry.next_seq, None)
            if event is None:
                if not give_up_gaps:
                    return False
                # The missing events are lost: skip to the next one we have.
                entry.events_lost = True
                entry.next_seq = min(pending)
                continue
            entry.next_seq = event.seq + 1
            self._apply(entry, event)
            if entry.life.ended:
                pending.clear()
                return True
        return entry.life.ended

    def _apply(self, entry: _Open, event: Event) -> None:
        life = entry.life
        states = life.states
        if not states:
            if event.seq == 0 and (
                (event.old_state == CLOSE and event.new_state in (SYN_SENT, LISTEN))
                or (event.old_state == LISTEN and event.new_state == SYN_RECV)
            ):
                life.role = _role_of(event)
            else:
                # Seen mid-life: born before tracing, or its first events were lost.
                life.preexisting = bool(event.flags & EventFlag.PREEXISTING)
                if event.seq != 0:
                    entry.events_lost = True
                states.append(StateSpan(event.old_state, None, event.duration_s))
                entry.visited.append(event.old_state)
        else:
            current = states[-1]
            if current.state != event.old_state:
                # A transition went missing in between.
                entry.events_lost = True
                states.append(StateSpan(event.old_state, None, event.duration_s))
                entry.visited.append(event.old_state)
            else:
                current.duration_s = (
                    event.duration_s
                    if event.duration_s is not None
                    else (max(0.0, event.ts - current.start) if current.start is not None else None)
                )
                if (
                    current.state == SYN_RECV
                    and event.duration_s is not None
                    and current.start is not None
                ):
                    # The kernel dates a server's SYN_RECV back to when the
                    # SYN-ACK left, a round trip before the accepted socket
                    # (and its first event) existed. (Otherwise the two agree
                    # but for float rounding, which must not move the start.)
                    began = event.ts - event.duration_s
                    if began < current.start - 1e-6:
                        current.start = began
        if event.new_state != CLOSE:
            states.append(StateSpan(event.new_state, event.ts))
            entry.visited.append(event.new_state)
        # Later events know the owner better (a child's closer, for one).
        if event.pid:
            life.pid = event.pid
            life.comm = event.comm
            life.owner_source = event.owner_source
            life.cgroup_id = event.cgroup_id
        if event.pair.lport and not life.pair.lport:
            # A client's first event (CLOSE>SYN_SENT) can come before its
            # local port is chosen; a later one knows it.
            life.pair = life.pair._replace(laddr=event.pair.laddr, lport=event.pair.lport)
        life.syn_retrans = max(life.syn_retrans, event.syn_retrans)
        life.last_ts = event.ts
        if event.flags & EventFlag.END_UNSEEN:
            # It ended while the kernel skipped our program: when and how are unknown.
            life.ended = True
            entry.events_lost = True
            states[-1].duration_s = None
            life.close = None
            return
        if event.flags & EventFlag.LAST or event.new_state == CLOSE:
            life.ended = True
            life.time_wait_end = TW_END_NAMES.get(event.tw_end)
            if event.flags & EventFlag.NO_TIME_WAIT:
                life.time_wait_end = "skipped"  # the kernel made no timewait socket
            life.close = classify_close(
                role=life.role,
                visited=entry.visited,
                last_old_state=event.old_state,
                reset_sent=bool(event.flags & EventFlag.RESET_SENT),
                reset_received=bool(event.flags & EventFlag.RESET_RECEIVED),
                lport=event.pair.lport,
                no_syn=bool(event.flags & EventFlag.NO_SYN),
            )

    def _finish(self, sock: int, entry: _Open) -> Lifecycle:
        self._open.pop(sock, None)
        if len(self._finished_order) == self._finished_order.maxlen:
            self._finished.discard(self._finished_order[0])
        self._finished_order.append(sock)
        self._finished.add(sock)
        life = entry.life
        life.lost = entry.events_lost
        if not life.ended:
            life.close = None
        life.complete = life.ended and not life.lost and not life.preexisting
        self.stats.lifecycles += 1
        return life
