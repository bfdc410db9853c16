"""Sockets that existed before the exporter started, until the kernel sees them.

The BPF program counts a socket once it sees it change state. Sockets that
were already there are counted from a sock_diag snapshot taken at start-up
(before the probes attach): each stays counted here, in the state the
snapshot saw, until the program reports seeing it (the `adopted` map), or,
for timewait sockets (whose life no tracepoint shows), until sock_diag no
longer lists them.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .probe import DestKey, TupleKey
from .sockdiag import DiagSocket
from .states import TcpState

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


def packed(family: int, address: str) -> bytes:
    """An address as struct tt_tuple stores it: 16 bytes, IPv4 in the first 4."""
    raw = socket.inet_pton(family, address)
    return raw.ljust(16, b"\0")


def key_of(sock: DiagSocket, netns: int) -> TupleKey:
    return (
        netns,
        sock.family,
        sock.lport,
        sock.rport,
        packed(sock.family, sock.laddr),
        packed(sock.family, sock.raddr),
    )


@dataclass(frozen=True, slots=True)
class OldCloseWait:
    """A socket already in CLOSE_WAIT at start-up: its age is only known to be at least this."""

    key: TupleKey
    inode: int
    since: float  # unix time the exporter started: a lower bound of when it entered CLOSE_WAIT
    comm: str  # the program holding it at start-up ("" if none could be found)


class Preexisting:
    def __init__(
        self,
        sockets: Iterable[DiagSocket],
        netns: int,
        started: float,
        comm_of_inode: Callable[[int], str] = lambda inode: "",
    ) -> None:
        self.started = started
        self._lock = threading.Lock()
        self._state: dict[TupleKey, int] = {}
        self._timewait: dict[TupleKey, int] = {}
        self._close_wait: dict[TupleKey, OldCloseWait] = {}
        self._dests: Counter[DestKey] = Counter()
        self._dest_of: dict[TupleKey, DestKey] = {}
        sockets = list(sockets)
        listening = {sock.lport for sock in sockets if sock.state == TcpState.LISTEN}
        for sock in sockets:
            if sock.state not in COUNTED:
                continue
            key = key_of(sock, netns)
            if sock.is_timewait:
                self._timewait[key] = sock.state
            else:
                self._state[key] = sock.state
            if sock.state == TcpState.CLOSE_WAIT and not sock.is_timewait:
                self._close_wait[key] = OldCloseWait(
                    key, sock.inode, started, comm_of_inode(sock.inode)
                )
            # A connection whose local port is not listening was made by connect():
            # it holds an ephemeral port towards its destination.
            if sock.state != TcpState.LISTEN and sock.lport not in listening:
                dest = (netns, sock.family, sock.rport, key[5])
                self._dests[dest] += 1
                self._dest_of[key] = dest

    def adopt(self, keys: Iterable[TupleKey]) -> None:
        """The kernel program now follows these sockets: stop counting them here."""
        with self._lock:
            for key in keys:
                self._forget(key)

    def _forget(self, key: TupleKey) -> None:
        self._state.pop(key, None)
        self._timewait.pop(key, None)
        self._close_wait.pop(key, None)
        dest = self._dest_of.pop(key, None)
        if dest is not None:
            self._dests[dest] -= 1
            if self._dests[dest] <= 0:
                del self._dests[dest]

    @property
    def has_timewait(self) -> bool:
        return bool(self._timewait)

    def timewait_still_there(self, present: set[TupleKey]) -> None:
        """Forget timewait sockets a fresh sock_diag listing no longer shows."""
        with self._lock:
            for key in [key for key in self._timewait if key not in present]:
                self._forget(key)

    def counts(self) -> dict[int, int]:
        with self._lock:
            result = Counter(self._state.values())
            result.update(self._timewait.values())
            return dict(result)

    def close_wait(self) -> list[OldCloseWait]:
        with self._lock:
            return list(self._close_wait.values())

    def dests(self) -> Counter[DestKey]:
        with self._lock:
            return Counter(self._dests)

    def __len__(self) -> int:
        with self._lock:
            return len(self._state) + len(self._timewait)


def wanted(
    sock: DiagSocket,
    ports: frozenset[int],
    family: int | None,
    pid: int | None,
    holders: dict[int, list[int]],
) -> bool:
    """The tracer's filters, applied to a snapshot socket."""
    if ports and sock.lport not in ports and sock.rport not in ports:
        return False
    if family is not None and sock.family != family:
        return False
    return pid is None or pid in holders.get(sock.inode, ())


def take_snapshot(
    netns: int,
    ports: frozenset[int] = frozenset(),
    family: int | None = None,
    pid: int | None = None,
) -> Preexisting:
    """sock_diag snapshot of this namespace's TCP sockets the filters want, now,
    with the programs holding the ones already in CLOSE_WAIT."""
    from . import procfs, sockdiag

    sockets = sockdiag.snapshot()
    started = time.time()
    if pid is not None:
        all_holders = procfs.socket_holders({sock.inode for sock in sockets if sock.inode})
    else:
        all_holders = {}
    sockets = [sock for sock in sockets if wanted(sock, ports, family, pid, all_holders)]
    leaking = {sock.inode for sock in sockets if sock.state == TcpState.CLOSE_WAIT and sock.inode}
    holders = procfs.socket_holders(leaking) if leaking else {}

    def comm_of_inode(inode: int) -> str:
        for holder in holders.get(inode, []):
            info = procfs.process_info(holder)
            if info is not None:
                return info.comm
        return ""

    return Preexisting(sockets, netns, started, comm_of_inode)
