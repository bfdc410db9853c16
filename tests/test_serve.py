"""`tcptrace-ebpf serve` against the real kernel, scraped over HTTP and parsed
with prometheus_client's own parser."""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Peer, cli_argv, deadline, free_port, requires_root, run_cli, sh, wait_for

from tcptrace_ebpf.kernel import bpfsys
from tcptrace_ebpf.kernel.features import detect_features, macro_on

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, path: str = "/metrics") -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@contextlib.contextmanager
def serving(*args: str) -> Iterator[tuple[Any, int]]:
    port = free_port()
    with run_cli("serve", "--web.listen-address", f"127.0.0.1:{port}", *args) as run:
        wait_for(lambda: ("tcptrace_events_total", ()) in scrape(port))
        yield run, port


def churn(port: int, count: int) -> list[int]:
    """`count` connections to a local listener; the client closes first and
    the server right after. Returns the client ports (whose TIME_WAIT runs).
    Clients bind ports outside the ephemeral range, so other traffic on the
    host cannot collide with the pairs reused later."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(256)
    ports = []
    for _ in range(count):
        client = socket.socket()
        # SO_REUSEADDR lets a later bind() to this port reuse its TIME_WAIT pair.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        while True:
            try:
                client.bind(("127.0.0.1", free_port()))
                break
            except OSError:
                continue
        client.connect(("127.0.0.1", port))
        child, _ = server.accept()
        client.sendall(b"ping")
        assert child.recv(4) == b"ping"
        ports.append(client.getsockname()[1])
        client.close()
        assert child.recv(1) == b""
        child.close()
    server.close()
    return ports


def reuse_and_reset(port: int, client_ports: list[int]) -> None:
    """A new connection from each client port (ending its TIME_WAIT), reset at once."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(256)
    for cport in client_ports:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        client.bind(("127.0.0.1", cport))
        client.connect(("127.0.0.1", port))
        child, _ = server.accept()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        with contextlib.suppress(OSError):
            child.recv(1)
        child.close()
    server.close()


@requires_root
def test_counters_move_by_exactly_what_connections_did() -> None:
    k = 120
    port = free_port()
    with serving("--port", str(port)) as (run, http_port):
        before = scrape(http_port)
        client_ports = churn(port, k)
        wait_for(lambda: value(scrape(http_port), "tcptrace_sockets", state="TIME_WAIT") == k)
        middle = scrape(http_port)
        reuse_and_reset(port, client_ports)
        wait_for(
            lambda: (
                delta(
                    before,
                    scrape(http_port),
                    "tcptrace_time_wait_duration_seconds_count",
                    end="reused",
                )
                == k
            )
        )
        time.sleep(1.5)  # the held RST closes are swept within a second
        after = scrape(http_port)
    assert run.returncode == 0, run.stderr

    transitions = "tcptrace_state_transitions_total"
    phase_a = {
        ("CLOSE", "SYN_SENT"): k, ("SYN_SENT", "ESTABLISHED"): k,
        ("LISTEN", "SYN_RECV"): k, ("SYN_RECV", "ESTABLISHED"): k,
        ("ESTABLISHED", "FIN_WAIT1"): k, ("FIN_WAIT1", "FIN_WAIT2"): k,
        ("FIN_WAIT2", "TIME_WAIT"): k, ("ESTABLISHED", "CLOSE_WAIT"): k,
        ("CLOSE_WAIT", "LAST_ACK"): k, ("LAST_ACK", "CLOSE"): k,
        ("CLOSE", "LISTEN"): 1, ("LISTEN", "CLOSE"): 1,
    }  # fmt: skip
    for (old, new), expected in phase_a.items():
        assert delta(before, middle, transitions, old_state=old, new_state=new) == expected, (
            old,
            new,
        )
    changed = {
        labels
        for name, labels in set(before) | set(middle)
        if name == transitions and delta(before, middle, transitions, **dict(labels))
    }
    assert len(changed) == len(phase_a), changed  # and nothing else moved

    # Phase B: each pair reused (TIME_WAIT ends), then reset by the client.
    phase_b = {
        ("TIME_WAIT", "CLOSE"): k, ("CLOSE", "SYN_SENT"): k, ("SYN_SENT", "ESTABLISHED"): k,
        ("LISTEN", "SYN_RECV"): k, ("SYN_RECV", "ESTABLISHED"): k,
        ("ESTABLISHED", "CLOSE"): 2 * k, ("CLOSE", "LISTEN"): 1, ("LISTEN", "CLOSE"): 1,
    }  # fmt: skip
    for (old, new), expected in phase_b.items():
        assert delta(middle, after, transitions, old_state=old, new_state=new) == expected, (
            old,
            new,
        )

    closed = "tcptrace_connections_closed_total"
    assert delta(before, middle, closed, role="client", close="active") == k
    assert delta(before, middle, closed, role="server", close="passive") == k
    assert delta(middle, after, closed, role="client", close="reset_sent") == k
    assert delta(middle, after, closed, role="server", close="reset_received") == k
    opened = "tcptrace_connections_opened_total"
    assert delta(before, after, opened, role="client") == 2 * k
    assert delta(before, after, opened, role="server") == 2 * k
    for role in ("client", "server"):
        assert delta(before, after, "tcptrace_handshake_duration_seconds_count", role=role) == 2 * k
        assert (
            delta(before, after, "tcptrace_connection_duration_seconds_count", role=role) == 2 * k
        )
        assert (
            delta(before, after, "tcptrace_handshake_duration_seconds_bucket", role=role, le="+Inf")
            == 2 * k
        )
    tw = "tcptrace_time_wait_duration_seconds"
    assert delta(before, after, f"{tw}_count", end="reused") == k
    assert delta(before, after, f"{tw}_count", end="expired") == 0
    assert 0 < delta(before, after, f"{tw}_sum", end="reused") < k * 10
    assert delta(before, after, "tcptrace_state_duration_seconds_count", state="TIME_WAIT") == k
    assert delta(before, after, "tcptrace_state_duration_seconds_count", state="CLOSE_WAIT") == k
    assert delta(before, after, "tcptrace_close_wait_duration_seconds_count") == k
    # Back where we started: nothing left open or in TIME_WAIT.
    for state in ("ESTABLISHED", "TIME_WAIT", "CLOSE_WAIT", "LISTEN"):
        assert value(after, "tcptrace_sockets", state=state) == value(
            before, "tcptrace_sockets", state=state
        ), state
    assert value(after, "tcptrace_lost_events_total", cause="socket_map_full") == 0
    # The kernel's own count of skipped program runs is exported, per tracepoint.
    assert ("tcptrace_lost_events_total", (("cause", "kernel_skipped"),)) in after
    skipped = "tcptrace_program_skipped_runs_total"
    assert (skipped, (("tracepoint", "sock:inet_sock_set_state"),)) in after
    assert (skipped, (("tracepoint", "timer:timer_expire_entry"),)) in after
    # events_total counts every TCP state change on the host before filtering
    # (scrapes included); TIME_WAIT -> CLOSE is the timewait socket's, not one.
    assert delta(before, after, "tcptrace_events_total") >= (
        sum(phase_a.values()) + sum(phase_b.values()) - k
    )


@requires_root
def test_the_programs_own_cost_is_exported_while_the_kernel_counts_it() -> None:
    """With the kernel's BPF statistics on (held by this test, as
    kernel.bpf_stats_enabled=1 would), each program's runs and time in the
    kernel are exported by tracepoint: at least the runs our connections
    made, in plausible time."""
    port, k = free_port(), 20
    runs, seconds = "tcptrace_program_runs_total", "tcptrace_program_run_seconds_total"
    with serving("--port", str(port)) as (run, http_port), bpfsys.run_stats():
        before = scrape(http_port)
        churn(port, k)
        after = scrape(http_port)
    assert run.returncode == 0, run.stderr
    # Ten state changes a connection (both ends; other traffic on the host adds).
    state = "sock:inet_sock_set_state"
    assert delta(before, after, runs, tracepoint=state) >= 10 * k
    if macro_on(detect_features(), "USE_TW_EHASH"):
        # A second program on the state change, "tracepoint/program", runs as often.
        other = f"{state}/tw_reuse"
        assert delta(before, after, runs, tracepoint=other) >= 10 * k
    else:
        # Each connection's sockets stop timers (their retransmit and delayed-ACK
        # timers, at the latest when they close), each traced as a cancel.
        other = "timer:timer_cancel"
        assert delta(before, after, runs, tracepoint=other) >= k
    for tracepoint in (state, other):
        took = delta(before, after, seconds, tracepoint=tracepoint)
        per_run = took / delta(before, after, runs, tracepoint=tracepoint)
        assert 0 < per_run < 1e-3, (tracepoint, per_run)


@requires_root
def test_server_handshake_counts_from_the_syn() -> None:
    """A listener with TCP_DEFER_ACCEPT holds the connection in SYN_RECV
    until data comes, 0.3 s after the client's handshake. The server's
    handshake and lifetime count from the SYN, though the socket we trace is
    made only when the data comes."""
    port = free_port()
    handshake = "tcptrace_handshake_duration_seconds"
    lifetime = "tcptrace_connection_duration_seconds"
    with serving("--port", str(port)) as (run, http_port):
        before = scrape(http_port)
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
            listener.bind(("127.0.0.1", port))
            listener.listen(8)
            with socket.create_connection(("127.0.0.1", port)) as client:
                time.sleep(0.3)
                client.sendall(b"ping")
                child, _ = listener.accept()
                with child:
                    assert child.recv(4) == b"ping"
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_for(lambda: delta(before, scrape(http_port), f"{lifetime}_count", role="server") == 1)
        after = scrape(http_port)
    assert run.returncode == 0, run.stderr
    for role in ("client", "server"):
        assert delta(before, after, f"{handshake}_count", role=role) == 1
    assert delta(before, after, f"{handshake}_sum", role="client") < 0.05
    assert 0.29 <= delta(before, after, f"{handshake}_sum", role="server") < 1.0
    assert 0.29 <= delta(before, after, f"{lifetime}_sum", role="server") < 1.0
    # In the buckets too: none of it under 0.25 s.
    assert (f"{handshake}_bucket", (("le", "0.25"), ("role", "server"))) in after
    assert delta(before, after, f"{handshake}_bucket", role="server", le="0.25") == 0


def ss_counts(port: int) -> collections.Counter[str]:
    """Sockets per state on `port` (local or remote) as ss shows them."""
    out = sh("ss", "-tanH", f"( sport = :{port} or dport = :{port} )").stdout
    names = {
        "ESTAB": "ESTABLISHED", "SYN-SENT": "SYN_SENT", "SYN-RECV": "SYN_RECV",
        "FIN-WAIT-1": "FIN_WAIT1", "FIN-WAIT-2": "FIN_WAIT2", "TIME-WAIT": "TIME_WAIT",
        "CLOSE-WAIT": "CLOSE_WAIT", "LAST-ACK": "LAST_ACK", "LISTEN": "LISTEN",
        "CLOSING": "CLOSING",
    }  # fmt: skip
    return collections.Counter(names[line.split()[0]] for line in out.splitlines() if line.strip())


def make_sockets(
    listener: socket.socket, port: int, established: int, close_wait: int, time_wait: int
) -> list[socket.socket]:
    held = []
    for _ in range(established):
        client = socket.create_connection(("127.0.0.1", port))
        child, _ = listener.accept()
        held += [client, child]
    for _ in range(close_wait):
        client = socket.create_connection(("127.0.0.1", port))
        child, _ = listener.accept()
        client.shutdown(socket.SHUT_WR)  # the child goes CLOSE_WAIT, the client FIN_WAIT2
        held += [client, child]
    for _ in range(time_wait):
        client = socket.create_connection(("127.0.0.1", port))
        child, _ = listener.accept()
        client.close()
        assert child.recv(1) == b""
        child.close()
    return held


def gauge_agrees(port: int, http_port: int, states: tuple[str, ...]) -> bool:
    """tcptrace_sockets equals what ss shows now, in each of `states`."""
    expected = ss_counts(port)
    samples = scrape(http_port)
    return all(
        value(samples, "tcptrace_sockets", state=state) == expected[state] for state in states
    )


@requires_root
def test_socket_gauge_matches_ss() -> None:
    """Sockets made before the exporter started (counted from its start-up
    snapshot) and after (counted by the kernel program): per state, the
    gauge says what ss says."""
    port = free_port()
    # A first start may compile serve's program: minutes under emulation,
    # by which time the TIME_WAIT sockets made before it (60 s) would be
    # gone. Done first, the start that counts loads it from the cache.
    with serving("--port", str(port)):
        pass
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    held = make_sockets(listener, port, established=3, close_wait=2, time_wait=2)
    made = time.monotonic()
    try:
        with serving("--port", str(port)) as (_run, http_port):
            held += make_sockets(listener, port, established=4, close_wait=3, time_wait=5)
            states = ("ESTABLISHED", "CLOSE_WAIT", "TIME_WAIT", "LISTEN", "FIN_WAIT2")
            # Each client that shut down reaches FIN_WAIT2 only once its peer
            # ACKs the FIN, which the kernel may delay (up to 200 ms): wait
            # for all five, or `expected` would be taken before they settle.
            wait_for(
                lambda: ss_counts(port)["TIME_WAIT"] == 7 and ss_counts(port)["FIN_WAIT2"] == 5,
                what=lambda: (
                    f"7 TIME_WAIT and 5 FIN_WAIT2 in ss, "
                    f"{time.monotonic() - made:.0f} s after the first: {dict(ss_counts(port))}"
                ),
            )
            expected = ss_counts(port)
            assert expected["ESTABLISHED"] == 14
            assert expected["CLOSE_WAIT"] == 5
            assert expected["TIME_WAIT"] == 7
            assert expected["FIN_WAIT2"] == 5
            # The last changes may still be on their way (slow, emulated CPUs).
            wait_for(lambda: gauge_agrees(port, http_port, states), timeout=5)
            samples = scrape(http_port)
            for state in states:
                assert value(samples, "tcptrace_sockets", state=state) == expected[state], state
            # Closing the old ones moves them off the gauge too.
            for sock in held[:6]:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            wait_for(lambda: gauge_agrees(port, http_port, states[:4]), timeout=5)
            expected = ss_counts(port)
            samples = scrape(http_port)
            for state in states[:4]:
                assert value(samples, "tcptrace_sockets", state=state) == expected[state], state
    finally:
        for sock in held:
            sock.close()
        listener.close()


@requires_root
def test_timewait_older_than_the_exporter_leaves_the_gauge_when_it_ends() -> None:
    """TIME_WAIT sockets made before the exporter started are counted from
    its snapshot. Ended early (a new connection reuses the address pair), the
    kernel program reports it and the gauge drops at once, not when their
    60 s timers would have run out."""
    k = 20
    port = free_port()
    client_ports = churn(port, k)
    made = time.monotonic()
    with serving("--port", str(port)) as (_run, http_port):
        assert value(scrape(http_port), "tcptrace_sockets", state="TIME_WAIT") == k
        # The kernel reuses a loopback pair once its TIME_WAIT is 1 s old.
        time.sleep(max(0.0, made + 1.2 - time.monotonic()))
        reuse_and_reset(port, client_ports)
        assert ss_counts(port)["TIME_WAIT"] == 0
        ended = time.monotonic()
        wait_for(lambda: value(scrape(http_port), "tcptrace_sockets", state="TIME_WAIT") == 0)
        assert time.monotonic() - ended < deadline(5)


@requires_root
def test_kernel_and_engine_agree_on_how_connections_closed() -> None:
    """serve (kernel classification) and lifecycles (Python engine), side by
    side over a mix of endings, count the same closes by role."""
    port = free_port()
    with (
        serving("--port", str(port)) as (_run, http_port),
        run_cli("lifecycles", "--json", "--port", str(port)) as lives_run,
    ):
        before = scrape(http_port)
        with Peer() as server, Peer() as client:
            server.cmd(f"listen 127.0.0.1 {port}")
            for ending in ("client_first", "server_first", "client_rst", "server_rst"):
                cport = int(client.cmd(f"connect 127.0.0.1 {port}"))
                server.cmd("accept")
                first, second = (
                    (client, server) if ending.startswith("client") else (server, client)
                )
                if ending.endswith("rst"):
                    first.cmd("linger0")
                first.cmd("close")
                time.sleep(0.05)
                second.cmd("close")
                del cport
            client.try_cmd(f"connect 127.0.0.1 {free_port()}")  # refused, another port: not ours
            server.cmd("close_listener")
        time.sleep(1.5)
        after = scrape(http_port)
    engine_counts = collections.Counter(
        (life["role"], life["close"])
        for life in lives_run.json_lines()
        if life["close"] and life["role"] != "listener"
    )
    kernel_counts = collections.Counter()
    for (name, labels), _ in after.items():
        if name == "tcptrace_connections_closed_total":
            n = delta(before, after, name, **dict(labels))
            if n:
                kernel_counts[(dict(labels)["role"], dict(labels)["close"])] = int(n)
    # TIME_WAITs still run: the engine has not finished those lifecycles, the kernel
    # counts a connection closed once it reaches TIME_WAIT.
    open_lives = [
        life
        for life in lives_run.json_lines()
        if life["close"] is None and life["role"] != "listener"
    ]
    for life in open_lives:
        assert life["states"][-1]["state"] == "TIME_WAIT"
        engine_counts[(life["role"], "active")] += 1
    assert engine_counts == kernel_counts


@requires_root
def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            cli_argv("serve", "--web.listen-address", f"127.0.0.1:{port}"),
            capture_output=True, text=True, timeout=deadline(60), check=False,
        )  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    assert "already in use" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--web.listen-address", "nonsense"], "listen-address"),
        (["--web.listen-address", "127.0.0.1:99999"], "listen-address"),
        (["--listen-address", ":"], "listen-address"),
        (["--web.telemetry-path", "metrics"], "telemetry-path"),
        (["--web.config.file", "/nonexistent/web.yml"], "/nonexistent/web.yml"),
        (["--log.level", "loud"], "log.level"),
    ],
)
def test_serve_bad_flags(args: list[str], needle: str, tmp_path: Path) -> None:
    result = subprocess.run(
        cli_argv("serve", *args), capture_output=True, text=True, timeout=deadline(60), check=False
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_malformed_web_config(tmp_path: Path) -> None:
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: /nonexistent.crt\n")
    result = subprocess.run(
        cli_argv("serve", "--web.config.file", str(config)),
        capture_output=True,
        text=True,
        timeout=deadline(60),
        check=False,
    )
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert str(config) in line


@requires_root
def test_health_and_readiness() -> None:
    with serving() as (_run, http_port):
        for path, body in (("/-/healthy", b"Healthy"), ("/-/ready", b"Ready")):
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10) as reply:
                assert reply.status == 200
                assert reply.read().startswith(body)


@requires_root
def test_sigterm_exits_zero() -> None:
    with serving() as (run, _http_port):
        pass
    assert run.returncode == 0
    assert run.stderr[-1].startswith("tcptrace-ebpf: stopped: ")
