"""What the running kernel offers: tracepoints, symbols, BTF offsets, HZ, headers.

`detect_features()` gathers everything the BPF program's preamble needs and
says, for each optional capability, whether it is there and if not why, so
the tracer degrades cleanly and `tcptrace-ebpf doctor` can explain.
"""

from __future__ import annotations

import gzip
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from .btf import Btf, BtfError
from .tracefs import TracepointFormat, find_tracefs, read_format

# Fields the tracer cannot work without.
SET_STATE_FIELDS = (
    "skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol",
    "saddr", "daddr", "saddr_v6", "daddr_v6",
)  # fmt: skip
ADDR_FIELDS = ("sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6")

TIMEWAIT_LEN_S = 60  # TCP_TIMEWAIT_LEN, a compile-time constant of the kernel


@dataclass(frozen=True, slots=True)
class Capability:
    name: str
    available: bool
    detail: str  # what it gives, or why it is missing and what that costs


@dataclass
class Features:
    release: str
    formats: dict[str, TracepointFormat] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    tw_timer_handler: int = 0
    hz: int = 0
    kfree_skb_rx_sk_arg: int = -1  # position of rx_sk among kfree_skb's raw arguments
    ehash_bucket_size: int = 0  # sizeof(struct inet_ehash_bucket); 0 if not known
    # BTF type id of typedef btf_trace_<tracepoint>, for tp_btf programs.
    btf_trace_ids: dict[str, int] = field(default_factory=dict)
    sk_head: tuple[int, int] = (0, 0)  # (start, length) of the one read of sock_common's head
    inet_head: tuple[int, int] = (0, 0)  # (start, length) of the one read of inet_sock's
    capabilities: dict[str, Capability] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        cap = self.capabilities.get(name)
        return cap is not None and cap.available

    def note(self, name: str, available: bool, detail: str) -> None:
        self.capabilities[name] = Capability(name, available, detail)

    def note_unless(self, name: str, reasons: list[str], good: str, bad: str) -> None:
        """Available when nothing stands in the way; else `bad` with the
        reasons, "; "-joined, in place of its "{}"."""
        self.note(name, not reasons, bad.format("; ".join(reasons)) if reasons else good)


def kernel_release() -> str:
    return os.uname().release


# The kernel symbols start-up looks for, found in one read of /proc/kallsyms
# (the kernel formats its 100,000-odd lines at every read: a read costs 60 ms
# here and about half a second under emulation).
KALLSYMS_WANTED = (
    "tw_timer_handler",  # its address: the timer function of a timewait socket
    "bpf_get_raw_tracepoint",  # raw tracepoints (4.17+; renamed in 5.x)
    "bpf_find_raw_tracepoint",
    "bpf_skc_to_tcp_sock",  # BTF-typed raw tracepoints' helper (5.9+)
    "bpf_ringbuf_output",  # the BPF ring buffer (5.8+)
    "bpf_prog_test_run_raw_tp",  # BPF_PROG_TEST_RUN on raw tracepoints (5.10+)
)


def kallsyms(symbols: tuple[str, ...], path: str = "/proc/kallsyms") -> dict[str, int]:
    """Which of `symbols` the kernel has, with their addresses, from one read.
    Present by name: the names are shown even where the addresses are hidden
    (kptr_restrict, not root), and then read 0. The first line of a name wins."""
    try:
        with open(path, "rb") as listing:
            text = listing.read()
    except OSError:
        return {}
    found: dict[str, int] = {}
    for symbol in symbols:
        # "<address> <type> <name>\n", or "<name>\t[<module>]\n": found by
        # byte search, not by splitting 200,000 lines in Python.
        name = symbol.encode()
        hits = [text.find(b" " + name + end) for end in (b"\n", b"\t")]
        hits = [hit for hit in hits if hit >= 0]
        if not hits:
            continue
        line_start = text.rfind(b"\n", 0, min(hits)) + 1
        address = text[line_start : text.find(b" ", line_start)]
        try:
            found[symbol] = int(address, 16)
        except ValueError:
            continue
    return found


def _config_value(text: str, key: str) -> str | None:
    match = re.search(rf"^{re.escape(key)}=(\S+)$", text, re.MULTILINE)
    return match.group(1) if match else None


def kernel_hz(release: str | None = None) -> int:
    """CONFIG_HZ of the running kernel: from its config, else measured.

    Measured by watching jiffies (the timestamp line of /proc/schedstat)
    advance against the monotonic clock, rounded to a usual HZ value.
    """
    release = release or kernel_release()
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
        value = _config_value(text, "CONFIG_HZ")
        if value and value.isdigit():
            return int(value)
    return _measure_hz()


def _schedstat_jiffies() -> int | None:
    try:
        with open("/proc/schedstat") as schedstat:
            for line in schedstat:
                if line.startswith("timestamp "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _measure_hz() -> int:
    first = _schedstat_jiffies()
    start = time.monotonic()
    if first is None:
        return 0
    time.sleep(0.2)
    second = _schedstat_jiffies()
    elapsed = time.monotonic() - start
    if second is None or elapsed <= 0:
        return 0
    rate = (second - first) / elapsed
    return min((100, 250, 300, 1000), key=lambda hz: abs(hz - rate))


def headers_dir(release: str | None = None) -> Path | None:
    """Where BCC will find kernel headers for this kernel, or None."""
    release = release or kernel_release()
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env and Path(env).is_dir():
        return Path(env)
    build = Path(f"/lib/modules/{release}/build")
    if build.is_dir():
        return build
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return Path("/sys/kernel/kheaders.tar.xz")
    return None


# BTF offsets the program may use, by macro name: (struct, member path).
BTF_OFFSETS = {
    "OFF_TW_TIMER": ("inet_timewait_sock", "tw_timer"),
    "OFF_TW_SUBSTATE": ("inet_timewait_sock", "tw_substate"),
    "OFF_TIMER_EXPIRES": ("timer_list", "expires"),
    "OFF_SKC_NET": ("sock_common", "skc_net"),
    "OFF_NET_NS_INUM": ("net", "ns.inum"),
    "OFF_TIMER_FUNCTION": ("timer_list", "function"),
    # What the raw inet_sock_set_state program reads from the socket itself.
    "OFF_SK_PROTOCOL": ("sock", "sk_protocol"),
    "OFF_SKC_DADDR": ("sock_common", "skc_daddr"),
    "OFF_SKC_DPORT": ("sock_common", "skc_dport"),
    "OFF_SKC_FAMILY": ("sock_common", "skc_family"),
    "OFF_INET_SADDR": ("inet_sock", "inet_saddr"),
    "OFF_INET_SPORT": ("inet_sock", "inet_sport"),
    "OFF_SKC_V6_DADDR": ("sock_common", "skc_v6_daddr"),
    "OFF_SKC_V6_RCV_SADDR": ("sock_common", "skc_v6_rcv_saddr"),
    # And what a timewait socket's address pair is read from (its sock_common).
    "OFF_SKC_NUM": ("sock_common", "skc_num"),
    "OFF_SKC_RCV_SADDR": ("sock_common", "skc_rcv_saddr"),
    # A server's SYN-ACK round trip, when its accepted socket becomes ESTABLISHED.
    "OFF_TCP_SRTT_US": ("tcp_sock", "srtt_us"),
    # Segments a socket sent: 0 at SYN_SENT -> CLOSE means connect() failed before its SYN.
    "OFF_TCP_SEGS_OUT": ("tcp_sock", "segs_out"),
    # The kernel's own count of a socket's retransmissions, raised where it
    # counts TCPSynRetrans: in SYN_SENT, the SYNs sent again.
    "OFF_TCP_TOTAL_RETRANS": ("tcp_sock", "total_retrans"),
    # Where a closing socket's timewait socket is found: the head of its
    # bucket of the connection table (see tw_in_ehash in bpf/time_wait.h).
    "OFF_SKC_HASH": ("sock_common", "skc_hash"),
    "OFF_SKC_STATE": ("sock_common", "skc_state"),
    "OFF_SKC_NULLS_NODE": ("sock_common", "skc_nulls_node"),
    "OFF_NET_TW_HASHINFO": ("net", "ipv4.tcp_death_row.hashinfo"),
    "OFF_HASHINFO_EHASH": ("inet_hashinfo", "ehash"),
    "OFF_HASHINFO_EHASH_MASK": ("inet_hashinfo", "ehash_mask"),
}
# Those, all needed to find a timewait socket in the connection table.
TW_EHASH_FIELDS = (
    "OFF_SKC_HASH", "OFF_SKC_STATE", "OFF_SKC_NULLS_NODE", "OFF_NET_TW_HASHINFO",
    "OFF_HASHINFO_EHASH", "OFF_HASHINFO_EHASH_MASK", "OFF_SKC_NET",
)  # fmt: skip
# The fields read from a timewait socket in one go, from the start of its
# sock_common (TW_HEAD_LEN bytes), by size.
TW_HEAD_FIELDS = {
    "OFF_SKC_DADDR": 4,
    "OFF_SKC_RCV_SADDR": 4,
    "OFF_SKC_HASH": 4,
    "OFF_SKC_DPORT": 2,
    "OFF_SKC_NUM": 2,
    "OFF_SKC_STATE": 1,
}
TW_HEAD_LEN = 24
# Raw tracepoints whose programs can be BTF-typed (tp_btf).
TP_BTF_TRACEPOINTS = (
    "inet_sock_set_state", "timer_start", "timer_cancel", "timer_expire_entry", "kfree_skb",
)  # fmt: skip
# Tracepoints whose programs can be raw besides set_state's and the timers',
# with the feature that says the tracepoint is there.
RAW_TCP_EVENTS = {
    "tcp_receive_reset": "reset_received",
    "tcp_send_reset": "reset_sent",
    "tcp_retransmit_skb": "syn_retrans",
}
# The sock_common fields a timewait socket's address pair is read from.
TW_TUPLE_FIELDS = (
    "OFF_SKC_FAMILY", "OFF_SKC_NUM", "OFF_SKC_DPORT", "OFF_SKC_RCV_SADDR", "OFF_SKC_DADDR",
    "OFF_SKC_V6_RCV_SADDR", "OFF_SKC_V6_DADDR",
)  # fmt: skip
# Sizes the raw set_state program assumes for those fields.
RAW_SET_STATE_SIZES = {
    "OFF_SK_PROTOCOL": 2,
    "OFF_SKC_DADDR": 4,
    "OFF_SKC_DPORT": 2,
    "OFF_SKC_FAMILY": 2,
    "OFF_INET_SADDR": 4,
    "OFF_INET_SPORT": 2,
    "OFF_SKC_V6_DADDR": 16,
    "OFF_SKC_V6_RCV_SADDR": 16,
}
# The fields read in one go from the head of sock_common, and from inet_sock.
# They are the ones the tracepoint's own TP_fast_assign reads: inet_sport and
# inet_saddr, not skc_num (zeroed by inet_put_port() before a CLOSE is traced).
SK_HEAD_FIELDS = ("OFF_SKC_DADDR", "OFF_SKC_DPORT", "OFF_SKC_FAMILY")
INET_HEAD_FIELDS = ("OFF_INET_SADDR", "OFF_INET_SPORT")


def _raw_sock_arg_problem(btf: Btf | None, tracepoint: str, otherwise: str) -> str | None:
    """None if raw tracepoint `tracepoint`'s first argument is its socket
    (struct sock *), as our raw program takes it; else why not."""
    try:
        if btf is not None and btf.raw_tracepoint_arg_index(tracepoint, "sock") == 0:
            return None
    except BtfError as err:
        return str(err)
    return otherwise


def _member_size(btf: Btf | None, features: Features, macro: str) -> int:
    """Size in bytes of the member BTF_OFFSETS[macro] names; 0 if not known."""
    if btf is None or macro not in features.offsets:
        return 0
    try:
        return btf.member_size(*BTF_OFFSETS[macro])
    except BtfError:
        return 0


def detect_features(btf_path: str = "/sys/kernel/btf/vmlinux") -> Features:
    """Inspect the running kernel. Needs tracefs mounted to see tracepoints."""
    features = Features(release=kernel_release())
    symbols = kallsyms(KALLSYMS_WANTED)
    root = find_tracefs()
    wanted = {
        "inet_sock_set_state": ("sock", "inet_sock_set_state"),
        "tcp_receive_reset": ("tcp", "tcp_receive_reset"),
        "tcp_send_reset": ("tcp", "tcp_send_reset"),
        "tcp_retransmit_skb": ("tcp", "tcp_retransmit_skb"),
        "timer_start": ("timer", "timer_start"),
        "timer_cancel": ("timer", "timer_cancel"),
        "timer_expire_entry": ("timer", "timer_expire_entry"),
        "kfree_skb": ("skb", "kfree_skb"),
    }
    if root is not None:
        for key, (category, event) in wanted.items():
            fmt = read_format(root, category, event)
            if fmt is not None:
                features.formats[key] = fmt

    set_state = features.formats.get("inet_sock_set_state")
    if set_state is None:
        why = "tracefs is not mounted" if root is None else "the kernel has no such tracepoint"
        features.note("set_state", False, f"sock:inet_sock_set_state unavailable: {why}")
    elif not set_state.has(*SET_STATE_FIELDS):
        missing = [name for name in SET_STATE_FIELDS if name not in set_state.fields]
        features.note(
            "set_state", False, f"sock:inet_sock_set_state lacks fields {', '.join(missing)}"
        )
    else:
        features.note("set_state", True, "sock:inet_sock_set_state: every TCP state change")

    recv = features.formats.get("tcp_receive_reset")
    features.note(
        "reset_received",
        recv is not None and recv.has("skaddr"),
        "tcp:tcp_receive_reset: tells resets received and refused connects"
        if recv is not None and recv.has("skaddr")
        else "no tcp:tcp_receive_reset with skaddr: a received RST reads as a timeout",
    )
    sent = features.formats.get("tcp_send_reset")
    features.note(
        "reset_sent",
        sent is not None and sent.has("skaddr"),
        "tcp:tcp_send_reset: tells resets sent"
        if sent is not None and sent.has("skaddr")
        else "no tcp:tcp_send_reset with skaddr: a sent RST reads as a timeout",
    )
    retrans = features.formats.get("tcp_retransmit_skb")
    retrans_ok = retrans is not None and retrans.has("skaddr", "state", *ADDR_FIELDS)
    features.note(
        "syn_retrans",
        retrans_ok,
        "tcp:tcp_retransmit_skb: counts SYN retransmissions"
        if retrans_ok
        else "no usable tcp:tcp_retransmit_skb: SYN retransmissions are not counted",
    )

    btf: Btf | None = None
    try:
        btf = Btf.load(btf_path)
    except BtfError as err:
        features.note("btf", False, f"no kernel BTF ({err}): no TIME_WAIT, no netns")
    else:
        features.note("btf", True, f"kernel BTF at {btf_path}")
    sizes_ok = True
    if btf is not None:
        for macro, (struct, member) in BTF_OFFSETS.items():
            try:
                features.offsets[macro] = btf.member_offset(struct, member)
                if macro in RAW_SET_STATE_SIZES:
                    size = btf.member_size(struct, member)
                    sizes_ok = sizes_ok and size == RAW_SET_STATE_SIZES[macro]
            except BtfError:
                continue

    features.note(
        "netns",
        "OFF_SKC_NET" in features.offsets and "OFF_NET_NS_INUM" in features.offsets,
        "network namespace of each socket (listener owners per namespace)"
        if "OFF_SKC_NET" in features.offsets and "OFF_NET_NS_INUM" in features.offsets
        else "no netns offsets in BTF: listener owners are matched by port only",
    )

    # tcp_sock fields read as u32, each the feature of its own.
    for name, macro, good, bad in (
        (
            "synack_rtt",
            "OFF_TCP_SRTT_US",
            "server handshakes from the SYN: the SYN-ACK round trip read from tcp_sock.srtt_us",
            "no 4-byte tcp_sock.srtt_us in BTF: server handshakes start at the client's "
            "last ACK (the accepted socket's birth)",
        ),
        (
            "segs_out",
            "OFF_TCP_SEGS_OUT",
            "connect() failing before its SYN told from a SYN timeout (tcp_sock.segs_out)",
            "no 4-byte tcp_sock.segs_out in BTF: a connect() that fails before its SYN "
            "from an explicitly bound port reads as a timeout",
        ),
        (
            "total_retrans",
            "OFF_TCP_TOTAL_RETRANS",
            "SYN retransmissions counted as the kernel counts them (tcp_sock.total_retrans)",
            "no 4-byte tcp_sock.total_retrans in BTF: SYN retransmissions counted per "
            "tcp:tcp_retransmit_skb event (since 6.18 also attempts given up before the SYN "
            "left, before 6.18 not a SYN whose transmission failed)",
        ),
    ):
        is_u32 = _member_size(btf, features, macro) == 4
        features.note(name, is_u32, good if is_u32 else bad)

    features.tw_timer_handler = symbols.get("tw_timer_handler", 0)
    timer_fmts = [features.formats.get(k) for k in ("timer_start", "timer_cancel")]
    expire_fmt = features.formats.get("timer_expire_entry")
    timers_ok = (
        all(f is not None and f.has("timer") for f in timer_fmts)
        and timer_fmts[0] is not None
        and timer_fmts[0].has("function")
        and expire_fmt is not None
        and expire_fmt.has("timer", "function")
    )
    reasons = []
    if not timers_ok:
        reasons.append("timer tracepoints missing")
    if "tw_timer_handler" not in symbols:
        reasons.append("symbol tw_timer_handler not in /proc/kallsyms")
    elif not features.tw_timer_handler:
        reasons.append(
            "the address of tw_timer_handler is hidden in /proc/kallsyms (kptr_restrict)"
        )
    if "OFF_TW_TIMER" not in features.offsets:
        reasons.append("no inet_timewait_sock.tw_timer in BTF")
    features.note_unless(
        "timewait",
        reasons,
        "TIME_WAIT followed through the timewait socket's timer",
        "TIME_WAIT not measured: {}",
    )
    features.note(
        "tw_substate",
        "OFF_TW_SUBSTATE" in features.offsets,
        "timewait substate: FIN_WAIT2 vs TIME_WAIT"
        if "OFF_TW_SUBSTATE" in features.offsets
        else "no tw_substate in BTF: FIN_WAIT2 timewait sockets read as TIME_WAIT",
    )
    features.hz = kernel_hz(features.release)
    features.note(
        "timer_expires",
        "OFF_TIMER_EXPIRES" in features.offsets and features.hz > 0,
        f"timer expiry in jiffies (HZ={features.hz}): when an unseen FIN began TIME_WAIT"
        if "OFF_TIMER_EXPIRES" in features.offsets and features.hz > 0
        else "no timer expiry offset or HZ: an unseen FIN is dated at the socket's end",
    )
    # Raw tracepoints (Linux 4.17+): the program gets the tracepoint's C
    # arguments. Cheaper, and not skipped when another BPF program runs on the
    # CPU, which matters for the timer ones (they fire for every kernel timer).
    raw = "bpf_get_raw_tracepoint" in symbols or "bpf_find_raw_tracepoint" in symbols
    features.note(
        "raw_timers",
        raw and "OFF_TIMER_FUNCTION" in features.offsets,
        "timer tracepoints attached raw (cheaper, never skipped for another program)"
        if raw and "OFF_TIMER_FUNCTION" in features.offsets
        else "timer tracepoints attached classic: the kernel may skip state changes that "
        "interrupt them",
    )
    if raw and btf is not None:
        try:
            features.kfree_skb_rx_sk_arg = btf.raw_tracepoint_arg_index("kfree_skb", "sock")
        except BtfError:
            features.kfree_skb_rx_sk_arg = -1
    kfree = features.formats.get("kfree_skb")
    if kfree is not None and kfree.has("rx_sk"):
        # Attached only for rx_sk (see kfree_rx_sk below): say how, or nothing.
        features.note(
            "raw_kfree",
            features.kfree_skb_rx_sk_arg >= 0,
            "skb:kfree_skb attached raw"
            if features.kfree_skb_rx_sk_arg >= 0
            else "skb:kfree_skb attached classic",
        )
    # The state-change program raw too, reading the socket's fields itself.
    reasons = []
    if not raw:
        reasons.append("no raw tracepoints")
    missing = [macro for macro in RAW_SET_STATE_SIZES if macro not in features.offsets]
    if missing:
        reasons.append("BTF lacks " + ", ".join(missing))
    elif not sizes_ok:
        reasons.append("unexpected field sizes in BTF")
    if not reasons:

        def span(fields: tuple[str, ...]) -> tuple[int, int]:
            start = min(features.offsets[macro] for macro in fields)
            end = max(features.offsets[macro] + RAW_SET_STATE_SIZES[macro] for macro in fields)
            return start, (end - start + 7) // 8 * 8

        features.sk_head = span(SK_HEAD_FIELDS)
        features.inet_head = span(INET_HEAD_FIELDS)
        if features.sk_head[1] > 64 or features.inet_head[1] > 64:
            reasons.append("the socket fields are not compact")
        problem = _raw_sock_arg_problem(
            btf, "inet_sock_set_state", "inet_sock_set_state's raw arguments are not (sk, old, new)"
        )
        if problem:
            reasons.append(problem)
    features.note_unless(
        "raw_set_state",
        reasons,
        "sock:inet_sock_set_state attached raw (several times cheaper per change)",
        "sock:inet_sock_set_state attached classic ({})",
    )
    # The reset and retransmit programs raw too: the kernel skips a classic
    # program on a CPU where another tracing program runs or a BPF map
    # syscall is under way. The retransmit one reads the address pair as the
    # raw set_state one does.
    reasons = []
    if not features.has("raw_set_state"):
        reasons.append("the raw state-change program is not usable")
    for name, feature in RAW_TCP_EVENTS.items():
        if not features.has(feature):
            continue
        problem = _raw_sock_arg_problem(btf, name, f"{name}'s first raw argument is not the socket")
        if problem:
            reasons.append(problem)
    features.note_unless(
        "raw_tcp_events",
        reasons,
        "tcp resets and retransmits attached raw (never skipped for another program)",
        "tcp reset and retransmit tracepoints attached classic ({})",
    )
    tw_tuple = features.has("timewait") and all(f in features.offsets for f in TW_TUPLE_FIELDS)
    features.note(
        "tw_tuple",
        tw_tuple,
        "timewait sockets' address pairs: those older than tracing are seen to go"
        if tw_tuple
        else "no sock_common offsets in BTF: timewait sockets older than tracing are "
        "counted until their timer's due time",
    )
    # BTF-typed raw tracepoints (tp_btf, Linux 5.5+): the verifier knows the
    # arguments' kernel types, so fields are plain loads instead of helper
    # calls. The set_state program also needs bpf_skc_to_tcp_sock() (5.9+)
    # to reach inet_sock's fields from its struct sock argument.
    if btf is not None and raw:
        found = btf.typedef_ids(f"btf_trace_{name}" for name in TP_BTF_TRACEPOINTS)
        features.btf_trace_ids = {
            name: found[f"btf_trace_{name}"]
            for name in TP_BTF_TRACEPOINTS
            if f"btf_trace_{name}" in found
        }
    reasons = []
    if not features.has("raw_set_state"):
        reasons.append("the raw state-change program is not usable")
    if "inet_sock_set_state" not in features.btf_trace_ids:
        reasons.append("no btf_trace_inet_sock_set_state in BTF")
    if "bpf_skc_to_tcp_sock" not in symbols:
        reasons.append("no bpf_skc_to_tcp_sock helper (Linux < 5.9)")
    features.note_unless(
        "tp_btf",
        reasons,
        "BTF-typed raw tracepoints: socket and timer fields read as plain loads",
        "no BTF-typed raw tracepoints ({})",
    )
    features.note(
        "kfree_rx_sk",
        kfree is not None and kfree.has("rx_sk"),
        "skb:kfree_skb rx_sk: the peer's FIN reaching a timewait socket, seen live"
        if kfree is not None and kfree.has("rx_sk")
        else "no skb:kfree_skb rx_sk (Linux < 6.11): such FINs are dated from the timer",
    )
    # A new timewait socket found where the kernel puts it, at the head of
    # its bucket of the connection table, when its full socket's CLOSE is
    # traced: then timer:timer_start, which runs for every timer on the host,
    # need not be hooked. Only with kfree_skb's rx_sk: that is what tells a
    # timewait socket's timer moved by a segment (its FIN) from one cancelled.
    if btf is not None:
        try:
            features.ehash_bucket_size = btf.struct_size("inet_ehash_bucket")
        except BtfError:
            features.ehash_bucket_size = 0
    reasons = []
    if not features.has("tw_tuple"):
        reasons.append("no timewait address pairs")
    if not features.has("kfree_rx_sk"):
        reasons.append("no skb:kfree_skb rx_sk (Linux < 6.11)")
    missing = [macro for macro in TW_EHASH_FIELDS if macro not in features.offsets]
    if missing:
        reasons.append("BTF lacks " + ", ".join(missing))
    if features.ehash_bucket_size != 8:
        reasons.append("no 8-byte struct inet_ehash_bucket in BTF")
    if not all(
        macro in features.offsets
        and features.offsets[macro] + size <= TW_HEAD_LEN
        and features.offsets[macro] % size == 0
        and _member_size(btf, features, macro) == size
        for macro, size in TW_HEAD_FIELDS.items()
    ):
        reasons.append(
            f"sock_common's state, hash, ports and addresses not in its first {TW_HEAD_LEN} bytes"
        )
    features.note_unless(
        "tw_ehash",
        reasons,
        "new timewait sockets found in the kernel's connection table at their socket's close: "
        "timer:timer_start, which runs for every timer on the host, is not hooked",
        "new timewait sockets seen through timer:timer_start, which runs for every timer "
        "on the host ({})",
    )
    # Probed by the kernel's own symbols, never by version: distributions
    # backport BPF features into older kernels (RHEL 8's 4.18, for one).
    features.note(
        "ringbuf",
        "bpf_ringbuf_output" in symbols,
        "BPF ring buffer: trace and lifecycles get events through one buffer shared by all CPUs"
        if "bpf_ringbuf_output" in symbols
        else "no BPF ring buffer (Linux < 5.8): trace and lifecycles get events through a "
        "perf buffer, one per CPU",
    )
    # User space finishes what the kernel holds (closes awaiting their RST,
    # cancelled timewait sockets awaiting a reuse) by running small programs
    # on demand: BPF_PROG_TEST_RUN on raw tracepoint programs.
    features.note(
        "sweepers",
        "bpf_prog_test_run_raw_tp" in symbols,
        "BPF_PROG_TEST_RUN on raw tracepoint programs: held closes and cancelled timewait "
        "sockets are finished in the kernel"
        if "bpf_prog_test_run_raw_tp" in symbols
        else "no BPF_PROG_TEST_RUN on raw tracepoint programs (Linux < 5.10): closes held for "
        "their RST and cancelled timewait sockets could never be finished",
    )
    return features


@dataclass(frozen=True, slots=True)
class KernelFeature:
    """A capability the program uses, with the upstream release that brought
    it: only to say which kernels lack what. Whether the running kernel has
    it is always probed (detect_features)."""

    capability: str
    since: tuple[int, int]
    what: str  # the kernel feature, as the README's "Kernels" table names it


# In the order kernels got them. Sources: the upstream commits named in the
# README's "Kernels" section.
KERNEL_FEATURES = (
    KernelFeature("set_state", (4, 16), "sock:inet_sock_set_state"),
    KernelFeature("btf", (5, 4), "kernel BTF (/sys/kernel/btf/vmlinux)"),
    KernelFeature("ringbuf", (5, 8), "BPF ring buffer"),
    KernelFeature("tp_btf", (5, 9), "BTF-typed tracepoints with bpf_skc_to_tcp_sock()"),
    KernelFeature("sweepers", (5, 10), "BPF_PROG_TEST_RUN on raw tracepoint programs"),
    KernelFeature("kfree_rx_sk", (6, 11), "skb:kfree_skb rx_sk"),
)
# What the tracer cannot run without: missing either, it refuses to start.
REQUIRED = ("set_state", "sweepers")
OLDEST_SUPPORTED = max(f.since for f in KERNEL_FEATURES if f.capability in REQUIRED)

# The kernel features, as the BPF program sees them: each C macro below is
# defined 1 in the program's preamble when the running kernel has every
# capability listed (as detect_features() found them; "!name": one it must
# lack), else 0. The program tests these macros (#if HAVE_TIMEWAIT), never a
# kernel version, and the loader picks its programs by the same rules
# (macro_on). HAVE_* say what the kernel offers; USE_* how a program is
# attached or reads what it needs; CHECK_* what it must look for itself.
# The options can turn two off as well (probe.build_source): USE_RINGBUF
# (--perf-buffer) and WATCH_OLD_TIMEWAIT (only with metrics, and only when
# BTF gives the offset of a timer's function).
FEATURE_MACROS: Final[dict[str, tuple[str, ...]]] = {
    "HAVE_RESET_RECEIVED": ("reset_received",),
    "HAVE_RESET_SENT": ("reset_sent",),
    "HAVE_SYN_RETRANS": ("syn_retrans",),
    "HAVE_NETNS": ("netns",),
    "HAVE_SYNACK_RTT": ("synack_rtt",),
    "HAVE_SEGS_OUT": ("segs_out",),
    "HAVE_TOTAL_RETRANS": ("total_retrans",),
    "HAVE_TIMEWAIT": ("timewait",),
    "HAVE_TW_SUBSTATE": ("timewait", "tw_substate"),
    "HAVE_TIMER_EXPIRES": ("timewait", "timer_expires"),
    "HAVE_KFREE_RX_SK": ("timewait", "kfree_rx_sk"),
    "HAVE_TW_TUPLE": ("tw_tuple",),
    "USE_RINGBUF": ("ringbuf",),
    "USE_TP_BTF": ("tp_btf",),
    "USE_RAW_TIMERS": ("raw_timers",),
    "USE_RAW_SET_STATE": ("raw_set_state",),
    # The reset and retransmit programs read the address pair as the raw
    # set_state program does.
    "USE_RAW_TCP_EVENTS": ("raw_set_state", "raw_tcp_events"),
    "USE_RAW_KFREE": ("raw_kfree",),
    # The peer's FIN reaching a timewait socket in FIN_WAIT2 is looked for
    # every second (sweep_fin_wait2) where kfree_skb has no rx_sk to show it
    # live (before 6.11).
    "CHECK_TW_FIN": ("timewait", "tw_substate", "tw_tuple", "!kfree_rx_sk"),
    "WATCH_OLD_TIMEWAIT": ("tw_tuple",),
    # A closing socket's timewait socket is looked up in the connection
    # table (tw_in_ehash) and timer:timer_start is not hooked: only where
    # kfree_skb's rx_sk tells a timer moved by a segment from one cancelled.
    "USE_TW_EHASH": ("timewait", "tw_tuple", "kfree_rx_sk", "tw_ehash"),
}


def macro_on(features: Features, macro: str) -> bool:
    """Whether the running kernel's features turn `macro` on (FEATURE_MACROS)."""
    return all(
        not features.has(name[1:]) if name.startswith("!") else features.has(name)
        for name in FEATURE_MACROS[macro]
    )


def release_series(release: str) -> tuple[int, int] | None:
    """(major, minor) of a kernel release string: "6.1.0-57-cloud-amd64" -> (6, 1)."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _series_text(series: tuple[int, int]) -> str:
    return f"{series[0]}.{series[1]}"


def unsupported_reason(features: Features) -> str | None:
    """One line saying why this kernel cannot be traced, or None if it can."""
    missing = [name for name in REQUIRED if not features.has(name)]
    if not missing:
        return None
    details = "; ".join(
        features.capabilities[name].detail if name in features.capabilities else name
        for name in missing
    )
    series = release_series(features.release)
    oldest = _series_text(OLDEST_SUPPORTED)
    if series is not None and series < OLDEST_SUPPORTED:
        return (
            f"kernel {features.release} is older than the oldest supported, Linux {oldest}, "
            f"and cannot be traced: {details}"
        )
    return f"kernel {features.release} cannot be traced: {details}"


def kernel_summary(features: Features) -> str:
    """One line: the running kernel's series against the README's table,
    from what was detected (what this kernel loses, or that it has all)."""
    series = release_series(features.release)
    name = f"kernel {features.release}" + (
        f" (series {_series_text(series)})" if series is not None else ""
    )
    lacking = [
        f"{feature.what} ({_series_text(feature.since)}+)"
        for feature in KERNEL_FEATURES
        if not features.has(feature.capability)
    ]
    if not lacking:
        return f"{name}: has every kernel feature the tracer uses"
    verdict = "cannot be traced" if unsupported_reason(features) else "degraded"
    return (
        f"{name}: {verdict}, lacks {', '.join(lacking)} (README, 'Kernels', says what each costs)"
    )
