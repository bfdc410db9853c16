"""Measure `serve`'s start-up time and steady-state memory.

Starts `tcptrace-ebpf serve` on a free port (no API socket), times launch ->
"tracing started" on stderr, waits `--settle` seconds, then reads VmRSS (and
VmHWM, its peak) and whether libLLVM/libclang are mapped, from
/proc/<pid>/status and maps. Runs `--rounds` times and prints the median and
range. Needs root.

    .venv/bin/python bench/footprint.py --rounds 5
    .venv/bin/python bench/footprint.py --source /tmp/old   # another checkout's code

Extra arguments go to `serve`. TCPTRACE_EBPF_NO_CACHE=1 measures a start
that compiles the program (no cache).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOOL = Path(sys.executable).with_name("tcptrace-ebpf")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def status_kb(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (the most it has been) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def compiler_mapped(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({word for word in ("libLLVM", "libclang", "libbcc") if word in maps})


@contextmanager
def running_serve(extra: list[str], source: str | None) -> Iterator[tuple[int, float]]:
    """serve (from `source`'s checkout if given) on a free port, attached: yields
    its pid and the seconds from launch to `tracing started`; stopped by pid."""
    port = free_port()
    env = dict(os.environ)
    command = [str(TOOL)]
    if source:
        env["PYTHONPATH"] = source
        command = [sys.executable, "-m", "tcptrace_ebpf"]
    started = time.monotonic()
    proc = subprocess.Popen(
        [*command, "serve", f"--web.listen-address=127.0.0.1:{port}", "--api.socket=", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=source or None,  # `python -m` looks in the working directory first
    )
    assert proc.stderr is not None
    try:
        buffered = b""
        deadline = started + 300
        while b"tracing started" not in buffered:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"serve did not start: {buffered.decode(errors='replace')}")
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                buffered += os.read(proc.stderr.fileno(), 4096)
        yield proc.pid, time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_round(
    settle_s: float, extra: list[str], source: str | None
) -> tuple[float, int, int, list[str]]:
    with running_serve(extra, source) as (pid, startup):
        time.sleep(settle_s)
        return startup, status_kb(pid, "VmRSS"), status_kb(pid, "VmHWM"), compiler_mapped(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after start")
    parser.add_argument("--source", help="run tcptrace_ebpf from this checkout instead")
    args, extra = parser.parse_known_args()
    startups, rss = [], []
    for _ in range(args.rounds):
        startup, kb, peak_kb, libs = one_round(args.settle, extra, args.source)
        startups.append(startup)
        rss.append(kb / 1024)
        mapped = ", ".join(libs) or "no"
        print(
            f"start-up {startup:.2f} s, VmRSS {kb / 1024:.1f} MB (VmHWM {peak_kb / 1024:.1f}),"
            f" compiler mapped: {mapped}"
        )
    print(
        f"median of {args.rounds}: start-up {statistics.median(startups):.2f} s "
        f"({min(startups):.2f}-{max(startups):.2f}), VmRSS {statistics.median(rss):.1f} MB "
        f"({min(rss):.1f}-{max(rss):.1f})"
    )


if __name__ == "__main__":
    main()
