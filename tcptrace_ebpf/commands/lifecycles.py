"""`tcptrace-ebpf lifecycles`: each socket's whole life, once it ends."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TextIO

from ..host.workloads import shared as shared_workloads
from ..kernel.probe import TracerOptions
from ..model.events import Decoder
from ..model.lifecycle import Lifecycle, LifecycleEngine
from .output import Output
from .render import lifecycle_line
from .runner import run_event_command, workload_filter


def run_lifecycles(
    options: TracerOptions,
    *,
    as_json: bool,
    events_to: TextIO | None,
    duration: float | None,
    pod: str | None,
    container: str | None,
) -> None:
    out = Output()
    engine = LifecycleEngine()
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    workload_of = shared_workloads().of_id
    wanted = workload_filter(workload_of, pod, container)
    shown = (
        (lambda life: dumps(life.to_json(workload_of(life.cgroup_id))))
        if as_json
        else lifecycle_line
    )

    def write(life: Lifecycle) -> None:
        if wanted is None or wanted(life.cgroup_id):
            out.write(shown(life))

    def make_handler(decoder: Decoder) -> Callable[[bytes], None]:
        decode = decoder.decode

        def handle(raw: bytes) -> None:
            event = decode(raw)
            if events_to is not None:
                events_to.write(decoder.json_line(raw) + "\n")
            for life in engine.feed(event):
                write(life)

        return handle

    def finish(lost_socks: set[int]) -> str:
        still_open = engine.flush(lost_socks)
        for life in still_open:
            write(life)
        out.flush()
        stats = engine.stats
        return f"; {stats.lifecycles} lifecycles, {len(still_open)} still open" + (
            f", {stats.evicted} evicted" if stats.evicted else ""
        )

    run_event_command(options, duration=duration, make_handler=make_handler, finish=finish, out=out)
