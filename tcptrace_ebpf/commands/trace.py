"""`tcptrace-ebpf trace`: every TCP state change, one line (or JSON object) each."""

from __future__ import annotations

from collections.abc import Callable

from ..host.workloads import shared as shared_workloads
from ..kernel.probe import TracerOptions
from ..model.events import Decoder
from .output import Output
from .render import trace_line
from .runner import run_event_command, workload_filter


def run_trace(
    options: TracerOptions,
    *,
    as_json: bool,
    duration: float | None,
    pod: str | None,
    container: str | None,
) -> None:
    out = Output()

    def make_handler(decoder: Decoder) -> Callable[[bytes], None]:
        decode = decoder.decode
        wanted = workload_filter(shared_workloads().of_id, pod, container)
        if as_json:
            json_line = decoder.json_line
            if wanted is None:
                return lambda raw: out.write(json_line(raw))

            def write_json(raw: bytes) -> None:
                if wanted(decode(raw).cgroup_id):
                    out.write(json_line(raw))

            return write_json
        if wanted is None:
            return lambda raw: out.write(trace_line(decode(raw)))

        def write_line(raw: bytes) -> None:
            event = decode(raw)
            if wanted(event.cgroup_id):
                out.write(trace_line(event))

        return write_line

    def finish(_lost_socks: set[int]) -> str:
        out.flush()
        return ""

    run_event_command(options, duration=duration, make_handler=make_handler, finish=finish, out=out)
