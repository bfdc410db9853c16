"""Run a loaded Tracer until a deadline, Ctrl-C or SIGTERM.

Shared by the commands that consume events. Signals only set a flag: the
loop notices within one poll interval, detaches cleanly and returns.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from types import FrameType

from .events import Decoder
from .probe import Tracer

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
