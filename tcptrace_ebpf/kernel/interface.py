"""The interface between the BPF program (bpf/tcptrace.h) and Python.

Map keys and values are read through ctypes types built from the layouts the
compiler described (maps.py); what they mean is stated here: counter indexes
and names, the per-CPU metric arrays, and the conversion of the kernel's
address pair (`struct tt_tuple`, `struct tt_dest`) into the one type the rest
of the tool uses (`model.addresses`). Nothing past the tracer sees the
kernel's form of an address.
"""

from __future__ import annotations

import socket
from typing import Any, Final

from ..model.addresses import AddressPair, Destination

# struct tt_counter indexes -> names used in metrics and summaries.
COUNTER_NAMES: Final = {
    0: "events",
    1: "lost_ringbuf",
    2: "lost_socket_map",
    3: "lost_timewait_map",
    4: "lost_killed_map",
    5: "lost_listener_map",
    6: "lost_close_wait_map",
    7: "lost_adopted_map",
    8: "time_wait_skipped",
    9: "sockets_born",
    10: "lost_dest_map",
    11: "missed_transitions",
    12: "missed_ends",
}

# The per-CPU arrays a scrape reads, each named after its metric (tcptrace_<name>).
METRIC_ARRAYS: Final = (
    "state_transitions_total",
    "sockets",
    "state_duration_seconds",
    "handshake_duration_seconds",
    "connection_duration_seconds",
    "connections_opened_total",
    "connections_closed_total",
    "time_wait_duration_seconds",
    "close_wait_duration_seconds",
)

# In an `adopted` value: news of a timewait socket (TT_ADOPT_OLD_TIMEWAIT).
ADOPT_OLD_TIMEWAIT: Final = 0x80

_ADDRESS_SIZE: Final[dict[int, int]] = {socket.AF_INET: 4, socket.AF_INET6: 16}


def _text(family: int, raw: bytes) -> str:
    """An address as text; "" where the program could not read the family (a
    timewait socket's pair on a kernel without the BTF offsets for it)."""
    size = _ADDRESS_SIZE.get(family)
    return socket.inet_ntop(family, raw[:size]) if size else ""


def pair_of_tuple(value: Any) -> AddressPair:
    """The address pair of a `struct tt_tuple` read from a map (ctypes)."""
    family = int(value.family)
    return AddressPair(
        int(value.netns),
        family,
        _text(family, bytes(value.saddr)),
        int(value.sport),
        _text(family, bytes(value.daddr)),
        int(value.dport),
    )


def destination_of(key: Any) -> Destination:
    """The destination of a `struct tt_dest` map key (ctypes)."""
    family = int(key.family)
    return Destination(int(key.netns), family, _text(family, bytes(key.daddr)), int(key.dport))
