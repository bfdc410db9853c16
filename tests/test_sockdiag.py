"""sock_diag snapshots of real sockets on loopback.

Every socket is made on 127.0.0.1 / ::1 with an ephemeral port and closed by
the ``tcp`` fixture, even when a test fails; other sockets on the machine are
ignored by matching on our own ports. TIME_WAIT and orphaned FIN_WAIT2 sockets
outlive the test (they hold no fd; the kernel drops them within 60 s).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from support import netns_single, nft, requires_root
from support import wait_for as support_wait_for

from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.host import sockdiag
from tcptrace_ebpf.host.netns import run_in
from tcptrace_ebpf.host.snapshot import list_sockets
from tcptrace_ebpf.host.sockdiag import DiagSocket
from tcptrace_ebpf.model.addresses import AddressPair, Destination
from tcptrace_ebpf.model.states import SHORT_NAMES, TcpState

T = TypeVar("T")


class Loopback:
    """Makes loopback sockets and closes them all at teardown."""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []

    def new_socket(self, family: int = socket.AF_INET) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        self._sockets.append(sock)
        return sock

    def listener(self, family: int = socket.AF_INET, backlog: int = 8) -> socket.socket:
        sock = self.new_socket(family)
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        sock.listen(backlog)
        return sock

    def connect(self, listener: socket.socket) -> socket.socket:
        client = self.new_socket(listener.family)
        client.connect(listener.getsockname()[:2])
        return client

    def pair(self, listener: socket.socket) -> tuple[socket.socket, socket.socket]:
        """(client, accepted server side) of a new connection to ``listener``."""
        client = self.connect(listener)
        return client, self.accept(listener)

    def accept(self, listener: socket.socket) -> socket.socket:
        server, _ = listener.accept()
        self._sockets.append(server)
        return server

    def close_all(self) -> None:
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def tcp() -> Iterator[Loopback]:
    loopback = Loopback()
    try:
        yield loopback
    finally:
        loopback.close_all()


def port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def find(
    lport: int, rport: int, states: list[int] | None = None, families: tuple[int, ...] = ()
) -> DiagSocket | None:
    matches = [
        entry
        for entry in sockdiag.snapshot(states, families or (socket.AF_INET, socket.AF_INET6))
        if (entry.lport, entry.rport) == (lport, rport)
    ]
    assert len(matches) <= 1, matches
    return matches[0] if matches else None


def wait_for(probe: Callable[[], T | None], timeout: float = 2.0) -> T:
    """Loopback state changes land a moment after the syscall: poll briefly."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None or time.monotonic() > deadline:
            assert result is not None, "timed out waiting for the socket state"
            return result
        time.sleep(0.01)


def wait_for_state(lport: int, rport: int, state: int) -> DiagSocket:
    def probe() -> DiagSocket | None:
        entry = find(lport, rport)
        return entry if entry is not None and entry.state == state else None

    return wait_for(probe)


def test_established_pair(tcp: Loopback) -> None:
    listener = tcp.listener()
    client, server = tcp.pair(listener)

    client_entry = wait_for_state(port(client), port(listener), TcpState.ESTABLISHED)
    server_entry = wait_for_state(port(listener), port(client), TcpState.ESTABLISHED)

    assert client_entry.family == socket.AF_INET
    assert (client_entry.laddr, client_entry.raddr) == ("127.0.0.1", "127.0.0.1")
    assert client_entry.inode == os.fstat(client.fileno()).st_ino
    assert server_entry.inode == os.fstat(server.fileno()).st_ino
    assert client_entry.uid == server_entry.uid == os.geteuid()
    assert not client_entry.is_timewait
    assert not server_entry.is_timewait
    assert client_entry.cookie != 0
    assert client_entry.cookie != server_entry.cookie
    assert (client_entry.recv_q, client_entry.send_q) == (0, 0)


def test_listen_shows_backlog_and_accept_queue(tcp: Loopback) -> None:
    listener = tcp.listener(backlog=5)
    tcp.connect(listener)  # completed handshake, never accepted

    def queued() -> DiagSocket | None:
        entry = find(port(listener), 0, [TcpState.LISTEN])
        return entry if entry is not None and entry.recv_q == 1 else None

    entry = wait_for(queued)
    assert (entry.laddr, entry.raddr) == ("127.0.0.1", "0.0.0.0")
    assert entry.send_q == 5  # the backlog, as ss shows it
    assert entry.inode == os.fstat(listener.fileno()).st_ino
    assert not entry.is_timewait


def test_close_wait_counts_unread_bytes_and_peer_becomes_timewait_fin_wait2(
    tcp: Loopback,
) -> None:
    listener = tcp.listener()
    client, server = tcp.pair(listener)
    client_port = port(client)
    client.sendall(b"hello")
    client.close()  # peer closes; the server side never reads nor closes

    server_entry = wait_for_state(port(listener), client_port, TcpState.CLOSE_WAIT)
    # rcv_nxt - copied_seq: the 5 unread bytes plus the FIN, which takes a
    # sequence number too (ss shows the same 6).
    assert server_entry.recv_q == 6
    assert server_entry.inode == os.fstat(server.fileno()).st_ino

    # The closed client, orphaned in FIN_WAIT2, is turned into a timewait
    # socket with substate FIN_WAIT2 when tcp_fin_timeout <= 60 s.
    with open("/proc/sys/net/ipv4/tcp_fin_timeout") as file:
        if int(file.read()) > 60:
            pytest.skip("tcp_fin_timeout > 60 s keeps orphaned FIN_WAIT2 sockets full")
    client_entry = wait_for_state(client_port, port(listener), TcpState.FIN_WAIT2)
    assert client_entry.is_timewait
    assert client_entry.timer == sockdiag.TIMEWAIT_TIMER
    assert client_entry.inode == 0


def test_time_wait_socket(tcp: Loopback) -> None:
    listener = tcp.listener()
    client, server = tcp.pair(listener)
    client_port = port(client)
    client.close()  # active close: this side ends in TIME_WAIT
    wait_for_state(port(listener), client_port, TcpState.CLOSE_WAIT)
    server.close()

    entry = wait_for_state(client_port, port(listener), TcpState.TIME_WAIT)
    assert entry.is_timewait
    assert entry.timer == sockdiag.TIMEWAIT_TIMER
    assert 0 < entry.expires_ms <= 60_000
    assert (entry.inode, entry.uid, entry.recv_q, entry.send_q) == (0, 0, 0, 0)
    assert (entry.laddr, entry.raddr) == ("127.0.0.1", "127.0.0.1")
    assert entry.cookie != 0


def test_shutdown_write_gives_full_fin_wait2_socket(tcp: Loopback) -> None:
    listener = tcp.listener()
    client, _ = tcp.pair(listener)
    client.shutdown(socket.SHUT_WR)  # FIN sent, fd kept: a full socket in FIN_WAIT2

    client_entry = wait_for_state(port(client), port(listener), TcpState.FIN_WAIT2)
    assert not client_entry.is_timewait
    assert client_entry.inode == os.fstat(client.fileno()).st_ino
    server_entry = wait_for_state(port(listener), port(client), TcpState.CLOSE_WAIT)
    assert server_entry.recv_q == 1  # the FIN alone


def test_ipv6_loopback(tcp: Loopback) -> None:
    try:
        listener = tcp.listener(socket.AF_INET6)
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    client, _ = tcp.pair(listener)

    entry = wait_for_state(port(client), port(listener), TcpState.ESTABLISHED)
    assert entry.family == socket.AF_INET6
    assert (entry.laddr, entry.raddr) == ("::1", "::1")
    assert entry.inode == os.fstat(client.fileno()).st_ino
    listen_entry = find(port(listener), 0, [TcpState.LISTEN], (socket.AF_INET6,))
    assert listen_entry is not None
    assert (listen_entry.laddr, listen_entry.raddr) == ("::1", "::")
    assert find(port(client), port(listener), families=(socket.AF_INET,)) is None


def test_ipv4_mapped_address_stays_ipv6(tcp: Loopback) -> None:
    dual_stack = tcp.new_socket(socket.AF_INET6)
    try:
        dual_stack.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual_stack.bind(("::", 0))
    except OSError as err:
        pytest.skip(f"no dual-stack IPv6 here: {err}")
    dual_stack.listen(4)
    client = tcp.new_socket()
    client.connect(("127.0.0.1", port(dual_stack)))
    tcp.accept(dual_stack)

    entry = wait_for_state(port(dual_stack), port(client), TcpState.ESTABLISHED)
    assert entry.family == socket.AF_INET6
    assert (entry.laddr, entry.raddr) == ("::ffff:127.0.0.1", "::ffff:127.0.0.1")


def test_state_filter_returns_only_the_asked_states(tcp: Loopback) -> None:
    listener = tcp.listener()
    established_client, _ = tcp.pair(listener)
    closing_client, _ = tcp.pair(listener)
    closing_port = port(closing_client)
    closing_client.close()
    wait_for_state(port(listener), closing_port, TcpState.CLOSE_WAIT)

    close_wait = sockdiag.snapshot([TcpState.CLOSE_WAIT])
    assert {entry.state for entry in close_wait} == {TcpState.CLOSE_WAIT}
    assert (port(listener), closing_port) in {(e.lport, e.rport) for e in close_wait}
    assert (port(listener), port(established_client)) not in {
        (e.lport, e.rport) for e in close_wait
    }

    asked = {TcpState.LISTEN, TcpState.ESTABLISHED}
    mixed = sockdiag.snapshot(asked)
    assert {entry.state for entry in mixed} <= asked
    ports = {(e.lport, e.rport) for e in mixed}
    assert (port(listener), 0) in ports
    assert (port(established_client), port(listener)) in ports

    timewait = sockdiag.snapshot([TcpState.TIME_WAIT, TcpState.FIN_WAIT2])
    assert {entry.state for entry in timewait} <= {TcpState.TIME_WAIT, TcpState.FIN_WAIT2}

    assert sockdiag.snapshot([]) == []


def test_count_by_state(tcp: Loopback) -> None:
    listener = tcp.listener()
    clients = [tcp.pair(listener)[0] for _ in range(3)]
    client_ports = [port(client) for client in clients]
    for client in clients:
        client.close()
    for client_port in client_ports:
        wait_for_state(port(listener), client_port, TcpState.CLOSE_WAIT)

    counts = sockdiag.count_by_state([TcpState.CLOSE_WAIT])
    assert set(counts) == {TcpState.CLOSE_WAIT}
    assert counts[TcpState.CLOSE_WAIT] >= 3
    assert sockdiag.count_by_state([TcpState.LISTEN], [socket.AF_INET])[TcpState.LISTEN] >= 1


def test_a_listing_keeps_each_counted_socket_compacted(tcp: Loopback) -> None:
    """serve's listing (every socket compacted as it is decoded): who made
    each connection, and who holds the ones in CLOSE_WAIT."""
    listener = tcp.listener()
    client, _server = tcp.pair(listener)
    leaving, leaking = tcp.pair(listener)
    leaving_port = port(leaving)
    leaving.close()
    wait_for_state(port(listener), leaving_port, TcpState.CLOSE_WAIT)
    netns = os.stat("/proc/self/ns/net").st_ino

    def pair(lport: int, rport: int) -> AddressPair:
        return AddressPair(netns, socket.AF_INET, "127.0.0.1", lport, "127.0.0.1", rport)

    listing = list_sockets(netns, every_netns=False)
    made, *made_as = listing.listed(pair(port(client), port(listener)))
    accepted, *accepted_as = listing.listed(pair(port(listener), port(client)))
    assert made_as == accepted_as == [TcpState.ESTABLISHED, False]
    # Made by connect(): the two clients (one closed, in FIN_WAIT2) towards
    # the listener; the accepted ends are not clients. Taking a socket out
    # shows whether it counted as one (the host may have other sockets
    # towards the client's port: an earlier test's timewait socket, whose
    # listener had that port, did).
    towards_listener = Destination(netns, socket.AF_INET, "127.0.0.1", port(listener))
    towards_client = Destination(netns, socket.AF_INET, "127.0.0.1", port(client))
    assert listing.dests()[towards_listener] == 2
    others = listing.dests()[towards_client]
    listing.claim(accepted)
    assert listing.dests()[towards_client] == others
    listing.claim(made)
    assert listing.dests()[towards_listener] == 1
    held = [
        item for item in listing.close_wait() if item.pair == pair(port(listener), leaving_port)
    ]
    assert [(item.inode, item.comm) for item in held] == [
        (os.fstat(leaking.fileno()).st_ino, Path("/proc/self/comm").read_text().strip())
    ]


def test_bound_inactive_socket_is_reported_as_close(tcp: Loopback) -> None:
    bound = tcp.new_socket()
    bound.bind(("127.0.0.1", 0))
    if find(port(bound), 0, [TcpState.BOUND_INACTIVE]) is None:
        pytest.skip("this kernel cannot dump bound-inactive sockets (needs 6.8+)")
    for asked in (TcpState.CLOSE, TcpState.BOUND_INACTIVE):
        entry = find(port(bound), 0, [asked])
        assert entry is not None
        assert entry.state == TcpState.CLOSE
        assert entry.inode == os.fstat(bound.fileno()).st_ino
    assert find(port(bound), 0, [TcpState.LISTEN, TcpState.ESTABLISHED]) is None


def parse_ss_endpoint(text: str) -> tuple[str, int]:
    address, _, port_text = text.rpartition(":")
    return address.strip("[]"), 0 if port_text == "*" else int(port_text)


def ss_sockets() -> dict[tuple[int, int], tuple[str, int, int, str, str]]:
    """``ss -tan`` rows by (local port, peer port): (state, recv-q, send-q, local, peer)."""
    output = subprocess.run(
        ["ss", "-tan"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    rows = {}
    for line in output.splitlines()[1:]:
        state, recv_q, send_q, local, peer = line.split()[:5]
        local_address, local_port = parse_ss_endpoint(local)
        peer_address, peer_port = parse_ss_endpoint(peer)
        rows[local_port, peer_port] = (
            state,
            int(recv_q),
            int(send_q),
            local_address,
            peer_address,
        )
    return rows


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_agrees_with_ss(tcp: Loopback) -> None:
    listener = tcp.listener()
    tcp.pair(listener)  # ESTABLISHED both sides
    tcp.connect(listener)  # waits in the accept queue: LISTEN Recv-Q 1
    unread_client, _ = tcp.pair(listener)
    unread_client.sendall(b"unread bytes")
    half_closed, _ = tcp.pair(listener)
    half_closed.shutdown(socket.SHUT_WR)
    closed_client, _ = tcp.pair(listener)
    closed_port = port(closed_client)
    closed_client.close()
    wait_for_state(port(listener), closed_port, TcpState.CLOSE_WAIT)
    wait_for_state(port(half_closed), port(listener), TcpState.FIN_WAIT2)

    def acknowledged() -> DiagSocket | None:
        entry = find(port(unread_client), port(listener))
        return entry if entry is not None and entry.send_q == 0 else None

    wait_for(acknowledged)  # so ss cannot catch the 12 bytes still in flight

    ours = {
        (entry.lport, entry.rport): entry
        for entry in sockdiag.snapshot()
        if port(listener) in (entry.lport, entry.rport)
    }
    theirs = {key: row for key, row in ss_sockets().items() if port(listener) in key}

    assert len(ours) == 11  # the listener, 5 connections x 2 ends
    assert set(ours) == set(theirs)
    for key, entry in ours.items():
        state, recv_q, send_q, local_address, peer_address = theirs[key]
        assert state == SHORT_NAMES[TcpState(entry.state)], key
        assert (recv_q, send_q) == (entry.recv_q, entry.send_q), key
        assert local_address == entry.laddr, key
        assert peer_address == entry.raddr, key


class InNetns(Loopback):
    """Loopback sockets made inside the network namespace ``name``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.path = f"/run/netns/{name}"

    def new_socket(self, family: int = socket.AF_INET) -> socket.socket:
        # A socket belongs to the namespace it is made in, whichever thread uses it later.
        sock = run_in(self.path, lambda: socket.socket(family, socket.SOCK_STREAM))
        self._sockets.append(sock)
        return sock

    def close_all(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):  # an RST: nothing lingers in the namespace
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        super().close_all()


Row = tuple[str, int, int, str, int, str, int, int, int]

#: Every state ss -tan shows. (CLOSE sockets are bound but inactive ones,
#: which ss 6.1 does not ask for: test_bound_inactive_socket_is_reported_as_close.)
EVERY_STATE = frozenset(SHORT_NAMES[state] for state in TcpState) - {
    "CLOSE", "NEW-SYN-RECV", "BOUND-INACTIVE",
}  # fmt: skip


def ss_rows(netns: str) -> list[Row]:
    """``ss -tanHe`` in ``netns``: (state, recv-q, send-q, local address, local port,
    peer address, peer port, inode, cookie) per socket, sorted."""
    output = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-tanHe"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    rows = []
    for line in output.splitlines():
        state, recv_q, send_q, local, peer, *extended = line.split()
        fields = dict(item.split(":", 1) for item in extended if ":" in item)
        rows.append(
            (state, int(recv_q), int(send_q), *parse_ss_endpoint(local), *parse_ss_endpoint(peer),
             int(fields["ino"]), int(fields["sk"], 16))
        )  # fmt: skip
    return sorted(rows)


def diag_rows(sockets: list[DiagSocket]) -> list[Row]:
    return sorted(
        (SHORT_NAMES[TcpState(entry.state)], entry.recv_q, entry.send_q, entry.laddr, entry.lport,
         entry.raddr, entry.rport, entry.inode, entry.cookie)
        for entry in sockets
        if entry.state != TcpState.CLOSE  # bound-inactive: ss 6.1 does not list them
    )  # fmt: skip


def make_every_state(tcp: InNetns, netns: str, family: int) -> None:
    """Sockets in every state ss shows, held there by nftables dropping
    chosen segments inside the namespace (timers retransmit for minutes)."""
    established = tcp.listener(family)
    client, _ = tcp.pair(established)  # ESTABLISHED both ends
    client.sendall(b"unread")  # Recv-Q 6 on the other end
    half_closed, _ = tcp.pair(established)
    half_closed.shutdown(socket.SHUT_WR)  # FIN_WAIT2 (a full socket) and CLOSE_WAIT
    orphaned, _ = tcp.pair(established)
    orphaned.close()  # a timewait socket in FIN_WAIT2 (tcp_fin_timeout is 60 s here)
    closed_first, closed_second = tcp.pair(established)
    closed_first.close()
    assert closed_second.recv(1) == b""
    closed_second.close()  # TIME_WAIT
    tcp.connect(established)  # accepted by the kernel, not by us: LISTEN Recv-Q 1
    handshake, fin_wait1, last_ack, closing = (tcp.listener(family) for _ in range(4))

    def drop(closing_rules: str) -> None:
        nft(
            netns,
            f"""
            table inet tcptrace_test
            flush table inet tcptrace_test
            table inet tcptrace_test {{
                chain output {{
                    type filter hook output priority 0;
                    tcp dport 9 drop
                    tcp dport {port(handshake)} tcp flags == ack drop
                    tcp dport {port(fin_wait1)} tcp flags & fin == fin drop
                    tcp sport {port(last_ack)} tcp flags & fin == fin drop
                    tcp dport {port(closing)} {closing_rules}
                    tcp sport {port(closing)} {closing_rules}
                }}
            }}
            """,
        )

    drop("tcp flags & fin == fin drop")
    unanswered = tcp.new_socket(family)
    unanswered.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        unanswered.connect((LOOPBACK[family], 9))  # SYN_SENT
    tcp.connect(handshake)  # our ACK is dropped: the listener keeps a SYN_RECV request
    unacknowledged, _ = tcp.pair(fin_wait1)
    unacknowledged.shutdown(socket.SHUT_WR)  # FIN_WAIT1
    client, server = tcp.pair(last_ack)
    client.shutdown(socket.SHUT_WR)
    assert server.recv(1) == b""
    server.shutdown(socket.SHUT_WR)  # LAST_ACK, its FIN dropped
    # Both FINs held back, then let through while the ACKs are dropped: a side
    # that gets the peer's FIN before the ACK of its own goes CLOSING. It
    # would stay there only until the peer's next retransmitted FIN, which
    # acknowledges its own (one RTO, a fraction of a second: missed by a
    # loaded machine's ss): so once one side is CLOSING, nothing passes.
    client, server = tcp.pair(closing)
    client.shutdown(socket.SHUT_WR)
    server.shutdown(socket.SHUT_WR)
    drop("tcp flags == ack drop")
    support_wait_for(
        lambda: any(row[0] == "CLOSING" for row in ss_rows(netns)),
        timeout=10,
        interval=0.01,
        what="a socket in CLOSING",
    )
    drop("drop")


LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


@requires_root
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_every_state_agrees_with_ss_in_another_netns(family: int) -> None:
    with netns_single() as netns:
        tcp = InNetns(netns)
        try:
            make_every_state(tcp, netns, family)
            support_wait_for(
                lambda: {row[0] for row in ss_rows(netns)} >= EVERY_STATE,
                timeout=10,
                what=lambda: f"every state in ss: {sorted({row[0] for row in ss_rows(netns)})}",
            )

            def agreeing() -> tuple[list[Row], dict[int, int], list[Row]] | None:
                before = ss_rows(netns)
                ours = run_in(tcp.path, sockdiag.snapshot)
                counted = run_in(tcp.path, sockdiag.count_by_state)
                # Timers may fire meanwhile: only a comparison with an ss
                # listing that did not change around ours counts.
                return (diag_rows(ours), counted, before) if ss_rows(netns) == before else None

            ours, counted, theirs = support_wait_for(agreeing, timeout=10)
            assert ours == theirs
            assert {row[0] for row in ours} >= EVERY_STATE
            by_name = {name: int(state) for state, name in SHORT_NAMES.items()}
            assert counted == Counter(by_name[row[0]] for row in ours)
            assert {row[3] for row in ours} == {LOOPBACK[family]}
            # No inode: timewait sockets (TIME_WAIT, and the orphan's FIN_WAIT2),
            # requests, and the child waiting in the accept queue (no file yet).
            no_inode = {row[0] for row in ours if row[7] == 0}
            assert no_inode == {"TIME-WAIT", "FIN-WAIT-2", "SYN-RECV", "ESTAB"}
        finally:
            tcp.close_all()


def test_state_mask() -> None:
    assert sockdiag.state_mask(None) == sockdiag.ALL_STATES_MASK
    assert sockdiag.state_mask([TcpState.CLOSE_WAIT]) == 1 << 8
    assert sockdiag.state_mask([TcpState.CLOSE]) == (1 << 7) | (1 << 13)
    assert sockdiag.state_mask([]) == 0
    for state in TcpState:
        assert sockdiag.ALL_STATES_MASK & (1 << state)
    with pytest.raises(ValueError):
        sockdiag.state_mask([42])


def test_unknown_family_is_rejected() -> None:
    with pytest.raises(ValueError, match="AF_INET"):
        sockdiag.snapshot(families=[socket.AF_UNIX])


def _netlink(length: int, kind: int, sequence: int = sockdiag._SEQUENCE) -> bytes:
    return struct.pack("=IHHII", length, kind, 0, sequence, 0)


def _diag_message(family: int, local: str, lport: int, remote: str, rport: int) -> bytes:
    """A struct inet_diag_msg as the kernel sends it, with a netlink header."""
    body = struct.pack(
        "=BBBB", family, TcpState.TIME_WAIT, sockdiag.TIMEWAIT_TIMER, 0
    ) + struct.pack(">HH", lport, rport)
    body += socket.inet_pton(family, local).ljust(16, b"\0")
    body += socket.inet_pton(family, remote).ljust(16, b"\0")
    # interface, cookie (low word, high word), expires, rqueue, wqueue, uid, inode
    body += struct.pack("=IIIIIIII", 1, 0x89ABCDEF, 0x01234567, 41_000, 0, 0, 0, 0)
    attribute = struct.pack("=HHB3x", 8, 8, 1)  # INET_DIAG_SHUTDOWN: skipped
    return _netlink(16 + len(body) + len(attribute), 20) + body + attribute


def test_decoder_reads_every_field_of_inet_diag_msg() -> None:
    data = (
        _diag_message(socket.AF_INET, "10.1.2.3", 443, "192.0.2.7", 50_000)
        + _diag_message(socket.AF_INET6, "2001:db8::1", 8080, "::ffff:10.0.0.1", 1)
        + _netlink(20, 3)
        + struct.pack("=i", 0)
    )
    decoded: list[DiagSocket] = []
    done = sockdiag._decode_replies(data, socket.AF_INET, sockdiag._SocketDecoder().decode, decoded)
    assert done
    assert decoded == [
        DiagSocket(
            family=socket.AF_INET, state=TcpState.TIME_WAIT, laddr="10.1.2.3", lport=443,
            raddr="192.0.2.7", rport=50_000, inode=0, uid=0, recv_q=0, send_q=0,
            timer=sockdiag.TIMEWAIT_TIMER, expires_ms=41_000, cookie=0x0123456789ABCDEF,
            is_timewait=True,
        ),
        DiagSocket(
            family=socket.AF_INET6, state=TcpState.TIME_WAIT, laddr="2001:db8::1", lport=8080,
            raddr="::ffff:10.0.0.1", rport=1, inode=0, uid=0, recv_q=0, send_q=0,
            timer=sockdiag.TIMEWAIT_TIMER, expires_ms=41_000, cookie=0x0123456789ABCDEF,
            is_timewait=True,
        ),
    ]  # fmt: skip


def test_decoded_sockets_share_their_addresses_and_ports() -> None:
    """A snapshot keeps each old socket's pair: the two ends of a loopback
    connection, and every connection to one server port, share the text
    and number objects instead of holding a copy each."""
    data = _diag_message(socket.AF_INET, "10.1.2.3", 443, "192.0.2.7", 50_000) + _diag_message(
        socket.AF_INET, "192.0.2.7", 50_000, "10.1.2.3", 443
    )
    decoded: list[DiagSocket] = []
    sockdiag._decode_replies(data, socket.AF_INET, sockdiag._SocketDecoder().decode, decoded)
    server, client = decoded
    assert (server.lport, server.rport) == (client.rport, client.lport) == (443, 50_000)
    assert server.lport is client.rport
    assert server.rport is client.lport
    assert server.laddr is client.raddr


def test_decoder_waits_for_the_end_of_the_dump_and_skips_other_replies() -> None:
    message = _diag_message(socket.AF_INET, "127.0.0.1", 1, "127.0.0.1", 2)
    foreign = _netlink(len(message), 20, sequence=1) + message[16:]
    acknowledgement = _netlink(36, 2) + struct.pack("=i", 0) + bytes(16)
    decoded: list[int] = []
    for data in (message + foreign, acknowledgement):
        assert not sockdiag._decode_replies(data, socket.AF_INET, sockdiag._state_of, decoded)
        assert decoded == [TcpState.TIME_WAIT]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (_netlink(36, 2) + struct.pack("=i", -errno.ENOENT) + bytes(16), "modprobe tcp_diag"),
        (_netlink(36, 2) + struct.pack("=i", -errno.EINVAL) + bytes(16), "Invalid argument"),
        (_netlink(20, 3) + struct.pack("=i", -errno.ENOBUFS), "No buffer space"),
        (_netlink(12, 20), "malformed"),
        (_netlink(400, 20) + bytes(56), "malformed"),
    ],
)
def test_error_reply_is_a_user_error(reply: bytes, expected: str) -> None:
    with pytest.raises(UserError, match=expected) as caught:
        sockdiag._decode_replies(reply, socket.AF_INET, sockdiag._state_of, [])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EPERM, "permission denied"),
        (errno.EACCES, "permission denied"),
        (errno.EPROTONOSUPPORT, "modprobe"),
        (errno.EMFILE, "Too many open files"),
    ],
)
def test_open_failure_is_a_user_error(
    monkeypatch: pytest.MonkeyPatch, code: int, expected: str
) -> None:
    def refused() -> socket.socket:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(sockdiag, "_netlink_socket", refused)
    with pytest.raises(UserError, match=expected) as caught:
        sockdiag.snapshot()
    assert "\n" not in str(caught.value)
