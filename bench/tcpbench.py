"""What tcptrace-ebpf costs under loopback connection churn, and whether its counters are exact.

Run it as root through the wrapper next to this file:

    sudo bench/run [--duration S] [--connections C] [--rounds R] [--json FILE] [--quick]

See bench/README.md for what is measured and how to read the numbers. In short:

* throughput: nginx (keep-alive off) and wrk (`Connection: close`, so one
  request is one TCP connection) on 127.0.0.1, measured with no tracer, with
  `tcptrace-ebpf serve` (unfiltered, scraped every second), with
  `tcptrace-ebpf serve --port <nginx port>` (the exactness check), with
  `tcptrace-ebpf trace --json > /dev/null` and with bcc's
  `tcpstates-bpfcc > /dev/null`, interleaved over several rounds;
* scrape latency of `serve` with 100,000 sockets alive;
* the exporter's resident memory after 100,000 and after 5,000,000 connections.

Everything this script starts runs in its own session and is stopped by pid;
sysctls it changes are restored, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import http.client
import json
import math
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from tcptrace_ebpf.host.netns import run_in
from tcptrace_ebpf.serve.tracking import HEAL_RECHECK_S

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
LOOPBACK = "127.0.0.1"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TRACEFS = Path("/sys/kernel/tracing")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")

# (command, Debian package that provides it)
TOOLS = (
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
    ("tcpstates-bpfcc", "bpfcc-tools"),
    ("ss", "iproute2"),
)
# Only for --workload bulk.
IPERF3 = ("iperf3", "iperf3")

# What the load is (--workload): connection churn (wrk with "Connection:
# close" against nginx with keep-alive off: every request is a new
# connection), HTTP keep-alive (the same without "Connection: close", nginx
# keep-alive on: wrk's connections live the whole run, so the tracer's
# programs see only timers and packets, no state changes), or a bulk
# transfer (iperf3 over loopback: one connection moving data as fast as it
# can). The throughput is requests/s (churn: connections/s) or bits/s.
WORKLOADS = ("churn", "keepalive", "bulk")

MODE_BASELINE = "baseline"
MODE_SERVE = "serve"
MODE_EXACT = "serve-port"
MODE_TRACE = "trace"
MODE_TCPSTATES = "tcpstates"
ALL_MODES = (MODE_BASELINE, MODE_SERVE, MODE_EXACT, MODE_TRACE, MODE_TCPSTATES)
MODE_TITLES = {
    MODE_BASELINE: "baseline (no tracer)",
    MODE_SERVE: "serve (unfiltered)",
    MODE_EXACT: "serve --port NGINX",
    MODE_TRACE: "trace --json",
    MODE_TCPSTATES: "tcpstates-bpfcc",
}


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """An expected failure: one line, then cleanup."""


class Interrupted(BaseException):
    """Ctrl-C, SIGTERM or SIGHUP: stop measuring and clean up."""


# -- signals ------------------------------------------------------------------

_interrupts: list[int] = []


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    _interrupts.append(signum)
    if len(_interrupts) == 1:
        raise Interrupted(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    # A handler (not SIG_IGN) also means children get the default action after exec.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def ignore_signals() -> None:
    """While cleaning up: a second Ctrl-C must not abandon half-stopped processes."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda _s, _f: None)


# -- processes ------------------------------------------------------------------


class Processes:
    """Every process the bench starts: each in its own session, stopped by pid."""

    def __init__(self) -> None:
        self.running: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        text: bool = False,
    ) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(
            list(cmd),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            text=text,
            env={**os.environ, "PATH": SBIN_PATH + ":" + os.environ.get("PATH", "")},
        )
        self.running.append((name, proc))
        return proc

    def stop(
        self,
        proc: subprocess.Popen[Any],
        first: signal.Signals = signal.SIGTERM,
        timeout: float = 15.0,
    ) -> int | None:
        """Signal by pid, wait, then escalate to SIGTERM and SIGKILL. Returns the exit code."""
        steps = [first, *(s for s in (signal.SIGTERM, signal.SIGKILL) if s != first)]
        for step in steps:
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(step)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout if step != signal.SIGKILL else 10.0)
        self.running = [(n, p) for n, p in self.running if p is not proc]
        return proc.poll()

    def stop_all(self) -> None:
        for name, proc in reversed(list(self.running)):
            if proc.poll() is None:
                log(f"stopping {name} (pid {proc.pid})")
            self.stop(proc, signal.SIGTERM, timeout=10.0)


# -- /proc readings -----------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: fields start after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def cpu_seconds(pid: int, with_children: bool = True) -> float:
    """utime+stime of a process (all its threads), of the children it reaped and,
    optionally, of its live descendants."""
    fields = _stat_fields(pid)
    if fields is None:
        return math.nan
    # After the comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    ticks = sum(int(value) for value in fields[11:15])
    if with_children:
        for child in descendants(pid):
            child_fields = _stat_fields(child)
            if child_fields:
                ticks += int(child_fields[11]) + int(child_fields[12])
    return ticks / CLK_TCK


def rss_bytes(pid: int, key: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def fd_kinds(pid: int) -> dict[str, int]:
    kinds: dict[str, int] = {}
    try:
        entries = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return kinds
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("anon_inode:"):
            kind = target.removeprefix("anon_inode:").strip("[]")
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def prog_stats(pid: int) -> dict[int, tuple[int, int]]:
    """prog id -> (run_cnt, run_time_ns) of every BPF program process pid holds
    (non-zero only while the kernel's BPF run-time statistics are on)."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(entry) != "anon_inode:bpf-prog":
                continue
            text = Path(f"/proc/{pid}/fdinfo/{entry.name}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        prog_id = int(fields["prog_id"])
        stats[prog_id] = (int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0)))
    return stats


def bpf_prog_stats(pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the BPF programs a process holds
    (non-zero only while kernel.bpf_stats_enabled=1)."""
    try:
        stats = prog_stats(pid)
    except OSError:
        return 0, 0
    return sum(ns for _, ns in stats.values()), sum(runs for runs, _ in stats.values())


@dataclass
class SystemCpu:
    busy: float
    softirq: float
    total: float

    @classmethod
    def read(cls) -> SystemCpu:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
        total = user + nice + system + idle + iowait + irq + softirq + steal
        return cls(
            busy=(total - idle - iowait) / CLK_TCK,
            softirq=softirq / CLK_TCK,
            total=total / CLK_TCK,
        )


def timewait_count() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            parts = line.split()
            return int(parts[parts.index("tw") + 1])
    return -1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# -- HTTP -------------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.value = 0
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.value += 1


_own = _Counter()


def own_connections() -> int:
    """TCP connections this process has opened (each one moves LISTEN->SYN_RECV once)."""
    with _own.lock:
        return _own.value


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes, float]:
    """One GET on a fresh connection: (status, body, seconds from connect to last byte)."""
    _own.add()
    started = time.perf_counter()
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        return response.status, body, time.perf_counter() - started
    finally:
        conn.close()


Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> Sample:
    samples: Sample = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = frozenset(_LABEL.findall(match.group(3) or ""))
        samples[(match.group(1), labels)] = float(match.group(4))
    return samples


def metric_sum(samples: Sample, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (n, lbls), value in samples.items() if n == name and wanted <= set(lbls))


def scrape(port: int, timeout: float = 10.0) -> tuple[Sample, float]:
    status, body, seconds = http_get(port, "/metrics", timeout)
    if status != 200:
        raise BenchError(f"scrape of :{port}/metrics returned HTTP {status}")
    return parse_metrics(body.decode()), seconds


def percentiles(values: Sequence[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        # nearest rank
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1]

    return {
        "count": len(ordered),
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


class Scraper(threading.Thread):
    """GET /metrics every `interval` seconds, as Prometheus would; keeps latencies."""

    def __init__(self, port: int, interval: float = 1.0) -> None:
        super().__init__(name="scraper", daemon=True)
        self.port = port
        self.interval = interval
        self.latencies: list[float] = []
        self.server_durations: list[float] = []
        self.failures: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            try:
                samples, seconds = scrape(self.port)
                self.latencies.append(seconds)
                self.server_durations.append(
                    metric_sum(samples, "tcptrace_scrape_duration_seconds")
                )
            except (OSError, BenchError, http.client.HTTPException) as err:
                self.failures.append(str(err))
            next_at += self.interval
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def finish(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join(timeout=30)
        return {
            "latency_s": percentiles(self.latencies),
            "server_scrape_duration_s": percentiles(self.server_durations),
            "failures": len(self.failures),
            "failure_examples": self.failures[:3],
        }


# -- nginx --------------------------------------------------------------------------


@dataclass
class StubStatus:
    active: int
    accepts: int
    handled: int
    requests: int


class Nginx:
    """A private nginx: its own config, pid file and logs in a temp dir; stopped by pid."""

    def __init__(
        self,
        procs: Processes,
        workdir: Path,
        workers: int,
        keepalive: bool = False,
        cpus: str | None = None,
    ) -> None:
        self.keepalive = keepalive
        self.cpus = cpus  # taskset's CPU list for the master and its workers, or any
        self.procs = procs
        self.dir = workdir / "nginx"
        self.port = free_port()
        self.status_port = free_port()
        while self.status_port == self.port:
            self.status_port = free_port()
        self.workers = workers
        self.proc: subprocess.Popen[Any] | None = None
        self.stub_reads = 0

    def config(self) -> str:
        temp = self.dir / "tmp"
        try:
            built = subprocess.run(
                ["nginx", "-V"], capture_output=True, text=True, check=False
            ).stderr
        except OSError:
            built = ""
        temp_paths = [f"client_body_temp_path {temp}/body;"]
        for module in ("proxy", "fastcgi", "uwsgi", "scgi"):
            if f"--without-http_{module}_module" not in built:
                temp_paths.append(f"{module}_temp_path {temp}/{module};")
        temp_lines = "\n    ".join(temp_paths)
        keepalive = (
            "keepalive_timeout 300s;\n    keepalive_requests 100000000;"
            if self.keepalive
            else "keepalive_timeout 0;"
        )
        return f"""# written by tcptrace-ebpf bench/tcpbench.py
daemon off;
master_process on;
worker_processes {self.workers};
worker_rlimit_nofile 65536;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    {keepalive}
    {temp_lines}
    server {{
        listen {LOOPBACK}:{self.port} backlog=4096;
        location / {{
            return 200 "ok\\n";
        }}
    }}
    server {{
        listen {LOOPBACK}:{self.status_port};
        location / {{
            stub_status;
        }}
    }}
}}
"""

    def start(self) -> None:
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        errlog = self.dir / "error.log"
        cmd = ["nginx", "-e", str(errlog), "-p", str(self.dir), "-c", str(conf)]
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise BenchError(f"nginx config test failed: {check.stderr.strip()}")
        self.proc = self.procs.start("nginx", pinned(self.cpus, cmd), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"nginx exited at start: {self._errlog_tail()}")
            with contextlib.suppress(OSError, BenchError, http.client.HTTPException):
                self.stub()
                return
            time.sleep(0.1)
        raise BenchError(f"nginx did not answer within 15 s: {self._errlog_tail()}")

    def _errlog_tail(self) -> str:
        try:
            return " | ".join((self.dir / "error.log").read_text().splitlines()[-3:])
        except OSError:
            return "(no error log)"

    def stub(self) -> StubStatus:
        self.stub_reads += 1
        status, body, _seconds = http_get(self.status_port, "/")
        text = body.decode()
        active = re.search(r"Active connections:\s*(\d+)", text)
        counts = re.search(r"\n\s*(\d+)\s+(\d+)\s+(\d+)\s*\n", text)
        if status != 200 or not active or not counts:
            raise BenchError(f"unexpected stub_status answer: {text!r}")
        return StubStatus(int(active.group(1)), *(int(v) for v in counts.groups()))

    def wait_idle(self, timeout: float = 15.0) -> StubStatus:
        """Until the only active connection is our own stub_status request."""
        deadline = time.monotonic() + timeout
        while True:
            stub = self.stub()
            if stub.active <= 1 or time.monotonic() > deadline:
                return stub
            time.sleep(0.2)

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGQUIT, timeout=10.0)
            self.proc = None


# -- wrk ---------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    seconds: float
    errors: dict[str, int]
    non_2xx: int
    output: str


def parse_wrk(output: str) -> WrkResult:
    rate = re.search(r"Requests/sec:\s*([\d.]+)", output)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    if not rate or not total:
        raise BenchError(f"could not parse wrk's output: {output!r}")
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}.get(total.group(3), 1.0)
    errors = {}
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors = dict(
            zip(
                ("connect", "read", "write", "timeout"),
                map(int, socket_errors.groups()),
                strict=True,
            )
        )
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    return WrkResult(
        requests_per_s=float(rate.group(1)),
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * unit,
        errors=errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        output=output,
    )


def wrk_command(args: argparse.Namespace, port: int, duration: float) -> list[str]:
    return [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{max(1, round(duration))}s",
        *(["-H", "Connection: close"] if args.workload == "churn" else []),
        f"http://{LOOPBACK}:{port}/",
    ]


def iperf3_command(port: int, duration: float, address: str = LOOPBACK) -> list[str]:
    return ["iperf3", "-c", address, "-p", str(port), "-t", f"{max(1, round(duration))}", "-J"]


def bcc_program(text: str) -> Any:
    """`text` compiled and loaded by BCC (its probes attached at load), for the
    benches' empty programs; BCC is imported only here: nothing else in the
    bench needs it."""
    try:
        from bcc import BPF
    except ImportError:
        raise BenchError(
            "needs BCC for the empty program (apt-get install python3-bpfcc;"
            " run with .venv/bin/python)"
        ) from None
    return BPF(text=text)


def pinned(cpus: str | None, cmd: Sequence[str]) -> list[str]:
    """`cmd` run on the CPUs listed (taskset's -c list, which it and its children keep)."""
    return ["taskset", "-c", cpus, *cmd] if cpus else list(cmd)


def in_netns(netns: str | None, cmd: Sequence[str]) -> list[str]:
    """`cmd` run in the network namespace `ip netns add` named `netns`, if one
    is named (ip netns exec execs it: the process's pid is the command's)."""
    return ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)


def start_iperf3_server(
    procs: Processes,
    cpus: str | None = None,
    address: str = LOOPBACK,
    netns: str | None = None,
) -> tuple[subprocess.Popen[Any], int]:
    """An iperf3 server on a free port of `address` (in the network namespace
    `netns` names, as `ip netns add` made it, if one is named), once it
    accepts: (process, port). Not a one-off server (-1): the readiness probe
    would be its one client."""
    port = free_port()
    cmd = in_netns(netns, pinned(cpus, ["iperf3", "-s", "-B", address, "-p", str(port)]))
    proc = procs.start("iperf3", cmd)

    def accepts() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((address, port), 1):
            return True
        return False

    deadline = time.monotonic() + 10
    while not (run_in(f"/run/netns/{netns}", accepts) if netns else accepts()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError("iperf3 -s did not start")
        time.sleep(0.1)
    return proc, port


def parse_iperf3(output: str) -> float:
    """Bits per second the receiver got."""
    try:
        return float(json.loads(output)["end"]["sum_received"]["bits_per_second"])
    except (ValueError, KeyError, TypeError) as err:
        raise BenchError(f"could not parse iperf3's output ({err}): {output[:200]!r}") from None


# -- tracers -------------------------------------------------------------------------


POSSIBLY_LOST = re.compile(r"Possibly lost (\d+) samples")


class Tracer:
    """One tracer process under test (serve, trace --json or tcpstates-bpfcc)."""

    def __init__(
        self, mode: str, procs: Processes, workdir: Path, args: argparse.Namespace, nginx_port: int
    ) -> None:
        self.mode = mode
        self.procs = procs
        self.stderr_path = workdir / f"{mode}-{time.monotonic_ns()}.stderr"
        self.metrics_port = 0
        self.proc: subprocess.Popen[Any] | None = None
        self.exit_code: int | None = None
        self.startup_s = math.nan
        if mode in (MODE_SERVE, MODE_EXACT):
            self.metrics_port = free_port()
            self.cmd = [
                args.tcptrace,
                "serve",
                "--web.listen-address",
                f"{LOOPBACK}:{self.metrics_port}",
            ]
            if mode == MODE_EXACT:
                self.cmd += ["--port", str(nginx_port)]
        elif mode == MODE_TRACE:
            self.cmd = [args.tcptrace, "trace", "--json"]
        elif mode == MODE_TCPSTATES:
            self.cmd = [args.tcpstates]
        else:
            raise ValueError(mode)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 180.0) -> None:
        started = time.monotonic()
        with self.stderr_path.open("wb") as err:
            self.proc = self.procs.start(self.mode, self.cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = " | ".join(self.stderr_text().strip().splitlines()[-3:])
                raise BenchError(f"{self.mode} exited at start ({self.proc.returncode}): {tail}")
            if self._attached():
                break
            time.sleep(0.1)
        else:
            raise BenchError(f"{self.mode} did not start within {timeout:.0f} s")
        self.startup_s = time.monotonic() - started
        self._wait_quiet(deadline)

    def _attached(self) -> bool:
        if self.mode == MODE_TCPSTATES:
            # tcpstates prints its header to stdout (/dev/null here) once attached:
            # look for its program and its 1 + 2 x CPUs perf events (the tracepoint,
            # then two per-CPU perf buffers) instead.
            kinds = fd_kinds(self.pid)
            return kinds.get("bpf-prog", 0) >= 1 and kinds.get("perf_event", 0) >= 1 + 2 * NCPU
        return "tracing started" in self.stderr_text()

    def _wait_quiet(self, deadline: float) -> None:
        """Let start-up work finish (compiling, loading) before measuring;
        for serve, the confirmation of its start-up listing too."""
        if self.mode == MODE_SERVE:
            time.sleep(HEAL_RECHECK_S + 1.0)
        previous = cpu_seconds(self.pid)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = cpu_seconds(self.pid)
            if now - previous < 0.05:
                return
            previous = now

    def stop(self) -> None:
        if self.proc is None:
            return
        first = signal.SIGINT if self.mode == MODE_TCPSTATES else signal.SIGTERM
        self.exit_code = self.procs.stop(self.proc, first, timeout=30.0)

    def final_counts(self) -> FinalCounts:
        """What the tracer said about itself on stderr when it stopped."""
        text = self.stderr_text()
        if self.mode == MODE_TCPSTATES:
            lost_lines = [int(n) for n in POSSIBLY_LOST.findall(text)]
            if lost_lines:
                detail = f"{len(lost_lines)} 'Possibly lost N samples' lines"
                return FinalCounts(lost=sum(lost_lines), detail=detail)
            return FinalCounts(detail="not reported")
        return parse_stopped_line(text)


@dataclass
class FinalCounts:
    seen: int | None = None  # TCP state changes the kernel program saw
    reported: int | None = None  # events delivered to user space (trace)
    lost: int | None = None
    detail: str = ""


def parse_stopped_line(text: str) -> FinalCounts:
    """tcptrace-ebpf's last stderr line, in either of its forms:
    `stopped: N events, M lost (detail)` (N seen by the kernel program) or
    `stopped: D events reported (N TCP state changes seen on the host), M lost (...)`
    or, for serve, `stopped: N TCP state changes seen, M lost (...)`."""
    lines = [line for line in text.splitlines() if "stopped:" in line]
    if not lines:
        return FinalCounts(detail="no summary line")
    line = lines[-1].split("stopped:", 1)[1]
    lost = re.search(r"(\d+) lost(?: \(([^)]*)\))?", line)
    seen = re.search(r"(\d+) TCP state changes", line)
    first = re.match(r"\s*(\d+) events( reported)?", line)
    counts = FinalCounts(detail=line.strip())
    if lost:
        counts.lost = int(lost.group(1))
    if seen:
        counts.seen = int(seen.group(1))
    if first and first.group(2):
        counts.reported = int(first.group(1))
    elif first and counts.seen is None:
        counts.seen = int(first.group(1))
    return counts


# -- exactness ------------------------------------------------------------------------

TRANSITIONS = "tcptrace_state_transitions_total"


def exact_view(samples: Sample) -> dict[str, float]:
    """The counters the exactness check compares, from one scrape."""
    return {
        "LISTEN->SYN_RECV": metric_sum(
            samples, TRANSITIONS, old_state="LISTEN", new_state="SYN_RECV"
        ),
        "CLOSE->SYN_SENT": metric_sum(
            samples, TRANSITIONS, old_state="CLOSE", new_state="SYN_SENT"
        ),
        "opened{server}": metric_sum(samples, "tcptrace_connections_opened_total", role="server"),
        "opened{client}": metric_sum(samples, "tcptrace_connections_opened_total", role="client"),
        "closed{server}": metric_sum(samples, "tcptrace_connections_closed_total", role="server"),
        "closed{client}": metric_sum(samples, "tcptrace_connections_closed_total", role="client"),
        "events": metric_sum(samples, "tcptrace_events_total"),
        "lost": metric_sum(samples, "tcptrace_lost_events_total"),
    }


# The brief's checks (must hold exactly) and further ones (also shown, also required).
EXACT_KEYS = ("LISTEN->SYN_RECV", "opened{server}", "CLOSE->SYN_SENT")
EXTRA_KEYS = ("opened{client}", "closed{server}", "closed{client}")


# The exporter finishes some closes in its once-a-second housekeeping, after
# grace periods of up to 5 s (a cancelled TIME_WAIT waits that long for the
# connection that reuses its address pair): its counters catch up with the
# kernel a few seconds after the load stops.
QUIET_S = 6.0
CONVERGE_TIMEOUT_S = 30.0


def settle_metrics(
    port: int,
    reached: Callable[[dict[str, float]], bool] | None = None,
    timeout: float = CONVERGE_TIMEOUT_S,
) -> tuple[Sample, float, bool]:
    """Scrape until `reached(view)` holds on two scrapes 1.5 s apart; without
    `reached` (an unfiltered exporter: each scrape is itself a connection it
    counts, so its counters never stand still) just wait QUIET_S and scrape once.
    Returns the last scrape, the seconds waited and whether it settled in time."""
    started = time.monotonic()
    if reached is None:
        time.sleep(QUIET_S)
        samples, _ = scrape(port)
        return samples, time.monotonic() - started, True
    deadline = started + timeout
    samples, _ = scrape(port)
    while time.monotonic() < deadline:
        if reached(exact_view(samples)):
            time.sleep(1.5)
            samples, _ = scrape(port)
            if reached(exact_view(samples)):
                return samples, time.monotonic() - started, True
            continue
        time.sleep(0.5)
        samples, _ = scrape(port)
    return samples, time.monotonic() - started, False


# -- one measured run --------------------------------------------------------------


@dataclass
class RunResult:
    round: int
    position: int
    mode: str
    ok: bool = True
    error: str = ""
    conn_per_s: float = math.nan
    requests: int = 0
    wrk_seconds: float = math.nan
    wrk_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0
    nginx_accepts: int = 0  # connections nginx accepted during the run (the truth N)
    timewait_before: int = -1
    tracer_startup_s: float = math.nan
    tracer_cpu_s: float = math.nan  # during wrk's run
    tracer_cpu_after_s: float = math.nan  # from wrk's end until the tracer stopped
    tracer_rss_bytes: int = -1
    bpf_run_ns: int = 0
    bpf_runs: int = 0
    events: int | None = None  # state changes the kernel program saw
    events_reported: int | None = None  # events delivered to user space (trace)
    lost: int | None = None
    lost_detail: str = ""
    exact: dict[str, Any] = field(default_factory=dict)
    scrapes: dict[str, Any] = field(default_factory=dict)
    system: dict[str, float] = field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Processes()
        self.workdir = Path(tempfile.mkdtemp(prefix="tcptrace-bench-"))
        self.restore: list[Callable[[], None]] = []
        self.nginx: Nginx | None = None
        self.iperf3: tuple[subprocess.Popen[Any], int] | None = None
        self.results: dict[str, Any] = {}

    # -- set-up and clean-up ---------------------------------------------------

    def set_sysctl(self, name: str, value: str) -> None:
        path = Path("/proc/sys") / name.replace(".", "/")
        old = path.read_text().strip()
        if old == value:
            return
        path.write_text(value)
        log(f"sysctl {name}: {old} -> {value} (restored at the end)")

        def undo() -> None:
            path.write_text(old)
            log(f"sysctl {name} restored to {old}")

        self.restore.append(undo)

    def cleanup(self) -> None:
        ignore_signals()
        if self.nginx is not None:
            self.nginx.stop()
        self.procs.stop_all()
        for undo in reversed(self.restore):
            try:
                undo()
            except OSError as err:
                log(f"could not restore: {err}")
        self.restore.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the throughput runs --------------------------------------------------------

    def run_one(self, mode: str, round_no: int, position: int, duration: float) -> RunResult:
        args = self.args
        nginx = self.nginx
        assert nginx is not None
        result = RunResult(round=round_no, position=position, mode=mode)
        tracer: Tracer | None = None
        scraper: Scraper | None = None
        try:
            if mode != MODE_BASELINE:
                tracer = Tracer(mode, self.procs, self.workdir, args, nginx.port)
                tracer.start()
                result.tracer_startup_s = tracer.startup_s
            if args.settle > 0:
                # Every mode alike, so that each measures the same host state.
                self.load(args.settle)
            nginx.wait_idle()
            time.sleep(args.pause)
            result.timewait_before = timewait_count()

            # Before: nginx's accept counter, then the exporter's counters.
            stub_reads_before = nginx.stub_reads
            stub0 = nginx.stub()
            metrics0: Sample = {}
            if tracer is not None and tracer.metrics_port:
                metrics0, _ = scrape(tracer.metrics_port)
                scraper = Scraper(tracer.metrics_port, args.scrape_interval)
                scraper.start()
            own_after_m0 = own_connections()

            cpu0 = cpu_seconds(tracer.pid) if tracer else math.nan
            bpf0 = bpf_prog_stats(tracer.pid) if tracer else (0, 0)
            ours0 = self._our_cpu(tracer)
            sys0 = SystemCpu.read()
            command = (
                iperf3_command(self.iperf3_port(), duration)
                if args.workload == "bulk"
                else wrk_command(args, nginx.port, duration)
            )
            wrk = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=duration + 60,
                check=False,
                start_new_session=True,
            )
            sys1 = SystemCpu.read()
            ours1 = self._our_cpu(tracer)
            cpu1 = cpu_seconds(tracer.pid) if tracer else math.nan
            bpf1 = bpf_prog_stats(tracer.pid) if tracer else (0, 0)
            if wrk.returncode != 0:
                raise BenchError(f"{command[0]} failed ({wrk.returncode}): {wrk.stderr.strip()}")
            if args.workload == "bulk":
                # The throughput column holds bits/s here.
                result.conn_per_s = parse_iperf3(wrk.stdout)
                result.wrk_seconds = duration
            else:
                parsed = parse_wrk(wrk.stdout)
                result.conn_per_s = parsed.requests_per_s
                result.requests = parsed.requests
                result.wrk_seconds = parsed.seconds
                result.wrk_errors = parsed.errors
                result.non_2xx = parsed.non_2xx
            result.tracer_cpu_s = cpu1 - cpu0
            result.bpf_run_ns = bpf1[0] - bpf0[0]
            result.bpf_runs = bpf1[1] - bpf0[1]
            busy = sys1.busy - sys0.busy
            softirq = sys1.softirq - sys0.softirq
            ours = ours1 - ours0
            result.system = {
                "busy_cpu_s": busy,
                "softirq_cpu_s": softirq,
                "nginx_wrk_tracer_cpu_s": ours,
                # What no process of ours used (other users of this machine, and
                # softirq work that ran in ksoftirqd or hit another task): a noise
                # indicator. With tick accounting softirq ticks are charged to the
                # interrupted task too, so they are mostly inside `ours`.
                "other_cpu_s": busy - ours,
                "wall_s": sys1.total / NCPU - sys0.total / NCPU,
            }

            if scraper is not None:
                result.scrapes = scraper.finish()
                scraper = None
            nginx.wait_idle()
            # The accept counter once the load is over: every stub_status request
            # since stub0 was itself one accepted connection.
            stub_final = nginx.stub()
            stub_reads_in_window = nginx.stub_reads - stub_reads_before - 1
            result.nginx_accepts = stub_final.accepts - stub0.accepts - stub_reads_in_window
            if tracer is not None and tracer.metrics_port:
                keys = (*EXACT_KEYS, *EXTRA_KEYS)
                before = exact_view(metrics0)
                accepts = result.nginx_accepts

                def exact_now(view: dict[str, float]) -> bool:
                    return all(view[k] - before[k] == accepts for k in keys)

                metrics1, waited, settled = settle_metrics(
                    tracer.metrics_port, exact_now if mode == MODE_EXACT else None
                )
                own_in_window = own_connections() - own_after_m0
                after = exact_view(metrics1)
                delta = {key: int(after[key] - before[key]) for key in after}
                result.events = delta["events"]
                result.lost = delta["lost"]
                result.lost_detail = "tcptrace_lost_events_total, during the run"
                result.exact = self._exact_check(mode, delta, accepts, own_in_window)
                result.exact["settle_s"] = round(waited, 1)
                result.exact["settled"] = settled
            result.tracer_rss_bytes = rss_bytes(tracer.pid) if tracer else -1
            if tracer is not None:
                cpu_end = cpu_seconds(tracer.pid)
                tracer.stop()
                result.tracer_cpu_after_s = cpu_end - cpu1
                final = tracer.final_counts()
                if mode in (MODE_TRACE, MODE_TCPSTATES):
                    result.events, result.lost = final.seen, final.lost
                    result.events_reported = final.reported
                    result.lost_detail = final.detail
                elif final.lost is not None:
                    result.lost_detail += f"; at exit: {final.detail}"
                if tracer.exit_code not in (0, None) and mode != MODE_TCPSTATES:
                    result.lost_detail += f"; exit code {tracer.exit_code}"
        except BenchError as err:
            result.ok = False
            result.error = str(err)
            log(f"  {mode}: FAILED: {err}")
        finally:
            if scraper is not None:
                scraper.finish()
            if tracer is not None:
                tracer.stop()
        return result

    def _our_cpu(self, tracer: Tracer | None) -> float:
        """CPU of the bench (and of wrk, once reaped: it counts in our cutime/cstime),
        nginx's processes and the tracer."""
        assert self.nginx is not None
        total = sum(cpu_seconds(pid, with_children=False) for pid in self.nginx.pids())
        total += cpu_seconds(os.getpid(), with_children=False)
        if tracer is not None:
            total += cpu_seconds(tracer.pid)
        return total

    def _exact_check(
        self, mode: str, delta: dict[str, int], accepts: int, own_in_window: int
    ) -> dict[str, Any]:
        if mode == MODE_EXACT:
            # Filtered to the nginx port: stub_status (other port) and scrapes (the
            # exporter's port) are invisible, so every counter must equal N.
            expected = dict.fromkeys((*EXACT_KEYS, *EXTRA_KEYS), accepts)
            checks = {
                key: {"got": delta[key], "want": want, "ok": delta[key] == want}
                for key, want in expected.items()
            }
            return {
                "kind": "exact (serve --port nginx)",
                "N": accepts,
                "checks": checks,
                "pass": all(c["ok"] for c in checks.values()) and delta["lost"] == 0,
            }
        # Unfiltered: the bench's own connections (stub_status reads, scrapes) and
        # any other TCP traffic on this machine move the counters too.
        server_side = delta["LISTEN->SYN_RECV"]
        other = server_side - accepts - own_in_window
        return {
            "kind": "unfiltered (informative)",
            "N": accepts,
            "bench_own_connections": own_in_window,
            "LISTEN->SYN_RECV": server_side,
            "opened{server}": delta["opened{server}"],
            "CLOSE->SYN_SENT": delta["CLOSE->SYN_SENT"],
            "other_host_connections": other,
        }

    def iperf3_port(self) -> int:
        """The port of the bench's own iperf3 server (started on first use)."""
        if self.iperf3 is None:
            self.iperf3 = start_iperf3_server(self.procs)
        return self.iperf3[1]

    def load(self, seconds: float) -> None:
        """Unmeasured load (wrk on nginx, or iperf3) for `seconds`."""
        assert self.nginx is not None
        subprocess.run(
            iperf3_command(self.iperf3_port(), seconds)
            if self.args.workload == "bulk"
            else wrk_command(self.args, self.nginx.port, seconds),
            capture_output=True,
            timeout=seconds + 60,
            check=False,
            start_new_session=True,
        )

    def throughput(self) -> list[RunResult]:
        args = self.args
        nginx = self.nginx
        assert nginx is not None
        modes = [m for m in ALL_MODES if m in args.modes]
        if args.warmup > 0:
            log(f"warm-up: wrk for {args.warmup:.0f} s (not measured)")
            self.load(args.warmup)
        runs: list[RunResult] = []
        for round_no in range(1, args.rounds + 1):
            shift = (round_no - 1) % len(modes)
            order = modes[shift:] + modes[:shift]
            log(f"round {round_no}/{args.rounds}: {', '.join(order)}")
            for position, mode in enumerate(order):
                result = self.run_one(mode, round_no, position, args.duration)
                runs.append(result)
                if result.ok:
                    extra = ""
                    if result.exact.get("kind", "").startswith("exact"):
                        extra = " exact=" + ("PASS" if result.exact["pass"] else "FAIL")
                    cpu = "" if tracer_less(mode) else f"  tracer CPU {result.tracer_cpu_s:5.2f} s"
                    lost = "" if result.lost is None else f"  lost {result.lost:,}"
                    rate = (
                        f"{result.conn_per_s / 1e9:>8.2f} Gbit/s"
                        if args.workload == "bulk"
                        else f"{result.conn_per_s:>9,.0f} "
                        + ("conn/s" if args.workload == "churn" else "req/s")
                    )
                    log(
                        f"  {mode:<10} {rate}{cpu}{lost}{extra}"
                        f"  (TIME_WAIT before: {result.timewait_before:,})"
                    )
        return runs

    # -- scrape latency with many sockets -------------------------------------------

    def scrape_test(self) -> dict[str, Any]:
        args = self.args
        connections = args.scrape_sockets // 2
        per_helper = min(connections, connections_per_helper())
        helpers = -(-connections // per_helper)
        needed_fds = 2 * per_helper + 4096
        if int(Path("/proc/sys/fs/nr_open").read_text()) < needed_fds:
            self.set_sysctl("fs.nr_open", str(needed_fds))
        file_nr = Path("/proc/sys/fs/file-nr").read_text().split()
        if int(file_nr[2]) - int(file_nr[0]) < 2 * connections + 65536:
            self.set_sysctl("fs.file-max", str(int(file_nr[0]) + 2 * connections + 65536))
        out: dict[str, Any] = {
            "sockets_target": 2 * connections,
            "scrapes": args.scrape_count,
            "helpers": helpers,
        }
        serve = Tracer(MODE_SERVE, self.procs, self.workdir, args, 0)
        holders: list[subprocess.Popen[str]] = []
        try:
            log(
                f"scrape test: starting serve, then opening {connections:,} connections "
                f"({helpers} helper process(es))"
            )
            out["timewait_at_serve_start"] = timewait_count()
            serve.start()
            opened_at = time.monotonic()
            left, held = connections, 0
            ports: list[str] = []
            while left > 0:
                count = min(per_helper, left)
                holder = self.procs.start(
                    "holdsockets",
                    [sys.executable, str(HERE / "holdsockets.py"), "--connections", str(count)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                holders.append(holder)
                line = read_line(holder, timeout=600)
                match = re.match(r"ready (\d+) ports=(\S+)", line)
                if not match:
                    raise BenchError(f"holdsockets: {line or 'no answer'}")
                held += int(match.group(1))
                ports += match.group(2).split(",")
                left -= count
            out["open_seconds"] = time.monotonic() - opened_at
            out["holder"] = f"{held:,} sockets held, listening ports {','.join(ports)}"
            out["sockets_held"] = held
            log(f"  {out['holder']} (in {out['open_seconds']:.1f} s)")
            time.sleep(2.0)
            out["serve_started_first"] = self._time_scrapes(serve)
            log(f"  serve started before the sockets: {fmt_latency(out['serve_started_first'])}")
            serve.stop()
            log("  restarting serve with the sockets already open (start-up snapshot)")
            serve = Tracer(MODE_SERVE, self.procs, self.workdir, args, 0)
            out["timewait_at_serve_restart"] = timewait_count()
            serve.start()
            time.sleep(2.0)
            out["serve_started_after"] = self._time_scrapes(serve)
            out["serve_started_after"]["startup_s"] = serve.startup_s
            log(f"  serve started after the sockets: {fmt_latency(out['serve_started_after'])}")
        finally:
            serve.stop()
            for holder in holders:
                with contextlib.suppress(OSError):
                    assert holder.stdin is not None
                    holder.stdin.close()
            for holder in holders:
                self.procs.stop(holder, signal.SIGTERM, timeout=60.0)
        return out

    def _time_scrapes(self, serve: Tracer) -> dict[str, Any]:
        latencies: list[float] = []
        server: list[float] = []
        sizes: list[int] = []
        slow_at: list[float] = []
        established = 0.0
        sys0 = SystemCpu.read()
        ours0 = cpu_seconds(serve.pid) + cpu_seconds(os.getpid(), with_children=False)
        started = time.monotonic()
        for _ in range(self.args.scrape_count):
            at = time.monotonic() - started
            status, body, seconds = http_get(serve.metrics_port, "/metrics", timeout=30)
            if seconds > 0.03:
                slow_at.append(round(at, 2))
            if status != 200:
                raise BenchError(f"scrape returned HTTP {status}")
            samples = parse_metrics(body.decode())
            latencies.append(seconds)
            sizes.append(len(body))
            server.append(metric_sum(samples, "tcptrace_scrape_duration_seconds"))
            established = metric_sum(samples, "tcptrace_sockets", state="ESTABLISHED")
            time.sleep(self.args.scrape_test_interval)
        sys1 = SystemCpu.read()
        ours1 = cpu_seconds(serve.pid) + cpu_seconds(os.getpid(), with_children=False)
        return {
            "latency_s": percentiles(latencies),
            "latencies_s": [round(v, 6) for v in latencies],
            # When (seconds into the series) scrapes took over 30 ms: a period in
            # them points at the exporter's periodic housekeeping.
            "slow_scrapes_at_s": slow_at,
            "other_cpu_s": (sys1.busy - sys0.busy) - (ours1 - ours0),
            "seconds": time.monotonic() - started,
            "server_scrape_duration_s": percentiles(server),
            "body_bytes": max(sizes, default=0),
            "sockets_established_reported": established,
            "sockets_in_use_kernel": sockets_in_use(),
            "serve_rss_bytes": rss_bytes(serve.pid),
            "pass": bool(latencies) and percentiles(latencies)["p99"] < 0.100,
        }

    # -- memory under sustained churn ------------------------------------------------

    def memory_test(self) -> dict[str, Any]:
        args = self.args
        nginx = self.nginx
        assert nginx is not None
        target, checkpoint = args.memory_connections, args.memory_checkpoint
        out: dict[str, Any] = {"target_connections": target, "checkpoint": checkpoint}
        serve = Tracer(MODE_SERVE, self.procs, self.workdir, args, 0)
        wrk: subprocess.Popen[str] | None = None
        scraper: Scraper | None = None
        try:
            log(f"memory test: serve under churn until {target:,} connections")
            serve.start()
            nginx.wait_idle()
            out["rss_idle_bytes"] = rss_bytes(serve.pid)
            scraper = Scraper(serve.metrics_port, 1.0)
            scraper.start()
            stub0 = nginx.stub()
            reads0 = nginx.stub_reads
            started = time.monotonic()
            cpu0 = cpu_seconds(serve.pid)
            wrk = self.procs.start(
                "wrk",
                wrk_command(args, nginx.port, args.memory_max_seconds),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            timeline: list[dict[str, float]] = []
            next_sample = 0.0
            done = 0
            while True:
                time.sleep(1.0)
                elapsed = time.monotonic() - started
                # Each stub_status read is one accepted connection too.
                done = nginx.stub().accepts - stub0.accepts - (nginx.stub_reads - reads0)
                rss = rss_bytes(serve.pid)
                if "rss_at_checkpoint_bytes" not in out and done >= checkpoint:
                    out["rss_at_checkpoint_bytes"] = rss
                    out["connections_at_checkpoint"] = done
                    log(f"  {done:,} connections: RSS {rss / 2**20:.1f} MiB")
                if elapsed >= next_sample:
                    timeline.append({"t_s": round(elapsed, 1), "connections": done, "rss": rss})
                    next_sample = elapsed + args.memory_sample_interval
                    if len(timeline) % 6 == 0:
                        log(f"  {done:,} connections, RSS {rss / 2**20:.1f} MiB")
                if done >= target or wrk.poll() is not None:
                    break
            out["seconds"] = time.monotonic() - started
            out["connections"] = done
            out["rss_final_bytes"] = rss_bytes(serve.pid)
            out["rss_hwm_bytes"] = rss_bytes(serve.pid, "VmHWM")
            out["serve_cpu_s"] = cpu_seconds(serve.pid) - cpu0
            self.procs.stop(wrk, signal.SIGINT, timeout=15.0)
            wrk = None
            out["scrapes"] = scraper.finish()
            scraper = None
            nginx.wait_idle()
            samples, _ = scrape(serve.metrics_port)
            view = exact_view(samples)
            out["events_total"] = view["events"]
            out["lost_total"] = view["lost"]
            out["timeline"] = timeline
            after_checkpoint = [s["rss"] for s in timeline if s["connections"] >= checkpoint]
            out["rss_max_after_checkpoint_bytes"] = max(after_checkpoint, default=-1)
            # A leak grows with the connections; a one-off step does not: the slope
            # over the last 80 % of the run tells them apart.
            tail = [s for s in timeline if s["connections"] >= max(checkpoint, target // 5)]
            out["rss_slope_mib_per_million"] = rss_slope(tail)
            out["rss_at_fifth_bytes"] = tail[0]["rss"] if tail else -1
            out["connections_at_fifth"] = tail[0]["connections"] if tail else 0
            if "rss_at_checkpoint_bytes" in out:
                growth = out["rss_final_bytes"] - out["rss_at_checkpoint_bytes"]
                out["rss_growth_bytes"] = growth
                out["pass"] = done >= target and growth <= MEMORY_BUDGET
            else:
                out["pass"] = False
            log(
                f"  {done:,} connections in {out['seconds']:.0f} s: RSS "
                f"{out['rss_final_bytes'] / 2**20:.1f} MiB"
            )
        finally:
            if scraper is not None:
                scraper.finish()
            if wrk is not None:
                self.procs.stop(wrk, signal.SIGINT, timeout=15.0)
            serve.stop()
        return out

    # -- the whole run -----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args = self.args
        started = time.monotonic()
        self.results = {
            "machine": machine_info(args),
            "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        if args.bpf_stats:
            self.set_sysctl("kernel.bpf_stats_enabled", "1")
        self.nginx = Nginx(
            self.procs, self.workdir, args.nginx_workers, keepalive=args.workload == "keepalive"
        )
        self.nginx.start()
        self.results["nginx_port"] = self.nginx.port
        log(
            f"nginx on {LOOPBACK}:{self.nginx.port} (stub_status on :{self.nginx.status_port}), "
            f"wrk -t{args.threads} -c{args.connections}, {args.duration:.0f} s per run"
        )
        runs = self.throughput()
        self.results["runs"] = [asdict(r) for r in runs]
        self.results["summary"] = summarize(runs)
        if args.scrape_test:
            try:
                self.results["scrape_test"] = self.scrape_test()
            except BenchError as err:
                log(f"scrape test FAILED: {err}")
                self.results["scrape_test"] = {"error": str(err), "pass": False}
        if args.memory_test:
            try:
                self.results["memory_test"] = self.memory_test()
            except BenchError as err:
                log(f"memory test FAILED: {err}")
                self.results["memory_test"] = {"error": str(err), "pass": False}
        self.results["elapsed_s"] = time.monotonic() - started
        self.results["tracer_source_digest_at_end"] = source_digest()
        return self.results


MEMORY_BUDGET = 10 * 2**20  # RSS growth allowed from the checkpoint to the end


def rss_slope(samples: Sequence[dict[str, float]]) -> float | None:
    """Least-squares slope of RSS over connections, in MiB per million connections."""
    if len(samples) < 3:
        return None
    xs = [s["connections"] / 1e6 for s in samples]
    ys = [s["rss"] / 2**20 for s in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 24))  # CAP_SYS_RESOURCE
    return False


def connections_per_helper() -> int:
    """How many connections (two descriptors each) one holdsockets process may hold:
    a process may raise RLIMIT_NOFILE above its hard limit only with CAP_SYS_RESOURCE
    (containers often drop it); without it, several helpers share the sockets."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if has_cap_sys_resource() or hard == resource.RLIM_INFINITY:
        return 50_000
    return max(1000, (hard - 1024) // 2 // 1000 * 1000)


def tracer_less(mode: str) -> bool:
    return mode == MODE_BASELINE


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return ""
    return proc.stdout.readline().strip()


def sockets_in_use() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            parts = line.split()
            return int(parts[parts.index("inuse") + 1])
    return -1


# -- summary and report ------------------------------------------------------------


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float] | None:
    """
    A distribution-free interval for the median of `values` (the sign test's:
    two order statistics, chosen so that the true median lies between them
    with at least `confidence`), or None if there are too few values for one.
    Rounds on a shared machine are not normally distributed (a neighbour's
    burst drags one round far off), so no mean and standard deviation here.
    """
    ordered = sorted(values)
    n = len(ordered)
    # P(B <= j) for B ~ Binomial(n, 1/2), growing j until the tails exceed 1 - confidence.
    tail, k = 0.0, 0
    while k < n // 2:
        tail += math.comb(n, k) / 2**n
        if 1 - 2 * tail < confidence:
            break
        k += 1
    if k == 0:
        return None
    return ordered[k - 1], ordered[n - k]


def summarize(runs: Sequence[RunResult]) -> dict[str, Any]:
    by_mode: dict[str, list[RunResult]] = {}
    for run in runs:
        by_mode.setdefault(run.mode, []).append(run)
    baseline = {r.round: r.conn_per_s for r in by_mode.get(MODE_BASELINE, []) if r.ok}
    base_median = statistics.median(baseline.values()) if baseline else math.nan
    summary: dict[str, Any] = {}
    for mode, results in by_mode.items():
        good = [r for r in results if r.ok]
        rates = [r.conn_per_s for r in good]
        median = statistics.median(rates) if rates else math.nan
        per_round = [r.conn_per_s / baseline[r.round] for r in good if baseline.get(r.round, 0) > 0]
        cpus = [r.tracer_cpu_s for r in good if not math.isnan(r.tracer_cpu_s)]
        durations = [r.wrk_seconds for r in good if not math.isnan(r.wrk_seconds)]
        losts = [r.lost for r in good if r.lost is not None]
        events = [r.events for r in good if r.events is not None]
        exact = [r.exact for r in good if r.exact.get("kind", "").startswith("exact")]
        summary[mode] = {
            "runs": len(results),
            "failed": len(results) - len(good),
            "conn_per_s_median": median,
            "conn_per_s_min": min(rates, default=math.nan),
            "conn_per_s_max": max(rates, default=math.nan),
            "ratio_of_medians": median / base_median if base_median else math.nan,
            "ratio_per_round": per_round,
            "ratio_per_round_median": statistics.median(per_round) if per_round else math.nan,
            "ratio_per_round_interval95": median_interval(per_round),
            "tracer_cpu_s_median": statistics.median(cpus) if cpus else math.nan,
            "tracer_cpu_core_fraction_median": (
                statistics.median(c / d for c, d in zip(cpus, durations, strict=False))
                if cpus and durations
                else math.nan
            ),
            "tracer_cpu_after_s_max": max(
                (r.tracer_cpu_after_s for r in good if not math.isnan(r.tracer_cpu_after_s)),
                default=math.nan,
            ),
            "lost_total": sum(losts) if losts else None,
            "lost_per_run": losts,
            "events_per_run": events,
            "lost_detail": good[0].lost_detail if good else "",
            "exact_runs": len(exact),
            "exact_pass": sum(1 for e in exact if e["pass"]),
            "bpf_ns_per_run": (
                sum(r.bpf_run_ns for r in good) / max(1, sum(r.bpf_runs for r in good))
                if any(r.bpf_runs for r in good)
                else None
            ),
            "scrape_p50_s_median": _median_of(good, "p50"),
            "scrape_p99_s_max": _max_of(good, "p99"),
            "scrape_max_s": _max_of(good, "max"),
            "errors": [r.error for r in results if not r.ok],
        }
    return summary


def _median_of(runs: Sequence[RunResult], key: str) -> float | None:
    values = [r.scrapes["latency_s"][key] for r in runs if key in r.scrapes.get("latency_s", {})]
    return statistics.median(values) if values else None


def _max_of(runs: Sequence[RunResult], key: str) -> float | None:
    values = [r.scrapes["latency_s"][key] for r in runs if key in r.scrapes.get("latency_s", {})]
    return max(values) if values else None


def ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.1f} ms"


def fmt_latency(block: dict[str, Any]) -> str:
    lat = block["latency_s"]
    return (
        f"p50 {ms(lat.get('p50'))}, p99 {ms(lat.get('p99'))}, max {ms(lat.get('max'))} "
        f"over {lat.get('count', 0)} scrapes"
    )


def mib(value: float | None) -> str:
    return "-" if value is None or value < 0 else f"{value / 2**20:.1f} MiB"


def signed_mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:+.1f} MiB"


def load_description(config: dict[str, Any]) -> str:
    workload = config.get("workload", "churn")
    if workload == "bulk":
        return "one iperf3 transfer over 127.0.0.1 (bulk)"
    wrk = f"wrk -t{config['threads']} -c{config['connections']}"
    if workload == "keepalive":
        return f"nginx (keepalive on, {config['nginx_workers']} worker) + {wrk} on 127.0.0.1"
    return (
        f"nginx (keepalive off, {config['nginx_workers']} worker) + {wrk} 'Connection: close'"
        " on 127.0.0.1"
    )


def report(results: dict[str, Any]) -> str:
    config = results["config"]
    machine = results["machine"]
    lines = [
        "",
        f"tcptrace-ebpf benchmark  {results['started']}  kernel {machine['kernel']}, "
        f"{machine['cpus']} CPUs, {machine['nginx']}, {machine['wrk']}",
        f"{load_description(config)}; {config['duration']:.0f} s"
        f" runs, {config['rounds']} rounds in rotating order; medians shown",
        "",
    ]
    workload = config.get("workload", "churn")
    unit, scale = {"churn": ("conn/s", 1.0), "keepalive": ("req/s", 1.0)}.get(
        workload, ("Mbit/s", 1e-6)
    )
    if config.get("settle"):
        lines.insert(
            -1,
            f"each run measured after {config['settle']:.0f} s of unmeasured load with its tracer"
            " running (--settle)",
        )
    header = (
        f"{'mode':<22}{unit:>9}{'min-max':>16}{'ratio':>8}  {'per round':<16}"
        f"{'tracer CPU':>10}{'% core':>8}  {'lost':<22}exact"
    )
    lines += [header, "-" * len(header)]
    summary = results["summary"]
    for mode in ALL_MODES:
        if mode not in summary:
            continue
        s = summary[mode]
        ratio = "-" if mode == MODE_BASELINE else f"{s['ratio_of_medians']:.3f}"
        rounds = (
            "-"
            if mode == MODE_BASELINE
            else "/".join(f"{r:.2f}" for r in s["ratio_per_round"]) or "-"
        )
        cpu = "-" if math.isnan(s["tracer_cpu_s_median"]) else f"{s['tracer_cpu_s_median']:.2f} s"
        core = (
            "-"
            if math.isnan(s["tracer_cpu_core_fraction_median"])
            else f"{100 * s['tracer_cpu_core_fraction_median']:.0f}%"
        )
        if mode == MODE_BASELINE:
            lost = "-"
        elif mode == MODE_TCPSTATES and s["lost_total"] is None:
            lost = "not reported"
        elif s["lost_total"] is None:
            lost = "?"
        else:
            events = s["events_per_run"]
            total_events = sum(events)
            share = f" ({100 * s['lost_total'] / total_events:.0f}%)" if total_events else ""
            lost = f"{s['lost_total']:,}{share}"
        if mode == MODE_EXACT:
            verdict = "PASS" if s["exact_pass"] == s["exact_runs"] and s["exact_runs"] else "FAIL"
            exact = f"{verdict} {s['exact_pass']}/{s['exact_runs']} runs"
        elif mode == MODE_SERVE:
            exact = "see serve --port"
        else:
            exact = "-"
        failed = f" ({s['failed']} failed)" if s["failed"] else ""
        rng = f"{s['conn_per_s_min'] * scale:,.0f}-{s['conn_per_s_max'] * scale:,.0f}"
        lines.append(
            f"{MODE_TITLES[mode] + failed:<22}{s['conn_per_s_median'] * scale:>9,.0f}{rng:>16}"
            f"{ratio:>8}  {rounds:<16}{cpu:>10}{core:>8}  {lost:<22}{exact}"
        )
    lines.append("")
    lines.append(
        f"ratio = median {unit} / median baseline {unit}; per round = each round's ratio to "
        "that round's baseline."
    )
    for mode in ALL_MODES:
        if mode == MODE_BASELINE or mode not in summary:
            continue
        s = summary[mode]
        interval = s.get("ratio_per_round_interval95")
        if s["ratio_per_round"]:
            lines.append(
                f"{MODE_TITLES[mode]}: median of the per-round ratios "
                f"{s['ratio_per_round_median']:.3f}, "
                + (
                    f"95% interval {interval[0]:.3f}-{interval[1]:.3f}"
                    if interval
                    else "too few rounds for a 95% interval (6 or more)"
                )
                + f" ({len(s['ratio_per_round'])} rounds; sign test, no distribution assumed)"
            )
    lines.append(
        "tracer CPU = utime+stime of the tracer process (all threads) during wrk's run; "
        "% core = of one CPU. In-kernel BPF time is not in it (it is charged to nginx, wrk "
        "and softirq, and shows in conn/s)."
    )
    bpf = [
        f"{MODE_TITLES[m]} {summary[m]['bpf_ns_per_run']:.0f} ns"
        for m in ALL_MODES
        if m in summary and summary[m].get("bpf_ns_per_run")
    ]
    if bpf:
        lines.append("BPF program time per run (kernel.bpf_stats_enabled): " + ", ".join(bpf))
    runs = results["runs"]
    lines.append("")
    lines.append("Exactness (serve --port NGINX; N = nginx stub_status accepts during the run):")
    for run in runs:
        exact = run["exact"]
        if not exact.get("kind", "").startswith("exact"):
            continue
        parts = [
            f"{key} {c['got']:,}{'' if c['ok'] else ' (want ' + format(c['want'], ',') + ')'}"
            for key, c in exact["checks"].items()
        ]
        verdict = "PASS" if exact["pass"] else "FAIL"
        lines.append(
            f"  round {run['round']}: {verdict}  N={exact['N']:,}: "
            + ", ".join(parts)
            + f"; lost {run['lost']}; "
            + (
                f"matched {exact['settle_s']} s after nginx went idle"
                if exact.get("settled")
                else f"still off {exact.get('settle_s')} s after nginx went idle"
            )
        )
    unfiltered = [r for r in runs if r["exact"].get("kind", "").startswith("unfiltered")]
    if unfiltered:
        lines.append(
            "Unfiltered serve (informative): LISTEN->SYN_RECV delta - N - the bench's own "
            "connections = other TCP connections on this host during the run:"
        )
        for run in unfiltered:
            e = run["exact"]
            lines.append(
                f"  round {run['round']}: delta {e['LISTEN->SYN_RECV']:,}, N {e['N']:,}, own "
                f"{e['bench_own_connections']}, other {e['other_host_connections']:,}"
            )
    lines.append("")
    lines.append("Scrape latency of serve under this load (client side, one scrape a second):")
    for mode in (MODE_SERVE, MODE_EXACT):
        if mode in summary and summary[mode]["scrape_p50_s_median"] is not None:
            s = summary[mode]
            lines.append(
                f"  {MODE_TITLES[mode]:<22} p50 {ms(s['scrape_p50_s_median'])}, "
                f"p99 {ms(s['scrape_p99_s_max'])} (worst run), max {ms(s['scrape_max_s'])}"
            )
    timewait = [r["timewait_before"] for r in runs if r["timewait_before"] >= 0]
    if timewait:
        lines.append("")
        lines.append(
            f"TIME_WAIT sockets on the host at the start of each run: {min(timewait):,} to "
            f"{max(timewait):,} (loopback reuse keeps it bounded; the warm-up brings every "
            "run to the same level)"
        )
    noisy = [r for r in runs if r["system"].get("other_cpu_s", 0) > 0.5]
    if noisy:
        lines.append("")
        lines.append(
            "Noise: CPU used by other processes during runs (> 0.5 s): "
            + ", ".join(
                f"r{r['round']} {r['mode']} {r['system']['other_cpu_s']:.1f} s" for r in noisy
            )
        )
    errors = [f"r{r['round']} {r['mode']}: {r['error']}" for r in runs if not r["ok"]]
    if errors:
        lines.append("Failed runs: " + "; ".join(errors))

    scrape = results.get("scrape_test")
    if scrape:
        lines.append("")
        if "error" in scrape:
            lines.append(f"Scrape test: FAILED: {scrape['error']}")
        else:
            lines.append(
                f"Scrape latency with {scrape['sockets_target']:,} sockets alive "
                f"({scrape['holder']}), target p99 < 100 ms:"
            )
            for key, title in (
                ("serve_started_first", "serve started before them"),
                ("serve_started_after", "serve started after them"),
            ):
                block = scrape.get(key)
                if not block:
                    continue
                lat, srv = block["latency_s"], block["server_scrape_duration_s"]
                extra = f", start-up {block['startup_s']:.1f} s" if "startup_s" in block else ""
                lines.append(
                    f"  {title:<26} p50 {ms(lat['p50'])}, p99 {ms(lat['p99'])}, max "
                    f"{ms(lat['max'])} ({lat['count']} scrapes; exporter-reported p50 "
                    f"{ms(srv['p50'])}); ESTABLISHED reported "
                    f"{block['sockets_established_reported']:,.0f}; RSS "
                    f"{mib(block['serve_rss_bytes'])}{extra}  "
                    + ("PASS" if block["pass"] else "FAIL")
                )
                slow = block.get("slow_scrapes_at_s", [])
                lines.append(
                    f"  {'':<26} {len(slow)} scrapes over 30 ms"
                    + (f", at {', '.join(f'{t:.1f}' for t in slow[:12])} s" if slow else "")
                    + f"; CPU used by other processes meanwhile "
                    f"{block.get('other_cpu_s', math.nan):.1f} s of {block.get('seconds', 0):.0f} s"
                )
            lines.append(
                f"  TIME_WAIT sockets on the host when serve started: "
                f"{scrape.get('timewait_at_serve_start', -1):,} and "
                f"{scrape.get('timewait_at_serve_restart', -1):,}"
            )
    memory = results.get("memory_test")
    if memory:
        lines.append("")
        if "error" in memory:
            lines.append(f"Memory test: FAILED: {memory['error']}")
        else:
            growth = memory.get("rss_growth_bytes")
            lines.append(
                f"Memory of serve under churn (VmRSS), target growth <= 10 MiB: idle "
                f"{mib(memory['rss_idle_bytes'])}; after "
                f"{memory.get('connections_at_checkpoint', 0):,} connections "
                f"{mib(memory.get('rss_at_checkpoint_bytes'))}; after "
                f"{memory['connections']:,} {mib(memory['rss_final_bytes'])} "
                f"(growth {signed_mib(growth)}, "
                f"max after checkpoint {mib(memory['rss_max_after_checkpoint_bytes'])}, "
                f"VmHWM {mib(memory['rss_hwm_bytes'])})  " + ("PASS" if memory["pass"] else "FAIL")
            )
            slope = memory.get("rss_slope_mib_per_million")
            if slope is not None:
                lines.append(
                    f"  after {memory['connections_at_fifth']:,} connections "
                    f"{mib(memory['rss_at_fifth_bytes'])}; RSS slope from there to the end "
                    f"{slope:+.2f} MiB per million connections"
                )
            lines.append(
                f"  {memory['seconds']:.0f} s, {memory['connections'] / memory['seconds']:,.0f} "
                f"conn/s, serve CPU {memory['serve_cpu_s']:.1f} s, events "
                f"{memory['events_total']:,.0f}, lost {memory['lost_total']:,.0f}, scrapes "
                f"{fmt_latency(memory['scrapes'])}"
            )
    lines.append("")
    start_digest = machine.get("tracer_source_digest")
    end_digest = results.get("tracer_source_digest_at_end")
    if start_digest != end_digest:
        lines.append(
            f"WARNING: tcptrace-ebpf's sources changed during the run ({start_digest} -> "
            f"{end_digest}): later runs measured different code."
        )
    lines.append(
        f"{machine['tcptrace_ebpf']}, commit {machine['git_commit'][:12]}"
        f" ({machine['git_dirty_files']} files modified in the checkout), sources {start_digest}"
    )
    lines.append(f"Total time: {results['elapsed_s'] / 60:.1f} min")
    return "\n".join(lines)


# -- machine and tools ----------------------------------------------------------------


def _first_line(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = "unknown"
    with contextlib.suppress(OSError):
        mem_total = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()

    def sysctl(name: str) -> str:
        try:
            return Path("/proc/sys", name.replace(".", "/")).read_text().strip()
        except OSError:
            return "unknown"

    return {
        "kernel": platform.release(),
        "cpus": NCPU,
        "cpu_model": cpu_model,
        "memory": mem_total,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "nginx": _first_line(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": _first_line(["wrk", "--version"]).split(" [")[0],
        "bpfcc_tools": _first_line(["dpkg-query", "-W", "-f", "${Version}", "bpfcc-tools"]),
        "tcptrace_ebpf": _first_line([args.tcptrace, "--version"]),
        "python": platform.python_version(),
        "git_commit": _first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "git_dirty_files": len(
            subprocess.run(
                ["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.splitlines()
        ),
        "sysctl": {
            name: sysctl(name)
            for name in (
                "net.ipv4.ip_local_port_range",
                "net.ipv4.tcp_tw_reuse",
                "net.ipv4.tcp_max_tw_buckets",
                "net.core.somaxconn",
                "fs.nr_open",
            )
        },
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tracer_source_digest": source_digest(),
    }


def source_digest() -> str:
    """A digest of the tracer's sources in this checkout (the package is installed
    editable, and BPF code is compiled at each start): a run during which someone
    changed them is flagged."""
    digest = hashlib.sha256()
    for folder in (REPO / "tcptrace_ebpf", REPO / "bpf"):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in (".py", ".c", ".h"):
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH + ":" + os.environ.get("PATH", ""))


@contextlib.contextmanager
def no_service_start() -> Iterator[None]:
    """Debian starts nginx's service when the package is installed; a policy-rc.d
    that answers 101 prevents it (only if none exists; removed afterwards)."""
    created = False
    if not POLICY_RC_D.exists():
        POLICY_RC_D.write_text("#!/bin/sh\n# temporary, from tcptrace-ebpf bench\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
        created = True
    try:
        yield
    finally:
        if created:
            POLICY_RC_D.unlink(missing_ok=True)


def ensure_tools(args: argparse.Namespace) -> list[str]:
    """Install what is missing (Debian packages); returns the packages installed."""
    tools = (*TOOLS, IPERF3) if args.workload == "bulk" else TOOLS
    wanted = [(cmd, pkg) for cmd, pkg in tools if which(cmd) is None]
    if args.tcpstates == "tcpstates-bpfcc":
        args.tcpstates = which("tcpstates-bpfcc") or args.tcpstates
    missing = [pkg for _cmd, pkg in wanted]
    if not missing:
        return []
    if args.no_install:
        raise BenchError(f"missing: {', '.join(c for c, _ in wanted)} (and --no-install given)")
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with no_service_start():
        install = ["apt-get", "install", "-y", *missing]
        done = subprocess.run(install, env=env, check=False, timeout=1800)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=False, timeout=1800)
            done = subprocess.run(install, env=env, check=False, timeout=1800)
    still = [cmd for cmd, _ in wanted if which(cmd) is None]
    if done.returncode != 0 or still:
        raise BenchError(f"could not install {' '.join(missing)} (still missing: {still})")
    if args.tcpstates == "tcpstates-bpfcc" or not Path(args.tcpstates).exists():
        args.tcpstates = which("tcpstates-bpfcc") or args.tcpstates
    return missing


def ensure_tracefs(bench: Bench) -> None:
    if (TRACEFS / "events").is_dir():
        return
    log(f"mounting tracefs on {TRACEFS} (unmounted at the end)")
    subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)], check=True)

    def unmount() -> None:
        subprocess.run(["umount", str(TRACEFS)], check=False)

    bench.restore.append(unmount)


# -- command line ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Measure what tcptrace-ebpf costs under loopback connection churn "
        "(nginx + wrk), check the exporter's counters are exact, time scrapes with "
        "100,000 sockets alive and watch the exporter's memory. Needs root.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="churn",
        help="churn: a new connection per request (nginx keep-alive off, wrk 'Connection:"
        " close'); keepalive: wrk's connections kept for the run (nginx keep-alive on);"
        " bulk: one iperf3 transfer over loopback",
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (-c)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (-t)")
    parser.add_argument("--nginx-workers", type=int, default=1, help="nginx worker_processes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every mode")
    parser.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help="comma-separated subset of: " + ", ".join(ALL_MODES),
    )
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="seconds of unmeasured load first"
    )
    parser.add_argument("--pause", type=float, default=2.0, help="seconds of rest before a run")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds of unmeasured load at the start of every run, tracer running:"
        " measures a tracer past its first seconds (start-up work, adopting the"
        " sockets that were there before it)",
    )
    parser.add_argument(
        "--scrape-interval", type=float, default=1.0, help="scrape period during runs"
    )
    parser.add_argument("--json", metavar="FILE", help="write every result as JSON here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one round of 5 s runs, no scrape or memory test (unless asked for)",
    )
    parser.add_argument(
        "--scrape-test",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time scrapes with --scrape-sockets sockets alive (default: on unless --quick)",
    )
    parser.add_argument("--scrape-sockets", type=int, default=100_000)
    parser.add_argument("--scrape-count", type=int, default=200, help="scrapes timed")
    parser.add_argument(
        "--scrape-test-interval", type=float, default=0.1, help="pause between timed scrapes"
    )
    parser.add_argument(
        "--memory-test",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve's RSS under sustained churn (default: on unless --quick)",
    )
    parser.add_argument("--memory-connections", type=int, default=5_000_000)
    parser.add_argument("--memory-checkpoint", type=int, default=100_000)
    parser.add_argument("--memory-max-seconds", type=float, default=1800.0)
    parser.add_argument("--memory-sample-interval", type=float, default=5.0)
    parser.add_argument(
        "--bpf-stats",
        action="store_true",
        help="enable kernel.bpf_stats_enabled during the run (adds a little overhead) "
        "and report BPF program time per event",
    )
    parser.add_argument(
        "--tcptrace",
        default=str(REPO / ".venv" / "bin" / "tcptrace-ebpf"),
        help="the tcptrace-ebpf command",
    )
    parser.add_argument("--tcpstates", default="tcpstates-bpfcc", help="bcc's tcpstates")
    parser.add_argument(
        "--no-install", action="store_true", help="fail instead of apt-get installing tools"
    )
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {"duration": 10.0, "rounds": 3}
        for key, value in (("duration", 5.0), ("rounds", 1)):
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    # The scrape and memory tests churn connections: part of the churn workload.
    if args.scrape_test is None:
        args.scrape_test = not args.quick and args.workload == "churn"
    if args.memory_test is None:
        args.memory_test = not args.quick and args.workload == "churn"
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in ALL_MODES]
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(unknown)}")
    if MODE_BASELINE not in args.modes:
        args.modes.insert(0, MODE_BASELINE)
    if args.duration <= 0 or args.rounds < 1 or args.connections < 1 or args.threads < 1:
        parser.error("--duration, --rounds, --connections and --threads must be positive")
    if args.connections < args.threads:
        parser.error("wrk needs --connections >= --threads")
    if args.scrape_sockets < 2 or args.memory_connections < 1 or args.scrape_count < 1:
        parser.error("--scrape-sockets and --memory-connections must be positive")
    return args


def json_default(value: object) -> object:
    return str(value)


def clean_nan(value: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_nan(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run: needs root (BPF, nginx, sysctls): sudo bench/run", file=sys.stderr)
        return 2
    install_signal_handlers()
    bench: Bench | None = None
    try:
        installed = ensure_tools(args)
        if not Path(args.tcptrace).exists():
            raise BenchError(f"{args.tcptrace} not found (make the venv, or pass --tcptrace)")
        bench = Bench(args)
        ensure_tracefs(bench)
        results = bench.run()
        results["installed_packages"] = installed
    except BenchError as err:
        print(f"bench/run: error: {err}", file=sys.stderr)
        return 1
    except Interrupted as sig:
        print(f"bench/run: interrupted ({sig}); cleaning up", file=sys.stderr)
        return 130
    finally:
        if bench is not None:
            bench.cleanup()
    print(report(results))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(clean_nan(results), indent=2, default=json_default) + "\n")
        print(f"results written to {path}")
    return 0 if all_passed(results) else 3


def all_passed(results: dict[str, Any]) -> bool:
    summary = results.get("summary", {})
    exact = summary.get(MODE_EXACT)
    checks = [exact is None or exact["exact_pass"] == exact["exact_runs"]]
    for key in ("scrape_test", "memory_test"):
        if key in results:
            block = results[key]
            if key == "scrape_test" and "error" not in block:
                checks.extend(block[k]["pass"] for k in block if k.startswith("serve_started"))
            else:
                checks.append(bool(block.get("pass")))
    return all(checks)


if __name__ == "__main__":
    sys.exit(main())
