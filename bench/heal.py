"""Measure what `serve`'s housekeeping costs its memory when many sockets are
followed: the gauge heal (a sock_diag listing checked against the program's
maps, run after any loss) and the stale-timewait sweep (every minute).

In a fresh interpreter per source and round: load the program
(`SocketTracking`, as `serve` does), make `--timewait` connections in a
network namespace this script creates (each closed by its client first, so
its client end waits in TIME_WAIT, followed in the `timewait` map) and hold
`--connections` loopback connections open with holdsockets.py (two
sockets each, in the `socks` map); then heal `--heals` times and sweep
stale timewait sockets as often, and report the time of each, VmRSS after
each and VmHWM. RSS left above the idle figure after these is what a
long-running daemon keeps.

    .venv/bin/python bench/heal.py --connections 30000 --timewait 100000
    git archive <commit> tcptrace_ebpf bpf | tar -x -C /tmp/old
    .venv/bin/python bench/heal.py --source . --source /tmp/old

Needs root (BPF, network namespaces). Everything it makes (the namespace,
its sockets, the holders) is removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from sockdiag import STATUS, hold, release

HERE = Path(__file__).resolve().parent
NETNS = f"tcptrace-bench-heal-{os.getpid()}"

# argv = heals. Prints "ready" once tracing, reads a line (the sockets are
# there), then measures and prints one JSON line.
MEASURE = (
    STATUS
    + r"""
import sys
from tcptrace_ebpf.kernel.probe import TracerOptions
from tcptrace_ebpf.serve.tracking import SocketTracking

heals = int(sys.argv[1])
options = TracerOptions(emit_events=False, collect_metrics=True)
tracking = SocketTracking(options, os.stat("/proc/self/ns/net").st_ino)
tracking.start()
gc.collect()
rss_idle = status("VmRSS")
print("ready", flush=True)
sys.stdin.readline()
tracking.tick()
followed = sum(1 for _ in tracking.tracer.followed())
gc.collect()
rss_before = status("VmRSS")
heal_s, sweep_s, rss_after = [], [], []
for _ in range(heals):
    started = time.perf_counter()
    tracking.heal()
    heal_s.append(time.perf_counter() - started)
    started = time.perf_counter()
    tracking.tracer._sweep_stale_timewait(time.monotonic_ns())
    sweep_s.append(time.perf_counter() - started)
    rss_after.append(status("VmRSS"))
print(json.dumps({
    "followed": followed, "rss_idle_kb": rss_idle, "rss_before_kb": rss_before,
    "rss_after_kb": rss_after, "hwm_kb": status("VmHWM"), "heal_s": heal_s, "sweep_s": sweep_s,
}), flush=True)
tracking.close()
"""
)

# argv = connections. In the namespace: that many connections on loopback,
# each closed by the client first (client end in TIME_WAIT), over enough
# listening ports for the ephemeral range.
TIMEWAIT = r"""
import socket, sys
count = int(sys.argv[1])
listeners = []
for _ in range(count // 20000 + 1):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    listeners.append(listener)
for i in range(count):
    listener = listeners[i % len(listeners)]
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    client.close()
    server.close()
"""


def make_timewait(count: int) -> None:
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    run = ["ip", "netns", "exec", NETNS]
    subprocess.run([*run, "ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(
        [*run, "sysctl", "-q", f"net.ipv4.tcp_max_tw_buckets={count + 1000}"], check=True
    )
    subprocess.run([*run, sys.executable, "-c", TIMEWAIT, str(count)], check=True)


def measure(source: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=source)
    child = subprocess.Popen(
        [sys.executable, "-c", MEASURE, str(args.heals)],
        env=env,
        cwd=source,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    holders: list[subprocess.Popen[str]] = []
    try:
        assert child.stdin is not None
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit(f"{source}: the tracer did not start")
        if args.timewait:
            make_timewait(args.timewait)
        if args.connections:
            holders, _ports = hold(args.connections)
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"{source}: the measurement failed")
        result: dict[str, Any] = json.loads(line)
        child.wait()
        return result
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        release(holders)
        subprocess.run(["ip", "netns", "del", NETNS], check=False, stderr=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--connections", type=int, default=30000, help="held open (two sockets each)"
    )
    parser.add_argument("--timewait", type=int, default=100000, help="timewait sockets to make")
    parser.add_argument("--heals", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--source", action="append", help="a checkout to measure (default: this one)"
    )
    args = parser.parse_args()
    sources = args.source or [str(HERE.parent)]
    results: dict[str, list[dict[str, Any]]] = {source: [] for source in sources}
    for _ in range(args.rounds):
        for source in sources:
            result = measure(source, args)
            results[source].append(result)
            kept = (result["rss_after_kb"][-1] - result["rss_idle_kb"]) / 1024
            peak = (result["hwm_kb"] - result["rss_idle_kb"]) / 1024
            print(
                f"{source}: {result['followed']:,} followed; heal "
                f"{statistics.median(result['heal_s']) * 1000:.0f} ms, stale sweep "
                f"{statistics.median(result['sweep_s']) * 1000:.0f} ms (medians); RSS idle "
                f"{result['rss_idle_kb'] / 1024:.1f} MiB, +{peak:.1f} MiB at peak, "
                f"+{kept:.1f} MiB kept after {args.heals} heals and sweeps "
                f"(after each: {', '.join(f'{kb / 1024:.1f}' for kb in result['rss_after_kb'])})",
                flush=True,
            )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
