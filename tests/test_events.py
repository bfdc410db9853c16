"""Decoding raw events (pure): the two JSON paths agree, and round-trip."""

from __future__ import annotations

import json
import random
import socket

from tcptrace_ebpf.model.addresses import AddressPair
from tcptrace_ebpf.model.events import EVENT_SIZE, EVENT_STRUCT, Decoder, Event
from tcptrace_ebpf.model.owners import Workload


def random_raw(rng: random.Random) -> bytes:
    family = rng.choice([socket.AF_INET, socket.AF_INET6])
    size = 4 if family == socket.AF_INET else 16
    address = bytes(rng.getrandbits(8) for _ in range(size)).ljust(16, b"\0")
    peer = bytes(rng.getrandbits(8) for _ in range(size)).ljust(16, b"\0")
    comm = "".join(rng.choice('ab"\\\x01é-_ ') for _ in range(rng.randint(0, 15)))
    return EVENT_STRUCT.pack(
        rng.getrandbits(60), rng.getrandbits(40), rng.getrandbits(64), rng.getrandbits(40),
        rng.getrandbits(22), rng.getrandbits(11), address, peer,
        rng.getrandbits(16), rng.getrandbits(16), family, rng.getrandbits(16),
        rng.randint(1, 12), rng.randint(1, 12), rng.randint(0, 3), rng.randint(0, 4),
        rng.randint(0, 3), 0, rng.getrandbits(16),
        comm.encode()[:15].ljust(16, b"\0"), rng.choice([0, 1, rng.getrandbits(40)]),
    )  # fmt: skip


def test_layout_size() -> None:
    assert EVENT_SIZE == 112


def test_decode_names_every_field() -> None:
    values = (
        5 * 10**9, 22, 33, 4 * 10**9, 55, 1, bytes([10, 0, 0, 1]).ljust(16, b"\0"),
        bytes([10, 0, 0, 2]).ljust(16, b"\0"), 1001, 1002, socket.AF_INET, 7, 2, 1, 2, 3, 1, 0,
        9, b"comm-name".ljust(16, b"\0"), 77,
    )  # fmt: skip
    event = Decoder(clock_offset_ns=10**9).decode(EVENT_STRUCT.pack(*values))
    assert event._asdict() == {
        "ts": 6.0, "sock": 22, "seq": 7, "pid": 55, "comm": "comm-name",
        "pair": AddressPair(0, socket.AF_INET, "10.0.0.1", 1001, "10.0.0.2", 1002),
        "old_state": 2, "new_state": 1, "duration_s": 4.0, "flags": 1, "role": 2,
        "owner_source": 3, "tw_end": 1, "syn_retrans": 9, "skaddr": 33, "cgroup_id": 77,
    }  # fmt: skip


def test_fast_json_line_equals_the_reference() -> None:
    rng = random.Random(42)
    pods = {1: Workload(namespace="shop", pod='cart-"7"', container="api")}
    decoder = Decoder(
        clock_offset_ns=1_700_000_000 * 10**9, workload_of=lambda cgid: pods.get(cgid, Workload())
    )
    for _ in range(5000):
        raw = random_raw(rng)
        fast = json.loads(decoder.json_line(raw))
        event = decoder.decode(raw)
        assert fast == event.to_json(decoder.workload(event))


KEPT = (
    "sock", "seq", "pid", "comm", "pair",
    "old_state", "new_state", "role", "owner_source", "tw_end", "syn_retrans", "cgroup_id",
)  # fmt: skip


def test_json_round_trip() -> None:
    """What trace --json writes parses back into the same event (what the
    recorded test streams rely on)."""
    rng = random.Random(7)
    decoder = Decoder(clock_offset_ns=0)
    for _ in range(2000):
        event = decoder.decode(random_raw(rng))
        back = Event.from_json(json.loads(decoder.json_line(EVENT_STRUCT.pack(*_fields(event)))))
        for name in KEPT:
            assert getattr(back, name) == getattr(event, name), name
        assert (back.duration_s is None) == (event.duration_s is None)


def _fields(event: Event) -> tuple[object, ...]:
    pair = event.pair
    size = 4 if pair.family == socket.AF_INET else 16

    def packed(address: str) -> bytes:
        return socket.inet_pton(pair.family, address)[:size].ljust(16, b"\0")

    return (
        round(event.ts * 1e9), event.sock, event.skaddr,
        round((event.duration_s or 0) * 1e9), event.pid, event.flags,
        packed(pair.laddr), packed(pair.raddr), pair.lport, pair.rport, pair.family,
        event.seq, event.old_state, event.new_state, event.role, event.owner_source,
        event.tw_end, 0, event.syn_retrans, event.comm.encode()[:15].ljust(16, b"\0"),
        event.cgroup_id,
    )  # fmt: skip
