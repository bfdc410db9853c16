"""TCP states as the Linux kernel numbers and names them (include/net/tcp_states.h).

Names are the kernel's without the ``TCP_`` prefix (``SYN_SENT``, ``TIME_WAIT``):
that is what the JSON output and the Prometheus labels use. ``SHORT_NAMES``
are the ones ``ss`` prints, used where a line must fit 80 columns.
"""

from __future__ import annotations

import enum


class TcpState(enum.IntEnum):
    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12
    BOUND_INACTIVE = 13


SHORT_NAMES: dict[TcpState, str] = {
    TcpState.ESTABLISHED: "ESTAB",
    TcpState.SYN_SENT: "SYN-SENT",
    TcpState.SYN_RECV: "SYN-RECV",
    TcpState.FIN_WAIT1: "FIN-WAIT-1",
    TcpState.FIN_WAIT2: "FIN-WAIT-2",
    TcpState.TIME_WAIT: "TIME-WAIT",
    TcpState.CLOSE: "CLOSE",
    TcpState.CLOSE_WAIT: "CLOSE-WAIT",
    TcpState.LAST_ACK: "LAST-ACK",
    TcpState.LISTEN: "LISTEN",
    TcpState.CLOSING: "CLOSING",
    TcpState.NEW_SYN_RECV: "NEW-SYN-RECV",
    TcpState.BOUND_INACTIVE: "BOUND-INACTIVE",
}


def state_name(value: int) -> str:
    """Kernel name of a state number, ``UNKNOWN_<n>`` for numbers we do not know."""
    try:
        return TcpState(value).name
    except ValueError:
        return f"UNKNOWN_{value}"


def short_name(value: int) -> str:
    try:
        return SHORT_NAMES[TcpState(value)]
    except ValueError:
        return f"?{value}"


def parse_state(name: str) -> TcpState:
    """Parse a state name as the kernel, ``ss`` or a user would write it."""
    key = name.strip().upper().replace("-", "_")
    if key.startswith("TCP_"):
        key = key[4:]
    aliases = {"ESTAB": "ESTABLISHED", "FIN_WAIT_1": "FIN_WAIT1", "FIN_WAIT_2": "FIN_WAIT2"}
    key = aliases.get(key, key)
    try:
        return TcpState[key]
    except KeyError:
        raise ValueError(f"unknown TCP state {name!r}") from None
