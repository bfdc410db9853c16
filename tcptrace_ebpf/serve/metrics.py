"""Prometheus metrics, built at scrape time from what the kernel aggregated.

The BPF program keeps counters and histograms in per-CPU arrays, one map per
metric, named after it (``state_transitions_total`` becomes
``tcptrace_state_transitions_total``). At each scrape `TcpTraceCollector`
reads them (through a `KernelReading`), decodes array indexes into labels,
adds what only user space knows (sockets that predate the exporter,
CLOSE_WAIT owners) and yields fresh metric families. No per-event work
happens in Python.

Building families from a `KernelReading` is pure, so it is tested without
root against a fresh CollectorRegistry.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..kernel import buckets
from ..kernel.bpfsys import ProgramRuns
from ..kernel.interface import (
    CLOSE_SLOTS,
    CONNECTION_CLOSES,
    LOST_CAUSES,
    METRIC_ARRAYS,
    METRIC_ROLES,
    STATE_SLOTS,
    TwEnd,
    histogram_row_size,
)
from ..model.states import TcpState

log = logging.getLogger(__name__)

PREFIX = "tcptrace_"

# Rows of the role-keyed arrays (metric_role() in the BPF program).
ROLES = tuple(role.name.lower() for role in METRIC_ROLES)
# Rows of time_wait_duration_seconds: enum tt_tw_end.
TW_ENDS = {end.value: end.name.lower() for end in TwEnd if end is not TwEnd.NONE}
# States a socket can be counted in (CLOSE is not a state one stays in).
GAUGE_STATES = tuple(
    state
    for state in TcpState
    if state not in (TcpState.CLOSE, TcpState.NEW_SYN_RECV, TcpState.BOUND_INACTIVE)
)
TOP_COMMS = 10  # CLOSE_WAIT gauges per program and container: the biggest ten, then "other"


class NotReady(Exception):
    """The kernel program is not attached yet: a scrape then has only self-metrics."""


@dataclass(frozen=True, slots=True)
class CloseWaitOwner:
    """A socket in CLOSE_WAIT as the metrics see it: who holds it, since when."""

    comm: str
    since: float  # unix seconds (a lower bound for sockets older than the exporter)
    # Its container on Kubernetes, with kube-state-metrics' label names ("" elsewhere).
    namespace: str = ""
    pod: str = ""
    container: str = ""


@dataclass
class KernelReading:
    """Everything one scrape reads from the kernel, plus user-space additions."""

    arrays: Mapping[str, Sequence[int]]  # per-CPU arrays summed over CPUs, by map name
    counters: dict[str, int]
    sockets_extra: dict[int, int] = field(
        default_factory=dict
    )  # state -> pre-existing, not yet seen
    close_wait: list[CloseWaitOwner] = field(default_factory=list)
    ephemeral_ports: int = 0
    ephemeral_ports_in_use_max: int = 0
    programs: Mapping[str, ProgramRuns] = field(default_factory=dict)  # by tracepoint
    now: float = 0.0


def _le(bound: float) -> str:
    return repr(float(bound))


def histogram_rows(
    name: str,
    *,
    documentation: str,
    labels: Sequence[str],
    bounds: Sequence[float],
    flat: Sequence[int],
    rows: Iterable[tuple[int, Sequence[str]]],
) -> HistogramMetricFamily:
    """A histogram family from a flat per-row array: for each row, one count
    per bucket (le = bound), one for +Inf, then the sum in nanoseconds.
    Rows that never saw an observation are left out."""
    family = HistogramMetricFamily(PREFIX + name, documentation, labels=list(labels))
    stride = histogram_row_size(len(bounds))
    for row, label_values in rows:
        base = row * stride
        counts = flat[base : base + len(bounds) + 1]
        if len(counts) < len(bounds) + 1:
            continue
        total = sum(counts)
        if total == 0:
            continue
        cumulative = list(itertools.accumulate(counts))
        series = [
            (_le(bound), float(value)) for bound, value in zip(bounds, cumulative, strict=False)
        ]
        series.append(("+Inf", float(total)))
        family.add_metric(list(label_values), series, flat[base + len(bounds) + 1] / 1e9)
    return family


def _role_port_rows(port_labels: Sequence[str]) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Rows of the role x port arrays, with their label values."""
    slots = max(1, len(port_labels))
    for role_index, role in enumerate(ROLES):
        for slot in range(slots):
            if port_labels:
                # Only the server role has a local listening port; clients get "".
                port = port_labels[slot] if role == "server" else ""
                if role != "server" and slot:
                    continue
                yield role_index * slots + slot, (role, port)
            else:
                yield role_index * slots + slot, (role,)


def build_families(reading: KernelReading, port_labels: Sequence[str] = ()) -> list[Metric]:
    """Every tcptrace_* family from one reading (pure)."""
    arrays = reading.arrays
    families: list[Metric] = []
    role_labels = ["role", "port"] if port_labels else ["role"]

    transitions = CounterMetricFamily(
        PREFIX + "state_transitions_total",
        "TCP state changes, by old and new state (TIME_WAIT as the connection lives it).",
        labels=["old_state", "new_state"],
    )
    for index, value in enumerate(arrays.get("state_transitions_total", ())):
        if value:
            old, new = divmod(index, STATE_SLOTS)
            transitions.add_metric([_state(old), _state(new)], value)
    families.append(transitions)

    sockets = GaugeMetricFamily(
        PREFIX + "sockets",
        "TCP sockets in each state now (TIME_WAIT included), counted since start-up.",
        labels=["state"],
    )
    counted = arrays.get("sockets", ())
    for state in GAUGE_STATES:
        value = counted[state] if state < len(counted) else 0
        value += reading.sockets_extra.get(int(state), 0)
        # Never clamped: a negative row is an error to see (and fix), not to hide.
        sockets.add_metric([state.name], value)
    families.append(sockets)

    families.append(
        histogram_rows(
            "state_duration_seconds",
            documentation="Time spent in a TCP state, observed when the state is left.",
            labels=["state"],
            bounds=buckets.STATE,
            flat=arrays.get("state_duration_seconds", ()),
            rows=((int(state), (state.name,)) for state in TcpState if state < STATE_SLOTS),
        )
    )
    families.append(
        histogram_rows(
            "handshake_duration_seconds",
            documentation="Handshake time: SYN_SENT to ESTABLISHED (client), "
            "SYN_RECV to ESTABLISHED (server).",
            labels=role_labels,
            bounds=buckets.HANDSHAKE,
            flat=arrays.get("handshake_duration_seconds", ()),
            rows=_role_port_rows(port_labels),
        )
    )
    families.append(
        histogram_rows(
            "connection_duration_seconds",
            documentation="Connection lifetime, from connect() or accept to close "
            "(TIME_WAIT not included).",
            labels=role_labels,
            bounds=buckets.CONNECTION,
            flat=arrays.get("connection_duration_seconds", ()),
            rows=_role_port_rows(port_labels),
        )
    )

    opened = CounterMetricFamily(
        PREFIX + "connections_opened_total",
        "Connections opened: connect() calls (client) and accepted children (server).",
        labels=role_labels,
    )
    opened_values = arrays.get("connections_opened_total", ())
    for row, label_values in _role_port_rows(port_labels):
        value = opened_values[row] if row < len(opened_values) else 0
        if value or label_values[0] != "unknown":
            opened.add_metric(list(label_values), value)
    families.append(opened)

    closed = CounterMetricFamily(
        PREFIX + "connections_closed_total",
        "Connections closed, by role and how they closed.",
        labels=[*role_labels, "close"],
    )
    closed_values = arrays.get("connections_closed_total", ())
    for row, label_values in _role_port_rows(port_labels):
        for close in CONNECTION_CLOSES:
            index = row * CLOSE_SLOTS + close
            value = closed_values[index] if index < len(closed_values) else 0
            if value or label_values[0] != "unknown":
                closed.add_metric([*label_values, close.name.lower()], value)
    families.append(closed)

    families.append(
        histogram_rows(
            "time_wait_duration_seconds",
            documentation="How long TIME_WAIT lasted, by how it ended: expired (60 s "
            "timer), reused (a new connection took the address pair) or killed (RST, "
            "ss -K, netns gone).",
            labels=["end"],
            bounds=buckets.TIME_WAIT,
            flat=arrays.get("time_wait_duration_seconds", ()),
            rows=((row, (end,)) for row, end in TW_ENDS.items()),
        )
    )
    families.append(
        histogram_rows(
            "close_wait_duration_seconds",
            documentation="How long sockets stayed in CLOSE_WAIT (peer closed, we had "
            "not), observed when they left it.",
            labels=[],
            bounds=buckets.CLOSE_WAIT,
            flat=arrays.get("close_wait_duration_seconds", ()),
            rows=[(0, ())],
        )
    )

    skipped = CounterMetricFamily(
        PREFIX + "time_wait_skipped_total",
        "Active closes for which the kernel created no TIME_WAIT socket "
        "(net.ipv4.tcp_max_tw_buckets reached).",
    )
    skipped.add_metric([], reading.counters.get("time_wait_skipped", 0))
    families.append(skipped)

    syn_retransmits = CounterMetricFamily(
        PREFIX + "syn_retransmits_total",
        "SYNs that connect() calls sent again, unanswered in time: dropped by a full "
        "accept queue or a firewall, or lost (kernel counter TCPSynRetrans, which also "
        "counts SYN-ACKs sent again).",
    )
    syn_retransmits.add_metric([], reading.counters.get("syn_retransmits", 0))
    families.append(syn_retransmits)

    families.append(
        GaugeMetricFamily(
            PREFIX + "ephemeral_ports",
            "Size of the ephemeral port range (net.ipv4.ip_local_port_range).",
            value=reading.ephemeral_ports,
        )
    )
    families.append(
        GaugeMetricFamily(
            PREFIX + "ephemeral_ports_in_use_max",
            "The most local ports in use towards one remote address and port (client "
            "sockets, TIME_WAIT included); connect() there fails once it reaches "
            "tcptrace_ephemeral_ports.",
            value=reading.ephemeral_ports_in_use_max,
        )
    )

    families.extend(close_wait_families(reading.close_wait, reading.now))

    events = CounterMetricFamily(
        PREFIX + "events_total", "TCP state changes the kernel program processed."
    )
    events.add_metric([], reading.counters.get("events", 0))
    families.append(events)
    lost = CounterMetricFamily(
        PREFIX + "lost_events_total",
        "Events or sockets the tracer could not record, by cause.",
        labels=["cause"],
    )
    for counter, cause in LOST_CAUSES.items():
        lost.add_metric([cause], reading.counters.get(counter, 0))
    families.append(lost)
    families.extend(program_families(reading.programs))
    return families


def program_families(programs: Mapping[str, ProgramRuns]) -> list[Metric]:
    """What the kernel counts of the tracer's own BPF programs: their cost,
    in the kernel, where it shows in no process's CPU time."""
    skipped = CounterMetricFamily(
        PREFIX + "program_skipped_runs_total",
        "Runs of the tracer's BPF programs the kernel skipped because another tracing "
        "program was running on that CPU, by tracepoint (most timer ones concern no socket).",
        labels=["tracepoint"],
    )
    runs = CounterMetricFamily(
        PREFIX + "program_runs_total",
        "Runs of the tracer's BPF programs, by tracepoint, counted only while the kernel's "
        "BPF statistics are on (sysctl kernel.bpf_stats_enabled=1).",
        labels=["tracepoint"],
    )
    seconds = CounterMetricFamily(
        PREFIX + "program_run_seconds_total",
        "Time the tracer's BPF programs ran in the kernel, by tracepoint, counted only while "
        "the kernel's BPF statistics are on (sysctl kernel.bpf_stats_enabled=1).",
        labels=["tracepoint"],
    )
    for tracepoint, counts in sorted(programs.items()):
        skipped.add_metric([tracepoint], counts.skipped)
        runs.add_metric([tracepoint], counts.runs)
        seconds.add_metric([tracepoint], counts.run_ns / 1e9)
    return [skipped, runs, seconds]


CLOSE_WAIT_LABELS = ["comm", "namespace", "pod", "container"]
OTHER_OWNER = ("other", "", "", "")


def close_wait_families(sockets: Sequence[CloseWaitOwner], now: float) -> list[Metric]:
    """CLOSE_WAIT sockets and their oldest age per program and container: the
    top ten, then "other" (so a node with many pods keeps ten series each)."""
    by_owner: dict[tuple[str, str, str, str], list[float]] = {}
    for sock in sockets:
        owner = (sock.comm or "unknown", sock.namespace, sock.pod, sock.container)
        by_owner.setdefault(owner, []).append(sock.since)
    ranked = sorted(by_owner.items(), key=lambda item: (-len(item[1]), item[0]))
    top, rest = ranked[:TOP_COMMS], ranked[TOP_COMMS:]
    if rest:
        top.append((OTHER_OWNER, [since for _, values in rest for since in values]))
    count = GaugeMetricFamily(
        PREFIX + "close_wait_sockets",
        "Sockets in CLOSE_WAIT (the peer closed, the program has not), per program "
        "and Kubernetes namespace, pod and container.",
        labels=CLOSE_WAIT_LABELS,
    )
    oldest = GaugeMetricFamily(
        PREFIX + "close_wait_oldest_seconds",
        "Age of the oldest CLOSE_WAIT socket per program and container (a lower bound "
        "for sockets older than the exporter).",
        labels=CLOSE_WAIT_LABELS,
    )
    for owner, since in top:
        count.add_metric(list(owner), len(since))
        oldest.add_metric(list(owner), max(0.0, now - min(since)))
    return [count, oldest]


@dataclass(frozen=True, slots=True)
class MetricInfo:
    name: str  # without the _bucket/_sum/_count of histograms
    type: str  # counter, gauge, histogram
    labels: frozenset[str]  # besides le


def catalog(port_label: bool = True) -> list[MetricInfo]:
    """Every tcptrace_* metric `serve` can export, with its type and labels:
    what dashboards and alerts may use. Built by the same code as a scrape,
    from a reading where everything is non-zero."""
    reading = KernelReading(
        arrays={name: [1] * 4096 for name in METRIC_ARRAYS},
        counters=dict.fromkeys([*LOST_CAUSES, "events", "time_wait_skipped", "syn_retransmits"], 1),
        close_wait=[CloseWaitOwner("comm", 0.0)],
        programs={"sock:inet_sock_set_state": ProgramRuns(runs=1, run_ns=1, skipped=1)},
        now=1.0,
    )
    collector = TcpTraceCollector(lambda: reading, "v", "k")
    families = [
        *build_families(reading, ("other", "80") if port_label else ()),
        *collector._self_families(),
    ]
    result = []
    for family in families:
        labels = {name for sample in family.samples for name in sample.labels} - {"le"}
        # prometheus_client keeps a counter family's name without its _total.
        name = family.name + "_total" if family.type == "counter" else family.name
        result.append(MetricInfo(name, family.type, frozenset(labels)))
    return result


def _state(value: int) -> str:
    try:
        return TcpState(value).name
    except ValueError:
        return f"UNKNOWN_{value}"


class TcpTraceCollector(Collector):
    """The exporter's collector: fresh families from the kernel at each scrape."""

    def __init__(
        self,
        read: Callable[[], KernelReading],
        version: str,
        kernel: str,
        port_labels: Callable[[], Sequence[str]] = lambda: (),
    ) -> None:
        self._read = read
        self._version = version
        self._kernel = kernel
        self._port_labels = port_labels
        self._errors = 0
        self._last_duration = 0.0
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        # Declared here so registering does not read the kernel.
        reading = KernelReading(arrays={}, counters={})
        yield from build_families(reading, self._port_labels())
        yield from self._self_families()

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        families: list[Metric] = []
        with self._lock:
            try:
                families = build_families(self._read(), self._port_labels())
            except NotReady:
                pass
            except Exception:
                self._errors += 1
                log.exception("scrape failed")
            self._last_duration = time.perf_counter() - started
            families.extend(self._self_families())
        yield from families

    def _self_families(self) -> list[Metric]:
        duration = GaugeMetricFamily(
            PREFIX + "scrape_duration_seconds",
            "Time the exporter took to read the kernel and build this scrape's metrics.",
            value=self._last_duration,
        )
        errors = CounterMetricFamily(
            PREFIX + "scrape_errors_total", "Scrapes that failed to read the kernel."
        )
        errors.add_metric([], self._errors)
        info = GaugeMetricFamily(
            PREFIX + "build_info",
            "tcptrace-ebpf version and the kernel it runs on.",
            labels=["version", "kernel"],
        )
        info.add_metric([self._version, self._kernel], 1)
        return [duration, errors, info]
