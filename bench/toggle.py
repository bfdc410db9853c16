"""What `serve`'s BPF programs cost the load, measured by switching them on and off.

bench/run compares runs seconds apart, each with `serve` started afresh: on
this shared VM one round's ratio varies by 5-8 % (the load's own rate varies
by 5 % from one second to the next), so a 1 % effect takes hundreds of rounds.
Here one load runs throughout, and the programs `serve` loads (the same
program, options and maps) are attached and detached in turn, in short
windows: each pair of adjacent windows, one with and one without, gives a
ratio, in alternating order (on-off, then off-on) so that a steady drift of
the load cancels. What is measured is the kernel side only: `serve`'s user
space takes 1-2 ms of CPU a second between scrapes (see bench/README.md).

The rate in a window is the kernel's or the server's own count: connections
accepted (`Tcp: PassiveOpens`, churn), requests served (nginx's stub_status,
keepalive), bytes received on loopback (`/proc/net/dev`, bulk) or on the
veth (in the server's namespace's /proc/PID/net/dev, bulk with `--veth`).
Each window starts `--settle` seconds after the switch.

The load's rate wanders by 10 % and more over seconds, far less from one
tenth of a second to the next, so the shortest windows that a switch's
after-effects do not reach give the most exact ratio for a given time
(`WINDOWS`): keep-alive's programs run per timer, and nothing lingers;
bulk's stream takes about 0.3 s to settle into its new pace; churn's
programs follow each connection for its whole life. `--pin` runs the
server on CPU 0 and the client on CPU 1 (wrk with one thread): on 2 CPUs
the two ends otherwise move between them, which doubles the noise.
`--empty` switches an empty program on `timer_cancel` in place of `serve`'s.
`--veth` (bulk) sends the stream across a veth pair between two network
namespaces made for the run, not loopback.

Each window also counts the CPUs busy (the cpuidle states' residency), for
the work done per busy CPU-second: where the load does not keep every CPU
busy (bulk: its two ends wait on each other), a change of pace shows there
and not in the rate. And the segments the client retransmitted (`Tcp:
RetransSegs` in its namespace), to tell a change in the stream's losses
from one in the CPU it gets (bulk over veth retransmits tens of thousands
a second, more the faster it goes, with the programs or without).

    .venv/bin/python bench/toggle.py                          # churn, 120 pairs
    .venv/bin/python bench/toggle.py --workload keepalive --pin --pairs 2400
    .venv/bin/python bench/toggle.py --workload bulk --pin --pairs 600
    .venv/bin/python bench/toggle.py --workload bulk --pin --veth --pairs 600

Needs root, nginx and wrk (churn, keepalive) or iperf3 (bulk); BCC for --empty.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
import tcpbench
from support import netns_pair

from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.kernel.probe import Tracer, TracerOptions

WARMUP_S = 5.0
SERVER_CPU, CLIENT_CPU = "0", "1"  # with --pin
CPUS = os.cpu_count() or 1
# Per workload: seconds per window, and from a switch to its window (above).
WINDOWS = {"churn": (1.0, 0.2), "keepalive": (0.1, 0.05), "bulk": (0.5, 0.4)}


def tcp_counter(snmp: Path, name: str) -> float:
    """The kernel's `Tcp: name` counter, from a /proc/net/snmp table
    (/proc/PID/net/snmp: that process's namespace)."""
    lines = snmp.read_text().splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        if header.startswith("Tcp:"):
            return float(values.split()[header.split().index(name)])
    raise tcpbench.BenchError(f"no Tcp: {name} in {snmp}")


def received_bytes(net_dev: Path, interface: str | None) -> float:
    """Bytes received on `interface`, or on every interface but lo if None,
    from a /proc/net/dev table (/proc/PID/net/dev: that process's namespace)."""
    total, found = 0.0, False
    for line in net_dev.read_text().splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip() == interface or (interface is None and name.strip() != "lo"):
            total, found = total + float(fields.split()[0]), True
    if not found:
        raise tcpbench.BenchError(f"no {interface or 'interface but lo'} in {net_dev}")
    return total


class Switchable(Protocol):
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None: ...


class EmptyTimerProgram:
    """An empty program on `timer:timer_cancel`, hit for every timer moved,
    which `serve` hooks before 6.11 (`--empty`): what any program there does
    to the load, whatever it does inside."""

    TRACEPOINT = "timer_cancel"

    def __init__(self) -> None:
        # RAW_TRACEPOINT_PROBE attaches at load
        self._bpf = tcpbench.bcc_program(f"RAW_TRACEPOINT_PROBE({self.TRACEPOINT}) {{ return 0; }}")
        self._attached = True

    def pause(self) -> None:
        if self._attached:
            self._bpf.detach_raw_tracepoint(tp=self.TRACEPOINT)
            self._attached = False

    def resume(self) -> None:
        if not self._attached:
            self._bpf.attach_raw_tracepoint(
                tp=self.TRACEPOINT, fn_name=f"raw_tracepoint__{self.TRACEPOINT}"
            )
            self._attached = True

    def close(self) -> None:
        self._bpf.cleanup()


def serve_programs() -> Tracer:
    """The programs `serve` loads, with its options and maps, attached."""
    tracer = Tracer(TracerOptions(emit_events=False, collect_metrics=True))
    tracer.start()  # closes what it opened if it fails
    return tracer


@functools.cache
def cpuidle_state_files() -> list[Path]:
    """Each CPU's cpuidle states' residency files (found once, not per window)."""
    pattern = "/sys/devices/system/cpu/cpu[0-9]*/cpuidle/state[0-9]*/time"
    return [Path(state) for state in glob.glob(pattern)]


def idle_seconds() -> float:
    """All CPUs' idle time since boot: the cpuidle states' residency (in µs)
    where the kernel has cpuidle, else /proc/stat's idle and iowait (in
    ticks of 10 ms, too coarse for windows under a second)."""
    states = cpuidle_state_files()
    if states:
        return sum(int(state.read_text()) for state in states) / 1e6
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def window(
    count: Callable[[], float], retransmits: Callable[[], float], seconds: float
) -> tuple[float, float, float]:
    """Over `seconds` from now: the count's rate of growth, how many CPUs
    were busy (on average), and segments retransmitted a second."""
    start, resent, idle, started = count(), retransmits(), idle_seconds(), time.monotonic()
    time.sleep(seconds)
    end, end_resent = count(), retransmits()
    end_idle, elapsed = idle_seconds(), time.monotonic() - started
    return (
        (end - start) / elapsed,
        CPUS - (end_idle - idle) / elapsed,
        (end_resent - resent) / elapsed,
    )


def geometric_mean_interval(ratios: list[float]) -> tuple[float, float, float]:
    """The ratios' geometric mean, with a normal-approximation 95 % interval.
    Not the arithmetic mean: with one pair's spread at 0.1-0.2, a ratio's
    mean reads 1-2 % above 1 where nothing changes (E[x/y] > E[x]/E[y])."""
    logs = [math.log(ratio) for ratio in ratios]
    mean, half = statistics.fmean(logs), 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def measure(
    args: argparse.Namespace,
    programs: Switchable,
    count: Callable[[], float],
    retransmits: Callable[[], float],
) -> list[dict[str, float]]:
    pairs = []
    for number in range(args.pairs):
        order = (True, False) if number % 2 == 0 else (False, True)
        rates, busy, resent = {}, {}, {}
        for on in order:
            if on:
                programs.resume()
            else:
                programs.pause()
            time.sleep(args.settle)
            rates[on], busy[on], resent[on] = window(count, retransmits, args.window)
        ratio = rates[True] / rates[False]
        pairs.append(
            {
                "on": rates[True],
                "off": rates[False],
                "ratio": ratio,
                "busy_cpus_on": busy[True],
                "busy_cpus_off": busy[False],
                "retransmits_on": resent[True],
                "retransmits_off": resent[False],
                # the work done per CPU-second busy, attached against detached
                "work_per_busy_cpu_ratio": ratio * busy[False] / busy[True],
            }
        )
    programs.resume()
    return pairs


def report(args: argparse.Namespace, pairs: list[dict[str, float]]) -> dict[str, Any]:
    def summarize(key: str) -> dict[str, Any]:
        ratios = [pair[key] for pair in pairs]
        geomean, low, high = geometric_mean_interval(ratios)
        return {
            "median": statistics.median(ratios),
            "median_interval": tcpbench.median_interval(ratios),
            "geomean": geomean,
            "geomean_interval": (low, high),
            "stdev": statistics.stdev(ratios),
        }

    summary = {
        "workload": args.workload,
        "pairs": len(pairs),
        "window_s": args.window,
        "settle_s": args.settle,
        "pinned": args.pin,
        "programs": "empty" if args.empty else "serve",
        "rate_off_median": statistics.median(pair["off"] for pair in pairs),
        "rate_on_median": statistics.median(pair["on"] for pair in pairs),
        "busy_cpus_off_median": statistics.median(pair["busy_cpus_off"] for pair in pairs),
        "busy_cpus_on_median": statistics.median(pair["busy_cpus_on"] for pair in pairs),
        "retransmits_off_median": statistics.median(pair["retransmits_off"] for pair in pairs),
        "retransmits_on_median": statistics.median(pair["retransmits_on"] for pair in pairs),
        "ratio": summarize("ratio"),
        "work_per_busy_cpu_ratio": summarize("work_per_busy_cpu_ratio"),
    }
    unit = {"churn": "conn/s", "keepalive": "req/s", "bulk": "bytes/s"}[args.workload]
    layout = f", server on CPU {SERVER_CPU} and client on CPU {CLIENT_CPU}" if args.pin else ""
    what = "an empty program on timer_cancel" if args.empty else "serve's programs"
    print(
        f"{args.workload}, {what}: {len(pairs)} pairs of {args.window:g} s windows, "
        f"{args.settle:g} s after each switch{layout}; medians with the programs "
        f"detached: {summary['rate_off_median']:,.0f} {unit}, "
        f"{summary['busy_cpus_off_median']:.2f} CPUs busy; attached: "
        f"{summary['rate_on_median']:,.0f} {unit}, {summary['busy_cpus_on_median']:.2f} CPUs; "
        f"segments retransmitted a second: {summary['retransmits_off_median']:,.0f} "
        f"detached, {summary['retransmits_on_median']:,.0f} attached"
    )
    for key, what in (("ratio", "rate"), ("work_per_busy_cpu_ratio", "work per busy CPU")):
        ratio = summary[key]
        low, high = ratio["median_interval"] or (math.nan, math.nan)
        geo_low, geo_high = ratio["geomean_interval"]
        print(
            f"{what}, attached/detached: median {ratio['median']:.4f} (95 % interval "
            f"{low:.4f}-{high:.4f}, sign test); geometric mean {ratio['geomean']:.4f} "
            f"(95 % interval {geo_low:.4f}-{geo_high:.4f}); sd of one pair {ratio['stdev']:.4f}"
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("churn", "keepalive", "bulk"), default="churn")
    parser.add_argument("--pairs", type=int, default=120, help="pairs of windows")
    parser.add_argument(
        "--window", type=float, help="seconds per window (churn 1, keepalive 0.1, bulk 0.5)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        help="seconds from a switch to its window (churn 0.2, keepalive 0.05, bulk 0.4)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help=f"server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU} (wrk: one thread)",
    )
    parser.add_argument(
        "--empty",
        action="store_true",
        help="switch an empty program on timer:timer_cancel in place of serve's (needs BCC)",
    )
    parser.add_argument(
        "--veth",
        action="store_true",
        help="bulk: the stream crosses a veth pair between two namespaces, not loopback",
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (-c)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (-t)")
    parser.add_argument("--json", type=Path, help="write every pair and the summary here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("toggle: needs root")
    window, settle = WINDOWS[args.workload]
    args.window = window if args.window is None else args.window
    args.settle = settle if args.settle is None else args.settle
    if args.pin:
        if not {int(SERVER_CPU), int(CLIENT_CPU)} <= os.sched_getaffinity(0):
            raise SystemExit(f"toggle: --pin needs CPUs {SERVER_CPU} and {CLIENT_CPU}")
        args.threads = 1
    if args.veth and args.workload != "bulk":
        raise SystemExit("toggle: --veth is for --workload bulk")
    if args.pairs < 6 or args.window <= 0 or args.settle < 0 or args.connections < args.threads < 1:
        raise SystemExit(
            "toggle: --pairs 6 or more, --window above 0, --settle 0 or more, "
            "--connections >= --threads"
        )
    server_cpus, client_cpus = (SERVER_CPU, CLIENT_CPU) if args.pin else (None, None)
    # resume() takes about 12 ms here: allow 30 ms a switch
    duration = WARMUP_S + args.pairs * 2 * (args.window + args.settle + 0.03) + 10
    procs = tcpbench.Processes()
    nginx: tcpbench.Nginx | None = None
    programs: Switchable | None = None
    count: Callable[[], float]
    client_snmp = Path("/proc/net/snmp")  # in the namespace of the load's sender
    # the namespaces (--veth) go last, after the processes in them have stopped
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="tcptrace-toggle-") as workdir,
    ):
        try:
            programs = EmptyTimerProgram() if args.empty else serve_programs()
            if args.workload == "bulk":
                pair = stack.enter_context(netns_pair()) if args.veth else None
                netns = pair.a if pair else None
                address = pair.addr_a if pair else tcpbench.LOOPBACK
                server, port = tcpbench.start_iperf3_server(procs, server_cpus, address, netns)
                client = tcpbench.pinned(
                    client_cpus, tcpbench.iperf3_command(port, duration, address)
                )
                load = procs.start("iperf3", tcpbench.in_netns(pair.b if pair else None, client))
                # Counted in each end's namespace (their pids are iperf3's: taskset
                # and ip netns exec exec it); on loopback, lo carries the stream.
                server_dev = Path(f"/proc/{server.pid}/net/dev")
                count = functools.partial(received_bytes, server_dev, None if pair else "lo")
                client_snmp = Path(f"/proc/{load.pid}/net/snmp")
            else:
                nginx = tcpbench.Nginx(
                    procs,
                    Path(workdir),
                    workers=1,
                    keepalive=args.workload == "keepalive",
                    cpus=server_cpus,
                )
                nginx.start()
                client = tcpbench.pinned(
                    client_cpus, tcpbench.wrk_command(args, nginx.port, duration)
                )
                load = procs.start("wrk", client)
                stub = nginx.stub
                count = (
                    functools.partial(tcp_counter, Path("/proc/net/snmp"), "PassiveOpens")
                    if args.workload == "churn"
                    else lambda: stub().requests
                )
            time.sleep(WARMUP_S)
            retransmits = functools.partial(tcp_counter, client_snmp, "RetransSegs")
            pairs = measure(args, programs, count, retransmits)
            if load.poll() is not None:
                raise tcpbench.BenchError(f"the load ended early ({load.returncode})")
        except (tcpbench.BenchError, UserError, subprocess.CalledProcessError) as err:
            raise SystemExit(f"toggle: {err}") from None
        finally:
            if programs:
                programs.close()
            if nginx:
                nginx.stop()
            procs.stop_all()
    summary = report(args, pairs)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "pairs": pairs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
