"""Helpers for tests that drive real sockets and the real tracer.

Everything started here is stopped by its context manager or fixture, even
when a test fails: peer processes, tracer processes, network namespaces.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
PEER = TESTS / "peer.py"

# Tests that load the BPF program or drive sockets in namespaces they create:
# marked `root` (select them with -m root, or leave them out with -m 'not
# root'); conftest.py skips them, with this reason, when not run as root.
requires_root = pytest.mark.root
ROOT_SKIP_REASON = "needs root: loads a BPF program into the kernel"


# What _spin() and _start() take on the development machine (2 vCPUs, idle), in
# seconds (measured 0.012-0.017 and 0.024-0.037 there, 2026-12-02).
_SPIN_REFERENCE_S = 0.02
_START_REFERENCE_S = 0.035


def _spin() -> float:
    """Pure Python: the interpreter's own speed."""
    started = time.perf_counter()
    total = 0
    for i in range(300_000):
        total += i * i % 7
    return time.perf_counter() - started


def _start() -> float:
    """A Python process started and importing what the CLI imports first:
    process creation, page faults and file reads, which emulation slows far
    more than computing (the tests start many processes: the CLI, peers)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import json, socket, subprocess"], check=True)
    return time.perf_counter() - started


@functools.cache
def slowdown_parts() -> tuple[float, float]:
    """(computing, starting a process): each as a multiple of the
    development machine's time, measured once per test run (the fastest of
    three tries)."""
    return (
        min(_spin() for _ in range(3)) / _SPIN_REFERENCE_S,
        min(_start() for _ in range(3)) / _START_REFERENCE_S,
    )


def slowdown() -> float:
    """How many times slower than the development machine this one runs
    right now, at least 1: about ten inside the kernel matrix's emulated
    guests (where BCC's compile alone takes 30-45 s), two or three on a busy
    host. The larger of slowdown_parts(). Every deadline below, and every
    bound on how long something may take, is multiplied by it, so they hold
    under emulation without loosening them on a fast host."""
    return max(1.0, *slowdown_parts())


def deadline(seconds: float) -> float:
    """`seconds` on the development machine, on this one (see slowdown())."""
    return seconds * slowdown()


def close_pipes(proc: subprocess.Popen[Any]) -> None:
    """Close our ends of an ended process's pipes (left to the garbage
    collector, each is a ResourceWarning)."""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):  # a write the process never read
                pipe.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port outside the ephemeral range that nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


class Peer:
    """A tests/peer.py process; `cmd()` sends one command and returns its reply value."""

    def __init__(self, netns: str | None = None) -> None:
        argv = [sys.executable, str(PEER)]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.pid = int(self.cmd("pid"))

    def try_cmd(self, line: str) -> tuple[bool, str]:
        """Send a command; (succeeded, value or error)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        status, _, value = reply.partition(" ")
        return status == "ok", value

    def cmd(self, line: str) -> str:
        ok, value = self.try_cmd(line)
        if not ok:
            raise AssertionError(f"peer {line!r} failed: {value!r}")
        return value

    def send_line(self, line: str) -> None:
        """Send a command without waiting for its reply (read it with reply())."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def reply(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.try_cmd("exit")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        close_pipes(self.proc)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain(stream: Any, sink: list[str], lines: queue.Queue[str | None] | None) -> None:
    """Read `stream` to its end into `sink`, each line also to `lines`, then
    None there: the end (the process exited, or closed it)."""
    for line in stream:
        sink.append(line.rstrip("\n"))
        if lines is not None:
            lines.put(line)
    if lines is not None:
        lines.put(None)


@dataclass
class CliRun:
    """A running `tcptrace-ebpf ...` process."""

    args: list[str]
    proc: subprocess.Popen[str]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    returncode: int | None = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        time.sleep(0.05)  # let the reader threads take the last lines
        return self.returncode

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout if line.startswith("{")]


def cli_argv(*args: str) -> list[str]:
    # -W error: a Python warning in the CLI (or in the loader process, which
    # takes the same warning options) fails the test instead of going unseen.
    return [sys.executable, "-W", "error", "-m", "tcptrace_ebpf", *args]


def _record_paths(args: tuple[str, ...]) -> tuple[Path, Path] | None:
    """With TCPTRACE_RECORD_DIR set, where a `lifecycles --json` run records its
    events and lifecycles (how tests/data/streams was made)."""
    directory = os.environ.get("TCPTRACE_RECORD_DIR")
    if not directory or not args or args[0] != "lifecycles" or "--json" not in args:
        return None
    test = os.environ.get("PYTEST_CURRENT_TEST", "x::run").split(" ")[0].split("::", 1)[1]
    name = "".join(ch if ch.isalnum() else "_" for ch in test).strip("_")
    base = Path(directory) / name
    base.parent.mkdir(parents=True, exist_ok=True)
    return base.with_suffix(".events.jsonl"), base.with_suffix(".lifecycles.jsonl")


@contextlib.contextmanager
def run_cli(*args: str, ready: str = "tracing started", timeout: float = 60) -> Iterator[CliRun]:
    """Start the CLI, wait for its `ready` line on stderr (`timeout` seconds
    on the development machine), stop it on exit."""
    timeout = deadline(timeout)
    record = _record_paths(args)
    if record is not None:
        args = (*args, "--events-to", str(record[0]))
    proc = subprocess.Popen(
        cli_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run = CliRun(list(args), proc)
    errors: queue.Queue[str | None] = queue.Queue()
    threads = [
        threading.Thread(target=_drain, args=(proc.stdout, run.stdout, None), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, run.stderr, errors), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        give_up = time.monotonic() + timeout
        while True:
            try:
                line = errors.get(timeout=max(0.01, give_up - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {ready!r} within {timeout}s: {run.stderr}") from None
            if line is None:
                # Told at once: waiting out `timeout` (minutes under emulation)
                # for each test made a broken tracer take the matrix's whole budget.
                proc.wait(timeout=5)
                raise AssertionError(f"tracer exited early ({proc.returncode}): {run.stderr}")
            if ready in line:
                break
        yield run
    finally:
        run.stop()
        for thread in threads:
            thread.join(timeout=5)
        close_pipes(proc)
        if record is not None:
            record[1].write_text(
                "".join(line + "\n" for line in run.stdout if line.startswith("{"))
            )


def wait_for(
    predicate: Any,
    timeout: float = 10,
    interval: float = 0.05,
    what: str | Callable[[], str] | None = None,
) -> Any:
    """Poll `predicate` until it returns something truthy, and return that;
    fail saying `what` (a string, or a function making one at the time of
    failure; by default the predicate itself) otherwise. `timeout`: seconds
    on the development machine (see slowdown())."""
    timeout = deadline(timeout)
    give_up = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > give_up:
            message = what() if callable(what) else what or predicate
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


@dataclass
class NetnsPair:
    """Two network namespaces joined by a veth pair: a (10.R.0.1) and b (10.R.0.2)."""

    a: str
    b: str
    addr_a: str
    addr_b: str


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Create two namespaces linked by veth; delete them (and their sockets) after."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"tta{tag}", f"ttb{tag}"
    octet = random.randint(16, 250)
    pair = NetnsPair(a, b, f"10.{octet}.0.1", f"10.{octet}.0.2")
    created: list[str] = []
    try:
        for name in (a, b):
            sh("ip", "netns", "add", name)
            created.append(name)
        sh(
            "ip",
            "link",
            "add",
            f"va{tag}",
            "netns",
            a,
            "type",
            "veth",
            "peer",
            "name",
            f"vb{tag}",
            "netns",
            b,
        )
        for name, dev, addr in ((a, f"va{tag}", pair.addr_a), (b, f"vb{tag}", pair.addr_b)):
            sh("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", name, "link", "set", dev, "up")
            sh("ip", "-n", name, "link", "set", "lo", "up")
        yield pair
    finally:
        for name in created:
            sh("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def netns_single() -> Iterator[str]:
    """One namespace with only lo up."""
    name = f"tts{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def nft(netns: str, script: str) -> None:
    """Load an nftables ruleset inside a namespace."""
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input=script,
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )


def by_role(lifecycles: list[dict[str, Any]], port: int) -> dict[str, list[dict[str, Any]]]:
    """Lifecycles touching `port`, grouped by role."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for life in lifecycles:
        if port in (life["lport"], life["rport"]):
            grouped.setdefault(life["role"], []).append(life)
    return grouped


def path(life: dict[str, Any]) -> list[str]:
    return [span["state"] for span in life["states"]]


def durations(life: dict[str, Any]) -> dict[str, float | None]:
    return {span["state"]: span["duration_s"] for span in life["states"]}
