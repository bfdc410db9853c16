"""Metric families built from a `KernelReading`: pure logic, a fresh registry, no root."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tcptrace_ebpf.kernel.bpfsys import ProgramRuns
from tcptrace_ebpf.serve.metrics import KernelReading, TcpTraceCollector


def test_the_programs_own_runs_time_and_skips_are_exported_by_tracepoint() -> None:
    reading = KernelReading(
        arrays={},
        counters={},
        programs={
            "sock:inet_sock_set_state": ProgramRuns(runs=1000, run_ns=466_000, skipped=3),
            "timer:timer_start": ProgramRuns(runs=9000, run_ns=531_000, skipped=0),
        },
    )
    registry = CollectorRegistry()
    registry.register(TcpTraceCollector(lambda: reading, "v", "k"))

    def sample(name: str, tracepoint: str) -> float | None:
        return registry.get_sample_value(name, {"tracepoint": tracepoint})

    state, timer = "sock:inet_sock_set_state", "timer:timer_start"
    assert sample("tcptrace_program_runs_total", state) == 1000
    assert sample("tcptrace_program_runs_total", timer) == 9000
    # Base units: nanoseconds become seconds.
    assert sample("tcptrace_program_run_seconds_total", state) == 466e-6
    assert sample("tcptrace_program_run_seconds_total", timer) == 531e-6
    assert sample("tcptrace_program_skipped_runs_total", state) == 3
    assert sample("tcptrace_program_skipped_runs_total", timer) == 0


def test_no_program_attached_exports_no_program_series() -> None:
    registry = CollectorRegistry()
    registry.register(TcpTraceCollector(lambda: KernelReading(arrays={}, counters={}), "v", "k"))
    names = {sample.name for family in registry.collect() for sample in family.samples}
    assert not {n for n in names if n.startswith("tcptrace_program_")}
    assert "tcptrace_events_total" in names
