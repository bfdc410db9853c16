"""Sockets that existed before the exporter started, until the kernel sees them.

The BPF program counts a socket once it sees it change state. Sockets that
were already there are counted from a sock_diag listing taken at start-up,
just after the probes attach (and again at each heal: serve/tracking.py),
less those the program follows: each stays counted here, in the state the
listing saw, until the program reports seeing it (the `adopted` map).
Timewait sockets never change state on the tracepoint: the program watches
their timers instead and reports when one goes (early, by reuse of its
address pair or a RST, or at its timer). Each is also forgotten once its
timer, as the snapshot gave it, is well past due: the last word where the
kernel cannot tell (see `tw_tuple` in `doctor`).

On a busy host the snapshot has hundreds of thousands of sockets: only
compact records of them are kept. Sockets are keyed by their address pair
(network namespace included), the type the tracer turns the kernel's
reports into, so the two match by equality. It runs in the daemon itself:
measured with `bench/sockdiag.py` on 100,000 sockets, it takes 1.9 s and a
peak of 48 MB that falls back to the 29 MB the records keep (about 240
bytes a socket since the decoder shares ports as it shares addresses: 26 MB
for 108,000, README "Footprint"). (In a child process, as it once ran to
contain pyroute2's memory, it took 3.5 s, the daemon kept 41 MB, and
multiprocessing's resource tracker, 11 MB, stayed for the daemon's life.)
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace

from ..kernel.interface import ADOPT_OLD_TIMEWAIT
from ..model.addresses import AddressPair, Destination
from ..model.states import TcpState
from .sockdiag import DiagSocket

# A timewait socket's timer runs at most TCP_TIMEWAIT_LEN; past its due time
# by this much, it is gone even if the kernel's word was lost.
TIMEWAIT_LEN_S = 60.0
TIMEWAIT_GRACE_S = 2.0

# States a snapshot socket is counted in. SYN_RECV from sock_diag is a request
# socket (it never changes state on the tracepoint and lives milliseconds),
# CLOSE a socket that is bound but unused: neither is counted.
COUNTED = frozenset(
    {
        TcpState.ESTABLISHED, TcpState.SYN_SENT, TcpState.FIN_WAIT1, TcpState.FIN_WAIT2,
        TcpState.TIME_WAIT, TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.LISTEN,
        TcpState.CLOSING,
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class OldCloseWait:
    """A socket already in CLOSE_WAIT at start-up: its age is only known to be at least this."""

    pair: AddressPair
    inode: int
    since: float  # unix time the exporter started: a lower bound of when it entered CLOSE_WAIT
    comm: str  # the program holding it at start-up ("" if none could be found)
    cgroup: str = ""  # that program's cgroup path: its container and pod


@dataclass(frozen=True, slots=True)
class Record:
    """What the daemon keeps of one snapshot socket."""

    pair: AddressPair
    state: int
    timewait: bool
    client: bool  # made by connect(): holds an ephemeral port towards its destination
    expires_ms: int = 0  # a timewait socket's timer: milliseconds left at the snapshot


class Preexisting:
    def __init__(
        self,
        records: Iterable[Record],
        started: float,
        close_wait: Sequence[OldCloseWait] = (),
    ) -> None:
        self.started = started
        self._lock = threading.Lock()
        self._state: dict[AddressPair, int] = {}
        self._timewait: dict[AddressPair, int] = {}
        # When each timewait socket is surely gone (time.monotonic()).
        self._timewait_due: dict[AddressPair, float] = {}
        self._clients: set[AddressPair] = set()
        self._dests: Counter[Destination] = Counter()
        # The snapshot's time on the monotonic clock.
        taken = time.monotonic() - max(0.0, time.time() - started)
        for record in records:
            if record.timewait:
                self._timewait[record.pair] = record.state
                self._timewait_due[record.pair] = (
                    taken + min(record.expires_ms / 1000, TIMEWAIT_LEN_S) + TIMEWAIT_GRACE_S
                )
            else:
                self._state[record.pair] = record.state
            if record.client:
                self._clients.add(record.pair)
                self._dests[record.pair.destination] += 1
        self._close_wait = {item.pair: item for item in close_wait}

    def adopt(self, news: Iterable[tuple[AddressPair, int]], now: float | None = None) -> None:
        """What the kernel program reported (see Tracer.drain_adopted): sockets
        it now follows, and timewait sockets that went or live on."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for key, value in news:
                if not value & ADOPT_OLD_TIMEWAIT:
                    self._forget(key)  # followed by the kernel from now on
                elif value & ~ADOPT_OLD_TIMEWAIT == TcpState.CLOSE:
                    if key in self._timewait:
                        self._forget(key)
                elif key in self._timewait:
                    # Re-armed (the peer's FIN): a full TIME_WAIT from now.
                    self._timewait[key] = value & ~ADOPT_OLD_TIMEWAIT
                    self._timewait_due[key] = now + TIMEWAIT_LEN_S + TIMEWAIT_GRACE_S

    def expire_timewait(self, now: float | None = None) -> None:
        """Forget timewait sockets whose timer is well past due."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in [key for key, due in self._timewait_due.items() if due <= now]:
                self._forget(key)

    def _forget(self, key: AddressPair) -> None:
        self._state.pop(key, None)
        self._timewait.pop(key, None)
        self._timewait_due.pop(key, None)
        self._close_wait.pop(key, None)
        if key in self._clients:
            self._clients.discard(key)
            dest = key.destination
            self._dests[dest] -= 1
            if self._dests[dest] <= 0:
                del self._dests[dest]

    def pairs(self) -> dict[AddressPair, AddressPair]:
        """Every socket of the snapshot, each pair mapped to the very object
        it is keyed by."""
        with self._lock:
            return {pair: pair for pairs in (self._state, self._timewait) for pair in pairs}

    def keys(self) -> set[AddressPair]:
        """Every socket of the snapshot, timewait ones included."""
        with self._lock:
            return set(self._state) | set(self._timewait)

    def keep_ages_from(self, earlier: Preexisting) -> None:
        """CLOSE_WAIT sockets an earlier snapshot had keep its (older) lower bound."""
        with earlier._lock:
            older = dict(earlier._close_wait)
        with self._lock:
            for key, item in self._close_wait.items():
                if key in older and older[key].since < item.since:
                    self._close_wait[key] = older[key]

    @property
    def has_timewait(self) -> bool:
        return bool(self._timewait)

    def counts(self) -> dict[int, int]:
        with self._lock:
            result = Counter(self._state.values())
            result.update(self._timewait.values())
            return dict(result)

    def close_wait(self) -> list[OldCloseWait]:
        with self._lock:
            return list(self._close_wait.values())

    def dests(self) -> Counter[Destination]:
        with self._lock:
            return Counter(self._dests)

    def __len__(self) -> int:
        with self._lock:
            return len(self._state) + len(self._timewait)


def record_of(sock: DiagSocket, netns: int, listening: Collection[int]) -> Record:
    """What is kept of one listed socket (pure). `listening`: the ports
    listening in its network namespace."""
    # A connection whose local port is not listening was made by connect().
    client = sock.state != TcpState.LISTEN and sock.lport not in listening
    expires_ms = sock.expires_ms if sock.is_timewait else 0
    return Record(
        AddressPair.of(sock, netns), int(sock.state), sock.is_timewait, client, expires_ms
    )


def wanted(
    sock: DiagSocket,
    ports: frozenset[int],
    family: int | None,
    held: Collection[int] | None,
) -> bool:
    """The tracer's filters, applied to a listed socket. `held`: with --pid,
    the socket inodes that process holds."""
    if ports and sock.lport not in ports and sock.rport not in ports:
        return False
    if family is not None and sock.family != family:
        return False
    return held is None or sock.inode in held


@dataclass
class Listing:
    """One sock_diag listing, compacted: each counted socket by its address
    pair. A check against the program's maps marks those the program
    follows (None); the rest are counted from the listing (preexisting())."""

    records: dict[AddressPair, Record | None]
    close_wait: list[OldCloseWait]
    started: float

    def preexisting(self, previous: Preexisting | None = None) -> Preexisting:
        """The sockets not marked followed, to count until the program sees
        them. Built anew: it stays as small as what it keeps. A socket the
        `previous` snapshot has too is keyed by that snapshot's pair, not
        this listing's: the listing's objects then all go with it, instead
        of staying scattered through the heap among its freed ones (measured
        with 108,000 sockets: the daemon kept 17 MiB more after each heal)."""
        earlier = previous.pairs() if previous is not None else {}
        kept = [
            record if (pair := earlier.get(record.pair)) is None else replace(record, pair=pair)
            for record in self.records.values()
            if record is not None
        ]
        del earlier
        close_wait = [item for item in self.close_wait if self.records.get(item.pair) is not None]
        return Preexisting(kept, self.started, close_wait)


def list_sockets(
    netns: int,
    ports: frozenset[int] = frozenset(),
    family: int | None = None,
    pid: int | None = None,
    every_netns: bool = True,
) -> Listing:
    """sock_diag listing of the TCP sockets the filters want, now, in this
    network namespace and (`every_netns`) all others (pods have their own),
    with the programs holding the ones already in CLOSE_WAIT. Each socket
    is compacted as it is decoded: a busy host's hundreds of thousands are
    never all held as decoded rows."""
    from . import procfs, sockdiag
    from .netns import in_each_netns

    # With --pid, only the sockets that process holds (its open files).
    held = set(procfs.socket_holders(pids=[pid])) if pid is not None else None
    Found = tuple[dict[AddressPair, Record | None], list[tuple[AddressPair, int]]]

    def list_here(inode: int) -> Found:
        records: dict[AddressPair, Record | None] = {}
        leaking: list[tuple[AddressPair, int]] = []  # in CLOSE_WAIT: pair, socket inode
        listening = {sock.lport for sock in sockdiag.snapshot(states=[TcpState.LISTEN])}

        def keep(sock: DiagSocket) -> None:
            if sock.state in COUNTED and wanted(sock, ports, family, held):
                record = record_of(sock, inode, listening)
                records[record.pair] = record
                if sock.state == TcpState.CLOSE_WAIT and not sock.is_timewait:
                    leaking.append((record.pair, sock.inode))

        sockdiag.for_each(keep)
        return records, leaking

    # A namespace not listed (gone meanwhile, or not ours to enter) is
    # counted from its first change.
    per_netns = in_each_netns(netns, list_here, every_netns)
    started = time.time()
    records, leaking = per_netns[0][1]  # our own namespace: usually most of them
    for _inode, (more, more_leaking) in per_netns[1:]:
        records.update(more)
        leaking += more_leaking
    # Socket inodes are unique on the host: one search of /proc for every namespace.
    inodes = {inode for _pair, inode in leaking if inode}
    holders = procfs.socket_holders(inodes) if inodes else {}

    def comm_of_inode(inode: int) -> tuple[str, str]:
        for holder in holders.get(inode, []):
            info = procfs.process_info(holder)
            if info is not None:
                return info.comm, info.cgroup
        return "", ""

    close_wait = [
        OldCloseWait(pair, inode, started, *comm_of_inode(inode)) for pair, inode in leaking
    ]
    return Listing(records, close_wait, started)
