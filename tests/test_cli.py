"""The command line: clean failures, stopping, filters, output formats, losses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import Peer, cli_argv, deadline, free_port, requires_root, run_cli, wait_for

from tcptrace_ebpf.commands.runner import noticed_summary, skipped_tcp_runs


def run(
    *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *cli_argv(*args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=deadline(120),
        env={**os.environ, **(env or {})},
    )


def run_in_private_mounts(
    script: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a shell script in a private mount namespace: what it mounts or
    unmounts there, the host does not see."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=deadline(120),
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tcptrace-ebpf: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["trace", "--port", "0"], "--port"),
        (["trace", "--port", "70000"], "--port"),
        (["lifecycles", "--pid", "-3"], "--pid"),
        (["trace", "--duration", "0"], "--duration"),
        (["trace", "--duration", "soon"], "--duration"),
        (["trace", "--max-sockets", "10"], "--max-sockets"),
        (["trace", "--frobnicate"], "--frobnicate"),
        (["teleport"], "teleport"),
    ],
)
def test_bad_flags(args: list[str], needle: str) -> None:
    result = run(*args)
    assert_one_line_error(result, needle, "--help")
    assert result.returncode == 2


def test_the_harness_tells_a_tracer_that_exits_before_it_is_ready_at_once() -> None:
    """run_cli() (every test that starts the tracer) fails as soon as the
    tracer exits without its ready line: not after its timeout, which is
    minutes per test in the emulated kernels."""
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"exited early \(2\).*--port"):
        with run_cli("trace", "--port", "0", timeout=600):
            pass
    assert time.monotonic() - started < deadline(15)


def test_help() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("trace", "lifecycles", "doctor"):
        assert command in result.stdout


@requires_root
def test_not_root() -> None:
    # As nobody, but allowed to read the checkout and its virtual environment,
    # which may sit under a directory only root can enter (a 0700 /tmp).
    result = run(
        "trace",
        prefix=(
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "--",
        ),
    )
    assert_one_line_error(result, "root", "sudo")


@requires_root
def test_no_bcc(tmp_path: Path) -> None:
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: no BCC')\n")
    result = run("trace", env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(result, "BCC", "python3-bpfcc")


@requires_root
def test_no_kernel_headers() -> None:
    """In a private mount namespace /lib/modules is hidden: no headers for BCC."""
    script = f"mount -t tmpfs none /lib/modules && exec {' '.join(cli_argv('trace'))}"
    result = run_in_private_mounts(script, env={"BCC_KERNEL_SOURCE": ""})
    assert_one_line_error(result, "kernel headers", "doctor --fix")


@requires_root
def test_mounts_tracefs_itself() -> None:
    """A host booted without tracefs: the tracer mounts it (here in a private mount namespace)."""
    script = (
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; "
        "umount /sys/kernel/debug 2>/dev/null; "
        f"exec {' '.join(cli_argv('trace', '--duration', '1', '--port', '9'))}"
    )
    result = run_in_private_mounts(script)
    assert result.returncode == 0, result.stderr
    assert "mounted it at /sys/kernel/tracing" in result.stderr
    assert "tracing started" in result.stderr


@requires_root
def test_duration_stops_by_itself() -> None:
    started = time.monotonic()
    result = run("trace", "--duration", "1.5", "--port", str(free_port()))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    # Degradation warnings (older kernels) may come before the start line.
    assert [line for line in lines if "tracing started" in line], result.stderr
    assert lines[-1].startswith("tcptrace-ebpf: stopped: ")
    assert " 0 lost" in lines[-1]
    assert elapsed < deadline(30)


def test_stop_summary_namesskipped_tcp_runs() -> None:
    """Skipped reset and retransmission runs are named; timer and state-change
    skips are not (those are counted elsewhere, or concern other timers)."""
    assert skipped_tcp_runs({}) == ""
    quiet = {"tcp:tcp_retransmit_skb": 0, "timer:timer_start": 7, "sock:inet_sock_set_state": 2}
    assert skipped_tcp_runs(quiet) == ""
    skips = {**quiet, "tcp:tcp_send_reset": 1, "tcp:tcp_retransmit_skb": 3}
    assert skipped_tcp_runs(skips) == (
        "; runs skipped by the kernel (tcp:tcp_retransmit_skb: 3, tcp:tcp_send_reset: 1)"
    )


def test_stop_summary_names_what_was_noticed_missing_later() -> None:
    """A change or end the program never saw, noticed later, is named even
    when no loss counter explains it: its lifecycle says `events_lost`."""
    assert noticed_summary({"missed_transitions": 0, "missed_ends": 0, "lost_ringbuf": 3}) == ""
    assert noticed_summary({"missed_transitions": 1}) == "; noticed later: 1 missed change"
    assert noticed_summary({"missed_transitions": 2, "missed_ends": 1}) == (
        "; noticed later: 2 missed changes, 1 missed end"
    )


@requires_root
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly(sig: int) -> None:
    with run_cli("trace", "--port", str(free_port())) as cli:
        cli.stop(sig)
    assert cli.returncode == 0
    assert cli.stderr[-1].startswith("tcptrace-ebpf: stopped: ")
    assert not any("Traceback" in line for line in cli.stderr)


def _one_connection(host: str, port: int) -> tuple[int, int]:
    with Peer() as server, Peer() as client:
        server.cmd(f"listen {host} {port}")
        cport = int(client.cmd(f"connect {host} {port}"))
        server.cmd("accept")
        client.cmd("linger0")
        client.cmd("close")
        server.cmd("close")
        server.cmd("close_listener")
        return cport, client.pid


@requires_root
def test_trace_json_keys() -> None:
    port = free_port()
    with run_cli("trace", "--json", "--port", str(port)) as cli:
        cport, client_pid = _one_connection("127.0.0.1", port)
        wait_for(lambda: len(cli.json_lines()) >= 7)
    events = cli.json_lines()
    required = {
        "ts", "sock", "pid", "comm", "family", "laddr", "lport", "raddr", "rport",
        "old_state", "new_state", "duration_s",
    }  # fmt: skip
    for event in events:
        assert required <= event.keys()
        assert isinstance(event["ts"], float)
        assert abs(event["ts"] - time.time()) < 60
        assert event["family"] == "ipv4"
        assert not event["old_state"].startswith("TCP_")
    connect = next(e for e in events if e["old_state"] == "CLOSE" and e["new_state"] == "SYN_SENT")
    assert connect["pid"] == client_pid
    assert connect["duration_s"] is None  # time in CLOSE before connect() is unknown
    established = next(e for e in events if e["old_state"] == "SYN_SENT")
    assert established["sock"] == connect["sock"]
    assert established["lport"] == cport
    assert 0 <= established["duration_s"] < 1


@requires_root
@pytest.mark.parametrize(("listen", "host"), [("0.0.0.0", "127.0.0.1"), ("::", "::1")])
def test_accepted_socket_has_its_peer_from_the_first_event(listen: str, host: str) -> None:
    """An accepted socket's every event, its LISTEN -> SYN_RECV first, carries
    its own address pair, not the wildcard listener's. (Before 6.13 the child
    changes state as a copy of its listener, before its ports and addresses are
    set: the program holds that event until the pair is known.)"""
    port = free_port(host)
    with run_cli("trace", "--json", "--port", str(port)) as cli:
        with Peer() as server, Peer() as client:
            server.cmd(f"listen {listen} {port}")
            cport = int(client.cmd(f"connect {host} {port}"))
            server.cmd("accept")
            client.cmd("linger0")
            client.cmd("close")
            server.cmd("close")
            server.cmd("close_listener")
        wait_for(
            lambda: [
                e for e in cli.json_lines() if e["role"] == "server" and e["new_state"] == "CLOSE"
            ],
            what=lambda: f"no server-side close in {cli.stdout}",
        )
    accepted = [e for e in cli.json_lines() if e["role"] == "server"]
    assert (accepted[0]["old_state"], accepted[0]["new_state"]) == ("LISTEN", "SYN_RECV")
    assert [e["seq"] for e in accepted] == list(range(len(accepted)))
    for event in accepted:
        assert (event["laddr"], event["lport"]) == (host, port), event
        assert (event["raddr"], event["rport"]) == (host, cport), event


@requires_root
def test_trace_lines_fit_80_columns() -> None:
    port = free_port("::1")
    with run_cli("trace", "--port", str(port)) as cli:
        _one_connection("::1", port)
        wait_for(lambda: len(cli.stdout) >= 7)
    assert cli.stdout
    for line in cli.stdout:
        assert len(line) <= 80, line
        assert "[::1]:" in line or "…" in line


@requires_root
def test_filters_pid_and_family() -> None:
    """A pid and a family filter in one run (one program to compile): of one
    process's IPv4 and IPv6 connections and another's IPv6 one, only the
    first process's IPv6 connection is traced."""
    port = free_port()
    with Peer() as server4, Peer() as server6, Peer() as client, Peer() as other:
        server4.cmd(f"listen 127.0.0.1 {port}")
        server6.cmd(f"listen ::1 {port}")
        with run_cli("trace", "--json", "--pid", str(client.pid), "-6") as cli:
            client.cmd(f"connect 127.0.0.1 {port}")
            server4.cmd("accept")
            client.cmd("close")
            other.cmd(f"connect ::1 {port}")
            server6.cmd("accept")
            other.cmd("close")
            # Last: once its events are in, the others' would be too.
            traced_port = int(client.cmd(f"connect ::1 {port}"))
            server6.cmd("accept")
            client.cmd("close")
            wait_for(lambda: len(cli.json_lines()) >= 3)
            time.sleep(0.3)
    events = cli.json_lines()
    assert {event["pid"] for event in events} == {client.pid}
    assert {event["family"] for event in events} == {"ipv6"}
    # (SYN_SENT may come before the kernel gave the socket its port: 0.)
    assert {event["lport"] for event in events} - {0} == {traced_port}


@requires_root
def test_sockets_older_than_the_tracer() -> None:
    """A listener and a connection made before tracing starts: the child gets
    the listener's owner (seeded from /proc); the old connection is reported
    from its first change on, marked as started before tracing."""
    port = free_port()
    with Peer() as server, Peer() as client, Peer() as late:
        server.cmd(f"listen 127.0.0.1 {port}")
        old_cport = int(client.cmd(f"connect 127.0.0.1 {port}"))
        server.cmd("accept")
        with run_cli("lifecycles", "--json", "--port", str(port)) as cli:
            client.cmd("close")  # the old connection: server side goes CLOSE_WAIT
            server.cmd("close")
            late_cport = int(late.cmd(f"connect 127.0.0.1 {port}"))
            server.send_line("accept")
            assert server.reply().startswith("ok")
            late.cmd("linger0")
            late.cmd("close")
            wait_for(lambda: len(cli.json_lines()) >= 3)
    lives = cli.json_lines()
    old_child = next(life for life in lives if life["rport"] == old_cport and life["lport"] == port)
    assert old_child["preexisting"] is True
    assert old_child["complete"] is False
    assert [s["state"] for s in old_child["states"]][:2] == ["ESTABLISHED", "CLOSE_WAIT"]
    assert old_child["states"][0]["start"] is None
    assert old_child["close"] == "passive"
    assert old_child["role"] == "server"
    late_child = next(
        life for life in lives if life["rport"] == late_cport and life["role"] == "server"
    )
    assert late_child["pid"] == server.pid
    assert late_child["owner"] in ("listener", "closer")
    assert late_child["complete"] is True


def _churn(port: int, count: int) -> None:
    """`count` short connections to a local listener, as fast as Python goes."""
    code = textwrap.dedent(
        f"""
        import socket, struct
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", {port})); srv.listen(1024)
        for _ in range({count}):
            c = socket.create_connection(("127.0.0.1", {port}))
            s, _ = srv.accept()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close(); s.close()
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=deadline(120))


@requires_root
def test_lost_events_are_counted_and_marked() -> None:
    """The reader stalls (SIGSTOP) while a burst overflows a 1 MB buffer:
    losses are counted in the summary and every lifecycle they touched says so."""
    port = free_port()
    with run_cli("lifecycles", "--json", "--port", str(port), "--buffer-mb", "1") as cli:
        os.kill(cli.proc.pid, signal.SIGSTOP)
        try:
            _churn(port, 3000)
        finally:
            os.kill(cli.proc.pid, signal.SIGCONT)
        time.sleep(1.5)
    assert cli.returncode == 0
    summary = cli.stderr[-1]
    lost = int(re.search(r"\), (\d+) lost", summary).group(1))
    assert lost > 0, summary
    assert "buffer full" in summary
    # The lifecycles still open at the stop (the losses' ones) come last:
    # the reader (this test) must have got them, however slowly.
    assert "given up" not in summary, summary
    lives = cli.json_lines()
    touched = [life for life in lives if life["events_lost"]]
    assert touched, "a loss must show on the lifecycles it touched"
    assert all(life["complete"] is False for life in touched)
    for life in lives:
        if life["complete"] and life["role"] == "client":
            assert [s["state"] for s in life["states"]] == ["SYN_SENT", "ESTABLISHED"]


@requires_root
def test_socket_map_full() -> None:
    """More sockets open at once than the kernel map holds: counted, shown, untracked."""
    port = free_port()
    code = textwrap.dedent(
        f"""
        import socket, sys, time
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", {port})); srv.listen(4096)
        held = []
        for _ in range(700):
            c = socket.create_connection(("127.0.0.1", {port}))
            s, _ = srv.accept()
            held += [c, s]
        print("ready", flush=True)
        sys.stdin.readline()
        """
    )
    with run_cli("trace", "--json", "--port", str(port), "--max-sockets", "1024") as cli:
        holder = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "ready"
        finally:
            holder.communicate("go\n", timeout=deadline(60))
        time.sleep(0.5)
    summary = cli.stderr[-1]
    assert "socket map full" in summary, summary
    untracked = [event for event in cli.json_lines() if "untracked" in event["flags"]]
    assert untracked
    assert all(event["sock"] == 0 for event in untracked)


@requires_root
def test_perf_buffer_fallback() -> None:
    """Kernels without the BPF ring buffer use a perf buffer: same events."""
    port = free_port()
    with run_cli("lifecycles", "--json", "--port", str(port), "--perf-buffer") as cli:
        _one_connection("127.0.0.1", port)
        wait_for(lambda: len(cli.json_lines()) >= 3)
    lives = cli.json_lines()
    client = next(life for life in lives if life["role"] == "client")
    assert [s["state"] for s in client["states"]] == ["SYN_SENT", "ESTABLISHED"]
    assert client["close"] == "reset_sent"
    assert client["complete"] is True
