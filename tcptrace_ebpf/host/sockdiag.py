"""Snapshot of the kernel's TCP sockets through netlink sock_diag (what ``ss -tan`` reads).

The tracer calls this at start-up to learn the sockets that existed before its
BPF program was attached, and the CLOSE_WAIT-leak finder calls it to list
CLOSE_WAIT sockets. It speaks netlink itself, with the standard library, as
``ss`` does: one SOCK_DIAG_BY_FAMILY dump request per address family, and the
replies' ``struct inet_diag_msg`` unpacked with ``struct`` (include/uapi/linux/
inet_diag.h). Measured against pyroute2 (``bench/sockdiag.py``, README
"Footprint"), this is several times faster per socket and needs no import
worth speaking of.

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
* sock_diag sees the network namespace of the calling thread only (the
  netlink socket belongs to the namespace it was opened in).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.model.states import TcpState

T = TypeVar("T")

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

_SUPPORTED_FAMILIES = (socket.AF_INET, socket.AF_INET6)

# include/uapi/linux/netlink.h, sock_diag.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
# struct nlmsghdr: length, type, flags, sequence number, port id.
_HEADER = struct.Struct("=IHHII")
# struct inet_diag_req_v2 without its inet_diag_sockid (48 zero bytes: match any):
# family, protocol, extensions wanted (none: no tcp_info, no meminfo), pad, states.
_REQUEST = struct.Struct("=BBBBI")
_SOCKID_SIZE = 48
# struct inet_diag_msg: family, state, timer, retransmits; inet_diag_sockid (ports
# big-endian, addresses in network order, interface, cookie as two host-order
# u32, low word first); expires, rqueue, wqueue, uid, inode. Attributes follow;
# none were asked for and any the kernel adds are skipped with the message.
_MESSAGE = struct.Struct("=BBBBHH16s16sIIIIIIII")
_STATE_OFFSET = _HEADER.size + 1
# Room for the largest reply the kernel builds in one go (a dump's replies
# are at most 32 KiB each, whatever the buffer; 64 KiB leaves room to spare).
_RECEIVE_BUFFER = 65536
_SEQUENCE = 0x7463  # any number: replies to our request carry it back


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

    Costs a few microseconds per socket returned (bench/sockdiag.py), and next
    to nothing per socket the state filter leaves out.

    Raises UserError when sock_diag cannot be used, ValueError for an unknown
    state number or a family other than AF_INET / AF_INET6.
    """
    sockets: list[DiagSocket] = []
    for_each(sockets.append, states, families)
    return sockets


def for_each(
    handle: Callable[[DiagSocket], None],
    states: Iterable[int] | None = None,
    families: Iterable[int] = (socket.AF_INET, socket.AF_INET6),
) -> None:
    """snapshot(), each socket handed to `handle` as it is decoded and not
    kept here: a caller that keeps less of each never holds them all."""
    mask = state_mask(states)
    wanted_families = _checked_families(families)
    with _open_diag_socket() as diag:
        for family in wanted_families:
            for sock in _dump(diag, family, mask, _SocketDecoder().decode):
                handle(sock)


def count_by_state(
    states: Iterable[int] | None = None,
    families: Iterable[int] = (socket.AF_INET, socket.AF_INET6),
) -> dict[int, int]:
    """Number of TCP sockets per state (numbered as DiagSocket.state); zero counts are left out.

    Same query as snapshot() but decodes only the state byte of each socket.
    """
    mask = state_mask(states)
    wanted_families = _checked_families(families)
    counts: Counter[int] = Counter()
    with _open_diag_socket() as diag:
        for family in wanted_families:
            counts.update(_dump(diag, family, mask, _state_of))
    return dict(counts)


def _checked_families(families: Iterable[int]) -> list[int]:
    checked = list(dict.fromkeys(families))
    for family in checked:
        if family not in _SUPPORTED_FAMILIES:
            raise ValueError(f"address family {family} is not AF_INET or AF_INET6")
    return checked


def _netlink_socket() -> socket.socket:
    return socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
    )


def _open_diag_socket() -> socket.socket:
    try:
        diag = _netlink_socket()
    except OSError as err:
        raise UserError(_open_error_message(err)) from err
    try:
        diag.bind((0, 0))  # the kernel picks our port id
    except OSError as err:
        diag.close()
        raise UserError(f"cannot bind the netlink sock_diag socket: {_strerror(err)}") from err
    return diag


def _request(family: int, mask: int) -> bytes:
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, mask) + bytes(_SOCKID_SIZE)
    length = _HEADER.size + len(body)
    flags = _NLM_F_REQUEST | _NLM_F_DUMP
    return _HEADER.pack(length, _SOCK_DIAG_BY_FAMILY, flags, _SEQUENCE, 0) + body


def _dump(
    diag: socket.socket, family: int, mask: int, decode: Callable[[bytes, int], T]
) -> Iterator[T]:
    """Every reply to one dump request, each message given to `decode` as
    (buffer, offset of its struct inet_diag_msg), yielded a datagram at a
    time: only one datagram's worth is ever held here."""
    try:
        diag.sendall(_request(family, mask))
    except OSError as err:
        raise UserError(_dump_error_message(family, _errno(err))) from err
    while True:
        try:
            data, _ancillary, flags, _address = diag.recvmsg(_RECEIVE_BUFFER)
        except OSError as err:
            raise UserError(_dump_error_message(family, _errno(err))) from err
        if flags & socket.MSG_TRUNC:
            raise UserError(f"sock_diag reply larger than {_RECEIVE_BUFFER} bytes: not decoded")
        if not data:
            raise UserError(_dump_error_message(family, errno.EPIPE))
        decoded: list[T] = []
        done = _decode_replies(data, family, decode, decoded)
        yield from decoded
        if done:
            return


def _decode_replies(
    data: bytes, family: int, decode: Callable[[bytes, int], T], decoded: list[T]
) -> bool:
    """Decode one datagram of netlink messages into `decoded`; True once the
    dump is done. Raises UserError for an error reply or a malformed message."""
    offset = 0
    end = len(data)
    while offset + _HEADER.size <= end:
        length, kind, _flags, sequence, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > end:
            raise UserError(f"malformed sock_diag reply (message of {length} bytes)")
        if sequence == _SEQUENCE:
            if kind in {_NLMSG_DONE, _NLMSG_ERROR}:
                # Both carry an int: 0, or a negative errno (an acknowledgement,
                # or the reason the dump failed).
                (negative_errno,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                if negative_errno:
                    raise UserError(_dump_error_message(family, -negative_errno))
                if kind == _NLMSG_DONE:
                    return True
            elif kind == _SOCK_DIAG_BY_FAMILY:
                if length < _HEADER.size + _MESSAGE.size:
                    raise UserError(f"malformed sock_diag reply (socket of {length} bytes)")
                decoded.append(decode(data, offset + _HEADER.size))
        offset += (length + 3) & ~3  # messages are 4-byte aligned
    return False


def _state_of(data: bytes, offset: int) -> int:
    return data[offset + 1]


class _SocketDecoder:
    """Decodes struct inet_diag_msg into DiagSocket. Addresses repeat (a
    host has few), so each is turned into text once and the text shared;
    so are ports (a server's connections share its port, and a busy host's
    ephemeral ports recur). Sharing ports paid when the start-up snapshot
    kept each socket's pair as objects; it now packs them (host/snapshot.py),
    so the listing's rows live one at a time and the sharing saves little."""

    def __init__(self) -> None:
        self._texts: dict[tuple[int, bytes], str] = {}
        self._ports: dict[int, int] = {}

    def _port(self, raw: int) -> int:
        port = self._ports.get(raw)
        if port is None:
            port = self._ports[raw] = socket.ntohs(raw)
        return port

    def _text(self, family: int, raw: bytes) -> str:
        key = (family, raw)
        text = self._texts.get(key)
        if text is None:
            packed = raw[:4] if family == socket.AF_INET else raw
            text = self._texts[key] = socket.inet_ntop(family, packed)
        return text

    def decode(self, data: bytes, offset: int) -> DiagSocket:
        (
            family, state, timer, _retransmits, sport, dport, src, dst, _interface,
            cookie_low, cookie_high, expires, rqueue, wqueue, uid, inode,
        ) = _MESSAGE.unpack_from(data, offset)  # fmt: skip
        return DiagSocket(
            family=family,
            state=state,
            laddr=self._text(family, src),
            lport=self._port(sport),
            raddr=self._text(family, dst),
            rport=self._port(dport),
            inode=inode,
            uid=uid,
            recv_q=rqueue,
            send_q=wqueue,
            timer=timer,
            expires_ms=expires,
            cookie=cookie_high << 32 | cookie_low,
            is_timewait=timer == TIMEWAIT_TIMER and inode == 0,
        )


def _errno(err: OSError) -> int:
    return err.errno if err.errno is not None else errno.EIO


def _strerror(err: OSError) -> str:
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
