"""What every timer on the host costs with serve's programs attached, measured from outside.

Before 6.11, serve's timer programs run for every timer started and
cancelled on the host, not only for timewait sockets': under bulk traffic,
hundreds of thousands a second (bench/bpfcost.py counts them). Since 6.11
serve hooks neither, and this shows what that saves. The
kernel's own count of their time (BPF_ENABLE_STATS) reads the clock around
every run, which is itself a cost of the size being measured, and leaves
out what the kernel does to reach a program at all. This measures from
outside: a loop of setsockopt(TCP_KEEPIDLE) calls on a connected loopback
socket with keepalive on, each of which moves the socket's keepalive timer
to another wheel bucket (the kernel traces one timer_cancel and one
timer_start), timed

  - with no tracer,
  - with an empty program on both tracepoints (the cost of any program
    there: the kernel's dispatch, not the program's work), and
  - with `tcptrace-ebpf serve` running,

in rounds that rotate the order, pinned to one CPU; each timing is the
fastest of five loops. Before the rounds, the kernel's count checks that
each call is one run of each of serve's timer_start and timer_cancel
programs, if it hooks them. Needs root and BCC (for the empty program).

    .venv/bin/python bench/timercost.py                 # 15 rounds
    .venv/bin/python bench/timercost.py --rounds 31 --calls 500000

Prints, per variant, the median time per call and, against no tracer, the
median per-round difference with its 95 % interval (bench/README.md), per
call and per hooked tracepoint hit (the empty program hooks both, serve
both or, since 6.11, neither). Extra arguments go to serve.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tcpbench
from bpfcost import prog_name
from footprint import running_serve

from tcptrace_ebpf.kernel import bpfsys

# Far apart, so that each change moves the timer to another bucket of the
# wheel (mod_timer within a bucket only updates the expiry, tracing nothing).
KEEPIDLE_S = (100, 7000)
VARIANTS = ("none", "empty", "serve")
REPEATS = 5
EMPTY_PROGRAMS = """
RAW_TRACEPOINT_PROBE(timer_start) { return 0; }
RAW_TRACEPOINT_PROBE(timer_cancel) { return 0; }
"""


def connected_socket() -> tuple[socket.socket, socket.socket]:
    """A connected loopback pair (client, server); the client has keepalive on."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return client, server


def ns_per_call(sock: socket.socket, calls: int) -> float:
    """Wall time per setsockopt call (each moves the keepalive timer), in ns."""
    setsockopt, level, option = sock.setsockopt, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE
    low, high = KEEPIDLE_S
    started = time.perf_counter_ns()
    for _ in range(calls // 2):
        setsockopt(level, option, low)
        setsockopt(level, option, high)
    return (time.perf_counter_ns() - started) / (calls // 2 * 2)


def fastest_ns_per_call(sock: socket.socket, calls: int, repeats: int = REPEATS) -> float:
    """The fastest of `repeats` timings of calls/repeats calls each: what the
    calls cost when nothing else on this shared machine got in the way (a
    neighbour's burst only ever adds time)."""
    return min(ns_per_call(sock, max(2, calls // repeats)) for _ in range(repeats))


@contextmanager
def empty_programs() -> Iterator[None]:
    try:
        programs = tcpbench.bcc_program(EMPTY_PROGRAMS)
    except tcpbench.BenchError as err:
        raise SystemExit(f"timercost: {err}") from None
    try:
        yield
    finally:
        programs.cleanup()


@contextmanager
def serve(extra: list[str]) -> Iterator[int]:
    with running_serve(extra, None) as (pid, _startup):
        time.sleep(1)  # the start-up snapshot's own work is over
        yield pid


def timer_runs_per_call(pid: int, sock: socket.socket, calls: int) -> dict[str, float]:
    """The kernel's count of serve's timer program runs per call: name -> runs."""
    with bpfsys.run_stats():
        before = tcpbench.prog_stats(pid)
        ns_per_call(sock, calls)
        after = tcpbench.prog_stats(pid)
    runs: dict[str, float] = {}
    for prog_id, (count, _ns) in after.items():
        name = prog_name(prog_id)
        if "timer_start" in name or "timer_cance" in name:
            runs[name] = (count - before.get(prog_id, (0, 0))[0]) / calls
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--calls", type=int, default=500_000, help="setsockopt calls per variant and round"
    )
    parser.add_argument(
        "--cpu", type=int, default=None, help="CPU to pin the loop to (default: the last one)"
    )
    args, extra = parser.parse_known_args()
    if os.geteuid() != 0:
        raise SystemExit("timercost: needs root")
    if args.rounds < 1 or args.calls < 2:
        raise SystemExit("timercost: --rounds must be at least 1, --calls at least 2")
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1] if args.cpu is None else args.cpu
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as err:
        raise SystemExit(f"timercost: cannot pin to CPU {cpu}: {err.strerror}") from None
    client, server = connected_socket()
    setups: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "none": nullcontext,
        "empty": empty_programs,
        "serve": lambda: serve(extra),
    }
    try:
        with serve(extra) as pid:
            runs = timer_runs_per_call(pid, client, 20_000)
        print("serve's timer programs, runs per call (the kernel's count):", end="")
        print("".join(f" {name} {count:.3f}" for name, count in sorted(runs.items())))
        if not runs:
            print(" none: serve hooks neither tracepoint on this kernel")
        if not all(0.98 < count < 1.1 for count in runs.values()):
            raise SystemExit(
                "timercost: the calls did not each run serve's timer programs once on this"
                " kernel, so the loop does not measure what it says"
            )
        hooks = {"empty": 2, "serve": len(runs)}  # tracepoints each variant hooks
        timings: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for round_no in range(args.rounds):
            shift = round_no % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                with setups[variant]():
                    timings[variant].append(fastest_ns_per_call(client, args.calls))
            print(
                f"round {round_no + 1}: "
                + ", ".join(f"{v} {timings[v][-1]:.1f}" for v in VARIANTS)
                + " ns per call",
                flush=True,
            )
    finally:
        client.close()
        server.close()
    print(f"\n{args.rounds} rounds of {args.calls:,} calls, pinned to CPU {cpu}; medians:")
    for variant in VARIANTS:
        line = f"{variant:<6} {statistics.median(timings[variant]):7.1f} ns per call"
        if variant != "none":
            added = [t - b for t, b in zip(timings[variant], timings["none"], strict=True)]
            line += f"; added {statistics.median(added):5.1f} ns per call"
            # Per hit of its hooks; per call if it hooks neither tracepoint.
            hits = hooks[variant] or 1
            if hooks[variant]:
                line += f", {statistics.median(added) / hits:5.1f} per hit of its {hits} hook(s)"
            interval = tcpbench.median_interval(added)
            if interval:
                line += f" (95 % interval {interval[0] / hits:.1f}-{interval[1] / hits:.1f})"
        print(line)


if __name__ == "__main__":
    main()
