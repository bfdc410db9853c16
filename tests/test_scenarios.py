"""Seed scenarios of a TCP connection, traced for real.

Each test loads the real BPF program (through the real CLI), drives real
sockets owned by separate peer processes, and checks the lifecycles it
reports: exact state paths, roles, how they closed, owners, and durations.
TIME_WAIT is ended early, where a test cannot wait 60 s, the way real
traffic ends it: a new connection reusing the address pair.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from support import (
    Peer,
    deadline,
    free_port,
    netns_pair,
    netns_single,
    nft,
    requires_root,
    run_cli,
    sh,
    wait_for,
)

pytestmark = requires_root


def comm_of(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def netstat(netns: str, name: str) -> int:
    """A TcpExt counter of a namespace (/proc/net/netstat): the kernel's own count."""
    lines = sh("ip", "netns", "exec", netns, "cat", "/proc/net/netstat").stdout.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            return int(dict(zip(header.split(), values.split(), strict=False))[name])
    raise KeyError(name)


def path(life: dict[str, Any]) -> list[str]:
    return [span["state"] for span in life["states"]]


def whole(run: Any, life: dict[str, Any], expected: list[str]) -> bool:
    """Check a lifecycle's state path; True when it is whole, so the rest of
    it can be checked exactly. Rarely the program misses a change: the
    kernel skipped it (an interrupt ran the same tracepoint while our
    program ran on that CPU) and counted that, or, rarer still, never gave
    it the change at all. Then the lifecycle must say its events were lost,
    the run's summary must show it (a counted loss, or a change or end
    noticed missing later), and the states it shows must be expected ones,
    in order (a missed change leaves a state out; a missed end, the rest)."""
    seen = path(life)
    shown = json.dumps(life)  # in full: pytest would cut a dict short
    if not life["events_lost"]:
        assert seen == expected, shown
        return True
    summary = run.stderr[-1]
    lost = re.search(r"(\d+) lost", summary)
    assert lost, summary
    assert int(lost.group(1)) > 0 or "noticed later: " in summary, f"{shown}\n{summary}"
    rest = iter(expected)
    assert all(state in rest for state in seen), f"{shown}\n{summary}"
    return False


def span(life: dict[str, Any], state: str) -> dict[str, Any]:
    return next(s for s in life["states"] if s["state"] == state)


def assert_sane(life: dict[str, Any]) -> None:
    """Every state has a start and a non-negative duration, and they chain up."""
    states = life["states"]
    for here, after in itertools.pairwise(states):
        assert here["start"] is not None, life
        assert here["duration_s"] is not None, life
        assert here["duration_s"] >= 0, life
        # The next state begins when this one ends (within clock rounding).
        assert abs(here["start"] + here["duration_s"] - after["start"]) < 0.002, life
    assert states[-1]["duration_s"] is None or states[-1]["duration_s"] >= 0


def lifecycles_on(run: Any, port: int) -> list[dict[str, Any]]:
    """Lifecycles touching `port`, oldest first (ids are unique, not ordered)."""
    return sorted(
        (life for life in run.json_lines() if port in (life["lport"], life["rport"])),
        key=lambda life: ((life["states"] or [{}])[0].get("start") or 0.0, life["sock"]),
    )


def pick(lives: list[dict[str, Any]], role: str, nth: int = 0, **match: Any) -> dict[str, Any]:
    found = [
        life
        for life in lives
        if life["role"] == role and all(life[key] == value for key, value in match.items())
    ]
    assert len(found) > nth, f"no {role} #{nth} {match} in {lives}"
    return found[nth]


# How far the tracer's timestamps (kernel monotonic time made unix time at its
# start) and the test's time.time() may differ.
CLOCKS_S = 0.05


def timed(peer: Peer, line: str) -> tuple[float, float]:
    """Run a peer command; when it was sent and when it had answered (what
    it did in the kernel happened in between, however slow the machine)."""
    sent = time.time()
    peer.cmd(line)
    return sent, time.time()


def between(first: tuple[float, float], second: tuple[float, float]) -> tuple[float, float]:
    """The least and most time between something done during `first` and
    something done during `second` (as timed() measures them)."""
    return second[0] - first[1] - CLOCKS_S, second[1] - first[0] + CLOCKS_S


def reuse_pair(client: Peer, server: Peer, host: str, port: int, cport: int) -> tuple[float, float]:
    """Connect again from the same client port (tests bind a port outside the
    ephemeral range, so other traffic cannot hold it): a new connection on the same
    address pair ends a TIME_WAIT on it early (the kernel lets a connect()
    reuse its own TIME_WAIT pair on loopback after about 1 s). The new
    connection is then reset so it leaves no TIME_WAIT behind. Returns when
    the connect() that succeeded was sent and when it had answered."""
    give_up = time.monotonic() + deadline(10)
    while True:
        sent = time.time()
        ok, value = client.try_cmd(f"connect {host} {port} {cport}")
        if ok:
            connected = sent, time.time()
            break
        assert time.monotonic() < give_up, f"could not reuse port {cport}: {value}"
        time.sleep(0.1)
    server.cmd("accept")
    client.cmd("linger0")
    client.cmd("close")
    server.cmd("close")
    return connected


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_client_closes_first(host: str) -> None:
    """Scenario 1 (and 8 on ::1): handshake, data, client closes first."""
    port = free_port(host)
    with run_cli("lifecycles", "--json", "--port", str(port)) as run:
        with Peer() as server, Peer() as client:
            server.cmd(f"listen {host} {port}")
            cport = int(client.cmd(f"connect {host} {port} {free_port(host)}"))
            server.cmd("accept")
            client.cmd("send 100")
            server.cmd("recv")
            server.cmd("send 300")
            client.cmd("recv")
            client_close = timed(client, "close")
            time.sleep(0.1)
            server_close = timed(server, "close")
            time.sleep(0.2)
            reused = reuse_pair(client, server, host, port, cport)
            server.cmd("close_listener")
            wait_for(lambda: len(lifecycles_on(run, port)) >= 5)
            client_pid, server_pid = client.pid, server.pid
            client_comm, server_comm = comm_of(client.pid), comm_of(server.pid)
    assert run.returncode == 0, run.stderr
    lives = lifecycles_on(run, port)

    first = pick(lives, "client", lport=cport)
    assert (first["pid"], first["comm"]) == (client_pid, client_comm)
    assert first["family"] == ("ipv6" if ":" in host else "ipv4")
    least, most = between(client_close, server_close)
    if whole(run, first, ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT"]):
        assert first["close"] == "active"
        assert first["complete"] is True
        assert first["time_wait_end"] == "reused"
        assert_sane(first)
        # The peer's FIN came at least 0.1 s after ours: between the two close
        # commands, however long they took.
        closing = span(first, "FIN_WAIT1")["duration_s"] + span(first, "FIN_WAIT2")["duration_s"]
        assert max(0.09, least) <= closing <= most, first
        # Ended when our connect() reused the pair (an explicitly bound port may
        # reuse its TIME_WAIT at once), not by the 60 s timer.
        tw = span(first, "TIME_WAIT")
        assert tw["duration_s"] < 5.0, first
        assert reused[0] - CLOCKS_S < tw["start"] + tw["duration_s"] < reused[1] + CLOCKS_S, first

    child = pick(lives, "server", rport=cport)
    assert (child["pid"], child["comm"]) == (server_pid, server_comm)
    if whole(run, child, ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK"]):
        assert child["close"] == "passive"
        assert child["complete"] is True
        assert_sane(child)
        assert max(0.09, least) <= span(child, "CLOSE_WAIT")["duration_s"] <= most, child

    listener = pick(lives, "listener")
    assert path(listener) == ["LISTEN"]
    assert listener["close"] == "listener_closed"
    assert listener["pid"] == server_pid

    # The connection that reused the pair was reset by the client.
    again = pick(lives, "client", nth=1, lport=cport)
    assert path(again) == ["SYN_SENT", "ESTABLISHED"]
    assert again["close"] == "reset_sent"
    again_child = pick(lives, "server", nth=1, rport=cport)
    assert again_child["close"] == "reset_received"


def test_server_closes_first() -> None:
    """Scenario 2: the server closes first; roles swapped."""
    host = "127.0.0.1"
    port = free_port(host)
    with run_cli("lifecycles", "--json", "--port", str(port)) as run:
        with Peer() as server, Peer() as client:
            server.cmd(f"listen {host} {port}")
            cport = int(client.cmd(f"connect {host} {port} {free_port(host)}"))
            server.cmd("accept")
            client.cmd("send 10")
            server.cmd("recv")
            server_close = timed(server, "close")
            time.sleep(0.1)
            client_close = timed(client, "close")
            time.sleep(0.2)
            # A SYN on the pair ends the server's TIME_WAIT at once.
            reuse_pair(client, server, host, port, cport)
            server.cmd("close_listener")
            wait_for(lambda: len(lifecycles_on(run, port)) >= 5)
            client_pid, server_pid = client.pid, server.pid
    assert run.returncode == 0, run.stderr
    lives = lifecycles_on(run, port)

    child = pick(lives, "server", rport=cport)
    assert child["pid"] == server_pid
    if whole(run, child, ["SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT"]):
        assert child["close"] == "active"
        assert child["complete"] is True
        assert child["time_wait_end"] == "reused"
        assert_sane(child)
        assert span(child, "TIME_WAIT")["duration_s"] < 5.0

    first = pick(lives, "client", lport=cport)
    assert first["pid"] == client_pid
    if whole(run, first, ["SYN_SENT", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK"]):
        assert first["close"] == "passive"
        assert first["complete"] is True
        assert_sane(first)
        least, most = between(server_close, client_close)
        assert max(0.09, least) <= span(first, "CLOSE_WAIT")["duration_s"] <= most, first


def test_server_handshake_from_the_syn() -> None:
    """A listener with TCP_DEFER_ACCEPT keeps the connection in SYN_RECV
    until data comes, 0.3 s after the client's handshake: the server's
    SYN_RECV lasts from the SYN, though the kernel makes the socket we trace
    only at the end of it."""
    host = "127.0.0.1"
    port = free_port(host)
    with run_cli("lifecycles", "--json", "--port", str(port)) as run:
        with Peer() as server, Peer() as client:
            server.cmd(f"listen {host} {port}")
            server.cmd("defer_accept 5")
            cport = int(client.cmd(f"connect {host} {port} {free_port(host)}"))
            time.sleep(0.3)
            client.cmd("send 10")
            server.cmd("accept")
            server.cmd("recv")
            client.cmd("linger0")
            client.cmd("close")
            server.cmd("close")
            server.cmd("close_listener")
            wait_for(lambda: len(lifecycles_on(run, port)) >= 3)
    assert run.returncode == 0, run.stderr
    lives = lifecycles_on(run, port)

    first = pick(lives, "client", lport=cport)
    child = pick(lives, "server", rport=cport)
    assert path(first) == ["SYN_SENT", "ESTABLISHED"]
    assert path(child) == ["SYN_RECV", "ESTABLISHED"]
    assert_sane(child)
    # The client was established by the SYN-ACK, at once.
    assert span(first, "SYN_SENT")["duration_s"] < 0.05
    # The server's SYN_RECV began with the client's SYN and ended with the data.
    assert 0.29 <= span(child, "SYN_RECV")["duration_s"] < 1.0
    assert abs(span(child, "SYN_RECV")["start"] - span(first, "SYN_SENT")["start"]) < 0.05


def test_connection_refused() -> None:
    """Scenario 3: nothing listens; the SYN is answered by RST."""
    port = free_port()
    with run_cli("lifecycles", "--json", "--port", str(port)) as run, Peer() as client:
        ok, error = client.try_cmd(f"connect 127.0.0.1 {port}")
        assert (ok, error) == (False, "ECONNREFUSED")
        wait_for(lambda: lifecycles_on(run, port))
        client_pid = client.pid
    (life,) = lifecycles_on(run, port)
    assert life["role"] == "client"
    assert path(life) == ["SYN_SENT"]
    assert life["close"] == "refused"
    assert life["complete"] is True
    assert life["pid"] == client_pid
    assert 0 <= life["states"][0]["duration_s"] < 0.5


def test_connect_timeout() -> None:
    """Scenario 4: the peer's namespace drops SYNs; the client gives up after
    tcp_syn_retries, lowered to 1 in its namespace (the kernel turns that
    into a time budget: a few seconds, one or two retransmissions)."""
    port = free_port()
    with netns_pair() as ns:
        nft(
            ns.b,
            """
            table inet tcptrace_test {
                chain input {
                    type filter hook input priority 0;
                    tcp flags & (syn | ack) == syn drop
                }
            }
            """,
        )
        sh("ip", "netns", "exec", ns.a, "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")
        with run_cli("lifecycles", "--json", "--port", str(port)) as run:
            with Peer(netns=ns.a) as client:
                retrans_before = netstat(ns.a, "TCPSynRetrans")
                started = time.monotonic()
                ok, error = client.try_cmd(f"connect {ns.addr_b} {port}")
                elapsed = time.monotonic() - started
                syn_retrans = netstat(ns.a, "TCPSynRetrans") - retrans_before
                assert (ok, error) == (False, "ETIMEDOUT")
                wait_for(lambda: lifecycles_on(run, port))
                client_pid = client.pid
    (life,) = lifecycles_on(run, port)
    assert life["role"] == "client"
    assert path(life) == ["SYN_SENT"]
    assert life["close"] == "timeout"
    assert life["complete"] is True
    # Exact, unless the kernel skipped runs of the retransmission program (it
    # does when a run would nest in another): the stop summary says how many.
    skipped = re.search(r"tcp:tcp_retransmit_skb: (\d+)", "\n".join(run.stderr))
    short = int(skipped.group(1)) if skipped else 0
    assert syn_retrans >= 1
    assert syn_retrans - short <= life["syn_retrans"] <= syn_retrans, run.stderr
    assert life["pid"] == client_pid
    assert 2.5 <= life["states"][0]["duration_s"] <= elapsed + 0.1


@pytest.mark.parametrize("resetter", ["client", "server"])
def test_abortive_close(resetter: str) -> None:
    """Scenario 5: SO_LINGER 0 then close() sends RST instead of FIN."""
    port = free_port()
    with run_cli("lifecycles", "--json", "--port", str(port)) as run:
        with Peer() as server, Peer() as client:
            server.cmd(f"listen 127.0.0.1 {port}")
            cport = int(client.cmd(f"connect 127.0.0.1 {port}"))
            server.cmd("accept")
            client.cmd("send 10")
            server.cmd("recv")
            aborting, other = (client, server) if resetter == "client" else (server, client)
            aborting.cmd("linger0")
            aborting.cmd("close")
            time.sleep(0.1)
            other.cmd("close")
            server.cmd("close_listener")
            wait_for(lambda: len(lifecycles_on(run, port)) >= 3)
    lives = lifecycles_on(run, port)
    first = pick(lives, "client", lport=cport)
    child = pick(lives, "server", rport=cport)
    assert path(first) == ["SYN_SENT", "ESTABLISHED"]
    assert path(child) == ["SYN_RECV", "ESTABLISHED"]
    sent, received = (first, child) if resetter == "client" else (child, first)
    assert sent["close"] == "reset_sent"
    assert received["close"] == "reset_received"
    assert first["complete"]
    assert child["complete"]
    assert_sane(first)
    assert_sane(child)


def test_simultaneous_close() -> None:
    """Scenario 6: both FINs cross; a side that gets the peer's FIN before the
    ACK of its own passes through CLOSING.

    Inside a namespace of its own, the test holds back FIN segments with
    nftables while both sides close, then lets the retransmitted FINs
    cross. Deleting the namespace ends both TIME_WAITs ("killed")."""
    port = free_port()
    with run_cli("lifecycles", "--json", "--port", str(port)) as run:
        with netns_single() as ns:
            with Peer(netns=ns) as server, Peer(netns=ns) as client:
                server.cmd(f"listen 127.0.0.1 {port}")
                cport = int(client.cmd(f"connect 127.0.0.1 {port}"))
                server.cmd("accept")
                nft(
                    ns,
                    f"""
                    table inet tcptrace_test {{
                        chain output {{
                            type filter hook output priority 0;
                            tcp dport {port} tcp flags & fin == fin drop
                            tcp sport {port} tcp flags & fin == fin drop
                        }}
                    }}
                    """,
                )
                client.cmd("close")
                server.cmd("close")
                time.sleep(0.3)
                sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "tcptrace_test")
                wait_for(
                    lambda: (
                        sh("ip", "netns", "exec", ns, "ss", "-tanH").stdout.count("TIME-WAIT") == 2
                    ),
                    timeout=15,
                )
                server.cmd("close_listener")
                client_pid, server_pid = client.pid, server.pid
        # The namespace is gone; its timewait sockets were killed with it.
        wait_for(lambda: len(lifecycles_on(run, port)) >= 3, timeout=30)
    lives = lifecycles_on(run, port)
    first = pick(lives, "client", lport=cport)
    child = pick(lives, "server", rport=cport)
    # Both sides pass through CLOSING when both retransmitted FINs leave before
    # either arrives (most runs); otherwise the FIN that comes second carries
    # the ACK of the first, and that side reads as a plain active close.
    crossed = [life for life in (first, child) if "CLOSING" in path(life)]
    assert crossed, (first, child)
    for life, pid in ((first, client_pid), (child, server_pid)):
        assert path(life)[-1] == "TIME_WAIT", life
        assert "FIN_WAIT1" in path(life), life
        if life in crossed:
            assert path(life)[-3:] == ["FIN_WAIT1", "CLOSING", "TIME_WAIT"], life
            assert life["close"] == "simultaneous"
        else:
            assert path(life)[-3:] == ["FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT"], life
            assert life["close"] == "active"
        assert life["time_wait_end"] == "killed"
        assert life["complete"] is True
        assert life["pid"] == pid
        assert_sane(life)


@pytest.mark.parametrize("first_closer", ["client", "server"])
def test_ack_and_fin_in_one_segment(first_closer: str) -> None:
    """Scenario 7: the peer closes at once on our FIN, so its ACK rides with
    its FIN; the first closer goes FIN_WAIT1 > FIN_WAIT2 > TIME_WAIT on that
    one segment (as an HTTP server does with Connection: close)."""
    host = "127.0.0.1"
    port = free_port()
    with run_cli("lifecycles", "--json", "--port", str(port)) as run:
        with Peer() as server, Peer() as client:
            server.cmd(f"listen {host} {port}")
            cport = int(client.cmd(f"connect {host} {port} {free_port(host)}"))
            server.cmd("accept")
            client.cmd("send 50")
            server.cmd("recv")
            closer, peer = (client, server) if first_closer == "client" else (server, client)
            peer.send_line("close_on_eof")
            time.sleep(0.05)
            closer.cmd("close")
            assert peer.reply().startswith("ok")
            time.sleep(1.2)
            reuse_pair(client, server, host, port, cport)
            server.cmd("close_listener")
            wait_for(lambda: len(lifecycles_on(run, port)) >= 5)
    lives = lifecycles_on(run, port)
    first = pick(lives, "client", lport=cport)
    child = pick(lives, "server", rport=cport)
    active, passive = (first, child) if first_closer == "client" else (child, first)
    assert path(active)[-3:] == ["FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT"]
    assert path(passive)[-2:] == ["CLOSE_WAIT", "LAST_ACK"]
    assert active["close"] == "active"
    assert passive["close"] == "passive"
    # ACK and FIN in one segment: no time in FIN_WAIT2 at all (the two state
    # changes of one segment's processing: under a millisecond, unemulated).
    assert span(active, "FIN_WAIT2")["duration_s"] < deadline(0.001)
    assert active["time_wait_end"] == "reused"
    for life in (active, passive):
        assert life["complete"] is True
        assert_sane(life)


def _client_closes_first(server: Peer, client: Peer, port: int) -> int:
    """A connection to 127.0.0.1:port whose client closes first, the server
    0.1 s later (so the client's end goes through FIN_WAIT2 into TIME_WAIT);
    returns the client's port."""
    server.cmd(f"listen 127.0.0.1 {port}")
    cport = int(client.cmd(f"connect 127.0.0.1 {port}"))
    server.cmd("accept")
    client.cmd("close")
    time.sleep(0.1)
    server.cmd("close")
    return cport


def _tw_visible(netns: str | None, cport: int) -> bool:
    """Whether `ss` (sock_diag) still shows a TIME_WAIT socket on local port cport."""
    argv = ["ss", "-tanH", "state", "time-wait", "sport", "=", f":{cport}"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    return bool(sh(*argv).stdout.strip())


def _a_quarter_past_a_second() -> None:
    """Sleep until CLOCK_MONOTONIC is a quarter past a whole second. Not just
    past it: the kernel's seconds counter (ktime_get_seconds(), the timekeeper's
    copy) moves on the next timer tick, which in an idle emulated guest comes
    a while after the whole second, so a FIN just after it may be stamped with
    the second before."""
    time.sleep((1.25 - time.monotonic() % 1) % 1)


def test_time_wait_ended_by_reuse() -> None:
    """Scenario 9a: with one ephemeral port, a new connect() must wait for the
    kernel to let it reuse the TIME_WAIT pair (tcp_tw_reuse, about 1 s on
    loopback); until then it fails with EADDRNOTAVAIL before any SYN leaves.
    TIME_WAIT's measured end must match when sock_diag stopped showing it."""
    port = free_port()
    with netns_single() as ns:
        sh(
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=40000 40000",
        )
        with run_cli("lifecycles", "--json", "--port", str(port)) as run:
            with Peer(netns=ns) as server, Peer(netns=ns) as client:
                server.cmd(f"listen 127.0.0.1 {port}")
                cport = int(client.cmd(f"connect 127.0.0.1 {port}"))
                assert cport == 40000
                server.cmd("accept")
                client.cmd("send 10")
                server.cmd("recv")
                # The kernel lets a connect() take the pair over once its clock
                # passes a mark: tcp_tw_reuse_delay (1 s) after the timewait
                # socket began since 6.13; before, the next whole second of
                # CLOCK_MONOTONIC after the last segment came (the server's
                # FIN), which may be a moment away. So close early in a
                # second, and try at once: the first try falls inside the
                # wait however slow the machine (nothing as slow as `ss` runs
                # before it; close and first try took 0.01 s in a 6.1 guest).
                _a_quarter_past_a_second()
                closing_at = time.monotonic()
                closing_wall = time.time()
                client.cmd("close")
                server.cmd("close")
                failures = 0
                first_try_after: float | None = None
                seen_at: float | None = None
                gone_by: float | None = None
                while True:
                    attempt_at = time.time()
                    ok, error = client.try_cmd(f"connect 127.0.0.1 {port}")
                    if first_try_after is None:
                        first_try_after = time.monotonic() - closing_at
                    if ok:
                        break
                    assert error == "EADDRNOTAVAIL"
                    failures += 1
                    if failures == 1:
                        seen_at = time.time()
                        assert _tw_visible(ns, cport)
                    assert failures < 200, "TIME_WAIT was never reused"
                    time.sleep(0.02)
                reused_at = time.time()
                if not _tw_visible(ns, cport):
                    gone_by = time.time()
                server.cmd("accept")
                client.cmd("linger0")
                client.cmd("close")
                server.cmd("close")
                server.cmd("close_listener")
                client_pid = client.pid
                wait_for(lambda: len(lifecycles_on(run, port)) >= 5 + failures)
    lives = lifecycles_on(run, port)
    first = pick(lives, "client", lport=cport)
    assert path(first) == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT"]
    assert first["time_wait_end"] == "reused"
    assert first["complete"] is True
    tw = span(first, "TIME_WAIT")
    # About 1 s, not 60 s. Since 6.13 (net.ipv4.tcp_tw_reuse_delay) at least
    # the delay; before, whenever the seconds counter passed the timewait
    # socket's last timestamp: anything in (0, 1] s.
    delay = Path("/proc/sys/net/ipv4/tcp_tw_reuse_delay")
    lowest = int(delay.read_text()) / 1000 - 0.1 if delay.exists() else 0.0
    assert lowest < tw["duration_s"], first
    # Its real span, bracketed by what the test saw (the tracer's clock and
    # time.time() agree within CLOCKS_S): it began after the close and
    # ended in the connect() that reused the pair, while sock_diag, which
    # still listed it after the first refusal, stopped listing it.
    assert failures >= 1, f"reused at the first try, {first_try_after:.2f} s after the close"
    assert seen_at is not None
    assert gone_by is not None, "sock_diag still lists the timewait socket after its reuse"
    end = tw["start"] + tw["duration_s"]
    assert closing_wall - CLOCKS_S < tw["start"], first
    assert attempt_at - CLOCKS_S < end < reused_at + CLOCKS_S, first
    assert seen_at - CLOCKS_S < end < gone_by + CLOCKS_S, first
    # Each refused attempt is a lifecycle of its own: no port, no SYN.
    failed = [life for life in lives if life["close"] == "connect_failed"]
    assert len(failed) == failures
    assert all(path(life) == ["SYN_SENT"] and life["pid"] == client_pid for life in failed)


@pytest.mark.slow
def test_time_wait_natural_expiry() -> None:
    """Scenario 9b: a TIME_WAIT left alone lasts the kernel's 60 s, plus up to
    the timer wheel's slack; its measured end matches when sock_diag stopped
    showing the socket, within 1 s."""
    port = free_port()
    with run_cli("lifecycles", "--json", "--port", str(port)) as run:
        with Peer() as server, Peer() as client:
            server.cmd(f"listen 127.0.0.1 {port}")
            cport = int(client.cmd(f"connect 127.0.0.1 {port}"))
            server.cmd("accept")
            client.cmd("close")
            server.cmd("close")
            server.cmd("close_listener")
        wait_for(lambda: _tw_visible(None, cport))
        wait_for(lambda: not _tw_visible(None, cport), timeout=90, interval=0.1)
        gone_at = time.time()
        wait_for(
            lambda: any(life["lport"] == cport for life in lifecycles_on(run, port)), timeout=10
        )
    first = pick(lifecycles_on(run, port), "client", lport=cport)
    assert path(first)[-1] == "TIME_WAIT"
    assert first["time_wait_end"] == "expired"
    assert first["complete"] is True
    tw = span(first, "TIME_WAIT")
    assert 60.0 <= tw["duration_s"] <= 67.5, first
    assert abs(tw["start"] + tw["duration_s"] - gone_at) < 1.0


def test_time_wait_skipped_when_the_kernel_makes_none() -> None:
    """With net.ipv4.tcp_max_tw_buckets at 0 the kernel gives an active close
    no TIME_WAIT at all: the lifecycle ends in FIN_WAIT2 saying so, and the
    exporter counts it."""
    from test_serve import delta, scrape

    port = free_port()
    http = free_port()
    with netns_single() as ns:
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=0")
        with (
            run_cli("serve", "--web.listen-address", f"127.0.0.1:{http}", "--api.socket", "",
                    "--port", str(port)) as _serve,
            run_cli("lifecycles", "--json", "--port", str(port)) as run,
        ):  # fmt: skip
            before = scrape(http)
            with Peer(netns=ns) as server, Peer(netns=ns) as client:
                cport = _client_closes_first(server, client, port)
                server.cmd("close_listener")
            wait_for(lambda: len(lifecycles_on(run, port)) >= 3)
            # serve's held close is swept within a second of its tick (later
            # on a slow machine): wait for it to be counted.
            wait_for(lambda: delta(before, scrape(http), "tcptrace_time_wait_skipped_total"))
            after = scrape(http)
    first = pick(lifecycles_on(run, port), "client", lport=cport)
    assert path(first) == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]
    assert first["close"] == "active"
    assert first["time_wait_end"] == "skipped"
    assert first["complete"] is True
    assert delta(before, after, "tcptrace_time_wait_skipped_total") == 1
    closed = "tcptrace_connections_closed_total"
    assert delta(before, after, closed, role="client", close="active") == 1


def test_time_wait_in_a_namespace_with_its_own_connection_table() -> None:
    """A namespace created while net.ipv4.tcp_child_ehash_entries is set gets
    a connection table of its own (6.1+). Its timewait sockets are put there,
    and where the program finds a new timewait socket in the connection table
    (6.11+) it must look in the namespace's own (its tcp_death_row's): else
    each would read as a close into no TIME_WAIT (skipped)."""
    from test_serve import delta, scrape

    sysctl = Path("/proc/sys/net/ipv4/tcp_child_ehash_entries")
    if not sysctl.exists():
        pytest.skip("this kernel has no per-namespace connection tables (Linux < 6.1)")
    port, http = free_port(), free_port()
    with (
        run_cli("serve", "--web.listen-address", f"127.0.0.1:{http}", "--api.socket", "",
                "--port", str(port)),
        contextlib.ExitStack() as stack,
    ):  # fmt: skip
        wait_for(lambda: ("tcptrace_events_total", ()) in scrape(http))
        before = scrape(http)
        saved = sysctl.read_text()
        sysctl.write_text("128\n")  # only namespaces created meanwhile take it
        try:
            ns = stack.enter_context(netns_single())
        finally:
            sysctl.write_text(saved)
        with Peer(netns=ns) as server, Peer(netns=ns) as client:
            cport = _client_closes_first(server, client, port)
            assert _tw_visible(ns, cport)
            wait_for(
                lambda: delta(before, scrape(http), "tcptrace_sockets", state="TIME_WAIT") == 1
            )
            after = scrape(http)
    assert delta(before, after, "tcptrace_time_wait_skipped_total") == 0
    transitions = "tcptrace_state_transitions_total"
    assert delta(before, after, transitions, old_state="FIN_WAIT2", new_state="TIME_WAIT") == 1
