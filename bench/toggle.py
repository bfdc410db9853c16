"""What `serve`'s BPF programs cost the load, measured by switching them on and off.

bench/run compares runs seconds apart, each with `serve` started afresh: on
this shared VM one round's ratio varies by 5-8 % (the load's own rate varies
by 5 % from one second to the next), so a 1 % effect takes hundreds of rounds.
Here one load runs throughout, and the programs `serve` loads (the same
program, options and maps) are attached and detached in turn, in windows of
a second: each pair of adjacent windows, one with and one without, gives a
ratio, in alternating order (on-off, then off-on) so that a steady drift of
the load cancels. What is measured is the kernel side only: `serve`'s user
space costs nothing between scrapes (see bench/README.md).

The rate in a window is the kernel's or the server's own count: connections
accepted (`Tcp: PassiveOpens`, churn), requests served (nginx's stub_status,
keepalive), bytes received on loopback (`/proc/net/dev`, bulk). Each window
starts a fifth of a second after the switch.

    .venv/bin/python bench/toggle.py                          # churn, 120 pairs
    .venv/bin/python bench/toggle.py --workload keepalive
    .venv/bin/python bench/toggle.py --workload bulk --pairs 300

Needs root, nginx and wrk (churn, keepalive) or iperf3 (bulk).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tcpbench

from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.kernel.probe import Tracer, TracerOptions

SETTLE_S = 0.2  # after each switch, before a window starts
WARMUP_S = 5.0


def passive_opens() -> float:
    lines = Path("/proc/net/snmp").read_text().splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        if header.startswith("Tcp:"):
            return float(values.split()[header.split().index("PassiveOpens")])
    raise tcpbench.BenchError("no Tcp: PassiveOpens in /proc/net/snmp")


def loopback_bytes() -> float:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return float(fields.split()[0])
    raise tcpbench.BenchError("no lo in /proc/net/dev")


def window_rate(count: Callable[[], float], seconds: float) -> float:
    """The count's rate of growth over `seconds`, from now."""
    start, started = count(), time.monotonic()
    time.sleep(seconds)
    return (count() - start) / (time.monotonic() - started)


def mean_interval(values: list[float]) -> tuple[float, float]:
    """A normal-approximation 95 % interval for the mean."""
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    mean = statistics.fmean(values)
    return mean - half, mean + half


def measure(
    args: argparse.Namespace, tracer: Tracer, count: Callable[[], float]
) -> list[dict[str, float]]:
    pairs = []
    for number in range(args.pairs):
        order = (True, False) if number % 2 == 0 else (False, True)
        rates = {}
        for on in order:
            if on:
                tracer.resume()
            else:
                tracer.pause()
            time.sleep(SETTLE_S)
            rates[on] = window_rate(count, args.window)
        pairs.append({"on": rates[True], "off": rates[False], "ratio": rates[True] / rates[False]})
    tracer.resume()
    return pairs


def report(args: argparse.Namespace, pairs: list[dict[str, float]]) -> dict[str, Any]:
    ratios = [pair["ratio"] for pair in pairs]
    low_high = tcpbench.median_interval(ratios)
    summary = {
        "workload": args.workload,
        "pairs": len(pairs),
        "window_s": args.window,
        "rate_off_median": statistics.median(pair["off"] for pair in pairs),
        "rate_on_median": statistics.median(pair["on"] for pair in pairs),
        "ratio_median": statistics.median(ratios),
        "ratio_median_interval": low_high,
        "ratio_mean": statistics.fmean(ratios),
        "ratio_mean_interval": mean_interval(ratios),
        "ratio_stdev": statistics.stdev(ratios),
    }
    unit = {"churn": "conn/s", "keepalive": "req/s", "bulk": "bytes/s"}[args.workload]
    print(
        f"{args.workload}: {len(pairs)} pairs of {args.window:g} s windows; median rate "
        f"{summary['rate_off_median']:,.0f} {unit} with the programs detached, "
        f"{summary['rate_on_median']:,.0f} attached"
    )
    interval = f"{low_high[0]:.4f}-{low_high[1]:.4f}" if low_high else "too few pairs"
    mean_low, mean_high = summary["ratio_mean_interval"]
    print(
        f"ratio attached/detached: median {summary['ratio_median']:.4f} (95 % interval "
        f"{interval}, sign test); mean {summary['ratio_mean']:.4f} (95 % interval "
        f"{mean_low:.4f}-{mean_high:.4f}); sd of one pair {summary['ratio_stdev']:.4f}"
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("churn", "keepalive", "bulk"), default="churn")
    parser.add_argument("--pairs", type=int, default=120, help="pairs of windows")
    parser.add_argument("--window", type=float, default=1.0, help="seconds per window")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (-c)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (-t)")
    parser.add_argument("--json", type=Path, help="write every pair and the summary here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("toggle: needs root")
    if args.pairs < 6 or args.window <= 0 or args.connections < args.threads < 1:
        raise SystemExit("toggle: --pairs 6 or more, --window above 0, --connections >= --threads")
    duration = WARMUP_S + args.pairs * 2 * (args.window + SETTLE_S + 0.05) + 10
    procs = tcpbench.Processes()
    nginx: tcpbench.Nginx | None = None
    tracer = Tracer(TracerOptions(emit_events=False, collect_metrics=True))
    with tempfile.TemporaryDirectory(prefix="tcptrace-toggle-") as workdir:
        try:
            tracer.start()
            if args.workload == "bulk":
                _server, port = tcpbench.start_iperf3_server(procs)
                load = procs.start("iperf3", tcpbench.iperf3_command(port, duration))
                count = loopback_bytes
            else:
                nginx = tcpbench.Nginx(
                    procs, Path(workdir), workers=1, keepalive=args.workload == "keepalive"
                )
                nginx.start()
                load = procs.start("wrk", tcpbench.wrk_command(args, nginx.port, duration))
                stub = nginx.stub
                count = passive_opens if args.workload == "churn" else lambda: stub().requests
            time.sleep(WARMUP_S)
            pairs = measure(args, tracer, count)
            if load.poll() is not None:
                raise tcpbench.BenchError(f"the load ended early ({load.returncode})")
        except (tcpbench.BenchError, UserError) as err:
            raise SystemExit(f"toggle: {err}") from None
        finally:
            tracer.close()
            if nginx:
                nginx.stop()
            procs.stop_all()
    summary = report(args, pairs)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "pairs": pairs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
