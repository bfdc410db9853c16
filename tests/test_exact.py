"""Exactness against the kernel (issue 13): each test drives real sockets under
the real tracer and fails on a defect the tracer had.

The truth is the kernel's: `ss` for what exists now, the namespace's MIB
counters (nstat) for what happened.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from support import Peer, free_port, requires_root, run_cli, sh, wait_for
from test_serve import delta, scrape, serving, ss_counts, value

CLOSED = "tcptrace_connections_closed_total"


def lives_on(run: Any, port: int) -> list[dict[str, Any]]:
    return [
        life
        for life in run.json_lines()
        if port in (life["lport"], life["rport"]) and life["role"] != "listener"
    ]


@requires_root
def test_connect_failing_before_its_syn_is_connect_failed() -> None:
    """connect() from an explicitly bound port whose address pair is in use
    fails at once with EADDRNOTAVAIL: no SYN left, so it did not time out.
    The socket has its local port already (bind), which is why the rule
    cannot be "no local port"."""
    port = free_port()
    with (
        serving("--port", str(port)) as (_run, http_port),
        run_cli("lifecycles", "--json", "--port", str(port)) as lives,
        Peer() as server,
        Peer() as first,
        Peer() as second,
    ):
        before = scrape(http_port)
        server.cmd(f"listen 127.0.0.1 {port}")
        cport = int(first.cmd(f"connect 127.0.0.1 {port} {free_port()}"))
        server.cmd("accept")
        ok, error = second.try_cmd(f"connect 127.0.0.1 {port} {cport}")
        assert (ok, error) == (False, "EADDRNOTAVAIL")
        wait_for(
            lambda: (
                delta(before, scrape(http_port), CLOSED, role="client", close="connect_failed") == 1
            ),
            timeout=30,
        )
        after = scrape(http_port)
        assert delta(before, after, CLOSED, role="client", close="timeout") == 0
        failed = wait_for(
            lambda: [life for life in lives_on(lives, port) if life["close"] is not None],
            timeout=30,
        )
    assert [life["close"] for life in failed] == ["connect_failed"]
    assert failed[0]["lport"] == cport
    assert failed[0]["syn_retrans"] == 0


def bound_client(port: int) -> socket.socket:
    client = socket.socket()
    # SO_REUSEADDR lets a later bind() to this port reuse its TIME_WAIT pair.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    client.bind(("127.0.0.1", port))
    return client


def listener_on(port: int) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(4096)
    return server


def time_wait_pairs(server: socket.socket, port: int, count: int) -> list[int]:
    """`count` connections to `server` from ports outside the ephemeral range,
    each closed by the client first, then by the server: count pairs in
    TIME_WAIT on the client side. Returns the client ports."""
    ports = []
    while len(ports) < count:
        try:
            client = bound_client(free_port())
        except OSError:
            continue
        client.connect(("127.0.0.1", port))
        child, _ = server.accept()
        ports.append(client.getsockname()[1])
        client.close()
        assert child.recv(1) == b""
        child.close()
    return ports


TW_DURATION_COUNT = "tcptrace_time_wait_duration_seconds_count"


def tw_gauge(http_port: int) -> float:
    return value(scrape(http_port), "tcptrace_sockets", state="TIME_WAIT")


@requires_root
def test_back_to_back_time_wait_reuse_loses_no_timewait_socket() -> None:
    """Pairs in TIME_WAIT are reused (after the kernel's reuse delay) by
    connections that close at once, so each enters TIME_WAIT again within
    microseconds of the reuse ending the old one, often in the very memory
    of the timewait socket just freed. Every new timewait socket is followed:
    none reads as skipped, and the TIME_WAIT gauge says what ss says."""
    k = 150
    port = free_port()
    with serving("--port", str(port)) as (_run, http_port):
        server = listener_on(port)
        try:
            before = scrape(http_port)
            client_ports = time_wait_pairs(server, port, k)
            wait_for(
                lambda: value(scrape(http_port), "tcptrace_sockets", state="TIME_WAIT") == k,
                timeout=30,
            )
            time.sleep(1.2)  # loopback reuses a TIME_WAIT pair once it is 1 s old
            for cport in client_ports:
                client = bound_client(cport)
                client.connect(("127.0.0.1", port))  # ends the old TIME_WAIT (reuse)
                child, _ = server.accept()
                client.shutdown(socket.SHUT_WR)
                # The server's FIN puts the client in TIME_WAIT at once, in softirq.
                child.close()
                client.close()
            expected = wait_for(lambda: ss_counts(port)["TIME_WAIT"] == k and ss_counts(port))
            wait_for(
                lambda: value(scrape(http_port), "tcptrace_sockets", state="TIME_WAIT") == k,
                timeout=30,
                what=lambda: f"TIME_WAIT gauge {tw_gauge(http_port)} vs ss {expected}",
            )
            after = scrape(http_port)
        finally:
            server.close()
    assert delta(before, after, "tcptrace_time_wait_skipped_total") == 0
    assert delta(before, after, TW_DURATION_COUNT, end="reused") == k
    assert value(after, "tcptrace_sockets", state="FIN_WAIT2") == 0


@requires_root
def test_killed_timewait_sockets_leave_the_gauge_at_once() -> None:
    """`ss -K` drops timewait sockets from the kernel at once: the TIME_WAIT
    gauge follows at once, not after the grace period that decides whether
    a new connection reused the pair (5 s), and they are counted killed."""
    k = 20
    port = free_port()
    with serving("--port", str(port)) as (_run, http_port):
        server = listener_on(port)
        try:
            before = scrape(http_port)
            time_wait_pairs(server, port, k)
        finally:
            server.close()
        wait_for(
            lambda: value(scrape(http_port), "tcptrace_sockets", state="TIME_WAIT") == k,
            timeout=30,
        )
        sh("ss", "-K", "-tan", "state", "time-wait", f"( dport = :{port} )")
        if ss_counts(port)["TIME_WAIT"]:
            pytest.skip("this kernel cannot destroy timewait sockets with ss -K")
        killed = time.monotonic()
        wait_for(
            lambda: value(scrape(http_port), "tcptrace_sockets", state="TIME_WAIT") == 0,
            timeout=3,
        )
        assert time.monotonic() - killed < 3  # the grace period alone is 5 s
        # Counted as killed once no new connection claimed their pairs.
        wait_for(
            lambda: delta(before, scrape(http_port), TW_DURATION_COUNT, end="killed") == k,
            timeout=30,
        )
        after = scrape(http_port)
    assert value(after, "tcptrace_sockets", state="TIME_WAIT") == 0
    assert delta(before, after, TW_DURATION_COUNT, end="reused") == 0
