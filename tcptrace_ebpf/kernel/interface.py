"""The interface between the BPF program and Python, stated once.

Everything both sides must agree on is defined here: flags, enums (states,
roles, owner sources, close kinds, TIME_WAIT ends), the `counters` map's
indexes with their names and loss causes, slot counts, `struct tt_event` and
`struct tt_tuple`, and the histogram row layout. The constants header the
program includes (bpf/tcptrace_interface.h) is generated from this module
(`make interface`, as buckets.py generates the bucket functions); a test
regenerates it and checks that it is the one committed and that the ctypes
layouts below are what a C compiler makes of it. Structures only the
program uses (per-socket state, map values user space reads through the
layouts the compiler describes, see maps.py) stay in bpf/tcptrace.h.

The tracer also turns the kernel's address pair (`struct tt_tuple`,
`struct tt_dest`) into the one type the rest of the tool uses
(`model.addresses`): nothing past the tracer sees the kernel's form.
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

from ..model.addresses import AddressPair, Destination
from ..model.states import TcpState

HEADER_NAME: Final = "tcptrace_interface.h"

AF_INET: Final = socket.AF_INET
AF_INET6: Final = socket.AF_INET6
IPPROTO_TCP: Final = 6
COMM_LEN: Final = 16

# Arrays indexed by state have this many slots (states are < 16), so that an
# unknown future state cannot index out of range.
STATE_SLOTS: Final = 16


class Documented(enum.IntEnum):
    """An enum whose members carry the comment the C header gives them."""

    doc: str

    def __new__(cls, value: int, doc: str = "") -> Self:
        member = int.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        return member


class Role(Documented):
    UNKNOWN = 0, "first seen mid-life, before tracing started"
    CLIENT = 1, "active open: connect()"
    SERVER = 2, "child of a listener"
    LISTENER = 3


# Rows of the metric arrays keyed by role (metric_role() in the program):
# listeners have none.
METRIC_ROLES: Final = (Role.CLIENT, Role.SERVER, Role.UNKNOWN)


class OwnerSource(Documented):
    """How the owner (pid, comm, cgroup) of a socket was learned."""

    UNKNOWN = 0
    CONNECT = 1, "the process that called connect()"
    LISTEN = 2, "the process that called listen()"
    LISTENER = 3, "the owner of the listener that accepted it"
    CLOSER = 4, "the process that called close()/shutdown() on it"


class Close(Documented):
    """How a connection ended (close_kind() in the program decides)."""

    NONE = 0
    ACTIVE = 1, "we sent FIN first"
    PASSIVE = 2, "the peer's FIN came first (CLOSE_WAIT)"
    SIMULTANEOUS = 3, "both FINs crossed (CLOSING)"
    RESET_SENT = 4
    RESET_RECEIVED = 5
    REFUSED = 6, "our SYN was answered by RST"
    TIMEOUT = 7, "the peer stopped answering (SYN or data)"
    CONNECT_FAILED = 8, "connect() failed before sending a SYN"
    LISTENER_CLOSED = 9


CLOSE_SLOTS: Final = 10
# The close kinds of connections (rows of connections_closed_total): a
# listener's close is not one.
CONNECTION_CLOSES: Final = tuple(
    kind for kind in Close if Close.NONE < kind < Close.LISTENER_CLOSED
)


class TwEnd(Documented):
    """How TIME_WAIT (or a timewait socket still in FIN_WAIT2) ended."""

    NONE = 0
    EXPIRED = 1, "its timer fired"
    REUSED = 2, "a new connection took the same address pair"
    KILLED = 3, "removed early otherwise: RST, ss -K, netns gone"


TW_END_SLOTS: Final = 4


class EventFlag(Documented):
    """Flags carried by events (struct tt_event.flags). Not an IntFlag:
    `flags & EventFlag.LAST` stays a plain int, at C speed."""

    DURATION_KNOWN = 1 << 0, "duration_ns is the time spent in old_state"
    PREEXISTING = 1 << 1, "socket existed before tracing started"
    LOST_BEFORE = 1 << 2, "an earlier event of this lifecycle was lost"
    UNTRACKED = 1 << 3, "socket map full: no per-socket state"
    RESET_SENT = 1 << 4, "we sent a RST on this socket"
    RESET_RECEIVED = 1 << 5, "we received a RST on this socket"
    LAST = 1 << 6, "the lifecycle ended with this event"
    INFERRED_TIME = 1 << 7, "ts recovered from the timewait timer, not seen live"
    TIMEWAIT_SOCK = 1 << 8, "the kernel's timewait socket, not the full socket"
    NO_TIME_WAIT = 1 << 9, "closed actively but the kernel created no timewait socket"
    END_UNSEEN = (
        1 << 10,
        "it ended unseen (the kernel skipped our program): this event closes it when we noticed",
    )
    NO_SYN = 1 << 11, "SYN_SENT -> CLOSE before any SYN left: connect() failed"


# The names of flags in the JSON outputs (DURATION_KNOWN is told by duration_s).
EVENT_FLAG_NAMES: Final = {
    flag: "timewait_socket" if flag is EventFlag.TIMEWAIT_SOCK else flag.name.lower()
    for flag in EventFlag
    if flag is not EventFlag.DURATION_KNOWN
}

# In an `adopted` value: news of a timewait socket older than tracing.
ADOPT_OLD_TIMEWAIT: Final = 0x80

# Lifecycle ids (sock_id): a counter per CPU (the `next_sock_id` map), with
# the CPU in the low ID_CPU_BITS bits.
ID_CPU_BITS: Final = 12

# Timewait sockets the check_timewait program looks at per run (kernels with
# USE_TW_EHASH, where no program sees a timer cancelled): user space hands
# it that many addresses at a time, in the one entry of `tw_check`.
TW_CHECK_BATCH: Final = 1024


def born_by(sock_id: int, marks: Sequence[int]) -> bool:
    """Whether lifecycle `sock_id` began by the time `next_sock_id` read
    `marks` (one counter per CPU): a socket the program followed then."""
    cpu = sock_id & ((1 << ID_CPU_BITS) - 1)
    return cpu < len(marks) and sock_id >> ID_CPU_BITS <= marks[cpu]


@dataclass(frozen=True)
class Counter:
    """One slot of the `counters` map."""

    index: int
    c_name: str  # enum tt_counter member, without TT_C_
    name: str  # in Tracer.counters(), summaries and self-metrics
    doc: str
    lost_cause: str | None = None  # its cause label in tcptrace_lost_events_total
    summary: str | None = None  # how the stop summary names a loss of it
    # How the stop summary names one it noticed later: a change or an end the
    # program never saw, whatever the cause (a skipped run is counted as a
    # loss already; a change the kernel never gave the program is not).
    noticed: str | None = None


COUNTERS: Final = (
    Counter(0, "EVENTS", "events", "TCP state changes seen"),
    Counter(1, "LOST_RINGBUF", "lost_ringbuf", "events dropped: ring/perf buffer full",
            "ringbuf_full", "buffer full"),
    Counter(2, "LOST_SOCKET_MAP", "lost_socket_map", "sockets not tracked: socket map full",
            "socket_map_full", "socket map full"),
    Counter(3, "LOST_TIMEWAIT_MAP", "lost_timewait_map",
            "timewait sockets not tracked: map full", "timewait_map_full", "timewait map full"),
    Counter(4, "LOST_KILLED_MAP", "lost_killed_map",
            "cancelled timewait sockets not classified: map full", "killed_map_full",
            "killed-timewait map full"),
    Counter(5, "LOST_LISTENER_MAP", "lost_listener_map",
            "listeners whose owner was not recorded: map full", "listener_map_full",
            "listener map full"),
    Counter(6, "LOST_CLOSE_WAIT_MAP", "lost_close_wait_map",
            "CLOSE_WAIT sockets not tracked: map full", "close_wait_map_full",
            "close-wait map full"),
    Counter(7, "LOST_ADOPTED_MAP", "lost_adopted_map",
            "pre-existing sockets not reported: map full", "adopted_map_full",
            "adopted map full"),
    Counter(8, "TW_SKIPPED", "time_wait_skipped", "active closes that got no timewait socket"),
    Counter(9, "SOCKETS_BORN", "sockets_born", "lifecycles started (tracked or not)"),
    Counter(10, "LOST_DEST_MAP", "lost_dest_map",
            "client sockets not counted per destination: map full", "dest_map_full",
            "destination map full"),
    # A change whose old state was not the one recorded: one before it went unseen.
    Counter(11, "MISSED_TRANSITION", "missed_transitions",
            "a change's old state was not the one we recorded", "missed_transition",
            noticed="missed change"),
    # Sockets whose end went unseen, closed when noticed (a new socket in their
    # place, another timewait socket in a timewait socket's memory, one far
    # past its time, or gone from sock_diag).
    Counter(12, "MISSED_END", "missed_ends", "lifecycles whose end we never saw", "end_unseen",
            noticed="missed end"),
    Counter(13, "LOST_FIN_WAIT2_MAP", "lost_fin_wait2_map",
            "timewait sockets in FIN_WAIT2 not checked: map full", "fin_wait2_map_full",
            "FIN_WAIT2 check map full"),
    Counter(14, "SYN_RETRANS", "syn_retransmits",
            "SYNs sent again by connecting sockets we follow"),
)  # fmt: skip
COUNTER_SLOTS: Final = 16
COUNTER_NAMES: Final = {counter.index: counter.name for counter in COUNTERS}

# Not a slot of `counters`: state changes whose program run the kernel itself
# skipped (another tracing program was running on that CPU), read from the
# program's own statistics (Tracer.counters adds it).
KERNEL_SKIPPED: Final = "kernel_skipped"
# What could not be recorded, by counter name -> cause label (README "Nothing
# lost silently"), and how the stop summary names each loss.
LOST_CAUSES: Final = {
    **{c.name: c.lost_cause for c in COUNTERS if c.lost_cause is not None},
    KERNEL_SKIPPED: "kernel_skipped",
}
LOSS_SUMMARY: Final = {
    **{c.name: c.summary for c in COUNTERS if c.summary is not None},
    KERNEL_SKIPPED: "skipped by the kernel",
}
NOTICED_SUMMARY: Final = {c.name: c.noticed for c in COUNTERS if c.noticed is not None}

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


def histogram_row_size(bucket_count: int) -> int:
    """Entries per label row of a histogram array: one count per bucket
    (le = bound), one for +Inf, then the sum of observations in nanoseconds."""
    return bucket_count + 2


# -- structures ------------------------------------------------------------

# C type -> (ctypes type, struct format character)
_SCALARS: Final[dict[str, tuple[Any, str]]] = {
    "u8": (ctypes.c_uint8, "B"),
    "u16": (ctypes.c_uint16, "H"),
    "u32": (ctypes.c_uint32, "I"),
    "u64": (ctypes.c_uint64, "Q"),
    "char": (ctypes.c_char, "s"),
}


@dataclass(frozen=True)
class Field:
    name: str
    c_type: str  # u8, u16, u32, u64 or char
    doc: str = ""
    length: int = 0  # an array of this many; 0: a scalar
    length_macro: str = ""  # the array length as the C source names it

    def ctype(self) -> Any:
        scalar = _SCALARS[self.c_type][0]
        return scalar * self.length if self.length else scalar

    def struct_code(self) -> str:
        if self.length:
            return f"{self.length}s"
        return _SCALARS[self.c_type][1]

    def declaration(self) -> str:
        size = f"[{self.length_macro or self.length}]" if self.length else ""
        return f"{self.c_type} {self.name}{size};"


@dataclass(frozen=True)
class Struct:
    name: str  # C: struct <name>
    doc: str
    fields: tuple[Field, ...]

    def ctypes_type(self) -> type[ctypes.Structure]:
        return type(
            self.name, (ctypes.Structure,), {"_fields_": [(f.name, f.ctype()) for f in self.fields]}
        )

    @property
    def format(self) -> str:
        """struct module format: little-endian, no padding (the fields are
        naturally aligned, which the layout test checks)."""
        return "<" + "".join(f.struct_code() for f in self.fields)

    def declaration(self) -> str:
        lines = [f"/* {self.doc} */", f"struct {self.name} {{"]
        for f in self.fields:
            declaration = f.declaration()
            lines.append(f"\t{declaration}" + (f"\t/* {f.doc} */" if f.doc else ""))
        lines.append("};")
        return "\n".join(lines)


TT_EVENT: Final = Struct(
    "tt_event",
    "One TCP state change, sent to user space (trace and lifecycles modes).",
    (
        Field("ts_ns", "u64", "when the change happened"),
        Field("sock_id", "u64", "stable id of this socket's lifecycle (0: untracked)"),
        Field("skaddr", "u64", "kernel address of the full socket (reused after free)"),
        Field("duration_ns", "u64", "time spent in old_state (if TT_EVF_DURATION_KNOWN)"),
        Field("pid", "u32", "owner's tgid, 0 if unknown"),
        Field("flags", "u32", "TT_EVF_*"),
        Field("saddr", "u8", "local address (IPv4 in the first 4 bytes)", 16),
        Field("daddr", "u8", "remote address", 16),
        Field("sport", "u16", "local port"),
        Field("dport", "u16", "remote port"),
        Field("family", "u16", "TT_AF_INET or TT_AF_INET6"),
        Field("seq", "u16", "position of this event in its lifecycle: 0, 1, ..."),
        Field("old_state", "u8"),
        Field("new_state", "u8"),
        Field("role", "u8", "enum tt_role"),
        Field("owner_source", "u8", "enum tt_owner_source"),
        Field("tw_end", "u8", "enum tt_tw_end, on the event that ends a timewait socket"),
        Field("pad", "u8"),
        Field("syn_retrans", "u16", "SYN retransmissions seen"),
        Field("comm", "char", "owner's command", COMM_LEN, "TT_COMM_LEN"),
        Field("cgroup_id", "u64", "owner's cgroup v2 id (inode of its directory), 0 if unknown"),
    ),
)
TT_TUPLE: Final = Struct(
    "tt_tuple",
    "An address pair, as seen from the socket's own side.",
    (
        Field("netns", "u32", "network namespace inode number (0 if unknown)"),
        Field("family", "u16"),
        Field("sport", "u16"),
        Field("dport", "u16"),
        Field("pad", "u16"),
        Field("saddr", "u8", "", 16),
        Field("daddr", "u8", "", 16),
    ),
)
STRUCTS: Final = (TT_EVENT, TT_TUPLE)

EVENT_STRUCT: Final = struct.Struct(TT_EVENT.format)
EVENT_SIZE: Final = EVENT_STRUCT.size


# -- the kernel's address pair -----------------------------------------------


def address_text(family: int, raw: bytes) -> str:
    """A 16-byte address field as text (IPv4 in its first 4 bytes). A family
    the program could not read (a timewait socket's pair on a kernel without
    the BTF offsets for it) reads as IPv6: all zeros, "::"."""
    if family == AF_INET:
        return socket.inet_ntop(AF_INET, raw[:4])
    return socket.inet_ntop(AF_INET6, raw)


def pair_of_tuple(value: Any) -> AddressPair:
    """The address pair of a `struct tt_tuple` read from a map (ctypes)."""
    family = int(value.family)
    return AddressPair(
        int(value.netns),
        family,
        address_text(family, bytes(value.saddr)),
        int(value.sport),
        address_text(family, bytes(value.daddr)),
        int(value.dport),
    )


def destination_of(key: Any) -> Destination:
    """The destination of a `struct tt_dest` map key (ctypes)."""
    family = int(key.family)
    return Destination(
        int(key.netns), family, address_text(family, bytes(key.daddr)), int(key.dport)
    )


# -- the generated header ------------------------------------------------------


def _enum(name: str, doc: str, members: Iterable[tuple[str, int, str]]) -> str:
    lines = [f"/* {doc} */", f"enum {name} {{"]
    for member, value, comment in members:
        lines.append(f"\t{member} = {value}," + (f"\t/* {comment} */" if comment else ""))
    lines.append("};")
    return "\n".join(lines)


def _members(prefix: str, values: Sequence[enum.IntEnum]) -> list[tuple[str, int, str]]:
    return [(f"{prefix}{value.name}", int(value), getattr(value, "doc", "")) for value in values]


def c_header() -> str:
    """bpf/tcptrace_interface.h, as this module states it."""
    parts = [
        "/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */",
        "/*",
        " * Generated by `python -m tcptrace_ebpf.kernel.interface --write` from",
        " * tcptrace_ebpf/kernel/interface.py: do not edit (edit that module).",
        " * What the BPF program and user space must agree on; tcptrace.h includes it.",
        " */",
        "#ifndef TCPTRACE_INTERFACE_H",
        "#define TCPTRACE_INTERFACE_H",
        "",
        f"#define TT_AF_INET {AF_INET}",
        f"#define TT_AF_INET6 {AF_INET6}",
        f"#define TT_IPPROTO_TCP {IPPROTO_TCP}",
        f"#define TT_COMM_LEN {COMM_LEN}",
        "",
        _enum(
            "tt_tcp_state",
            "TCP states, numbered as in include/net/tcp_states.h.",
            _members("TT_", list(TcpState)),
        ),
        f"#define TT_STATE_SLOTS {STATE_SLOTS}",
        "",
        _enum("tt_role", "A socket's role.", _members("TT_ROLE_", list(Role))),
        "/* Metric arrays keyed by role have rows for "
        + ", ".join(role.name.lower() for role in METRIC_ROLES)
        + " (metric_role()). */",
        f"#define TT_METRIC_ROLES {len(METRIC_ROLES)}",
        "",
        _enum(
            "tt_owner_source",
            "How the owner (pid, comm, cgroup) of a socket was learned.",
            _members("TT_OWNER_", list(OwnerSource)),
        ),
        "",
        _enum("tt_close", "How a connection ended.", _members("TT_CLOSE_", list(Close))),
        f"#define TT_CLOSE_SLOTS {CLOSE_SLOTS}",
        "",
        _enum(
            "tt_tw_end",
            "How TIME_WAIT (or a timewait socket still in FIN_WAIT2) ended.",
            _members("TT_TW_END_", list(TwEnd)),
        ),
        f"#define TT_TW_END_SLOTS {TW_END_SLOTS}",
        "",
        "/* Flags carried by events (struct tt_event.flags). */",
        *(
            f"#define TT_EVF_{flag.name}\t(1u << {flag.bit_length() - 1})\t/* {flag.doc} */"
            for flag in EventFlag
        ),
        "",
        "/* In the `adopted` map's value: news of a timewait socket older than tracing. */",
        f"#define TT_ADOPT_OLD_TIMEWAIT 0x{ADOPT_OLD_TIMEWAIT:x}",
        "/* Lifecycle ids: a counter per CPU, the CPU in this many low bits. */",
        f"#define TT_ID_CPU_BITS {ID_CPU_BITS}",
        "/* Timewait sockets check_timewait looks at per run. */",
        f"#define TT_TW_CHECK_BATCH {TW_CHECK_BATCH}",
        "",
        _enum(
            "tt_counter",
            "Indexes of the `counters` map: self-metrics and lost events by cause.",
            ((f"TT_C_{c.c_name}", c.index, c.doc) for c in COUNTERS),
        ),
        f"#define TT_COUNTER_SLOTS {COUNTER_SLOTS}",
        "",
        "/* Entries per label row of a histogram array: one count per bucket (le =",
        " * bound), one for +Inf, then the sum of observations in nanoseconds. */",
        "#define HIST_ROW(nb) ((nb) + 2)",
        "",
        *(f"{s.declaration()}\n" for s in STRUCTS),
        "#endif /* TCPTRACE_INTERFACE_H */",
        "",
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print or write bpf/" + HEADER_NAME)
    parser.add_argument("--write", metavar="DIR", nargs="?", const="bpf", help="write it in DIR")
    args = parser.parse_args(argv)
    if args.write is None:
        print(c_header(), end="")
    else:
        (Path(args.write) / HEADER_NAME).write_text(c_header())


if __name__ == "__main__":
    main()
