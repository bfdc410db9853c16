"""`tcptrace-ebpf closewait`: which process holds CLOSE_WAIT sockets, how many,
since when.

`gather()` lists them (a sock_diag snapshot filtered by the kernel, in every
network namespace), finds the processes holding each one (its inode in
/proc/PID/fd, as `ss -p` does) and dates them with what a tracer measured:
the running daemon's (asked over its local API), or, with --watch and no
daemon, this command's own (`OwnTracer`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..host import procfs, sockdiag
from ..host.listeners import own_netns_inum
from ..host.netns import established, in_each_netns
from ..host.workloads import shared as shared_workloads
from ..kernel.probe import TracerOptions, require_root
from ..model.addresses import AddressPair
from ..model.closewait import Age, LeakedSocket, group_by_process, old_enough
from ..model.owners import ProcessInfo
from ..model.states import TcpState
from ..serve.api import ApiUnavailable, query
from ..serve.payloads import close_wait_list
from ..serve.tracking import SocketTracking
from .output import Output, notice
from .render import close_wait_table
from .runner import StopFlag


def gather(
    ages: Mapping[AddressPair, Age],
    now: float | None = None,
    holder_info: Callable[[int], ProcessInfo | None] | None = None,
    every_netns: bool = True,
) -> list[LeakedSocket]:
    """Sockets in CLOSE_WAIT in this network namespace and (`every_netns`)
    every other one (pods have their own), with holders, their containers
    and ages."""
    now = time.time() if now is None else now

    def listed(_netns: int) -> list[sockdiag.DiagSocket]:
        return sockdiag.snapshot(states=[TcpState.CLOSE_WAIT])

    # A namespace with no ESTABLISHED or CLOSE_WAIT socket (CurrEstab counts
    # both) is not entered: each costs a thread and a netlink dump.
    per_netns = in_each_netns(
        own_netns_inum(), listed, every_netns, lambda path: established(path) != 0
    )
    inodes = {sock.inode for _netns, snapshot in per_netns for sock in snapshot if sock.inode}
    holders = procfs.socket_holders(inodes)
    cache: dict[int, ProcessInfo | None] = {}
    workloads = shared_workloads()

    def info(pid: int) -> ProcessInfo | None:
        if pid not in cache:
            if holder_info is not None:
                cache[pid] = holder_info(pid)
            else:
                process = procfs.process_info(pid)
                cache[pid] = (
                    None
                    if process is None
                    else process.with_workload(workloads.of_path(process.cgroup))
                )
        return cache[pid]

    result = []
    for netns, snapshot in per_netns:
        for sock in snapshot:
            pair = AddressPair.of(sock, netns)
            age = ages.get(pair)
            found = tuple(
                holder for pid in holders.get(sock.inode, []) if (holder := info(pid)) is not None
            )
            result.append(
                LeakedSocket(
                    pair=pair,
                    inode=sock.inode,
                    # sock_diag counts the peer's FIN as one unread byte while it
                    # is unread, and it is unread whenever anything is (it comes last).
                    recv_q=max(0, sock.recv_q - 1),
                    age_s=None if age is None else max(0.0, now - age.since),
                    age_is_lower_bound=age.lower_bound if age else False,
                    holders=found,
                )
            )
    return result


def ages_from_api(data: Iterable[Mapping[str, Any]], netns: int) -> dict[AddressPair, Age]:
    """The daemon's CLOSE_WAIT list, keyed by network namespace (`netns`, ours,
    for entries without one) and address pair, for matching with snapshots."""
    ages = {}
    for item in data:
        pair = AddressPair.from_json(item, int(item.get("netns") or netns))
        ages[pair] = Age(float(item["since"]), bool(item["lower_bound"]))
    return ages


class OwnTracer:
    """closewait --watch's own tracer, when no daemon runs: the kernel program
    and the snapshot of older sockets (serve's `SocketTracking`), without the
    daemon's HTTP server, API or metrics."""

    def __init__(self, netns: int) -> None:
        self.netns = netns
        self.tracking = SocketTracking(
            TracerOptions(emit_events=False, collect_metrics=True), netns
        )
        self.tracking.start()
        self._workloads = shared_workloads()

    def ages(self) -> dict[AddressPair, Age]:
        return ages_from_api(close_wait_list(self.tracking, None, self._workloads), self.netns)

    def tick(self) -> None:
        self.tracking.tick()

    def close(self) -> None:
        self.tracking.close()


def run_closewait(
    *,
    min_age: float,
    per_socket: bool,
    as_json: bool,
    watch: bool,
    interval: float,
    pod: str | None,
    container: str | None,
    api_socket: str,
) -> None:
    """Ages come from the running `tcptrace-ebpf serve`; without it, --watch
    traces by itself (ages exact from then on), a one-shot run shows none."""
    require_root()
    netns = own_netns_inum()
    path = Path(api_socket)
    own_tracer: OwnTracer | None = None
    try:
        query(path, "ping", timeout=2.0)
    except ApiUnavailable as err:
        if watch:
            own_tracer = OwnTracer(netns)
            source = "this command's own tracer (no daemon running)"
            # As trace says it: scripts wait for this line (ages count from here).
            notice(f"tracing started: {source}; ages count from now")
        else:
            hint = (
                "; start 'tcptrace-ebpf serve', or use --watch to measure from now"
                if err.no_daemon
                else ""
            )
            notice(f"ages unknown: {err}{hint}")
            source = ""
    else:
        source = f"tcptrace-ebpf serve at {path}"

    def ages() -> dict[AddressPair, Age]:
        if own_tracer is not None:
            return own_tracer.ages()
        if not source:
            return {}
        try:
            return ages_from_api(query(path, "close_wait"), netns)
        except ApiUnavailable as err:
            notice(f"ages unknown: {err}")
            return {}
        except (KeyError, TypeError, ValueError, AttributeError, OSError, OverflowError):
            # Valid JSON but not our daemon's list: root talks to whatever
            # owns the path, so its answer is not trusted to be well formed.
            notice(f"ages unknown: the daemon at {path} sent a malformed answer")
            return {}

    out = Output()

    def show(clear: bool) -> None:
        show_close_wait(
            out,
            ages=ages(),
            min_age=min_age,
            per_socket=per_socket,
            as_json=as_json,
            source=source,
            clear=clear,
            pod=pod,
            container=container,
        )
        out.flush()

    try:
        if not watch:
            show(clear=False)
            out.raise_failure()
            return
        with StopFlag() as stop:
            out.on_failure = stop.set
            stop.on_signal = out.interrupt
            while not stop.stopped:
                show(clear=not as_json)
                deadline = time.monotonic() + interval
                while not stop.stopped and time.monotonic() < deadline:
                    if own_tracer is not None:
                        own_tracer.tick()
                    time.sleep(min(0.2, interval))
                    out.watch_reader()
    finally:
        if own_tracer is not None:
            own_tracer.close()
    out.raise_failure()
    if given_up := out.stop_note():
        notice(f"stopped{given_up}")


def show_close_wait(
    out: Output,
    *,
    ages: Mapping[AddressPair, Age],
    min_age: float,
    per_socket: bool,
    as_json: bool,
    source: str,
    clear: bool,
    pod: str | None = None,
    container: str | None = None,
) -> None:
    sockets = old_enough(gather(ages), min_age)
    if pod is not None or container is not None:
        sockets = [sock for sock in sockets if any(h.matches(pod, container) for h in sock.holders)]
    groups = group_by_process(sockets)
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    if as_json:
        for group in groups:
            if per_socket:
                for sock in group.sockets:
                    out.write(dumps(sock.to_json(group.holder)))
            else:
                out.write(dumps(group.to_json()))
        return
    if clear:
        out.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S"))
    for line in close_wait_table(groups, len(sockets), min_age, source, per_socket):
        out.write(line)
