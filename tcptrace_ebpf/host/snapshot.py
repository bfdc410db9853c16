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

On a busy host the snapshot has hundreds of thousands of sockets: each is
kept as a few bytes in buffers shared by all (`Preexisting`; its address
pair packed, host/packedpairs.py), about 32 bytes a socket (3.4 MB for
108,000, against 19 MB as address pairs keying dicts), and so is each one
the listing finds, as it finds it (`Listed`): serve with 108,000 older
sockets went from 67 to 42 MB, its peak from 94 to 60 MB (README
"Footprint"). Sockets are looked up by their address pair (network
namespace included), the type the tracer turns the kernel's reports into.
It runs in the daemon itself: measured with `bench/sockdiag.py` on 100,000
sockets, the listing takes 1.9 s. (In a child process, as it once ran to
contain pyroute2's memory, it took 3.5 s, the daemon kept 41 MB, and
multiprocessing's resource tracker, 11 MB, stayed for the daemon's life.)
"""

from __future__ import annotations

import heapq
import struct
import threading
import time
from array import array
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from ..kernel.interface import ADOPT_OLD_TIMEWAIT
from ..model.addresses import AddressPair, Destination
from ..model.states import TcpState
from .packedpairs import PACKING, PackedPairs, pack, unpack
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


# A socket's state byte: its TCP state, with this bit for a timewait socket;
# 0 once it is forgotten (no TCP state is 0).
_TIMEWAIT_BIT: Final = 0x80
_STATE_MASK: Final = 0x7F

K = TypeVar("K")


def _take_one(counter: Counter[K], key: K) -> None:
    """One fewer of `key`; at none, no row (counts() and the metrics list
    only what there is). Each socket is taken once (its state byte is then
    0), so none goes below zero; one that did would stay, to show."""
    counter[key] -= 1
    if not counter[key]:
        del counter[key]


class _Family:
    """One family's sockets, per socket a packed pair, a state byte, a due
    time (timewait sockets: seconds from the snapshot) and a destination
    index, in parallel buffers: no object per socket."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.width = PACKING[family].size
        self.pairs = bytearray()
        self.states = bytearray()
        self.due = array("d")
        self.destination = array("I")

    def sorted_by_pair(self) -> tuple[PackedPairs, bytearray, array[float], array[int]]:
        """The same sockets in the order of their packed pairs, each pair
        once. The transient objects this takes (a key each) all go together
        when it returns."""
        width = self.width
        keys = [
            bytes(self.pairs[start : start + width]) for start in range(0, len(self.pairs), width)
        ]
        self.pairs = bytearray()
        order = sorted(range(len(keys)), key=keys.__getitem__)
        last = len(order) - 1
        # A pair listed twice (a socket closing as the listing ran) is
        # counted once, as listed last.
        unique = [
            index
            for rank, index in enumerate(order)
            if rank == last or keys[order[rank + 1]] != keys[index]
        ]
        del order
        pairs = PackedPairs(self.family, [keys[index] for index in unique])
        del keys
        return (
            pairs,
            bytearray(self.states[index] for index in unique),
            array("d", (self.due[index] for index in unique)),
            array("I", (self.destination[index] for index in unique)),
        )


class Listed:
    """Sockets as a listing finds them, packed as they come (see `add`), to
    become a `Preexisting`: a busy host's hundreds of thousands are never
    held as objects, which would be most of a listing's memory and, freed,
    leave the heap scattered."""

    def __init__(self) -> None:
        self.families: dict[int, _Family] = {}
        self.destinations: list[Destination | None] = [None]  # index 0: not a client
        self._destination_index: dict[Destination, int] = {}

    def add(self, record: Record) -> None:
        family = self.families.get(record.pair.family)
        if family is None:
            family = self.families[record.pair.family] = _Family(record.pair.family)
        family.pairs += pack(record.pair)
        if record.timewait:
            family.states.append(record.state | _TIMEWAIT_BIT)
            family.due.append(min(record.expires_ms / 1000, TIMEWAIT_LEN_S) + TIMEWAIT_GRACE_S)
        else:
            family.states.append(record.state)
            family.due.append(0.0)
        if record.client:
            dest = record.pair.destination
            if (index := self._destination_index.get(dest)) is None:
                index = self._destination_index[dest] = len(self.destinations)
                self.destinations.append(dest)
            family.destination.append(index)
        else:
            family.destination.append(0)


class Preexisting:
    """The snapshot's sockets, compact: their address pairs packed in one
    sorted buffer per family (host/packedpairs.py), and per socket, in
    arrays in that order, a state byte, a timewait socket's due time and
    the index of a client's destination: about 32 bytes a socket in all,
    and no object per socket, however many the host has.

    A heal's listing is one too before it is checked against the program's
    maps: `claim` takes out each socket the program follows."""

    def __init__(
        self,
        records: Iterable[Record] | Listed,
        started: float,
        close_wait: Sequence[OldCloseWait] = (),
        namespaces: frozenset[int] = frozenset(),
    ) -> None:
        self.started = started
        # The network namespaces (inodes) listed whole: a socket of one of
        # them that the listing lacks was not there.
        self.namespaces = namespaces
        self._lock = threading.Lock()
        if isinstance(records, Listed):
            listed = records
        else:
            listed = Listed()
            for record in records:
                listed.add(record)
        # The snapshot's time on the monotonic clock.
        taken = time.monotonic() - max(0.0, time.time() - started)
        self._families: dict[int, tuple[int, PackedPairs]] = {}  # family: (first index, pairs)
        self._states = bytearray()
        # When each timewait socket is surely gone (time.monotonic()).
        self._due = array("d")
        # A client's destination: its index in _destinations (0: not a client).
        self._destination = array("I")
        self._destinations = listed.destinations
        for family in list(listed.families):
            pairs, states, due, destination = listed.families.pop(family).sorted_by_pair()
            self._families[family] = (len(self._states), pairs)
            self._states += states
            self._due.extend(taken + seconds if seconds else 0.0 for seconds in due)
            self._destination += destination
        self._counts: Counter[int] = Counter()
        self._timewait = 0
        for value in set(self._states):
            self._counts[value & _STATE_MASK] += self._states.count(value)
            if value & _TIMEWAIT_BIT:
                self._timewait += self._states.count(value)
        self._dests: Counter[Destination] = Counter()
        for index, count in Counter(self._destination).items():
            if dest := self._destinations[index]:
                self._dests[dest] = count
        # Timewait sockets in the order they fall due, as the snapshot gave
        # them; those the kernel re-arms since wait in _rearmed.
        expiring = sorted(
            (due, index)
            for index, due in enumerate(self._due)
            if self._states[index] & _TIMEWAIT_BIT
        )
        self._expiring = array("I", (index for _due, index in expiring))
        self._expiring_due = array("d", (due for due, _index in expiring))
        del expiring
        self._expired = 0  # how far expire_timewait() has gone through _expiring
        self._rearmed: list[tuple[float, int]] = []  # a heap: (due, index)
        # (Of a pair listed twice, the last is kept: it may no longer be in CLOSE_WAIT.)
        self._close_wait: dict[bytes, OldCloseWait] = {}
        for item in close_wait:
            index, packed = self._index(item.pair)
            if index >= 0 and self._states[index] == TcpState.CLOSE_WAIT:
                self._close_wait[packed] = item

    def _index(self, pair: AddressPair) -> tuple[int, bytes]:
        """The socket's index in the per-socket arrays (-1: not in the
        snapshot), and its packed pair."""
        try:
            packed = pack(pair)
        except (KeyError, OSError, struct.error):
            return -1, b""  # no pair of a snapshot socket
        if pair.family not in self._families:
            return -1, packed
        first, pairs = self._families[pair.family]
        position = pairs.position(packed)
        return (first + position if position >= 0 else -1), packed

    def listed(self, pair: AddressPair) -> tuple[int, int, bool]:
        """The socket with this pair: its index (-1 if none), its state (0
        once claimed or forgotten) and whether it is a timewait socket."""
        with self._lock:
            index, _packed = self._index(pair)
            if index < 0:
                return -1, 0, False
            state = self._states[index]
            return index, state & _STATE_MASK, bool(state & _TIMEWAIT_BIT)

    def claim(self, index: int) -> None:
        """The program follows this socket (an index from `listed`): it is
        counted there, not here."""
        with self._lock:
            if self._states[index]:
                self._forget(index, b"")

    def _packed_at(self, index: int) -> bytes:
        for first, pairs in self._families.values():
            if first <= index < first + len(pairs):
                return pairs[index - first]
        raise IndexError(index)

    def adopt(self, news: Iterable[tuple[AddressPair, int]], now: float | None = None) -> None:
        """What the kernel program reported (see Tracer.drain_adopted): sockets
        it now follows, and timewait sockets that went or live on."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for key, value in news:
                index, packed = self._index(key)
                if index < 0 or not self._states[index]:
                    continue  # not one of ours (made between the snapshot and the attach), or gone
                timewait = self._states[index] & _TIMEWAIT_BIT
                if not value & ADOPT_OLD_TIMEWAIT:
                    self._forget(index, packed)  # followed by the kernel from now on
                elif not timewait:
                    continue  # news of a timewait socket: ours is a full one
                elif value & ~ADOPT_OLD_TIMEWAIT == TcpState.CLOSE:
                    self._forget(index, packed)
                else:
                    # Re-armed (the peer's FIN): a full TIME_WAIT from now.
                    state = value & ~ADOPT_OLD_TIMEWAIT
                    self._recount(self._states[index] & _STATE_MASK, state)
                    self._states[index] = state | _TIMEWAIT_BIT
                    self._due[index] = now + TIMEWAIT_LEN_S + TIMEWAIT_GRACE_S
                    heapq.heappush(self._rearmed, (self._due[index], index))

    def expire_timewait(self, now: float | None = None) -> None:
        """Forget timewait sockets whose timer is well past due."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._expired < len(self._expiring) and self._expiring_due[self._expired] <= now:
                self._expire(self._expiring[self._expired], now)
                self._expired += 1
            while self._rearmed and self._rearmed[0][0] <= now:
                self._expire(heapq.heappop(self._rearmed)[1], now)

    def _expire(self, index: int, now: float) -> None:
        # Re-armed since (due later now), or already gone: not this time.
        if self._states[index] & _TIMEWAIT_BIT and self._due[index] <= now:
            self._forget(index, b"")

    def _recount(self, old: int, new: int) -> None:
        _take_one(self._counts, old)
        self._counts[new] += 1

    def _forget(self, index: int, packed: bytes) -> None:
        state = self._states[index]
        self._states[index] = 0
        _take_one(self._counts, state & _STATE_MASK)
        if state & _TIMEWAIT_BIT:
            self._timewait -= 1
        elif state == TcpState.CLOSE_WAIT and self._close_wait:
            self._close_wait.pop(packed or self._packed_at(index), None)
        if dest_index := self._destination[index]:
            dest = self._destinations[dest_index]
            assert dest is not None
            _take_one(self._dests, dest)

    def _live(self) -> Iterator[tuple[int, PackedPairs, int]]:
        """(family's first index, the family's pairs, position) of each
        socket still counted, in order."""
        for first, pairs in self._families.values():
            for position in range(len(pairs)):
                if self._states[first + position]:
                    yield first, pairs, position

    def keys(self) -> set[AddressPair]:
        """Every socket still counted, timewait ones included."""
        with self._lock:
            return {unpack(pairs.family, pairs[position]) for _, pairs, position in self._live()}

    def count_not_in(self, earlier: Preexisting) -> int:
        """How many of the sockets counted here the earlier snapshot does not
        count (one pass over both, in order)."""
        if earlier is self:
            return 0
        found = 0
        with self._lock, earlier._lock:
            for family, (first, pairs) in self._families.items():
                theirs_first, theirs = earlier._families.get(family, (0, PackedPairs(family, [])))
                other = 0
                for position, packed in enumerate(pairs):
                    if not self._states[first + position]:
                        continue
                    while other < len(theirs) and theirs[other] < packed:
                        other += 1
                    if not (
                        other < len(theirs)
                        and theirs[other] == packed
                        and earlier._states[theirs_first + other]
                    ):
                        found += 1
        return found

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
        return self._timewait > 0

    def counts(self) -> dict[int, int]:
        with self._lock:
            return dict(self._counts)

    def close_wait(self) -> list[OldCloseWait]:
        with self._lock:
            return list(self._close_wait.values())

    def dests(self) -> Counter[Destination]:
        with self._lock:
            return Counter(self._dests)

    def __len__(self) -> int:
        with self._lock:
            return sum(self._counts.values())


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


def list_sockets(
    netns: int,
    ports: frozenset[int] = frozenset(),
    family: int | None = None,
    pid: int | None = None,
    every_netns: bool = True,
) -> Preexisting:
    """sock_diag listing of the TCP sockets the filters want, now, in this
    network namespace and (`every_netns`) all others (pods have their own),
    with the programs holding the ones already in CLOSE_WAIT. Each socket
    is packed as it is decoded (`Listed`): a busy host's hundreds of
    thousands are never all held as objects. A check against the program's
    maps then claims those it follows (serve/tracking.py)."""
    from . import procfs, sockdiag
    from .netns import in_each_netns

    # With --pid, only the sockets that process holds (its open files).
    held = set(procfs.socket_holders(pids=[pid])) if pid is not None else None
    listed = Listed()
    leaking: list[tuple[AddressPair, int]] = []  # in CLOSE_WAIT: pair, socket inode

    def list_here(inode: int) -> None:
        listening = {sock.lport for sock in sockdiag.snapshot(states=[TcpState.LISTEN])}

        def keep(sock: DiagSocket) -> None:
            if sock.state in COUNTED and wanted(sock, ports, family, held):
                record = record_of(sock, inode, listening)
                listed.add(record)
                if sock.state == TcpState.CLOSE_WAIT and not sock.is_timewait:
                    leaking.append((record.pair, sock.inode))

        sockdiag.for_each(keep)

    # A namespace not listed (gone meanwhile, or not ours to enter) is
    # counted from its first change.
    namespaces = frozenset(inode for inode, _ in in_each_netns(netns, list_here, every_netns))
    started = time.time()
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
    return Preexisting(listed, started, close_wait, namespaces)
