"""Exactness against the kernel (issue 13): each test drives real sockets under
the real tracer and fails on a defect the tracer had.

The truth is the kernel's: `ss` for what exists now, the namespace's MIB
counters (nstat) for what happened.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from support import (
    Peer,
    cli_argv,
    close_pipes,
    deadline,
    free_port,
    netns_single,
    nft,
    requires_root,
    run_cli,
    sh,
    wait_for,
)
from test_crosscheck import SYN_RETRANSMITS, mib
from test_serve import delta, scrape, serving, ss_counts, value

from tcptrace_ebpf.host.listeners import own_netns_inum
from tcptrace_ebpf.kernel.features import Capability, detect_features
from tcptrace_ebpf.kernel.interface import KERNEL_SKIPPED, STATE_SLOTS
from tcptrace_ebpf.kernel.probe import Tracer, TracerOptions
from tcptrace_ebpf.model.states import TcpState
from tcptrace_ebpf.serve.tracking import (
    HEAL_INTERVAL_S,
    HEAL_RECHECK_S,
    SETTLED_NS,
    SocketTracking,
)

FIN_WAIT2, TIME_WAIT = TcpState.FIN_WAIT2, TcpState.TIME_WAIT

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


def fin_wait2_timewait_sockets_reached_by_fins(k: int) -> tuple[list[int], list[int], Any]:
    """k connections closed by the client, then by the server once the
    client's timewait sockets are in FIN_WAIT2, under a tracer without
    kfree_skb's rx_sk; swept once all are in TIME_WAIT. The gauge, the
    transition counts, and what to look at if they are wrong."""
    port = free_port()
    features = detect_features()
    features.capabilities["kfree_rx_sk"] = Capability("kfree_rx_sk", False, "taken away")
    options = TracerOptions(emit_events=False, collect_metrics=True, ports=frozenset({port}))
    with Tracer(options, features=features) as tracer:
        server = listener_on(port)
        pairs = []
        try:
            for _ in range(k):
                client = socket.create_connection(("127.0.0.1", port))
                pairs.append((client, server.accept()[0]))
            for client, _ in pairs:
                client.close()
            # The servers' ACKs (delayed ones) came: timewait sockets in FIN_WAIT2.
            wait_for(lambda: ss_counts(port)["FIN_WAIT2"] == k)
            for _, child in pairs:
                child.close()  # its FIN reaches the timewait socket
        finally:
            for client, child in pairs:
                client.close()
                child.close()
            server.close()
        wait_for(lambda: ss_counts(port)["TIME_WAIT"] == k)
        tracer.sweep()
        gauge = tracer.percpu_array("sockets")
        transitions = tracer.percpu_array("state_transitions_total")
        evidence = {
            "counters": {name: n for name, n in tracer.counters().items() if n},
            "gauge": {state: n for state, n in enumerate(gauge) if n},  # TcpState numbers
            "FIN_WAIT2->CLOSE": transitions[FIN_WAIT2 * STATE_SLOTS + TcpState.CLOSE],
            "TIME_WAIT->CLOSE": transitions[TIME_WAIT * STATE_SLOTS + TcpState.CLOSE],
        }
    return gauge, transitions, evidence


@requires_root
def test_without_rx_sk_the_fin_reaching_a_fin_wait2_timewait_socket_is_found() -> None:
    """Kernels before 6.11 (kfree_skb without rx_sk, imitated here) do not
    show the peer's FIN reaching a timewait socket in FIN_WAIT2: the kernel
    re-arms its timer, traced only when the re-arm changes timer-wheel
    bucket, which few do. Every sweep (each second) checks those sockets:
    after one, the gauge has them all in TIME_WAIT, as ss does, and their
    FIN_WAIT2 -> TIME_WAIT changes are dated from the re-armed timer.

    A run in which the kernel skipped one of the program's runs (it does
    when one would nest in another of the same program on that CPU) is
    repeated, twice at most: the tracer alone cannot be exact then (`serve`
    heals its gauges after such a loss). One CI run found 12 of the 20 in
    neither state, cause unknown: the evidence printed on failure says more."""
    k = 20
    for _attempt in range(3):
        gauge, transitions, evidence = fin_wait2_timewait_sockets_reached_by_fins(k)
        if not evidence["counters"].get(KERNEL_SKIPPED):
            break
    assert (gauge[FIN_WAIT2], gauge[TIME_WAIT]) == (0, k), evidence
    assert transitions[FIN_WAIT2 * STATE_SLOTS + TIME_WAIT] == k, evidence


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
        # Well under the grace period alone (5 s), even under emulation.
        wait_for(lambda: tw_gauge(http_port) == 0, timeout=4)
        assert time.monotonic() - killed < 4.5
        # Counted as killed once no new connection claimed their pairs.
        wait_for(
            lambda: delta(before, scrape(http_port), TW_DURATION_COUNT, end="killed") == k,
            timeout=30,
        )
        after = scrape(http_port)
    assert value(after, "tcptrace_sockets", state="TIME_WAIT") == 0
    assert delta(before, after, TW_DURATION_COUNT, end="reused") == 0


def status_of(url: str) -> int | None:
    """HTTP status of a GET (None: nothing answers yet)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return None


@requires_root
def test_no_start_up_gap() -> None:
    """Until tracing has started, /metrics answers 503 (Prometheus records
    up=0) rather than partial data, while /-/healthy answers 200. Peers
    half-close their connections all through the start-up: every socket
    that changed state while the exporter started is counted in the state
    it is in (the probes attach before the snapshot), none in the one it left."""
    n = 200
    port = free_port()
    http_port = free_port()
    server = listener_on(port)
    pairs = []
    for _ in range(n):
        client = socket.create_connection(("127.0.0.1", port))
        pairs.append((client, server.accept()[0]))
    base = f"http://127.0.0.1:{http_port}"
    argv = cli_argv("serve", "--web.listen-address", f"127.0.0.1:{http_port}", "--port", str(port))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        statuses = []
        started = time.monotonic()
        closed = 0
        # One half-close every 50 ms, from before the HTTP port answers until
        # /metrics has answered 200 for a second.
        ready_since = None
        while time.monotonic() - started < 120:
            status = status_of(f"{base}/metrics")
            if status is not None:
                statuses.append((status, status_of(f"{base}/-/healthy")))
            if status == 200 and ready_since is None:
                ready_since = time.monotonic()
            if ready_since is not None and time.monotonic() - ready_since > 1:
                break
            if closed < n:
                pairs[closed][0].shutdown(socket.SHUT_WR)  # client FIN_WAIT2, child CLOSE_WAIT
                closed += 1
            time.sleep(0.05)
        assert ready_since is not None, "serve never answered 200"
        assert statuses[0] == (503, 200), statuses[:3]
        assert {status for status, _ in statuses} == {503, 200}
        assert all(healthy == 200 for _, healthy in statuses)
        for client, _child in pairs[closed:]:
            client.shutdown(socket.SHUT_WR)
        expected = {"ESTABLISHED": 0, "FIN_WAIT2": n, "CLOSE_WAIT": n}
        wait_for(lambda: all(ss_counts(port)[s] == c for s, c in expected.items()))
        gauge = {}

        def agrees() -> bool:
            samples = scrape(http_port)
            gauge.update({s: value(samples, "tcptrace_sockets", state=s) for s in expected})
            return gauge == expected

        try:
            wait_for(agrees, timeout=10, what=lambda: f"gauge {gauge} vs ss {expected}")
        except AssertionError:
            # Unless the kernel skipped the program on some change (seen
            # under load: 64 clients left in FIN_WAIT1), a counted loss that
            # a check against sock_diag makes good within its bound.
            samples = scrape(http_port)
            lost = {
                labels: count
                for (name, labels), count in samples.items()
                if name == "tcptrace_lost_events_total" and count
            }
            if not lost:
                raise
            wait_for(
                agrees,
                timeout=HEAL_INTERVAL_S + HEAL_RECHECK_S + 10,
                what=lambda: f"gauge {gauge} vs ss {expected} after losses {lost}",
            )
        assert closed > 10, "the start-up was too quick to test anything"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        close_pipes(proc)
        for client, child in pairs:
            client.close()
            child.close()
        server.close()


def gauge_matches_ss(
    http_port: int, port: int, states: tuple[str, ...], seen: dict[str, Any]
) -> bool:
    truth = ss_counts(port)
    samples = scrape(http_port)
    seen["ss"] = {state: truth[state] for state in states}
    seen["gauge"] = {state: value(samples, "tcptrace_sockets", state=state) for state in states}
    return bool(seen["ss"] == seen["gauge"])


@requires_root
def test_gauges_heal_after_a_loss() -> None:
    """With the socket map full, sockets go untracked (a counted loss): the
    gauge misses them. Within 60 s it says what ss says again, and again
    once they have all closed, while their timewait sockets live."""
    pairs_wanted = 700  # 1,400 sockets, more than --max-sockets' 1,024
    port = free_port()
    states = (
        "ESTABLISHED",
        "TIME_WAIT",
        "CLOSE_WAIT",
        "LAST_ACK",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "CLOSING",
    )
    seen: dict[str, Any] = {}
    with serving("--port", str(port), "--max-sockets", "1024") as (_run, http_port):
        server = listener_on(port)
        held = []
        try:
            for _ in range(pairs_wanted):
                client = socket.create_connection(("127.0.0.1", port))
                held += [client, server.accept()[0]]
            lost = value(scrape(http_port), "tcptrace_lost_events_total", cause="socket_map_full")
            assert lost > 0
            made = time.monotonic()
            wait_for(
                lambda: gauge_matches_ss(http_port, port, states, seen),
                timeout=75,
                interval=1,
                what=lambda: f"gauge {seen.get('gauge')} vs ss {seen.get('ss')}",
            )
            assert time.monotonic() - made <= deadline(60)
            # Every client first, then, once every child has the client's FIN,
            # every child: the clients keep the TIME_WAIT. (A child closed
            # before its client's FIN was processed, which a loaded machine
            # may defer to ksoftirqd, makes a simultaneous close: both sides
            # pass through FIN_WAIT1 and CLOSING to TIME_WAIT.)
            for sock in held[0::2]:
                sock.close()
            wait_for(
                lambda: ss_counts(port)["CLOSE_WAIT"] == pairs_wanted,
                what=lambda: f"every child in CLOSE_WAIT: ss {dict(ss_counts(port))}",
            )
            for sock in held[1::2]:
                sock.close()
            held = []
            closed = time.monotonic()
            wait_for(
                lambda: ss_counts(port)["TIME_WAIT"] == pairs_wanted,
                what=lambda: f"every client in TIME_WAIT: ss {dict(ss_counts(port))}",
            )
            # How the gauge came back, said if it did not while the
            # timewait sockets lived (60 s): when it differed from ss, and how.
            differed: list[tuple[float, dict[str, float]]] = []

            def healed() -> bool:
                if gauge_matches_ss(http_port, port, states, seen):
                    return True
                gauge, truth = seen["gauge"], seen["ss"]
                off = {s: gauge[s] - truth[s] for s in states if gauge[s] != truth[s]}
                differed.append((round(time.monotonic() - closed, 1), off))
                return False

            wait_for(healed, timeout=75, interval=1, what=lambda: f"gauge - ss: {differed[-5:]}")
            assert time.monotonic() - closed <= deadline(60), f"gauge - ss: {differed}"
            assert seen["ss"]["TIME_WAIT"] == pairs_wanted, f"gauge - ss: {differed}"
        finally:
            for sock in held:
                sock.close()
            server.close()


@contextmanager
def changes_unseen(tracer: Tracer) -> Iterator[None]:
    """The kernel skipping the set_state program on every change meanwhile,
    as it does when an interrupt's change comes while the program runs:
    the program is detached (attached last, its link is the last), then
    attached again."""
    key = "sock:inet_sock_set_state"
    assert tracer.attached[-1] == key
    os.close(tracer._attachments.pop())
    tracer.attached.pop()
    try:
        yield
    finally:
        tracer._attach(key, tracer._attached_progs[key], tracer.attach_kinds[key])


@requires_root
def test_a_check_moves_a_socket_whose_change_went_unseen() -> None:
    """A socket whose change the kernel skipped stays, for the program, in
    the state it left, until it changes again: a CLOSE_WAIT leak's never
    does. A check against sock_diag moves it to the state ss shows, once it
    has been in the program's since before the listing: the gauge and the
    CLOSE_WAIT list say what ss says, and the changes that follow carry on
    from there, every gauge back to what ss says once both sides closed."""
    port = free_port()
    states = ("ESTABLISHED", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT")
    options = TracerOptions(emit_events=False, collect_metrics=True, ports=frozenset({port}))
    tracking = SocketTracking(options, own_netns_inum())
    held: list[socket.socket] = []
    try:
        tracking.start()
        tracer = tracking.tracer

        def gauge() -> dict[str, int]:
            counts = tracer.metric_arrays()["sockets"]
            assert tracking.preexisting is not None
            assert not tracking.preexisting.counts()
            return {state: counts[TcpState[state]] for state in states}

        def ss() -> dict[str, int]:
            counts = ss_counts(port)
            return {state: counts[state] for state in states}

        server = listener_on(port)
        held.append(server)
        client = socket.create_connection(("127.0.0.1", port))
        child = server.accept()[0]
        held += [client, child]
        wait_for(lambda: gauge()["ESTABLISHED"] == 2, what=lambda: f"gauge {gauge()}")
        with changes_unseen(tracer):
            client.shutdown(socket.SHUT_WR)  # client FIN_WAIT2, child CLOSE_WAIT
            wait_for(lambda: ss()["CLOSE_WAIT"] == 1 and ss()["FIN_WAIT2"] == 1)
        assert gauge() == {**ss(), "ESTABLISHED": 2, "FIN_WAIT2": 0, "CLOSE_WAIT": 0}
        assert tracer.close_wait_sockets() == []
        time.sleep(SETTLED_NS / 1e9)
        tracking.heal()
        assert gauge() == ss()
        assert [sock.sock_id for sock in tracer.close_wait_sockets()] == [
            sock.sock_id for sock in tracer.followed() if sock.state == TcpState.CLOSE_WAIT
        ]
        assert tracer.counters()["missed_transitions"] == 2
        # The changes that follow are seen, from the states the check set.
        child.close()
        wait_for(lambda: ss()["TIME_WAIT"] == 1 and ss()["LAST_ACK"] == 0)
        wait_for(lambda: gauge() == ss(), what=lambda: f"gauge {gauge()} vs ss {ss()}")
        assert ss() == {**dict.fromkeys(states, 0), "TIME_WAIT": 1}
        assert tracer.close_wait_sockets() == []
        assert tracer.counters()["missed_transitions"] == 2
    finally:
        for sock in held:
            sock.close()
        tracking.close()


@requires_root
def test_a_check_ends_sockets_of_another_namespace_that_ended_unseen() -> None:
    """Sockets of a namespace other than the exporter's (a pod's) whose end
    the kernel never gave the program: the check lists that namespace too,
    finds them gone and ends them (counted as end_unseen), so the gauge
    says what ss says there. (Seen on the development machine: a connect
    timed out in a softirq that ran no BPF program, left in SYN_SENT.)"""
    port = free_port()
    options = TracerOptions(emit_events=False, collect_metrics=True, ports=frozenset({port}))
    tracking = SocketTracking(options, own_netns_inum())
    with netns_single() as ns:
        server, client = Peer(ns), Peer(ns)
        try:
            tracking.start()
            tracer = tracking.tracer

            def established() -> int:
                return int(tracer.metric_arrays()["sockets"][TcpState.ESTABLISHED])

            server.cmd(f"listen 127.0.0.1 {port}")
            client.cmd(f"connect 127.0.0.1 {port}")
            server.cmd("accept")
            wait_for(lambda: established() == 2, what=lambda: f"{established()} established")
            with changes_unseen(tracer):
                client.cmd("linger0")
                client.cmd("close")  # its RST ends the child too: both gone, unseen
                wait_for(lambda: ns_ss(ns, port).count("ESTAB") == 0)
            assert established() == 2
            tracking.heal()
            assert established() == 0
            assert tracer.counters()["missed_ends"] == 2
            assert not [sock for sock in tracer.followed() if sock.state != TcpState.LISTEN]
        finally:
            server.close()
            client.close()
            tracking.close()


@requires_root
def test_a_socket_seen_again_after_leaving_close_wait_unseen_leaves_the_close_wait_list() -> None:
    """A change the kernel skipped is caught up on the socket's next one,
    which tells the state the kernel has it in: one that left CLOSE_WAIT
    unseen leaves the CLOSE_WAIT list then (not listed there after its end
    for good). In a namespace of its own, the child's LAST_ACK is held by
    dropping the client's ACKs until the program is attached again."""
    port = free_port()
    options = TracerOptions(emit_events=False, collect_metrics=True, ports=frozenset({port}))
    with netns_single() as ns, Tracer(options) as tracer:
        server, client = Peer(ns), Peer(ns)
        try:
            server.cmd(f"listen 127.0.0.1 {port}")
            client.cmd(f"connect 127.0.0.1 {port}")
            server.cmd("accept")
            client.cmd("shutdown")  # the child in CLOSE_WAIT, seen
            wait_for(lambda: len(tracer.close_wait_sockets()) == 1)
            # The client's ACKs to the child, dropped.
            hold = f"type filter hook output priority 0; tcp dport {port} drop;"
            nft(ns, f"table inet t {{ chain o {{ {hold} }}; }}")
            with changes_unseen(tracer):
                server.cmd("shutdown")  # the child's FIN: LAST_ACK, unseen
                wait_for(lambda: "LAST-ACK" in ns_ss(ns, port))
            nft(ns, "flush ruleset")
            # Its FIN sent again, the client's ACK ends it: LAST_ACK -> CLOSE, seen.
            wait_for(lambda: "LAST-ACK" not in ns_ss(ns, port), timeout=30)
            wait_for(lambda: tracer.counters()["missed_transitions"] == 1)
            assert tracer.close_wait_sockets() == []
        finally:
            server.close()
            client.close()


def ns_ss(ns: str, port: int) -> str:
    return sh(
        "ip", "netns", "exec", ns, "ss", "-tanH", f"( sport = :{port} or dport = :{port} )"
    ).stdout


# Run inside the test's namespace: two connects that never complete. One to
# 127.0.0.1:PORT, whose SYNs the namespace's firewall drops on their way out
# (each is counted by the kernel, then its transmission fails); one to
# 10.77.0.2:PORT+1, out of a veth where nothing answers, whose route is removed once
# the first SYN has left (every later attempt is given up before the SYN is
# sent: no route). Prints the errno each connect() ended with.
SYN_FAILURES = """
import select, socket, subprocess, sys, time
port = int(sys.argv[1])
socks = []
for address in (("127.0.0.1", port), ("10.77.0.2", port + 1)):
    s = socket.socket()
    s.setblocking(False)
    assert s.connect_ex(address) == 115  # EINPROGRESS
    socks.append(s)
time.sleep(0.2)
subprocess.run(["ip", "route", "del", "10.77.0.0/24", "dev", "v0"], check=True)
limit = time.monotonic() + float(sys.argv[2])
pending = list(socks)
while pending and time.monotonic() < limit:
    _, done, _ = select.select([], pending, [], 0.5)
    pending = [s for s in pending if s not in done]
print(" ".join(str(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)) for s in socks))
"""


@requires_root
def test_syn_retransmissions_are_those_the_kernel_counts() -> None:
    """TCPSynRetrans counts a SYN sent again once the kernel has counted it,
    which is not every tcp:tcp_retransmit_skb event: since 6.18 the tracepoint
    also fires for attempts given up before the SYN was sent (no route: the
    kernel counts nothing), and before 6.18 it does not fire for a SYN the
    kernel counted whose transmission then failed (dropped on its way out)."""
    port = free_port()
    with netns_single() as ns:
        # Where 10.77.0.2's SYNs go unanswered: out of a veth whose peer, in
        # the same namespace, has another link-layer address and no IP.
        for command in (
            "link add v0 type veth peer name v1",
            "addr add 10.77.0.1/24 dev v0",
            "link set v0 up",
            "link set v1 up",
            "neigh add 10.77.0.2 lladdr 02:00:00:00:77:02 dev v0",
        ):
            sh("ip", "-n", ns, *command.split())
        nft(
            ns,
            f"""
            table inet tcptrace_syn_out {{
                chain output {{
                    type filter hook output priority 0;
                    tcp dport {port} tcp flags & (syn | ack) == syn counter drop
                }}
            }}
            """,
        )
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")
        with serving("--port", str(port), "--port", str(port + 1)) as (_run, http_port):
            before = scrape(http_port)
            mib_before = mib(ns)
            script = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", SYN_FAILURES, str(port),
                 str(deadline(20))],
                check=True, capture_output=True, text=True, timeout=deadline(40),
            )  # fmt: skip
            errors = script.stdout.split()
            assert len(errors) == 2, script.stdout
            assert "0" not in errors, script.stdout  # neither connect() succeeded
            kernel: dict[str, int] = {}
            ours: list[float] = []

            def agree() -> bool:
                now = mib(ns)
                kernel.update(
                    {k: now[k] - mib_before[k] for k in ("TCPSynRetrans", "TCPRetransFail")}
                )
                ours[:] = [delta(before, scrape(http_port), SYN_RETRANSMITS)]
                return ours[0] == kernel["TCPSynRetrans"]

            wait_for(agree, timeout=30, what=lambda: f"kernel {kernel}, ours {ours}")
            # Both kinds of failure happened: the firewall's SYNs were counted,
            # then failed; the unroutable ones were given up uncounted, and
            # that connect() ended for want of a route, not by timing out.
            assert kernel["TCPSynRetrans"] >= 1
            assert kernel["TCPRetransFail"] == kernel["TCPSynRetrans"]
            assert int(errors[1]) in (errno.ENETUNREACH, errno.EHOSTUNREACH), errors
