"""CLOSE_WAIT leaks, found for real: leaking processes, the daemon's ages, ss."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import cli_argv, close_pipes, deadline, free_port, requires_root, run_cli, sh, wait_for
from test_serve import scrape, value

from tcptrace_ebpf.commands.closewait import ages_from_api
from tcptrace_ebpf.model.addresses import AddressPair
from tcptrace_ebpf.model.closewait import Age, LeakedSocket, group_by_process, old_enough
from tcptrace_ebpf.model.owners import ProcessInfo

pytestmark = requires_root

# The labels of a program outside any container (as the test processes are).
NO_POD = {"namespace": "", "pod": "", "container": ""}

LEAKER = textwrap.dedent(
    """
    import os, socket, sys, time
    port, count, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port)); srv.listen(1024)
    held = [srv.accept()[0] for _ in range(count)]
    if mode == "unread":
        pass  # never read what the peer sent
    if mode == "fork" and os.fork() == 0:
        time.sleep(3600)  # the child shares every socket
    print("accepted", flush=True)
    sys.stdin.readline()  # until told to close
    for sock in held:
        sock.close()
    print("closed", flush=True)
    sys.stdin.readline()
    """
)


class Leaker:
    """A process that accepts connections and never closes them (until told)."""

    def __init__(self, port: int, count: int, mode: str = "plain", name: str = "leaker") -> None:
        script = Path(f"/tmp/tcptrace-{name}-{port}.py")
        script.write_text(LEAKER)
        self.script = script
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(port), str(count), mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.pid = self.proc.pid

    @property
    def comm(self) -> str:
        # Read once the leaker runs: right after fork it is still the test's name.
        return Path(f"/proc/{self.pid}/comm").read_text().strip()

    def wait(self, word: str) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == word

    def tell(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        close_pipes(self.proc)
        # a forked child holds the sockets too
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("pkill", "-f", str(self.script))
        self.script.unlink(missing_ok=True)


@contextlib.contextmanager
def leaker(
    port: int, count: int, mode: str = "plain", send: bytes = b""
) -> Iterator[tuple[Leaker, list[float]]]:
    """`count` clients connect, (send), and close: the leaker's sockets go CLOSE_WAIT.
    Yields the leaker and when each client closed."""
    leak = Leaker(port, count, mode)
    clients = []
    closed_at = []
    try:
        wait_for(lambda: sh("ss", "-tlnH", f"sport = :{port}").stdout.strip() != "")
        for _ in range(count):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        leak.wait("accepted")
        for client in clients:
            if send:
                client.sendall(send)
            client.close()
            closed_at.append(time.time())
        yield leak, closed_at
    finally:
        for client in clients:
            client.close()
        leak.stop()


def closewait(*args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        cli_argv("closewait", "--json", *args),
        capture_output=True,
        text=True,
        timeout=deadline(60),
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def daemon(tmp_path: Path, *args: str) -> Iterator[tuple[Any, int, str]]:
    api = str(tmp_path / "api.sock")
    http = free_port()
    with run_cli(
        "serve", "--web.listen-address", f"127.0.0.1:{http}", "--api.socket", api, *args
    ) as run:
        wait_for(lambda: ("tcptrace_events_total", ()) in scrape(http))
        yield run, http, api


def test_leaker_is_found_with_ages_and_metrics(tmp_path: Path) -> None:
    n = 25
    port = free_port()
    with daemon(tmp_path, "--port", str(port)) as (_run, http, api):
        with leaker(port, n) as (leak, closed_at):
            time.sleep(1.0)
            # Ages are taken while the command runs (seconds, emulated): between these.
            before = time.time()
            groups = [
                g for g in closewait("--api.socket", api, "--min-age", "0") if g["pid"] == leak.pid
            ]
            now = time.time()
            (group,) = groups
            assert group["comm"] == leak.comm
            assert group["count"] == n
            assert group["local_ports"] == [port]
            assert sum(peer["count"] for peer in group["top_peers"]) <= n
            assert group["oldest_age_is_lower_bound"] is False
            assert before - min(closed_at) - 1.0 < group["oldest_age_s"]
            assert group["oldest_age_s"] < now - min(closed_at) + 1.0
            sockets = [
                s
                for s in closewait("--api.socket", api, "--min-age", "0", "--sockets")
                if s["pid"] == leak.pid
            ]
            now = time.time()
            assert len(sockets) == n
            for sock in sockets:
                assert sock["lport"] == port
                assert sock["recv_q"] == 0
                assert sock["age_is_lower_bound"] is False
                assert 0 <= sock["age_s"] < now - min(closed_at) + 1.0
            # --min-age hides the young ones
            assert [
                g for g in closewait("--api.socket", api, "--min-age", "1h") if g["pid"] == leak.pid
            ] == []
            # The metrics name the program.
            wait_for(
                lambda: (
                    value(scrape(http), "tcptrace_close_wait_sockets", comm=leak.comm, **NO_POD)
                    == n
                )
            )
            before = time.time()
            oldest = value(
                scrape(http), "tcptrace_close_wait_oldest_seconds", comm=leak.comm, **NO_POD
            )
            assert before - min(closed_at) - 1.5 < oldest < time.time() - min(closed_at) + 1.5
            # When the leaker closes them, both drop to zero.
            leak.tell()
            leak.wait("closed")
            wait_for(
                lambda: (
                    value(scrape(http), "tcptrace_close_wait_sockets", comm=leak.comm, **NO_POD)
                    == 0
                )
            )
            assert [
                g for g in closewait("--api.socket", api, "--min-age", "0") if g["pid"] == leak.pid
            ] == []
            samples = scrape(http)
            assert value(samples, "tcptrace_close_wait_duration_seconds_count") >= n


def test_sockets_older_than_the_tracer_get_a_lower_bound(tmp_path: Path) -> None:
    n = 4
    port = free_port()
    with leaker(port, n, send=b"unread!") as (leak, closed_at):
        time.sleep(1.5)
        launched = time.time()
        with daemon(tmp_path, "--port", str(port)) as (_run, http, api):
            time.sleep(0.5)
            (group,) = [
                g for g in closewait("--api.socket", api, "--min-age", "0") if g["pid"] == leak.pid
            ]
            assert group["count"] == n
            assert group["oldest_age_is_lower_bound"] is True
            # A lower bound: at least since the daemon's start-up snapshot,
            # never more than the truth.
            now = time.time()
            assert 0.5 <= group["oldest_age_s"] <= now - launched
            assert group["oldest_age_s"] < now - min(closed_at)
            sockets = [
                s
                for s in closewait("--api.socket", api, "--min-age", "0", "--sockets")
                if s["pid"] == leak.pid
            ]
            assert all(s["age_is_lower_bound"] for s in sockets)
            assert all(s["recv_q"] == len(b"unread!") for s in sockets)
            wait_for(
                lambda: (
                    value(scrape(http), "tcptrace_close_wait_sockets", comm=leak.comm, **NO_POD)
                    == n
                )
            )
            # The human table marks a lower bound with ">".
            table = subprocess.run(
                cli_argv("closewait", "--api.socket", api, "--min-age", "0"),
                capture_output=True, text=True, timeout=deadline(60), check=True,
            ).stdout  # fmt: skip
            line = next(line for line in table.splitlines() if re.match(rf"\s*{leak.pid}\s", line))
            assert ">" in line


def test_shared_socket_lists_both_holders() -> None:
    port = free_port()
    with leaker(port, 3, mode="fork") as (leak, _):

        def holders() -> set[int]:
            return {g["pid"] for g in closewait("--min-age", "0") if port in g["local_ports"]}

        pids = wait_for(lambda: holders() if len(holders()) == 2 else None)
        assert leak.pid in pids
        sockets = [s for s in closewait("--min-age", "0", "--sockets") if s["lport"] == port]
        assert len(sockets) == 6  # three sockets, each under both holders
        counts = {
            g["pid"]: g["count"] for g in closewait("--min-age", "0") if port in g["local_ports"]
        }
        assert set(counts.values()) == {3}


def test_agrees_with_ss() -> None:
    port = free_port()
    with leaker(port, 7) as (leak, _):
        time.sleep(0.3)
        ours = {
            (s["laddr"], s["lport"], s["raddr"], s["rport"], s["pid"])
            for s in closewait("--min-age", "0", "--sockets")
            if s["lport"] == port
        }
        theirs = set()
        for line in sh(
            "ss", "-tanpH", "state", "close-wait", f"sport = :{port}"
        ).stdout.splitlines():
            fields = line.split()
            local, remote = fields[2], fields[3]
            for pid in re.findall(r"pid=(\d+)", line):
                laddr, lport = local.rsplit(":", 1)
                raddr, rport = remote.rsplit(":", 1)
                theirs.add((laddr, int(lport), raddr, int(rport), int(pid)))
        assert ours == theirs
        assert len(ours) == 7
        assert {entry[4] for entry in ours} == {leak.pid}


def test_a_thousand_leaks_answer_within_a_second() -> None:
    ports = [free_port() for _ in range(4)]
    with contextlib.ExitStack() as stack:
        for port in ports:
            stack.enter_context(leaker(port, 250))
        started = time.monotonic()
        groups = closewait("--min-age", "0")
        elapsed = time.monotonic() - started
    mine = [g for g in groups if set(g["local_ports"]) & set(ports)]
    assert sum(g["count"] for g in mine) == 1000
    assert len(mine) == 4
    assert elapsed < deadline(1.0), f"closewait took {elapsed:.2f}s"


def test_without_a_daemon_ages_are_unknown(tmp_path: Path) -> None:
    port = free_port()
    with leaker(port, 2) as (leak, _):
        argv = cli_argv(
            "closewait", "--json", "--min-age", "0", "--api.socket", str(tmp_path / "none.sock")
        )
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=deadline(60), check=True
        )
        (group,) = [
            json.loads(line)
            for line in result.stdout.splitlines()
            if json.loads(line)["pid"] == leak.pid
        ]
        assert group["oldest_age_s"] is None
        assert "ages unknown" in result.stderr


def test_watch_without_daemon_measures_from_now(tmp_path: Path) -> None:
    """--watch with no daemon traces by itself: new CLOSE_WAITs get real ages."""
    port = free_port()
    args = (
        "closewait", "--watch", "--json", "--interval", "0.5", "--min-age", "0",
        "--api.socket", str(tmp_path / "none.sock"),
    )  # fmt: skip
    with run_cli(*args) as run:
        assert "ages count from now" in run.stderr[-1]
        with leaker(port, 3) as (leak, closed_at):

            def aged() -> dict[str, Any] | None:
                for obj in run.json_lines():
                    if obj["pid"] == leak.pid and (obj["oldest_age_s"] or 0) > 1.5:
                        return obj
                return None

            found = wait_for(aged, timeout=15, what=lambda: f"no aged group in {run.stdout}")
            assert found["count"] == 3
            assert found["oldest_age_is_lower_bound"] is False
            assert found["oldest_age_s"] <= time.time() - min(closed_at) + 1.0
    assert run.returncode == 0, run.stderr


def test_ages_from_the_api_are_keyed_by_address_pair() -> None:
    """The daemon's CLOSE_WAIT list, matched to snapshots by network
    namespace (ours where the daemon had none) and address pair."""
    item = {"family": "ipv6", "laddr": "::1", "lport": 80, "raddr": "::1", "rport": 50000}
    data = [
        {"netns": 9, **item, "since": 1.5, "lower_bound": False},
        {"netns": 0, **item, "since": 2.5, "lower_bound": True},
    ]
    assert ages_from_api(data, 4) == {
        AddressPair(9, socket.AF_INET6, "::1", 80, "::1", 50000): Age(1.5, False),
        AddressPair(4, socket.AF_INET6, "::1", 80, "::1", 50000): Age(2.5, True),
    }
    with pytest.raises(ValueError):
        ages_from_api([{**data[0], "lport": "y"}], 4)


def test_grouping_is_pure() -> None:
    """Grouping without I/O: shared sockets under each holder, unknown ages kept."""
    a = ProcessInfo(1, "a", "a --x", "/", None)
    b = ProcessInfo(2, "b", "b", "/", None)

    def sock(rport: int, age: float | None, holders: tuple[ProcessInfo, ...]) -> LeakedSocket:
        pair = AddressPair(0, socket.AF_INET, "10.0.0.1", 80, "10.0.0.2", rport)
        return LeakedSocket(pair, rport, 0, age, False, holders)

    sockets = [sock(1, 100.0, (a,)), sock(2, 5.0, (a, b)), sock(3, None, ()), sock(4, 50.0, (a,))]
    kept = old_enough(sockets, 10.0)
    assert [s.pair.rport for s in kept] == [1, 3, 4]
    groups = group_by_process(sockets)
    assert [(g.holder.pid if g.holder else None, g.count) for g in groups] == [
        (1, 3),
        (2, 1),
        (None, 1),
    ]
    assert groups[0].oldest_age_s == 100.0
    assert groups[0].median_age_s == 50.0
    assert groups[0].to_json()["top_peers"][0] == {"raddr": "10.0.0.2", "rport": 1, "count": 1}
