"""Load on the metrics HTTP server: many scrapers, slow clients, a task limit.

    sudo .venv/bin/python bench/webserver_load.py [--source DIR]

Starts a MetricsServer (a registry of 1,000 samples) in a child process and
measures, from this process over loopback:

* 200 concurrent scrapers, 5 scrapes each on a new connection (10 s timeout):
  p50 and p99 latency, timeouts and errors;
* 50 requests on one kept-alive connection, for the landing page and for
  the metrics: median latency (a delayed ACK shows as ~40 ms);
* the server in a pids cgroup of 150 tasks, 147 (``--slow``) slow clients each
  holding a connection (a header byte every 5 s), then 30 scrapes: how many succeed.

``--source DIR`` runs the server from another checkout's ``tcptrace_ebpf``
(e.g. ``git archive main tcptrace_ebpf | tar -x -C /tmp/main``) to compare
before and after. Needs root for the cgroup (skipped otherwise). Prints one
line per figure.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

SERVER = """
import sys
from prometheus_client import CollectorRegistry, Gauge
from tcptrace_ebpf.web.server import MetricsServer
registry = CollectorRegistry()
gauge = Gauge("bench_value", "A value.", ["n"], registry=registry)
for n in range(1000):
    gauge.labels(str(n)).set(n)
server = MetricsServer(registry, ("127.0.0.1", 0))
server.start()
print(server.address[1], flush=True)
sys.stdin.read()
"""


def start_server(source: str | None, cgroup: Path | None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = source
    procs = str(cgroup / "cgroup.procs") if cgroup else None

    def join_cgroup() -> None:
        if procs:
            with open(procs, "w") as stream:
                stream.write(str(os.getpid()))

    return subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=join_cgroup,  # noqa: PLW1509 (no threads yet)
    )


def scrape(port: int, timeout: float = 10.0) -> float:
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
    finally:
        connection.close()
    return time.monotonic() - started


def concurrent_scrapers(port: int, scrapers: int = 200, each: int = 5) -> None:
    latencies: list[float] = []
    timeouts = errors = 0
    lock = threading.Lock()
    barrier = threading.Barrier(scrapers)

    def run() -> None:
        nonlocal timeouts, errors
        barrier.wait()
        for _ in range(each):
            try:
                took = scrape(port)
            except TimeoutError:
                with lock:
                    timeouts += 1
            except (OSError, http.client.HTTPException, RuntimeError):
                with lock:
                    errors += 1
            else:
                with lock:
                    latencies.append(took)

    threads = [threading.Thread(target=run) for _ in range(scrapers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
    print(
        f"{scrapers} concurrent scrapers x {each}: {len(latencies)} ok, p50"
        f" {statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms,"
        f" {timeouts} timeouts, {errors} errors"
    )


def kept_alive(port: int, path: str, requests: int = 50) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    took = []
    try:
        for _ in range(requests):
            started = time.monotonic()
            connection.request("GET", path)
            connection.getresponse().read()
            took.append(time.monotonic() - started)
    finally:
        connection.close()
    median_ms = statistics.median(took) * 1000
    print(f"kept-alive connection, GET {path}: median {median_ms:.1f} ms per request")


def pids_cgroup() -> Path | None:
    unified = Path("/sys/fs/cgroup")
    if (unified / "cgroup.controllers").exists():
        if "pids" not in (unified / "cgroup.subtree_control").read_text().split():
            return None
        parent = unified
    elif (unified / "pids" / "cgroup.procs").exists():
        parent = unified / "pids"
    else:
        return None
    cgroup = parent / f"tcptrace-bench-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    (cgroup / "pids.max").write_text("150\n")
    return cgroup


def slow_clients_under_task_limit(source: str | None, slow_clients: int) -> None:
    if os.geteuid() != 0:
        print("task limit: skipped (needs root)")
        return
    cgroup = pids_cgroup()
    if cgroup is None:
        print("task limit: skipped (no pids cgroup controller)")
        return
    proc = start_server(source, cgroup)
    slow: list[socket.socket] = []
    stopping = threading.Event()
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(slow_clients):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            slow.append(sock)

        def trickle() -> None:
            while not stopping.wait(5):
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X")

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(1)
        ok = 0
        for _ in range(30):
            with contextlib.suppress(OSError, http.client.HTTPException, RuntimeError):
                scrape(port)
                ok += 1
        print(f"pids limit 150, {slow_clients} slow clients: {ok} of 30 scrapes served")
    finally:
        stopping.set()
        for sock in slow:
            sock.close()
        proc.kill()
        proc.wait()
        for _ in range(50):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", help="directory holding the tcptrace_ebpf package to run")
    parser.add_argument("--slow", type=int, default=147, help="slow clients under the task limit")
    parser.add_argument("--only-slow", action="store_true", help="only the task-limit test")
    args = parser.parse_args()
    if args.only_slow:
        slow_clients_under_task_limit(args.source, args.slow)
        return
    proc = start_server(args.source, None)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        kept_alive(port, "/")
        kept_alive(port, "/metrics")
        concurrent_scrapers(port)
    finally:
        proc.kill()
        proc.wait()
    slow_clients_under_task_limit(args.source, args.slow)


if __name__ == "__main__":
    main()
