"""`tcptrace-ebpf serve`: the Prometheus exporter daemon.

Start-up order matters: the HTTP port is bound first (a port in use fails
at once, before anything is loaded; /metrics answers 503 until tracing has
started), then the BPF program is loaded and attached, and only then are
existing sockets snapshotted: a socket that changes state between the two is
seen by the program, and the snapshot's copy of a socket the program already
follows is dropped (the program's wins), so none falls between them. After
that the main thread only does housekeeping once a second (sweeping what
waits in the kernel, taking in sockets the kernel has seen, re-checking old
timewait sockets, healing the gauges after a loss); metrics are read from the
kernel when Prometheus scrapes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, ProcessCollector

from . import __version__
from .api import DEFAULT_PATH as DEFAULT_API_PATH
from .api import ApiServer
from .errors import UserError
from .metrics import CloseWaitOwner, KernelReading, NotReady, TcpTraceCollector
from .preexisting import COUNTED, TUPLE, OldCloseWait, Preexisting, take_snapshot
from .probe import KernelCloseWait, Tracer, TracerOptions, TupleKey
from .runner import StopFlag
from .seed import collect_listener_seeds, own_netns_inum
from .states import TcpState
from .webserver import MetricsServer, WebConfig
from .workloads import Workload
from .workloads import shared as shared_workloads

Endpoints = tuple[int, str, int, str, int]  # family, laddr, lport, raddr, rport


def endpoints(key: TupleKey | bytes) -> Endpoints:
    """(family, laddr, lport, raddr, rport) of a kernel address pair (as a
    tuple, or packed as struct tt_tuple)."""
    if isinstance(key, bytes):
        netns, family, sport, dport, _pad, saddr, daddr = TUPLE.unpack(key)
        key = (netns, family, sport, dport, saddr, daddr)
    _netns, family, sport, dport, saddr, daddr = key
    size = 4 if family == socket.AF_INET else 16
    return (
        family,
        socket.inet_ntop(family, saddr[:size]),
        sport,
        socket.inet_ntop(family, daddr[:size]),
        dport,
    )


def holders_due(
    tracked: Mapping[Endpoints, KernelCloseWait],
    old: Iterable[Endpoints],
    named: Container[Endpoints],
    now_ns: int,
    min_age_ns: int,
) -> dict[Endpoints, int]:
    """The CLOSE_WAIT sockets whose holder to look up now, with the pid the
    kernel recorded (0: none): those not named yet and at least `min_age_ns`
    in CLOSE_WAIT (`now_ns` and their start on CLOCK_MONOTONIC).

    Most CLOSE_WAIT sockets last a moment: the program closes right after
    reading the peer's FIN. Looking those up would read fd tables at every
    refresh on a busy host, for sockets gone before anyone asks. Sockets
    older than tracing (`old`) are always old enough.
    """
    due = {key: s.pid for key, s in tracked.items() if now_ns - s.since_ns >= min_age_ns}
    due.update(dict.fromkeys(old, 0))
    return {key: pid for key, pid in due.items() if key not in named}


log = logging.getLogger(__name__)

TICK_S = 1.0
HOLDER_REFRESH_S = 5.0  # how often new CLOSE_WAIT sockets' holders are looked up in /proc
HOLDER_MIN_AGE_S = 1.0  # younger CLOSE_WAIT sockets are left to the owner the kernel saw
FULL_HOLDER_SCAN_S = 60.0  # at most this often, every process's fd table is searched
# After a recorded loss, the gauges are checked against sock_diag at most this
# often, until a check finds nothing to fix: tcptrace_sockets is back to the
# truth within this interval plus one snapshot (well under 60 s).
HEAL_INTERVAL_S = 30.0
# Counters that say the program missed something (lost_* and kernel_skipped too).
LOSS_COUNTERS = ("missed_transitions", "missed_ends", "kernel_skipped")
PORT_LABEL_SLOTS = 20  # "other" plus 19 listening ports


@dataclass
class ServeOptions:
    listen: tuple[str, int] | None  # None: no HTTP server (closewait --watch's own tracer)
    telemetry_path: str = "/metrics"
    web_config: WebConfig | None = None
    api_path: Path | None = DEFAULT_API_PATH
    tracer: TracerOptions = field(
        default_factory=lambda: TracerOptions(emit_events=False, collect_metrics=True)
    )
    port_label: bool = False


def ephemeral_port_count(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        low, high = (int(part) for part in Path(path).read_text().split())
    except (OSError, ValueError):
        return 0
    return max(0, high - low + 1)


class PortLabels:
    """Rows of the optional `port` label: slot 0 is "other", then listening
    ports in the order they were first seen. A port keeps its slot for the
    exporter's life, so a series never changes meaning."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._labels = ["other"]
        self._slot_of: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, ports: Sequence[int]) -> dict[int, int]:
        """Give slots to new ports while some are free; returns the new ones."""
        added = {}
        with self._lock:
            for port in sorted(set(ports)):
                if port in self._slot_of or len(self._labels) >= self.slots:
                    continue
                self._slot_of[port] = len(self._labels)
                added[port] = len(self._labels)
                self._labels.append(str(port))
        return added

    def labels(self) -> list[str]:
        with self._lock:
            return [*self._labels, *["other"] * (self.slots - len(self._labels))]


class Exporter:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.netns = own_netns_inum()
        self.registry = CollectorRegistry(auto_describe=True)
        self.server = (
            MetricsServer(
                self.registry,
                options.listen,
                telemetry_path=options.telemetry_path,
                web_config=options.web_config,
                ready=self.tracing,
            )
            if options.listen is not None
            else None
        )
        self.port_labels = PortLabels(PORT_LABEL_SLOTS) if options.port_label else None
        tracer_options = options.tracer
        if self.port_labels is not None:
            tracer_options = TracerOptions(
                **{**tracer_options.__dict__, "port_slots": PORT_LABEL_SLOTS}
            )
        self.tracer = Tracer(tracer_options, prepare=self._prepare)
        self.preexisting: Preexisting | None = None
        self._ready = threading.Event()
        self._watching_old_timewait = False
        self._losses_healed = 0  # losses counted when the gauges were last healed
        self._heal_due = False  # the last heal fixed something: check again
        self._last_heal = 0.0
        self._last_holder_refresh = 0.0
        self._last_full_holder_scan = -FULL_HOLDER_SCAN_S
        # CLOSE_WAIT sockets' holders (program names), by address pair, from /proc.
        self._holder_comm: dict[Endpoints, str] = {}
        # ... and the holders' cgroup paths (their container and pod).
        self._holder_cgroup: dict[Endpoints, str] = {}
        self.workloads = shared_workloads()
        self.api = (
            ApiServer(
                options.api_path,
                {"close_wait": self.close_wait_list, "time_wait": self.time_wait_list},
            )
            if options.api_path is not None
            else None
        )

    # -- start and stop --------------------------------------------------

    def start(self) -> None:
        if self.server is not None:
            # Probes for supervisors (systemd, Kubernetes): healthy while
            # serving, ready once the BPF program is attached.
            self.server.add_route("/-/healthy", lambda: (200, "text/plain", b"Healthy.\n"))
            self.server.add_route("/-/ready", self._readiness)
        ProcessCollector(registry=self.registry)
        self.registry.register(
            TcpTraceCollector(
                self.read,
                version=__version__,
                kernel=os.uname().release,
                port_labels=self.port_labels.labels if self.port_labels else lambda: (),
            )
        )
        if self.server is not None:
            self.server.start()  # a port in use fails here, before the kernel work
        try:
            self.tracer.start()
            # Attached: now the sockets that were there before (see the module doc).
            self.heal()
        except BaseException:
            if self.server is not None:
                self.server.shutdown()
            self.tracer.close()
            raise
        self._ready.set()
        if self.api is not None:
            try:
                self.api.start()
            except OSError as err:
                log.warning(
                    "no local API at %s (%s): closewait will show no ages", self.api.path, err
                )
                self.api = None

    def tracing(self) -> bool:
        """Whether the probes are attached and existing sockets counted: until
        then a scrape would be partial, and /metrics answers 503."""
        return self._ready.is_set()

    def _readiness(self) -> tuple[int, str, bytes]:
        if self._ready.is_set():
            return 200, "text/plain", b"Ready: tracing.\n"
        return 503, "text/plain", b"Not ready: loading the BPF program.\n"

    def _prepare(self, tracer: Tracer) -> None:
        """Before the probes attach: the owners of existing listeners (their
        children are born in softirq, where the current task is not theirs)."""
        tracer.seed_listeners(collect_listener_seeds())

    def heal(self) -> None:
        """Make the counted sockets what sock_diag lists (this namespace).

        Run once the probes are attached, then after any recorded loss. A
        socket the program follows but sock_diag no longer lists ended
        unseen: the program closes it (counted as end_unseen). A listed
        socket the program does not follow (older than tracing, or missed
        for a full map) is counted from this snapshot until the program sees
        it change state. Followed sockets are read before the snapshot for
        the first (all of them existed before it), after it for the second
        (a socket born meanwhile is in both: the program's count wins).
        """
        self._last_heal = time.monotonic()
        losses = self._losses()
        followed_before = self.tracer.followed()
        filters = self.tracer.options
        if not self._watching_old_timewait:
            # Before the snapshot: one of its timewait sockets may go right after it.
            self._watching_old_timewait = self.tracer.watch_old_timewait(True)
        try:
            snapshot = take_snapshot(self.netns, filters.ports, filters.family, filters.pid)
        except (UserError, OSError) as err:
            if self.preexisting is None:
                log.warning(
                    "no start-up snapshot (%s): sockets older than the exporter are not counted",
                    err,
                )
                self.preexisting = Preexisting([], time.time())
            return
        listed = snapshot.keys()
        netns = self.netns.to_bytes(4, "little")
        # With --pid the listing has only that process's sockets: not its
        # orphans or timewait sockets, which no process holds. Not a proof
        # of death, then.
        gone = [
            sock
            for sock in followed_before
            if filters.pid is None
            and sock.key[:4] == netns
            and sock.state in COUNTED
            and sock.key not in listed
        ]
        ended = self.tracer.end_gone(gone)
        snapshot.drop(sock.key for sock in self.tracer.followed())
        previous = self.preexisting
        if previous is not None:
            snapshot.keep_ages_from(previous)
            # Found now, not counted before: missed by the program (a loss).
            found = len(snapshot.keys() - previous.keys())
        else:
            found = 0
            log.info("start-up snapshot: %d existing sockets", len(snapshot))
        self.preexisting = snapshot
        if ended or found:
            log.info("gauges healed: %d sockets gone unseen, %d found unfollowed", ended, found)
        self._heal_due = bool(ended or found)
        self._losses_healed = losses
        if self.port_labels is not None:
            self._assign_port_slots(self._listening_ports())

    def _losses(self) -> int:
        counters = self.tracer.counters()
        return sum(
            value
            for name, value in counters.items()
            if name.startswith("lost_") or name in LOSS_COUNTERS
        )

    def close(self) -> None:
        self._ready.clear()
        if self.api is not None:
            self.api.close()
        if self.server is not None:
            self.server.shutdown()
        self.tracer.close()

    def serve_forever(self, stop: StopFlag) -> None:
        next_tick = time.monotonic()
        while not stop.stopped:
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                try:
                    self.tick()
                except Exception:  # housekeeping must not kill the daemon
                    log.exception("housekeeping failed")
            time.sleep(min(0.2, max(0.0, next_tick - time.monotonic())))

    # -- housekeeping ------------------------------------------------------

    def tick(self) -> None:
        self.tracer.sweep()
        if time.monotonic() - self._last_heal >= HEAL_INTERVAL_S and (
            self._heal_due or self._losses() != self._losses_healed
        ):
            self.heal()
        if self.preexisting is not None:
            self.preexisting.adopt(self.tracer.drain_adopted())
            self.preexisting.expire_timewait()
            if self._watching_old_timewait and not self.preexisting.has_timewait:
                # All gone: spare every timer cancel in the system the check.
                self.tracer.watch_old_timewait(False)
                self._watching_old_timewait = False
        if self.port_labels is not None:
            self._assign_port_slots(self._listening_ports())
        if time.monotonic() - self._last_holder_refresh >= HOLDER_REFRESH_S:
            self._last_holder_refresh = time.monotonic()
            self._refresh_holders()

    def _refresh_holders(self) -> None:
        """Name CLOSE_WAIT sockets after the program holding them (as ss -p).

        The kernel knows the owner it saw (the connect() caller, the
        listener's owner); the holder may differ (a worker it was passed to).
        Finding it means reading fd tables, which on a host with many sockets
        is costly and holds the GIL the scrapes need: so only sockets not
        named yet and no longer new are looked up (see holders_due), first
        in the fd table of the owner the kernel recorded, and every process
        is searched at most once a minute.
        """
        from . import procfs, sockdiag

        tracked = {endpoints(sock.key): sock for sock in self.tracer.close_wait_sockets()}
        old = self.preexisting.close_wait() if self.preexisting is not None else []
        old_keys = [endpoints(item.key) for item in old]
        current = set(tracked).union(old_keys)
        names = {key: comm for key, comm in self._holder_comm.items() if key in current}
        self._holder_comm = names
        cgroups = {key: path for key, path in self._holder_cgroup.items() if key in current}
        self._holder_cgroup = cgroups
        missing = holders_due(
            tracked, old_keys, names, time.monotonic_ns(), int(HOLDER_MIN_AGE_S * 1e9)
        )
        if not missing:
            return
        try:
            listed = sockdiag.snapshot(states=[TcpState.CLOSE_WAIT])
        except (UserError, OSError) as err:
            log.debug("CLOSE_WAIT holders not refreshed: %s", err)
            return
        inode_of = {
            (sock.family, sock.laddr, sock.lport, sock.raddr, sock.rport): sock.inode
            for sock in listed
            if sock.inode
        }
        wanted = {inode_of[key]: key for key in missing if key in inode_of}
        if not wanted:
            return
        known_owners = {pid for pid in missing.values() if pid}
        holders = procfs.socket_holders(wanted, pids=known_owners) if known_owners else {}
        now = time.monotonic()
        if len(holders) < len(wanted) and now - self._last_full_holder_scan >= FULL_HOLDER_SCAN_S:
            self._last_full_holder_scan = now
            holders = procfs.socket_holders(wanted)
        for inode, pids in holders.items():
            for pid in pids:
                info = procfs.process_info(pid)
                if info is not None:
                    names[wanted[inode]] = info.comm
                    cgroups[wanted[inode]] = info.cgroup
                    break

    def close_wait_list(self) -> list[dict[str, object]]:
        """Sockets in CLOSE_WAIT and when they entered it (the local API's answer)."""
        offset = time.time() - time.monotonic()
        result: list[dict[str, object]] = []
        for sock in self.tracer.close_wait_sockets():
            described = self._describe(
                sock.key, sock.since_ns / 1e9 + offset, False, sock.pid, sock.comm
            )
            described.update(self._workload_of(sock).to_json())
            result.append(described)
        if self.preexisting is not None:
            for old in self.preexisting.close_wait():
                described = self._describe(old.key, old.since, True, 0, old.comm)
                described.update(self._old_workload_of(old).to_json())
                result.append(described)
        return result

    def time_wait_list(self) -> list[dict[str, object]]:
        """Timewait sockets and the program that made each connection (local API)."""
        result: list[dict[str, object]] = []
        for key, comm, cgroup_id in self.tracer.timewait_owners():
            _family, laddr, lport, raddr, rport = endpoints(key)
            result.append(
                {
                    "netns": key[0],
                    "laddr": laddr,
                    "lport": lport,
                    "raddr": raddr,
                    "rport": rport,
                    "comm": comm,
                    **self.workloads.of_id(cgroup_id).to_json(),
                }
            )
        return result

    def _describe(
        self, key: TupleKey | bytes, since: float, lower_bound: bool, pid: int, comm: str
    ) -> dict[str, object]:
        family, laddr, lport, raddr, rport = endpoints(key)
        netns = TUPLE.unpack(key)[0] if isinstance(key, bytes) else key[0]
        return {
            "family": "ipv6" if family == socket.AF_INET6 else "ipv4",
            "laddr": laddr,
            "lport": lport,
            "raddr": raddr,
            "rport": rport,
            "netns": netns,
            "since": since,
            "lower_bound": lower_bound,
            "pid": pid,
            "comm": comm,
        }

    def _workload_of(self, sock: KernelCloseWait, key: Endpoints | None = None) -> Workload:
        """The container of the process holding it (from /proc), or else of the
        owner the kernel saw (its cgroup id). `key`: its endpoints, if known."""
        path = self._holder_cgroup.get(endpoints(sock.key) if key is None else key)
        if path:
            return self.workloads.of_path(path)
        return self.workloads.of_id(sock.cgroup_id)

    def _old_workload_of(self, old: OldCloseWait) -> Workload:
        path = self._holder_cgroup.get(endpoints(old.key)) or old.cgroup
        return self.workloads.of_path(path) if path else Workload()

    def _close_wait_owner(self, comm: str, since: float, workload: Workload) -> CloseWaitOwner:
        return CloseWaitOwner(
            comm=comm,
            since=since,
            namespace=workload.namespace,
            pod=workload.pod,
            container=workload.container,
        )

    def _listening_ports(self) -> list[int]:
        table = self.tracer.table("listeners")
        return [int(key.port) for key in table]

    def _assign_port_slots(self, ports: Sequence[int]) -> None:
        assert self.port_labels is not None
        added = self.port_labels.add(ports)
        if added:
            table = self.tracer.table("port_slots")
            for port, slot in added.items():
                table[table.Key(port)] = table.Leaf(slot)

    # -- scrape --------------------------------------------------------------

    def read(self) -> KernelReading:
        """What one scrape needs from the kernel (called from the HTTP threads)."""
        if not self._ready.is_set():
            raise NotReady
        arrays = self.tracer.metric_arrays()
        counters = self.tracer.counters()
        now = time.time()
        offset = now - time.monotonic()
        owners = []
        for sock in self.tracer.close_wait_sockets():
            key = endpoints(sock.key)  # formatted once per socket and scrape
            owners.append(
                self._close_wait_owner(
                    self._holder_comm.get(key, sock.comm),
                    sock.since_ns / 1e9 + offset,
                    self._workload_of(sock, key),
                )
            )
        extra: dict[int, int] = {}
        dests = self.tracer.dest_ports()
        if self.preexisting is not None:
            extra = self.preexisting.counts()
            owners.extend(
                self._close_wait_owner(
                    self._holder_comm.get(endpoints(old.key), old.comm) or "unknown",
                    old.since,
                    self._old_workload_of(old),
                )
                for old in self.preexisting.close_wait()
            )
            for dest, count in self.preexisting.dests().items():
                dests[dest] = dests.get(dest, 0) + count
        return KernelReading(
            arrays=arrays,
            counters=counters,
            sockets_extra=extra,
            close_wait=owners,
            ephemeral_ports=ephemeral_port_count(),
            ephemeral_ports_in_use_max=max(dests.values(), default=0),
            program_skips=self.tracer.program_skips(),
            now=now,
        )
