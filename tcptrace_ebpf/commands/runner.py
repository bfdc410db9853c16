"""Run a loaded Tracer until a deadline, Ctrl-C or SIGTERM, and summarise.

Shared by the commands that consume events (trace, lifecycles). Signals only
set a flag: the loop notices within one poll interval, detaches cleanly and
returns.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

from ..host.listeners import collect_listener_seeds
from ..host.workloads import shared as shared_workloads
from ..kernel.interface import LOSS_SUMMARY, NOTICED_SUMMARY
from ..kernel.probe import Tracer, TracerOptions
from ..model.events import Decoder
from ..model.owners import Workload
from .output import Output, notice

log = logging.getLogger(__name__)

POLL_MS = 50
TICK_S = 1.0


def clock_offset_ns() -> int:
    """Unix time minus CLOCK_MONOTONIC (the BPF clock), in nanoseconds."""
    before = time.monotonic_ns()
    unix = time.time_ns()
    after = time.monotonic_ns()
    return unix - (before + after) // 2


class StopFlag:
    """Set by SIGINT/SIGTERM; restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.stopped = False
        self._previous: dict[int, object] = {}
        # Called in the handler after the flag is set; may raise to abandon a
        # blocking call (a write to a stalled reader) that would otherwise
        # resume after the handler and keep the loop from seeing the flag.
        self.on_signal: Callable[[], None] | None = None

    def set(self) -> None:
        self.stopped = True

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.stopped = True
        if self.on_signal is not None:
            self.on_signal()

    def __enter__(self) -> StopFlag:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def run(
    tracer: Tracer,
    decoder: Decoder,
    duration_s: float | None,
    *,
    on_tick: Callable[[], None] | None = None,
    stop: StopFlag | None = None,
    after_poll: Callable[[], None] | None = None,
) -> None:
    """Poll events until the deadline or a signal; sweep timewait sockets each tick.

    `after_poll` runs after each batch of events (to flush output), `on_tick`
    about once a second.
    """
    deadline = None if duration_s is None else time.monotonic() + duration_s
    next_tick = time.monotonic() + TICK_S
    flag = stop or StopFlag()
    while not flag.stopped:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        timeout = (
            POLL_MS if deadline is None else max(0, min(POLL_MS, int((deadline - now) * 1000)))
        )
        tracer.poll(timeout)
        if after_poll is not None:
            after_poll()
        if time.monotonic() >= next_tick:
            next_tick += TICK_S
            decoder.clock_offset_ns = clock_offset_ns()
            tracer.sweep()
            if on_tick is not None:
                on_tick()
    # Take what is still in the buffer before detaching.
    tracer.poll(0)
    if after_poll is not None:
        after_poll()


def workload_filter(
    workload_of: Callable[[int], Workload], pod: str | None, container: str | None
) -> Callable[[int], bool] | None:
    """cgroup id -> whether --pod/--container want it; None without those filters."""
    if pod is None and container is None:
        return None
    return lambda cgroup_id: bool(workload_of(cgroup_id).matches(pod, container))


def describe_start(tracer: Tracer) -> str:
    parts = [f"{len(tracer.attached)} tracepoints"]
    if tracer.features is not None and not tracer.features.has("timewait"):
        parts.append("TIME_WAIT not measured on this kernel (see 'tcptrace-ebpf doctor')")
    return "tracing started (" + ", ".join(parts) + "); Ctrl-C to stop"


def lost_summary(counters: dict[str, int]) -> str:
    total = sum(counters.get(key, 0) for key in LOSS_SUMMARY)
    detail = ", ".join(
        f"{label}: {counters[key]}" for key, label in LOSS_SUMMARY.items() if counters.get(key)
    )
    return f"{total} lost" + (f" ({detail})" if detail else "")


def noticed_summary(counters: dict[str, int]) -> str:
    """The changes and ends the program never saw but noticed later, if any:
    the lifecycles they belong to say `events_lost`, whether or not a loss
    above explains them."""
    parts = [
        f"{counters[key]} {label}{'' if counters[key] == 1 else 's'}"
        for key, label in NOTICED_SUMMARY.items()
        if counters.get(key)
    ]
    return "; noticed later: " + ", ".join(parts) if parts else ""


def skipped_tcp_runs(program_skips: dict[str, int]) -> str:
    """The reset and retransmission programs' runs the kernel skipped, if any:
    a skipped one leaves a close kind or a SYN retransmission count short.
    (Timer programs' skips are left out: nearly all concern other timers.)"""
    skipped = {tp: n for tp, n in sorted(program_skips.items()) if tp.startswith("tcp:") and n}
    if not skipped:
        return ""
    detail = ", ".join(f"{tp}: {n}" for tp, n in skipped.items())
    return f"; runs skipped by the kernel ({detail})"


def seed_existing(tracer: Tracer) -> None:
    """Give the kernel program the owners of listeners that predate it."""
    seeded = tracer.seed_listeners(collect_listener_seeds())
    log.debug("seeded %d existing listening ports", seeded)


def run_event_command(
    options: TracerOptions,
    *,
    duration: float | None,
    make_handler: Callable[[Decoder], Callable[[bytes], None]],
    finish: Callable[[set[int]], str],
    out: Output,
) -> None:
    """Load the tracer, hand raw events to the handler `make_handler(decoder)`
    returns until stopped, then print a summary."""
    # Owners' cgroup ids name their container and pod in the JSON output.
    decoder = Decoder(clock_offset_ns(), shared_workloads().of_id)
    handle = make_handler(decoder)
    delivered = [0]

    def on_event(raw: bytes) -> None:
        delivered[0] += 1
        handle(raw)

    with StopFlag() as stop:
        out.on_failure = stop.set
        stop.on_signal = out.interrupt
        tracer = Tracer(options, on_event=on_event, prepare=seed_existing)
        try:
            tracer.start()
            notice(describe_start(tracer))
            run(
                tracer,
                decoder,
                duration,
                stop=stop,
                after_poll=out.flush,
                on_tick=out.watch_reader,
            )
            counters = tracer.counters()
            skipped = skipped_tcp_runs(tracer.program_skips())
            lost_socks = tracer.lost_sock_ids()
        finally:
            tracer.close()
    out.raise_failure()
    extra = finish(lost_socks)
    notice(
        f"stopped: {delivered[0]} events reported ({counters['events']} TCP state changes "
        f"seen on the host), {lost_summary(counters)}{noticed_summary(counters)}{skipped}"
        f"{extra}{out.stop_note()}"
    )
