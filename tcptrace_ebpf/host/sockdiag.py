"""Snapshot of the kernel's TCP sockets through netlink sock_diag (what ``ss -tan`` reads).

The tracer calls this at start-up to learn the sockets that existed before its
BPF program was attached, and the CLOSE_WAIT-leak finder calls it to list
CLOSE_WAIT sockets. Netlink is spoken through pyroute2.

Points worth knowing:

* The state filter is a bitmask the kernel applies while walking its hash
  tables, so asking for CLOSE_WAIT on a host with 100k sockets only costs the
  CLOSE_WAIT ones.
* Timewait sockets (the small ``inet_timewait_sock`` that replaces a full
  socket after close) are included; the kernel reports them with their
  substate (TIME_WAIT, or FIN_WAIT2 for an orphaned FIN_WAIT2 socket), timer 3,
  inode 0, uid 0 and empty queues.
* Pending connection requests (request socks) are reported by the kernel as
  SYN_RECV; asking for SYN_RECV or NEW_SYN_RECV returns them.
* Sockets that are bound but neither listening nor connecting are reported as
  CLOSE; asking for CLOSE or BOUND_INACTIVE returns them (``ss -a`` shows
  them as UNCONN).
* sock_diag sees the network namespace of the calling process only.
* pyroute2 runs a private asyncio event loop for each request, so these
  functions must not be called from a thread that is running an event loop.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.diag import (
    SOCK_DIAG_BY_FAMILY,
    MarshalDiag,
    inet_diag_msg,
    inet_diag_req,
)
from pyroute2.netlink.diag import DiagSocket as NetlinkDiagSocket
from pyroute2.netlink.exceptions import NetlinkError

from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.model.states import TcpState

__all__ = [
    "ALL_STATES_MASK",
    "DiagSocket",
    "count_by_state",
    "snapshot",
    "state_mask",
]

#: idiag_timer value the kernel gives every timewait socket (tcp_twsk_diag_fill);
#: full sockets report 0 (none), 1 (retransmit), 2 (keepalive) or 4 (zero-window probe).
TIMEWAIT_TIMER = 3

#: Every state bit sock_diag understands: all kernel TCP states plus the
#: BOUND_INACTIVE pseudo-state, like ``ss -a``.
ALL_STATES_MASK = sum(1 << state for state in TcpState)

_NLMSG_ERROR = 2
_SUPPORTED_FAMILIES = (socket.AF_INET, socket.AF_INET6)


@dataclass(frozen=True, slots=True)
class DiagSocket:
    """One TCP socket as sock_diag reports it."""

    family: int
    """socket.AF_INET or socket.AF_INET6."""
    state: int
    """Kernel TCP state number; for timewait sockets the substate (TIME_WAIT or
    FIN_WAIT2), as ss shows it."""
    laddr: str
    """Local address as text; IPv4-mapped IPv6 addresses stay ``::ffff:a.b.c.d``."""
    lport: int
    raddr: str
    rport: int
    inode: int
    """Socket inode (``socket:[inode]`` in /proc/PID/fd); 0 for timewait sockets,
    request socks and full sockets no process holds any more (orphans)."""
    uid: int
    """Owner of the socket; 0 (meaning unknown, not root) for timewait sockets and request socks."""
    recv_q: int
    """Bytes received and not yet read; for LISTEN the accept-queue length."""
    send_q: int
    """Bytes sent and not yet acknowledged; for LISTEN the accept-queue limit."""
    timer: int
    """idiag_timer: 0 none, 1 retransmit, 2 keepalive, 3 TIME_WAIT, 4 zero-window probe."""
    expires_ms: int
    """Milliseconds until that timer fires."""
    cookie: int
    """The kernel's 64-bit socket cookie (the one BPF gets from bpf_get_socket_cookie)."""
    is_timewait: bool
    """A kernel timewait socket rather than a full socket."""


class _SocketMessage(inet_diag_msg):  # type: ignore[misc]  # pyroute2 is untyped
    # No attribute table: we use none of the attributes (shutdown, mark,
    # cgroup id, ...) and decoding them is over half of pyroute2's per-socket cost.
    nla_map = ()


class _StateMessage(nlmsg):  # type: ignore[misc]  # pyroute2 is untyped
    # Only the leading bytes of struct inet_diag_msg: counting needs the state alone.
    fields = (("idiag_family", "B"), ("idiag_state", "B"))


class _SocketMarshal(MarshalDiag):  # type: ignore[misc]  # pyroute2 is untyped
    msg_map: ClassVar[dict[int, type]] = dict.fromkeys(_SUPPORTED_FAMILIES, _SocketMessage)


class _StateMarshal(MarshalDiag):  # type: ignore[misc]  # pyroute2 is untyped
    msg_map: ClassVar[dict[int, type]] = dict.fromkeys(_SUPPORTED_FAMILIES, _StateMessage)


def state_mask(states: Iterable[int] | None) -> int:
    """The idiag_states bitmask that asks the kernel for ``states`` (None: all).

    Raises ValueError for a number that is no TcpState.
    """
    if states is None:
        return ALL_STATES_MASK
    mask = 0
    for number in states:
        state = TcpState(number)
        mask |= 1 << state
        if state is TcpState.CLOSE:
            # No full socket in CLOSE stays in the kernel's lookup tables; the
            # CLOSE sockets sock_diag can report are the bound-but-inactive
            # ones, which it only walks for the BOUND_INACTIVE bit.
            mask |= 1 << TcpState.BOUND_INACTIVE
    return mask


def snapshot(
    states: Iterable[int] | None = None,
    families: Iterable[int] = (socket.AF_INET, socket.AF_INET6),
) -> list[DiagSocket]:
    """TCP sockets of this network namespace in ``states`` (None: all states).

    Costs about 20 us per socket returned (pyroute2 decoding; ss needs 2 us),
    and next to nothing per socket the state filter leaves out.

    Raises UserError when sock_diag cannot be used, ValueError for an unknown
    state number or a family other than AF_INET / AF_INET6.
    """
    mask = state_mask(states)
    wanted_families = _checked_families(families)
    sockets: list[DiagSocket] = []
    with _open_diag_socket(_SocketMarshal()) as diag:
        for family in wanted_families:
            sockets.extend(_diag_socket(message) for message in _dump(diag, family, mask))
    return sockets


def count_by_state(
    states: Iterable[int] | None = None,
    families: Iterable[int] = (socket.AF_INET, socket.AF_INET6),
) -> dict[int, int]:
    """Number of TCP sockets per state (numbered as DiagSocket.state); zero counts are left out.

    Same query as snapshot() but decodes only the state byte of each socket,
    which makes it about twice as fast.
    """
    mask = state_mask(states)
    wanted_families = _checked_families(families)
    counts: Counter[int] = Counter()
    with _open_diag_socket(_StateMarshal()) as diag:
        for family in wanted_families:
            counts.update(message["idiag_state"] for message in _dump(diag, family, mask))
    return dict(counts)


def _checked_families(families: Iterable[int]) -> list[int]:
    checked = list(dict.fromkeys(families))
    for family in checked:
        if family not in _SUPPORTED_FAMILIES:
            raise ValueError(f"address family {family} is not AF_INET or AF_INET6")
    return checked


def _open_diag_socket(marshal: Any) -> Any:
    try:
        diag = NetlinkDiagSocket()
    except OSError as err:
        raise UserError(_open_error_message(err)) from err
    try:
        diag.set_marshal(marshal)
        diag.bind()
    except (OSError, NetlinkError) as err:
        diag.close()
        raise UserError(f"cannot bind the netlink sock_diag socket: {_strerror(err)}") from err
    return diag


def _dump(diag: Any, family: int, mask: int) -> list[Any]:
    request = inet_diag_req()
    request["header"]["type"] = SOCK_DIAG_BY_FAMILY
    request["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    request["sdiag_family"] = family
    request["sdiag_protocol"] = socket.IPPROTO_TCP
    request["idiag_ext"] = 0  # no tcp_info / meminfo: we do not read them
    request["idiag_states"] = mask
    # nlm_request_batch collects the whole dump inside one run of pyroute2's
    # event loop; nlm_request() would run the loop once per socket (2x slower).
    try:
        messages: list[Any] = diag.nlm_request_batch([request])
    except (OSError, NetlinkError) as err:
        raise UserError(_dump_error_message(family, _errno(err))) from err
    sockets = []
    for message in messages:
        # MarshalDiag picks message classes by address family, not by netlink
        # type, so pyroute2 does not recognise an error reply: look for it here.
        if message["header"]["type"] == _NLMSG_ERROR:
            (negative_errno,) = struct.unpack_from("i", message.data, message.offset + 16)
            if negative_errno:
                raise UserError(_dump_error_message(family, -negative_errno))
            continue  # an acknowledgement, not a socket
        sockets.append(message)
    return sockets


def _diag_socket(message: Any) -> DiagSocket:
    timer = message["idiag_timer"]
    inode = message["idiag_inode"]
    return DiagSocket(
        family=message["idiag_family"],
        state=message["idiag_state"],
        laddr=message["idiag_src"],
        lport=message["idiag_sport"],
        raddr=message["idiag_dst"],
        rport=message["idiag_dport"],
        inode=inode,
        uid=message["idiag_uid"],
        recv_q=message["idiag_rqueue"],
        send_q=message["idiag_wqueue"],
        timer=timer,
        expires_ms=message["idiag_expires"],
        cookie=_cookie(message["idiag_cookie"]),
        is_timewait=timer == TIMEWAIT_TIMER and inode == 0,
    )


def _cookie(raw: int) -> int:
    # The kernel sends idiag_cookie as two host-order u32 words, low word
    # first; pyroute2 reads them as one native-order u64, which is the cookie
    # on little-endian hosts and has its halves swapped on big-endian ones.
    if sys.byteorder == "little":
        return raw
    return ((raw & 0xFFFFFFFF) << 32) | (raw >> 32)


def _errno(err: BaseException) -> int:
    if isinstance(err, NetlinkError):
        return int(err.code)
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    return errno.EIO


def _strerror(err: BaseException) -> str:
    return os.strerror(_errno(err))


def _open_error_message(err: OSError) -> str:
    if err.errno in (errno.EPERM, errno.EACCES):
        return (
            "cannot open a netlink sock_diag socket (permission denied): run as root "
            "or allow netlink sockets in the seccomp/LSM policy of this container"
        )
    if err.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
        return (
            "this kernel has no netlink sock_diag support: load it with "
            "'modprobe inet_diag tcp_diag' (CONFIG_INET_DIAG, CONFIG_INET_TCP_DIAG)"
        )
    return f"cannot open a netlink sock_diag socket: {_strerror(err)}"


def _dump_error_message(family: int, code: int) -> str:
    family_name = "IPv6" if family == socket.AF_INET6 else "IPv4"
    if code == errno.ENOENT:
        return (
            f"the kernel has no sock_diag handler for {family_name} TCP sockets: load it "
            "with 'modprobe tcp_diag' (CONFIG_INET_TCP_DIAG)"
        )
    if code in (errno.EPERM, errno.EACCES):
        return (
            f"the kernel refused the sock_diag dump of {family_name} TCP sockets "
            "(permission denied): run as root or relax the LSM policy"
        )
    return f"sock_diag dump of {family_name} TCP sockets failed: {os.strerror(code)}"
