"""What each BPF program of `serve` costs: runs per connection or per second, ns per run.

Starts `tcptrace-ebpf serve` (on a free port, no API socket), turns on the
kernel's BPF run-time statistics for the measurement only (BPF_ENABLE_STATS:
held by a file descriptor, so another user of kernel.bpf_stats_enabled is not
disturbed), drives bench/run's load on loopback, and reads each of serve's
programs' run count and run time from /proc/PID/fdinfo before and after.
Needs root, nginx and wrk (churn, keepalive) or iperf3 (bulk).

    .venv/bin/python bench/bpfcost.py                       # churn, 5 rounds of 5 s
    .venv/bin/python bench/bpfcost.py --workload keepalive
    .venv/bin/python bench/bpfcost.py --workload bulk
    .venv/bin/python bench/bpfcost.py --source /tmp/a --source /tmp/b   # A/B

Workloads as bench/run's: `churn`, nginx (keep-alive off) and wrk -t2 -c50
with `Connection: close` (ten state changes per connection), reported per
connection; `keepalive`, the same with keep-alive on; `bulk`, one iperf3
transfer; these two per second.

With several `--source` checkouts (each a directory holding tcptrace_ebpf/ and
bpf/), rounds alternate between them, in rotating order, and serve is started
afresh for each run: the figures of each are medians over its rounds. Extra
arguments go to serve.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tcpbench
from footprint import running_serve

from tcptrace_ebpf.kernel import bpfsys


def prog_name(prog_id: int) -> str:
    """The program's name as the kernel keeps it (15 characters at most)."""
    return bpfsys.program_name_by_id(prog_id) or f"id {prog_id}"


@contextmanager
def serve(source: str | None, extra: list[str]) -> Iterator[int]:
    """A running serve (from `source`'s checkout if given), attached; yields its pid."""
    with running_serve(extra, source) as (pid, _startup):
        time.sleep(1)  # the start-up snapshot's own work is over
        yield pid


def wrk_load(args: argparse.Namespace, nginx: tcpbench.Nginx) -> float:
    """wrk against nginx as bench/run drives it; returns connections (churn) or seconds."""
    command = tcpbench.wrk_command(args, nginx.port, args.duration)
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    parsed = tcpbench.parse_wrk(done.stdout)
    return float(parsed.requests) if args.workload == "churn" else parsed.seconds


def bulk(duration: float, procs: tcpbench.Processes) -> float:
    """One iperf3 transfer over loopback for `duration` s; returns seconds."""
    server, port = tcpbench.start_iperf3_server(procs)
    try:
        started = time.monotonic()
        done = subprocess.run(
            tcpbench.iperf3_command(port, duration), capture_output=True, text=True, check=False
        )
        elapsed = time.monotonic() - started
        # iperf3 -J exits 0 even when it could not connect: its JSON says so.
        bits_per_s = tcpbench.parse_iperf3(done.stdout)
        print(f"  iperf3: {bits_per_s / 1e9:.1f} Gbit/s", flush=True)
        return elapsed
    finally:
        procs.stop(server)


def one_run(
    args: argparse.Namespace,
    nginx: tcpbench.Nginx | None,
    procs: tcpbench.Processes,
    source: str | None,
    extra: list[str],
) -> dict[str, tuple[int, int, float]]:
    """program name -> (runs, run time ns, units of the workload) over one run."""
    with serve(source, extra) as pid, bpfsys.run_stats():
        before = tcpbench.prog_stats(pid)
        units = wrk_load(args, nginx) if nginx else bulk(args.duration, procs)
        after = tcpbench.prog_stats(pid)
        names = {prog_id: prog_name(prog_id) for prog_id in after}
    result: dict[str, tuple[int, int, float]] = {}
    for prog_id, (runs, ns) in after.items():
        runs0, ns0 = before.get(prog_id, (0, 0))
        name = names[prog_id]
        old = result.get(name, (0, 0, units))
        result[name] = (old[0] + runs - runs0, old[1] + ns - ns0, units)
    return result


def report(label: str, unit: str, runs: list[dict[str, tuple[int, int, float]]]) -> None:
    names = sorted({name for run in runs for name in run})
    print(f"\n{label}: {len(runs)} runs, medians (range of ns/run)")
    print(f"{'program':<18}{'runs/' + unit:>12}{'ns/run':>9}{'range':>13}{'ns/' + unit:>11}")
    totals = [sum(ns for _, ns, _ in run.values()) / next(iter(run.values()))[2] for run in runs]
    for name in names:
        per_unit, per_run, cost = [], [], []
        for run in runs:
            count, ns, units = run.get(name, (0, 0, 1.0))
            per_unit.append(count / units)
            cost.append(ns / units)
            if count:
                per_run.append(ns / count)
        if not any(per_unit):
            continue
        ns_run = f"{statistics.median(per_run):.0f}" if per_run else "-"
        spread = f"{min(per_run):.0f}-{max(per_run):.0f}" if per_run else "-"
        print(
            f"{name:<18}{statistics.median(per_unit):>12.2f}{ns_run:>9}{spread:>13}"
            f"{statistics.median(cost):>11.0f}"
        )
    print(f"{'all programs':<18}{'':>12}{'':>9}{'':>13}{statistics.median(totals):>11.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("churn", "keepalive", "bulk"), default="churn")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (-c)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (-t)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--source", action="append", default=[], help="run tcptrace_ebpf from this checkout"
    )
    args, extra = parser.parse_known_args()
    if os.geteuid() != 0:
        raise SystemExit("bpfcost: needs root")
    if args.rounds < 1 or args.duration <= 0 or args.connections < args.threads < 1:
        raise SystemExit(
            "bpfcost: --rounds, --duration must be above 0, --connections >= --threads"
        )
    sources: list[str | None] = list(args.source) or [None]
    results: dict[str | None, list[dict[str, tuple[int, int, float]]]] = {s: [] for s in sources}
    procs = tcpbench.Processes()
    nginx: tcpbench.Nginx | None = None
    with tempfile.TemporaryDirectory(prefix="tcptrace-bpfcost-") as workdir:
        try:
            if args.workload != "bulk":
                nginx = tcpbench.Nginx(
                    procs, Path(workdir), workers=1, keepalive=args.workload == "keepalive"
                )
                nginx.start()
            for round_no in range(args.rounds):
                shift = round_no % len(sources)
                for source in sources[shift:] + sources[:shift]:
                    if nginx:
                        nginx.wait_idle()
                    run = one_run(args, nginx, procs, source, extra)
                    results[source].append(run)
                    total = sum(ns for _, ns, _ in run.values()) / next(iter(run.values()))[2]
                    print(
                        f"round {round_no + 1} {source or 'this checkout'}: {total:.0f} ns of BPF",
                        flush=True,
                    )
        except tcpbench.BenchError as err:
            raise SystemExit(f"bpfcost: {err}") from None
        finally:
            if nginx:
                nginx.stop()
            procs.stop_all()
    unit = "conn" if args.workload == "churn" else "s"
    for source in sources:
        report(source or "this checkout", unit, results[source])


if __name__ == "__main__":
    main()
