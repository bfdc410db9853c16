"""The cross-check's workload (tests/test_crosscheck.py), run inside the test's
network namespace, where it is the only traffic: clients and servers on its
loopback, every way a connection can start and end that the rules cover.

Usage: crosscheck_workload.py BASE_PORT. Ports BASE_PORT + 0..9 are the
services below; client ports for TIME_WAIT reuse come from BASE_PORT + 100...
Prints one JSON line (what it did), then holds `HELD` connections (and those
waiting in a full accept queue) open until a line comes on stdin, so the
test can compare gauges with ss.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

N = 12  # connections per kind
HELD = 5  # connections left ESTABLISHED for the gauges' check
REUSE = 12  # client ports whose TIME_WAIT pair is reused, back to back
OVERFLOW = 3  # active closes past tcp_max_tw_buckets
QUEUED = 2  # connections filling an accept queue of backlog 1 (full past 1)
DROPPED = 2  # connects whose SYNs that full queue drops until they time out
LINGER2 = 3  # FIN_WAIT2 timeouts (TCP_LINGER2 of 1 s)
ABORT_ON_LINGER = 3  # closes in FIN_WAIT2 with TCP_LINGER2 < 0: a RST, no timewait socket
LINGER0 = struct.pack("ii", 1, 0)
TCP_FIN_WAIT2 = 5  # tcp_info's states
TCP_CLOSE = 7


def listener(family: int, host: str, port: int, backlog: int = 1024) -> socket.socket:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(backlog)
    return server


def tcp_info(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)


def accept_queue(server: socket.socket) -> int:
    """Connections waiting in a listener's accept queue (tcpi_unacked)."""
    return int(struct.unpack_from("I", tcp_info(server), 24)[0])


def poll(done: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Wait for done() to hold; fail after `timeout` s."""
    limit = time.monotonic() + timeout
    while not done():
        if time.monotonic() > limit:
            raise SystemExit(f"crosscheck_workload: timed out waiting for {what}")
        time.sleep(0.01)


def client(family: int = socket.AF_INET, bind_port: int | None = None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if bind_port is not None:
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", bind_port))
    sock.settimeout(30)
    return sock


def connect_failing(port: int, errors: list[int]) -> None:
    """A connect() to 127.0.0.1:`port` that fails: its errno goes to `errors`."""
    c = client()
    try:
        c.connect(("127.0.0.1", port))
    except OSError as err:
        errors.append(err.errno or 0)
    c.close()


def close_orders(server: socket.socket, host: str, port: int, family: int, first: str) -> None:
    """One connection closed by `first` ("client" or "server"), the other after."""
    c = client(family)
    c.connect((host, port))
    s, _ = server.accept()
    c.sendall(b"x")
    assert s.recv(1) == b"x"
    if first == "client":
        c.close()
        assert s.recv(1) == b""
        s.close()
    else:
        s.close()
        assert c.recv(1) == b""
        c.close()


def main() -> None:
    base = int(sys.argv[1])
    v4, v6 = socket.AF_INET, socket.AF_INET6
    did: dict[str, int] = {}
    servers = {
        "client_first": listener(v4, "127.0.0.1", base),
        "server_first": listener(v4, "127.0.0.1", base + 1),
        "linger0": listener(v4, "127.0.0.1", base + 3),
        "unread": listener(v4, "127.0.0.1", base + 4),
        "ipv6": listener(v6, "::1", base + 6),
        "held": listener(v4, "127.0.0.1", base + 7),
        "linger2": listener(v4, "127.0.0.1", base + 9),
    }

    # SYN timeouts (the test's nftables rule drops SYNs to base + 5): in the
    # background, they take a few seconds each.
    timeouts: list[int] = []
    timers = [threading.Thread(target=connect_failing, args=(base + 5, timeouts)) for _ in range(2)]
    for thread in timers:
        thread.start()

    # A full accept queue: QUEUED connections wait in the queue of a
    # listener of backlog 1 that never accepts, one at a time (a SYN that
    # found a request pending would be answered with a SYN cookie). The
    # SYNs of the next connects are dropped (ListenOverflows, ListenDrops)
    # and retransmitted until the connects time out, in the background.
    full = listener(v4, "127.0.0.1", base + 8, backlog=1)
    queued = []
    for count in range(1, QUEUED + 1):
        c = client()
        c.connect(("127.0.0.1", base + 8))
        queued.append(c)
        poll(lambda count=count: accept_queue(full) == count, "the accept queue to fill")
    dropped: list[int] = []
    overflowing = [
        threading.Thread(target=connect_failing, args=(base + 8, dropped)) for _ in range(DROPPED)
    ]
    for thread in overflowing:
        thread.start()

    for _ in range(N):
        close_orders(servers["client_first"], "127.0.0.1", base, v4, "client")
        close_orders(servers["server_first"], "127.0.0.1", base + 1, v4, "server")
        close_orders(servers["ipv6"], "::1", base + 6, v6, "client")
    did["client_first"] = did["server_first"] = did["ipv6"] = N

    refused = 0
    for _ in range(N):
        c = client()
        try:
            c.connect(("127.0.0.1", base + 2))  # nothing listens there
        except ConnectionRefusedError:
            refused += 1
        c.close()
    did["refused"] = refused

    for _ in range(N):  # SO_LINGER 0: the client resets
        c = client()
        c.connect(("127.0.0.1", base + 3))
        s, _ = servers["linger0"].accept()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
        c.close()
        with contextlib.suppress(OSError):
            s.recv(1)
        s.close()
    did["linger0"] = N

    for _ in range(N):  # the server closes with data unread: it resets
        c = client()
        c.connect(("127.0.0.1", base + 4))
        s, _ = servers["unread"].accept()
        c.sendall(b"unread")
        time.sleep(0.01)
        s.close()
        with contextlib.suppress(OSError):
            c.recv(1)
        c.close()
    did["unread"] = N

    # TIME_WAIT reuse: pairs in TIME_WAIT, reused once the kernel allows
    # (loopback: 1 s), by connections that enter TIME_WAIT again at once.
    ports = [base + 100 + i for i in range(REUSE)]
    server = servers["client_first"]
    for port in ports:
        c = client(bind_port=port)
        c.connect(("127.0.0.1", base))
        s, _ = server.accept()
        c.close()
        s.recv(1)
        s.close()
    time.sleep(1.2)
    for port in ports:
        c = client(bind_port=port)
        c.connect(("127.0.0.1", base))
        s, _ = server.accept()
        c.shutdown(socket.SHUT_WR)
        s.close()
        c.close()
    did["reuse"] = REUSE

    # FIN_WAIT2 timeouts: the client half-closes, its FIN is acknowledged,
    # then close() leaves a timewait socket in FIN_WAIT2 whose timer is
    # TCP_LINGER2 (1 s; 4 s or less counts in TWKilled). The server, in
    # CLOSE_WAIT, sends no FIN until that timer has run out, then aborts
    # (SO_LINGER 0): its RST finds no socket, and nothing answers a RST.
    waiting = []
    for _ in range(LINGER2):
        c = client()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2, 1)
        c.connect(("127.0.0.1", base + 9))
        s, _ = servers["linger2"].accept()
        c.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        poll(lambda c=c: tcp_info(c)[0] == TCP_FIN_WAIT2, "FIN_WAIT2")
        c.close()
        waiting.append(s)

    def fin_wait2_left() -> bool:
        out = subprocess.run(
            ["ss", "-tanH", "state", "fin-wait-2", f"( dport = :{base + 9} )"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return not out.strip()

    poll(fin_wait2_left, "the FIN_WAIT2 timeouts")
    for s in waiting:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
        s.close()
    did["fin_wait2_timeout"] = LINGER2

    # TCP_LINGER2 < 0: close() in FIN_WAIT2 sends a RST instead of leaving a
    # timewait socket (TCPAbortOnLinger); the server, in CLOSE_WAIT, gets it
    # before it closes.
    for _ in range(ABORT_ON_LINGER):
        c = client()
        c.connect(("127.0.0.1", base + 9))
        s, _ = servers["linger2"].accept()
        c.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        poll(lambda c=c: tcp_info(c)[0] == TCP_FIN_WAIT2, "FIN_WAIT2")
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2, -1)
        c.close()
        poll(lambda s=s: tcp_info(s)[0] == TCP_CLOSE, "the RST of an abort on linger")
        s.close()
    did["abort_on_linger"] = ABORT_ON_LINGER

    # connect() failing before its SYN: a bound port whose pair is in use.
    held = []
    c = client(bind_port=base + 200)
    c.connect(("127.0.0.1", base + 7))
    held += [c, servers["held"].accept()[0]]
    failing = client(bind_port=base + 200)
    try:
        failing.connect(("127.0.0.1", base + 7))
    except OSError:
        did["connect_failed"] = 1
    failing.close()
    for _ in range(HELD - 1):
        c = client()
        c.connect(("127.0.0.1", base + 7))
        held += [c, servers["held"].accept()[0]]
    did["held"] = HELD

    # tcp_max_tw_buckets reached: the kernel makes no timewait socket. The
    # client half-closes, so the server's FIN finds it in FIN_WAIT2 and
    # nothing answers it with a RST.
    with open("/proc/sys/net/ipv4/tcp_max_tw_buckets", "w") as sysctl:
        sysctl.write("1\n")  # fewer than the TIME_WAIT sockets there already
    for _ in range(OVERFLOW):
        c = client()
        c.connect(("127.0.0.1", base))
        s, _ = servers["client_first"].accept()
        c.shutdown(socket.SHUT_WR)
        s.close()
        assert c.recv(1) == b""
        c.close()
    did["tw_overflow"] = OVERFLOW

    for thread in timers + overflowing:
        thread.join()
    did["syn_timeout"] = len(timeouts)
    did["full_queue_timeout"] = len(dropped)
    did["queued"] = len(queued)
    for sock in servers.values():
        if sock is not servers["held"]:
            sock.close()
    print(json.dumps(did), flush=True)
    sys.stdin.readline()
    for sock in held + queued:
        sock.close()
    servers["held"].close()
    full.close()


if __name__ == "__main__":
    main()
