"""Measure the sock_diag snapshot: time per socket, memory, import time.

Holds `--connections` loopback connections open with holdsockets.py (two
sockets each), then, in a fresh interpreter per round, imports
`tcptrace_ebpf.host.sockdiag`, dumps every TCP socket `--dumps` times with
`snapshot()` and once with `count_by_state()`, and reports the import time,
the memory the import adds (VmRSS), the time per socket and the peak memory
of a dump (VmHWM over the RSS before it). Then, in another fresh interpreter,
what the daemon's start-up snapshot (`host.snapshot.list_sockets`, every
network namespace) costs it: time, and the RSS it adds and keeps. `ss -tanH`
is timed for reference.

Each `--source` is a checkout whose package is measured (default: this one),
so two decoders compare side by side, rounds alternating between them; the
held sockets (address pair, state, inode, uid, cookie) must come out the
same from every one. Needs root for fs.nr_open only when the connections need
more descriptors than the hard limit allows.

    .venv/bin/python bench/sockdiag.py --connections 50000
    git archive <commit> tcptrace_ebpf | tar -x -C /tmp/old
    .venv/bin/python bench/sockdiag.py --source . --source /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Both measurements below start with this (each runs in a fresh interpreter).
STATUS = r"""
import gc, json, os, time
from pathlib import Path

def status(field, process=Path("/proc/self")):
    for line in (process / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0
"""

# argv = dumps, held ports (comma-separated).
MEASURE = (
    STATUS
    + r"""
import hashlib, sys

dumps = int(sys.argv[1])
held = {int(port) for port in sys.argv[2].split(",")}
rss_start = status("VmRSS")
started = time.perf_counter()
from tcptrace_ebpf.host import sockdiag
import_s = time.perf_counter() - started
rss_import = status("VmRSS")
snapshot_s, sockets = [], 0
digest = ""
for _ in range(dumps):
    started = time.perf_counter()
    listed = sockdiag.snapshot()
    snapshot_s.append(time.perf_counter() - started)
    sockets = len(listed)
    mine = sorted(
        (s.family, s.state, s.laddr, s.lport, s.raddr, s.rport, s.inode, s.uid, s.cookie,
         s.is_timewait)
        for s in listed if s.lport in held or s.rport in held
    )
    digest = hashlib.sha256(repr(mine).encode()).hexdigest()[:16]
    held_sockets = len(mine)
    del listed, mine
    gc.collect()
hwm = status("VmHWM")
started = time.perf_counter()
counted = sum(sockdiag.count_by_state().values())
count_s = time.perf_counter() - started
print(json.dumps({
    "module": sockdiag.__file__, "import_s": import_s, "rss_start_kb": rss_start,
    "rss_import_kb": rss_import, "hwm_kb": hwm, "rss_end_kb": status("VmRSS"),
    "snapshot_s": snapshot_s, "sockets": sockets, "held_sockets": held_sockets,
    "digest": digest, "count_s": count_s, "counted": counted,
}))
"""
)


# The daemon's start-up snapshot, as serve takes it.
MEASURE_TAKE = (
    STATUS
    + r"""

from tcptrace_ebpf.host import snapshot as preexisting
gc.collect()
rss_before = status("VmRSS")
started = time.perf_counter()
taken = preexisting.list_sockets(os.stat("/proc/self/ns/net").st_ino)
if hasattr(taken, "preexisting"):  # a checkout before 2026-12-04 (--source)
    taken = taken.preexisting()
elapsed = time.perf_counter() - started
gc.collect()
left_kb = 0  # processes the snapshot left behind (multiprocessing's resource tracker)
for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
        if int(stat.read_text().rpartition(")")[2].split()[1]) == os.getpid():
            left_kb += status("VmRSS", stat.parent)
    except (OSError, ValueError):
        continue
print(json.dumps({
    "children_left_kb": left_kb, "take_s": elapsed, "kept": len(taken), "rss_before_kb": rss_before,
    "hwm_kb": status("VmHWM"), "rss_after_kb": status("VmRSS"),
}))
"""
)


def per_helper() -> int:
    """Connections one holdsockets.py may hold: two descriptors each, within
    the hard RLIMIT_NOFILE (raising it needs CAP_SYS_RESOURCE, which this
    measurement does not count on)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 50_000
    return max(1000, (hard - 1024) // 2 // 1000 * 1000)


def hold(connections: int) -> tuple[list[subprocess.Popen[str]], list[int]]:
    """holdsockets.py processes holding `connections` between them, and their ports."""
    holders: list[subprocess.Popen[str]] = []
    ports: list[int] = []
    left = connections
    try:
        while left > 0:
            count = min(left, per_helper())
            holder = subprocess.Popen(
                [sys.executable, str(HERE / "holdsockets.py"), f"--connections={count}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            holders.append(holder)
            assert holder.stdout is not None
            line = holder.stdout.readline().split()
            if not line or line[0] != "ready":
                raise SystemExit(f"holdsockets.py failed: {' '.join(line)}")
            ports += [int(port) for port in line[2].removeprefix("ports=").split(",")]
            left -= count
    except BaseException:
        release(holders)
        raise
    return holders, ports


def release(holders: list[subprocess.Popen[str]]) -> None:
    for holder in holders:
        assert holder.stdin is not None
        holder.stdin.close()  # it closes every socket with an RST and exits
    for holder in holders:
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def measure(source: str, code: str, *argv: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=source)
    output = subprocess.run(
        [sys.executable, "-c", code, *argv],
        env=env,
        cwd=source,
        capture_output=True,
        text=True,
        check=False,
    )
    if output.returncode != 0:
        raise SystemExit(f"measuring {source} failed: {output.stderr.strip()}")
    result: dict[str, Any] = json.loads(output.stdout)
    return result


def time_ss(rounds: int) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(rounds):
        started = time.perf_counter()
        listed = subprocess.run(["ss", "-tanH"], capture_output=True, check=True).stdout
        times.append(time.perf_counter() - started)
        rows = listed.count(b"\n")
    return statistics.median(times), rows


def spread(values: list[float], scale: float, digits: int) -> str:
    """Median (lowest-highest) of `values` times `scale`."""
    low, median, high = (
        scale * value for value in (min(values), statistics.median(values), max(values))
    )
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=50_000, help="two sockets each")
    parser.add_argument("--rounds", type=int, default=5, help="fresh interpreters per source")
    parser.add_argument("--dumps", type=int, default=3, help="snapshots per interpreter")
    parser.add_argument("--source", action="append", help="checkout to measure (repeatable)")
    parser.add_argument("--json", help="write every measurement to this file")
    args = parser.parse_args()
    sources = [str(Path(source).resolve()) for source in args.source or [str(HERE.parent)]]
    holders, ports = hold(args.connections)
    results: dict[str, list[dict[str, Any]]] = {source: [] for source in sources}
    try:
        for _ in range(args.rounds):
            for source in sources:
                result = measure(source, MEASURE, str(args.dumps), ",".join(map(str, ports)))
                result.update(measure(source, MEASURE_TAKE))
                results[source].append(result)
        ss_s, ss_rows = time_ss(args.rounds)
    finally:
        release(holders)
    each_us = ss_s / ss_rows * 1e6
    print(f"ss -tanH: {ss_s * 1e3:.0f} ms for {ss_rows} sockets ({each_us:.2f} us each)")
    digests: set[str] = set()
    for rounds in results.values():
        per_socket = [s / r["sockets"] for r in rounds for s in r["snapshot_s"]]
        counting = [r["count_s"] / r["counted"] for r in rounds]
        imports = [r["import_s"] for r in rounds]
        import_mb = [(r["rss_import_kb"] - r["rss_start_kb"]) / 1024 for r in rounds]
        peak_mb = [(r["hwm_kb"] - r["rss_import_kb"]) / 1024 for r in rounds]
        kept_mb = [(r["rss_end_kb"] - r["rss_import_kb"]) / 1024 for r in rounds]
        digests.update(r["digest"] for r in rounds)
        print(f"{rounds[0]['module']} ({rounds[0]['sockets']} sockets, {args.rounds} rounds):")
        print(f"  import           {spread(imports, 1e3, 0)} ms, +{spread(import_mb, 1, 1)} MB RSS")
        print(f"  snapshot()       {spread(per_socket, 1e6, 2)} us per socket")
        print(f"  count_by_state() {spread(counting, 1e6, 2)} us per socket")
        print(f"  dump peak        +{spread(peak_mb, 1, 1)} MB RSS over the import")
        print(f"  after the dumps  +{spread(kept_mb, 1, 1)} MB RSS kept")
        take = [r["take_s"] for r in rounds]
        take_peak = [(r["hwm_kb"] - r["rss_before_kb"]) / 1024 for r in rounds]
        take_kept = [(r["rss_after_kb"] - r["rss_before_kb"]) / 1024 for r in rounds]
        left = [r["children_left_kb"] / 1024 for r in rounds]
        print(f"  held sockets     {rounds[0]['held_sockets']}, digest {rounds[0]['digest']}")
        print(
            f"  list_sockets()   {spread(take, 1, 2)} s for {rounds[0]['kept']} sockets kept, "
            f"+{spread(take_peak, 1, 1)} MB peak, +{spread(take_kept, 1, 1)} MB RSS kept, "
            f"child processes left: {spread(left, 1, 1)} MB RSS"
        )
    print("held sockets: " + ("the same from every source" if len(digests) == 1 else "DIFFER"))
    if args.json:
        Path(args.json).write_text(json.dumps({"ss_s": ss_s, "results": results}, indent=1))
    if len(digests) != 1:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
