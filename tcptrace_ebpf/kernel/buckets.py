"""Histogram bucket bounds, in seconds, shared by the BPF program and the exporter.

The BPF program computes the bucket index of each observation (a generated
``bucket_<name>()`` function per histogram) and the exporter turns the
per-bucket counts into cumulative Prometheus buckets with these bounds as
``le``. Bounds fit the quantity: loopback handshakes take microseconds,
TIME_WAIT lasts about 60 s (plus the timer wheel's slack), a leaked
CLOSE_WAIT can last days.
"""

from __future__ import annotations

from typing import Final

HANDSHAKE: Final = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

STATE: Final = (
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 62.0, 65.0, 120.0, 300.0, 900.0,
    3600.0, 14400.0, 86400.0,
)  # fmt: skip

CONNECTION: Final = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
    30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
)  # fmt: skip

# TIME_WAIT: early ends by reuse (about 1 s on loopback), the 60 s timer
# (fired at the next timer-wheel tick of its bucket, up to a few s late) and
# longer when the peer's retransmitted FIN restarts the timer.
TIME_WAIT: Final = (
    0.1, 0.5, 1.0, 1.5, 2.0, 5.0, 10.0, 30.0, 59.0, 60.0, 60.5, 61.0, 62.0,
    63.0, 65.0, 70.0, 90.0, 120.0, 300.0,
)  # fmt: skip

CLOSE_WAIT: Final = (
    0.001, 0.01, 0.1, 1.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
    86400.0, 604800.0,
)  # fmt: skip

#: name -> bounds, for every histogram the BPF program fills.
ALL: Final[dict[str, tuple[float, ...]]] = {
    "handshake": HANDSHAKE,
    "state": STATE,
    "connection": CONNECTION,
    "time_wait": TIME_WAIT,
    "close_wait": CLOSE_WAIT,
}


def bucket_index(bounds: tuple[float, ...], seconds: float) -> int:
    """Index of the bucket an observation falls in; len(bounds) is +Inf."""
    for index, bound in enumerate(bounds):
        if seconds <= bound:
            return index
    return len(bounds)


def c_bucket_function(name: str, bounds: tuple[float, ...]) -> str:
    """C source of ``bucket_<name>(u64 ns)`` and ``NB_<NAME>`` for the preamble."""
    lines = [f"#define NB_{name.upper()} {len(bounds)}"]
    lines.append(f"static __always_inline u32 bucket_{name}(u64 ns)")
    lines.append("{")
    for index, bound in enumerate(bounds):
        lines.append(f"\tif (ns <= {round(bound * 1e9)}ULL)\n\t\treturn {index};")
    lines.append(f"\treturn {len(bounds)};")
    lines.append("}")
    return "\n".join(lines)
