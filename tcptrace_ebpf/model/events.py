"""Events: what the BPF program reports for each TCP state change.

`decode()` turns the raw bytes of a `struct tt_event` (bpf/tcptrace_interface.h) into
an `Event`; `Event.to_json()` / `Event.from_json()` give the `trace --json`
form, which is also how event streams are recorded for the tests.
Pure code: no bcc, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NamedTuple

from ..kernel import interface
from ..kernel.interface import EVENT_FLAG_NAMES, EventFlag, OwnerSource, Role, TwEnd
from .addresses import AddressPair
from .owners import NO_WORKLOAD, Workload
from .states import state_name

AF_INET = interface.AF_INET
AF_INET6 = interface.AF_INET6
EVENT_STRUCT = interface.EVENT_STRUCT
EVENT_SIZE = interface.EVENT_SIZE  # 112

ROLE_NAMES = {role.value: role.name.lower() for role in Role}
OWNER_SOURCE_NAMES = {source.value: source.name.lower() for source in OwnerSource}
TW_END_NAMES = {end.value: end.name.lower() if end else None for end in TwEnd}
FLAG_VALUES = {name: int(flag) for flag, name in EVENT_FLAG_NAMES.items()}
_DURATION_KNOWN = int(EventFlag.DURATION_KNOWN)


class Event(NamedTuple):
    """One state change of one socket. Times are unix seconds.

    `pair.netns` is 0 (unknown): struct tt_event carries no network
    namespace. The program knows it, but nothing that reads events would
    use it: the JSON outputs and the recorded streams have no key for it,
    and carrying it would make every event 8 bytes longer (alignment).
    """

    ts: float
    sock: int  # lifecycle id, 0 for an untracked socket
    seq: int  # position in the lifecycle
    pid: int  # owner's pid, 0 if unknown
    comm: str
    pair: AddressPair
    old_state: int
    new_state: int
    duration_s: float | None  # time spent in old_state
    flags: int
    role: int
    owner_source: int
    tw_end: int
    syn_retrans: int
    skaddr: int = 0
    cgroup_id: int = 0  # the owner's cgroup v2 id, 0 if unknown

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def to_json(self, workload: Workload = NO_WORKLOAD) -> dict[str, Any]:
        """The `trace --json` object: the documented keys, then details, then
        the owner's cgroup id and its container and pod (`workload`)."""
        return {
            "ts": round(self.ts, 6),
            "sock": self.sock,
            "pid": self.pid or None,
            "comm": self.comm or None,
            "family": self.pair.family_name,
            **self.pair.endpoints_json(),
            "old_state": state_name(self.old_state),
            "new_state": state_name(self.new_state),
            "duration_s": None if self.duration_s is None else round(self.duration_s, 9),
            "seq": self.seq,
            "role": ROLE_NAMES.get(self.role, "unknown"),
            "owner": OWNER_SOURCE_NAMES.get(self.owner_source, "unknown"),
            "time_wait_end": TW_END_NAMES.get(self.tw_end),
            "syn_retrans": self.syn_retrans,
            "flags": [name for value, name in EVENT_FLAG_NAMES.items() if self.flags & value],
            "cgroup_id": self.cgroup_id or None,
            **workload.names_json(),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Event:
        """Parse a `trace --json` object (as recorded for tests)."""
        from .states import parse_state

        flags = 0
        for name in obj.get("flags", ()):
            flags |= FLAG_VALUES.get(name, 0)
        duration = obj.get("duration_s")
        if duration is not None:
            flags |= _DURATION_KNOWN
        roles = {name: value for value, name in ROLE_NAMES.items()}
        owners = {name: value for value, name in OWNER_SOURCE_NAMES.items()}
        tw_ends = {name: value for value, name in TW_END_NAMES.items() if name}
        return cls(
            ts=float(obj["ts"]),
            sock=int(obj["sock"]),
            seq=int(obj.get("seq", 0)),
            pid=int(obj.get("pid") or 0),
            comm=obj.get("comm") or "",
            pair=AddressPair.from_json(obj),
            old_state=int(parse_state(obj["old_state"])),
            new_state=int(parse_state(obj["new_state"])),
            duration_s=None if duration is None else float(duration),
            flags=flags,
            role=roles.get(obj.get("role", "unknown"), 0),
            owner_source=owners.get(obj.get("owner", "unknown"), 0),
            tw_end=tw_ends.get(obj.get("time_wait_end") or "", 0),
            syn_retrans=int(obj.get("syn_retrans", 0)),
            cgroup_id=int(obj.get("cgroup_id") or 0),
        )


format_address = lru_cache(maxsize=4096)(interface.address_text)


@lru_cache(maxsize=4096)
def _pair(family: int, saddr: bytes, sport: int, daddr: bytes, dport: int) -> AddressPair:
    """An event's address pair, shared by the events that have the same one
    (a lifecycle's do): one cache look-up per event, where the two address
    texts alone took two."""
    return AddressPair(
        0, family, format_address(family, saddr), sport, format_address(family, daddr), dport
    )


@lru_cache(maxsize=1024)
def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


@lru_cache(maxsize=1024)
def _json_string(text: str) -> str:
    return json.dumps(text)


_STATE_JSON = tuple(json.dumps(state_name(value)) for value in range(256))
_FAMILY_JSON = ('"ipv4"', '"ipv6"')
_ROLE_JSON = {value: json.dumps(name) for value, name in ROLE_NAMES.items()}
_OWNER_JSON = {value: json.dumps(name) for value, name in OWNER_SOURCE_NAMES.items()}
_TW_END_JSON = {value: json.dumps(name) for value, name in TW_END_NAMES.items()}


@lru_cache(maxsize=4096)
def _flags_json(flags: int) -> str:
    return json.dumps([name for value, name in EVENT_FLAG_NAMES.items() if flags & value])


@lru_cache(maxsize=4096)
def _workload_json(workload: Workload) -> str:
    return ",".join(f'"{key}":{json.dumps(value)}' for key, value in workload.names_json().items())


class Decoder:
    """Turns raw `struct tt_event` bytes into Events with unix timestamps.

    Kernel timestamps are CLOCK_MONOTONIC; `clock_offset_ns` (unix minus
    monotonic, nanoseconds) converts them. The caller refreshes it now and
    then so a clock step (NTP) shows up in later events.
    """

    __slots__ = ("clock_offset_ns", "workload_of")

    def __init__(
        self, clock_offset_ns: int, workload_of: Callable[[int], Workload] | None = None
    ) -> None:
        self.clock_offset_ns = clock_offset_ns
        # cgroup id -> container and pod (workloads.Workloads.of_id); None: not named.
        self.workload_of = workload_of

    def json_line(self, raw: bytes) -> str:
        """The `trace --json` line of a raw event, straight from its bytes.

        Same object as `decode(raw).to_json()` (a test checks it), built
        without the intermediate objects: at full churn `trace --json`
        handles hundreds of thousands of events a second in one thread.
        """
        (
            ts_ns, sock_id, _skaddr, duration_ns, pid, flags, saddr, daddr,
            sport, dport, family, seq, old, new, role, owner_source, tw_end, _pad,
            syn_retrans, comm, cgroup_id,
        ) = EVENT_STRUCT.unpack_from(raw)  # fmt: skip
        name = _comm(comm)
        workload = self.workload_of(cgroup_id) if self.workload_of and cgroup_id else NO_WORKLOAD
        duration = round(duration_ns / 1e9, 9) if flags & _DURATION_KNOWN else "null"
        return (
            f'{{"ts":{round((ts_ns + self.clock_offset_ns) / 1e9, 6)},"sock":{sock_id},'
            f'"pid":{pid or "null"},"comm":{_json_string(name) if name else "null"},'
            f'"family":{_FAMILY_JSON[family == AF_INET6]},'
            f'"laddr":"{format_address(family, saddr)}","lport":{sport},'
            f'"raddr":"{format_address(family, daddr)}","rport":{dport},'
            f'"old_state":{_STATE_JSON[old]},"new_state":{_STATE_JSON[new]},'
            f'"duration_s":{duration},"seq":{seq},"role":{_ROLE_JSON.get(role, _ROLE_JSON[0])},'
            f'"owner":{_OWNER_JSON.get(owner_source, _OWNER_JSON[0])},'
            f'"time_wait_end":{_TW_END_JSON.get(tw_end, "null")},"syn_retrans":{syn_retrans},'
            f'"flags":{_flags_json(flags)},"cgroup_id":{cgroup_id or "null"},'
            f"{_workload_json(workload)}}}"
        )

    def decode(self, raw: bytes) -> Event:
        (
            ts_ns, sock_id, skaddr, duration_ns, pid, flags, saddr, daddr,
            sport, dport, family, seq, old, new, role, owner_source, tw_end, _pad,
            syn_retrans, comm, cgroup_id,
        ) = EVENT_STRUCT.unpack_from(raw)  # fmt: skip
        # By position, in Event's order: keywords took twice as long (half
        # of what decoding an event costs).
        return Event(
            (ts_ns + self.clock_offset_ns) / 1e9,
            sock_id,
            seq,
            pid,
            _comm(comm),
            _pair(family, saddr, sport, daddr, dport),
            old,
            new,
            duration_ns / 1e9 if flags & _DURATION_KNOWN else None,
            flags,
            role,
            owner_source,
            tw_end,
            syn_retrans,
            skaddr,
            cgroup_id,
        )

    def workload(self, event: Event) -> Workload:
        """The container and pod of an event's owner (empty when unknown)."""
        if self.workload_of is None or not event.cgroup_id:
            return NO_WORKLOAD
        return self.workload_of(event.cgroup_id)
