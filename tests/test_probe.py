"""The BPF program itself: layout shared with Python, and loading on lesser kernels.

Kernels differ in which tracepoints and fields they have; the loader turns
each missing one into a compile-time switch. These tests load the real
program into the real kernel with capabilities taken away, one set at a
time, and check it still traces sane lifecycles.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from support import Peer, deadline, free_port, requires_root, wait_for

from tcptrace_ebpf.commands.runner import clock_offset_ns
from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.kernel import bpfsys, loader
from tcptrace_ebpf.kernel.features import (
    FEATURE_MACROS,
    Capability,
    Features,
    detect_features,
    macro_on,
)
from tcptrace_ebpf.kernel.interface import EventFlag
from tcptrace_ebpf.kernel.probe import Tracer, TracerOptions, build_source, program_text
from tcptrace_ebpf.model.events import (
    EVENT_SIZE,
    EVENT_STRUCT,
    Decoder,
)
from tcptrace_ebpf.model.lifecycle import Lifecycle, LifecycleEngine

BPF = Path(__file__).resolve().parent.parent / "bpf"
# A feature macro in an #if of the program.
MACRO = re.compile(r"\b(?:HAVE|USE|CHECK|WATCH)_\w+")


def without(*names: str):  # type: ignore[no-untyped-def]
    features = detect_features()
    for name in names:
        features.capabilities[name] = Capability(name, False, "taken away by the test")
    return features


def test_missing_set_state_tracepoint_is_a_clear_error() -> None:
    features = without("set_state")
    with pytest.raises(UserError, match="cannot be traced"):
        build_source(features, TracerOptions())


def test_generated_source_reflects_features() -> None:
    features = without("timewait", "netns")
    text, _ = build_source(features, TracerOptions(ports=frozenset({80})))
    assert "#define HAVE_TIMEWAIT 0" in text
    assert "#define HAVE_NETNS 0" in text
    assert "#define FILTER_PORTS 1" in text
    assert "struct tp_timer_start {" not in text
    assert "struct tp_inet_sock_set_state {" in text


def test_each_feature_macro_follows_its_row_of_the_table() -> None:
    """FEATURE_MACROS is where kernel features become the program's macros:
    every one the program tests is there, and each is on exactly when the
    features of its row are as the row says."""
    conditions = [line for line in program_text(BPF).splitlines() if line.startswith("#if")]
    tested = {name for line in conditions for name in MACRO.findall(line)}
    assert tested == set(FEATURE_MACROS)
    detected = detect_features()

    def defined(macro: str, features: Features) -> str:
        text, _ = build_source(features, TracerOptions(collect_metrics=True))
        return re.findall(rf"^#define {macro} (\d)$", text, re.MULTILINE)[0]

    for macro, row in FEATURE_MACROS.items():
        wants = {name.lstrip("!"): not name.startswith("!") for name in row}
        # A capability this kernel lacks cannot be given: its tracepoint
        # format, which the program's preamble is built from, is missing.
        givable = {cap for cap in wants if detected.has(cap)}
        for off in [None, *wants]:
            if any(wants[cap] != (cap == off) and cap not in givable for cap in wants):
                continue
            features = dataclasses.replace(
                detected,
                capabilities=dict(detected.capabilities),
                offsets={**detected.offsets, "OFF_TIMER_FUNCTION": 8},
            )
            for cap, on in wants.items():
                features.note(cap, on != (cap == off), "set by the test")
            expected = "1" if off is None else "0"  # any one of them otherwise: off
            assert macro_on(features, macro) == (off is None)
            assert defined(macro, features) == expected, (macro, off)


def test_the_program_reaches_bcc_as_one_text_with_every_header() -> None:
    """BCC rewrites map calls only in the text it is given, never in an
    included file: each header of bpf/ is in the text once, none is left to
    the compiler's #include."""
    text = program_text(BPF)
    headers = sorted(path.name for path in BPF.glob("*.h"))
    assert len(headers) >= 9
    for name in headers:
        assert text.count(f'#line 1 "{name}"') == 1, name
        assert f'#include "{name}"' not in text
    assert text.index('#line 1 "maps.h"') < text.index('#line 1 "socket_state.h"')
    assert "int btf_inet_sock_set_state(u64 *ctx)" in text


def test_the_cache_key_changes_with_every_header(tmp_path: Path) -> None:
    """A cached program is the one compiled from these very sources: a change
    to any header gives another key (loader.cache_key)."""
    sources = tmp_path / "bpf"
    shutil.copytree(BPF, sources)
    cflags = [f"-I{sources}"]
    key = loader.cache_key(program_text(sources), cflags, [])
    for header in sorted(sources.glob("*.h")):
        original = header.read_text()
        header.write_text(original + "/* changed */\n")
        assert loader.cache_key(program_text(sources), cflags, []) != key, header.name
        header.write_text(original)
    assert loader.cache_key(program_text(sources), cflags, []) == key


@requires_root
def test_event_layout_matches_bcc() -> None:
    """The Python mirror of struct tt_event has BCC's layout, field by field
    (compiled here with BCC itself: the tracer no longer keeps BCC loaded)."""
    from tcptrace_ebpf.kernel.probe import import_bcc

    text, cflags = build_source(detect_features(), TracerOptions(emit_events=True))
    # Bytes: BCC warns (with the whole program) about str.
    bpf = import_bcc().BPF(text=text.encode(), cflags=cflags)
    try:
        values = (
            11, 22, 33, 44, 55, 66, bytes(range(16)), bytes(range(16, 32)),
            1001, 1002, 10, 7, 1, 8, 2, 3, 2, 0, 9, b"comm-name\0\0\0\0\0\0\0", 77,
        )  # fmt: skip
        raw = ctypes.create_string_buffer(EVENT_STRUCT.pack(*values), EVENT_SIZE)
        event = bpf[b"events"].event(ctypes.addressof(raw))
        assert ctypes.sizeof(type(event)) == EVENT_SIZE
        assert (event.ts_ns, event.sock_id, event.skaddr, event.duration_ns) == (11, 22, 33, 44)
        assert (event.pid, event.flags) == (55, 66)
        assert bytes(event.saddr) == bytes(range(16))
        assert bytes(event.daddr) == bytes(range(16, 32))
        assert (event.sport, event.dport, event.family, event.seq) == (1001, 1002, 10, 7)
        assert (event.old_state, event.new_state, event.role) == (1, 8, 2)
        assert (event.owner_source, event.tw_end, event.syn_retrans) == (3, 2, 9)
        assert bytes(event.comm).rstrip(b"\0") == b"comm-name"
        assert event.cgroup_id == 77
    finally:
        bpf.cleanup()


DEGRADED = [
    ("tp_btf",),  # raw tracepoints, fields read with bpf_probe_read_kernel()
    # classic tracepoints (before 4.17)
    ("tp_btf", "raw_set_state", "raw_timers", "raw_kfree", "raw_tcp_events"),
    ("raw_tcp_events",),  # resets and retransmissions classic, the rest raw
    ("tp_btf", "raw_set_state"),  # BTF lacking a socket field the raw program reads
    ("timewait",),
    ("kfree_rx_sk",),
    ("tw_substate", "timer_expires"),
    ("netns",),
    ("synack_rtt",),  # server handshakes from the accepted socket's birth
    ("segs_out",),  # a connect() failing before its SYN told by its missing port only
    ("total_retrans",),  # SYN retransmissions counted per tracepoint event
    ("reset_received", "reset_sent", "syn_retrans"),
    ("timewait", "netns", "reset_received", "reset_sent", "syn_retrans", "btf", "tp_btf"),
]


def first_born(lives: list[Lifecycle], role: str) -> Lifecycle:
    """The earliest-born lifecycle of `role`. Not the first reported: a
    lifecycle is reported when it ends (a TIME_WAIT ended by reuse is known
    only after the new connection's handshake), and a perf buffer's rings,
    one per CPU, are read one after another."""

    def born(life: Lifecycle) -> float:  # ids are unique, not ordered
        return life.states[0].start or 0.0 if life.states else 0.0

    return min((life for life in lives if life.role == role), key=born)


def _close_then_reuse_the_pair(port: int) -> None:
    """A client connects to `port` and closes first, the server 50 ms later;
    then the client connects again from the same port (ending the first
    connection's TIME_WAIT by reuse) and resets that second connection."""
    with Peer() as server, Peer() as client:
        server.cmd(f"listen 127.0.0.1 {port}")
        # A port outside the ephemeral range: other traffic cannot hold it.
        cport = int(client.cmd(f"connect 127.0.0.1 {port} {free_port()}"))
        server.cmd("accept")
        client.cmd("close")
        time.sleep(0.05)
        server.cmd("close")
        time.sleep(0.05)
        client.cmd(f"connect 127.0.0.1 {port} {cport}")  # reuses the pair: ends TIME_WAIT
        server.cmd("accept")
        client.cmd("linger0")
        client.cmd("close")
        server.cmd("close")
        server.cmd("close_listener")


@requires_root
@pytest.mark.parametrize("missing", DEGRADED, ids=["-".join(m) for m in DEGRADED])
def test_degraded_kernels_still_trace(missing: tuple[str, ...]) -> None:
    """Client closes first, server 50 ms later, then the client reuses the
    pair: what each degraded kernel can still tell about the client."""
    features = without(*missing)
    decoder = Decoder(clock_offset_ns())
    engine = LifecycleEngine()
    lives = []
    port = free_port()
    options = TracerOptions(emit_events=True, ports=frozenset({port}))
    raw_events = []

    def on_event(raw):
        event = decoder.decode(raw)
        raw_events.append(event)
        lives.extend(engine.feed(event))

    tracer = Tracer(options, features, on_event=on_event)
    tracer.start()
    try:
        _close_then_reuse_the_pair(port)

        # Poll and sweep as the runner does, until the first connection's two
        # ends (the first client and the first child of the listener) are in.
        def first_ends_done() -> bool:
            roles = {life.role for life in lives if life.role in ("client", "server")}
            return roles == {"client", "server"} and len(lives) >= 3

        give_up = time.monotonic() + deadline(10)
        while time.monotonic() < give_up and not first_ends_done():
            tracer.poll(50)
            tracer.sweep()
        tracer.poll(0)
    finally:
        tracer.close()
    lives.extend(engine.flush())

    first = first_born(lives, "client")
    child = first_born(lives, "server")
    states = [span.state for span in first.states]
    closing = first.states[2].duration_s + first.states[3].duration_s  # FIN_WAIT1 + FIN_WAIT2
    assert first.close == "active", first
    assert first.complete, first
    if "timewait" in missing:
        assert states == [2, 1, 4, 5], first  # the timewait socket is invisible: ends in FIN_WAIT2
    else:
        assert states == [2, 1, 4, 5, 6], "\n".join(str(e.to_json()) for e in raw_events)
        assert first.time_wait_end == "reused"
        if "tw_substate" in missing:
            # FIN_WAIT2 vs TIME_WAIT cannot be told apart: TIME_WAIT from the full socket's close.
            assert closing < 0.05
        else:
            # Whether seen live (kfree_skb) or recovered from the timer, the peer's
            # FIN came 50 ms after ours.
            assert 0.045 <= closing < 0.2, first
    assert [span.state for span in child.states] == [3, 1, 8, 9]
    assert child.close == "passive"
    assert child.complete


def _run_with_events(options: TracerOptions, body, until, timeout: float = 10, tap=None):  # type: ignore[no-untyped-def]
    """Load the tracer in-process, run `body(tracer)`, poll until `until(lives)`.
    Events also go to `tap` as they come, for a body that needs to see them."""
    decoder = Decoder(clock_offset_ns())
    engine = LifecycleEngine()
    events: list = [] if tap is None else tap
    lives: list = []

    def on_event(raw: bytes) -> None:
        event = decoder.decode(raw)
        events.append(event)
        lives.extend(engine.feed(event))

    tracer = Tracer(options, on_event=on_event)
    tracer.start()
    try:
        body(tracer)
        give_up = time.monotonic() + deadline(timeout)
        while time.monotonic() < give_up and not until(lives):
            tracer.poll(50)
            tracer.sweep()
        tracer.poll(0)
        counters = tracer.counters()
    finally:
        tracer.close()
    return events, lives, counters


def _run_pair(port: int, body):  # type: ignore[no-untyped-def]
    """_run_with_events following `port`, with events, until three lifecycles
    (listener, client, server) ended: `body(tracer, server, client)` drives
    two peers, closed after whatever happens."""
    peers: list[Peer] = []

    def run(tracer: Tracer) -> None:
        server, client = Peer(), Peer()
        peers.extend((server, client))
        body(tracer, server, client)

    try:
        return _run_with_events(
            TracerOptions(emit_events=True, ports=frozenset({port})),
            run,
            until=lambda lives: len(lives) >= 3,
        )
    finally:
        for peer in peers:
            peer.close()


@requires_root
def test_missed_transition_marks_the_lifecycle() -> None:
    """Make the recorded state disagree with the kernel's (as when the kernel
    skipped our program for a change): the next change is flagged."""
    port = free_port()

    def body(tracer: Tracer, server: Peer, client: Peer) -> None:
        server.cmd(f"listen 127.0.0.1 {port}")
        cport = int(client.cmd(f"connect 127.0.0.1 {port}"))
        server.cmd("accept")
        table = tracer.table("socks")
        for key, value in table.items():
            if value.tuple.sport == cport and value.tuple.dport == port:
                value.id.state = 8  # pretend we saw it go CLOSE_WAIT
                table[key] = value
        client.cmd("linger0")
        client.cmd("close")
        server.cmd("close")
        server.cmd("close_listener")

    _events, lives, counters = _run_pair(port, body)
    client_life = next(life for life in lives if life.role == "client")
    assert counters["missed_transitions"] == 1
    assert client_life.lost is True
    assert client_life.complete is False
    assert client_life.close == "reset_sent"  # the rest of its life is still right


@requires_root
def test_a_timewait_record_of_another_connection_is_ended_not_carried_on() -> None:
    """Our record of a timewait socket whose end went unseen, where the kernel
    has put another connection's timewait socket since (planted: the record
    at a live timewait socket's address is given other ports): what that
    socket shows, the peer's FIN reaching it, is not taken for the record's.
    The record is ended, flagged end_unseen and counted, not moved on to
    TIME_WAIT, where it would stay until the other socket's timer ran out."""
    port = free_port()
    planted: dict = {}

    def body(tracer: Tracer, server: Peer, client: Peer) -> None:
        server.cmd(f"listen 127.0.0.1 {port}")
        cport = int(client.cmd(f"connect 127.0.0.1 {port}"))
        server.cmd("accept")
        client.cmd("close")  # first: its timewait socket waits for the peer's FIN
        table = tracer.table("timewait")

        def waiting() -> list:  # in FIN_WAIT2: no FIN yet
            return [(k, v) for k, v in table.items() if v.tuple.sport == cport and v.id.state == 5]

        key, value = wait_for(waiting, what="the client's timewait socket in FIN_WAIT2")[0]
        value.tuple.sport = cport + 1 if cport < 65535 else cport - 1
        table[key] = value
        planted["sock"] = value.id.sock_id
        server.cmd("close")  # the peer's FIN reaches the timewait socket
        server.cmd("close_listener")

    _events, lives, counters = _run_pair(port, body)
    records = [life for life in lives if life.sock == planted["sock"]]
    assert records, "the record never ended: moved on to TIME_WAIT with the other socket"
    record = records[0]
    assert [span.state for span in record.states] == [2, 1, 4, 5], record  # no TIME_WAIT
    assert record.ended, record
    assert record.close is None, record
    assert record.lost is True
    assert counters["missed_ends"] == 1
    child = next(life for life in lives if life.role == "server")
    assert child.close == "passive", child
    assert child.complete, child


@requires_root
def test_missed_end_is_closed_when_the_address_is_reused() -> None:
    """Plant the record of a socket that never ended at an address the kernel
    is about to reuse: the new socket there starts a new lifecycle and the
    planted one is closed, flagged end_unseen.

    On a busy host another socket may take the address first and carry the
    planted record on (as a real socket would have); such rounds are not
    judged, and the plant is repeated."""
    port = free_port()
    peers: dict = {}
    planted_ids = list(range(999_990, 1_000_000))

    def body(tracer: Tracer) -> None:
        server = Peer()
        peers["server"] = server
        server.cmd(f"listen 127.0.0.1 {port}")
        table = tracer.table("socks")
        for sock_id in planted_ids:
            # A socket that came and went: its memory is free for the next one.
            with Peer() as first:
                first.cmd(f"connect 127.0.0.1 {port}")
                server.cmd("accept")
                key, value = next(
                    (key, value) for key, value in table.items() if value.tuple.dport == port
                )
                first.cmd("linger0")
                first.cmd("close")
                server.cmd("close")
            time.sleep(0.2)
            value.id.state = 1  # ESTABLISHED, as if its end had been missed
            value.id.sock_id = sock_id
            table[key] = value
            for _ in range(10):
                with Peer() as again:
                    again.cmd(f"connect 127.0.0.1 {port}")
                    server.cmd("accept")
                    again.cmd("linger0")
                    again.cmd("close")
                    server.cmd("close")
            tracer.poll(0)
            if any(e.sock == sock_id and e.has(EventFlag.END_UNSEEN) for e in seen):
                break
        server.cmd("close_listener")

    seen: list = []

    def every_planted_end_has_its_lifecycle(lives: list) -> bool:
        ended = {e.sock for e in seen if e.sock in planted_ids and e.has(EventFlag.END_UNSEEN)}
        return bool(ended) and ended <= {life.sock for life in lives}

    try:
        events, lives, counters = _run_with_events(
            TracerOptions(emit_events=True, ports=frozenset({port})),
            body,
            until=every_planted_end_has_its_lifecycle,
            timeout=20,
            tap=seen,
        )
    finally:
        for peer in peers.values():
            peer.close()
    ended_unseen = [e for e in events if e.sock in planted_ids and e.has(EventFlag.END_UNSEEN)]
    assert ended_unseen, "no planted record was closed by a new socket at its address"
    # More than one when a round's event came after its check and the plant
    # was repeated: each is judged.
    for unseen in ended_unseen:
        assert "end_unseen" in unseen.to_json()["flags"]
        planted = next(life for life in lives if life.sock == unseen.sock)
        assert planted.ended
        assert planted.close is None
        assert planted.lost is True
        assert planted.complete is False
    assert counters["missed_ends"] >= 1
    # Every connection of ours still reads right.
    for life in lives:
        if life.sock not in planted_ids and life.role == "client":
            assert life.close == "reset_sent", life


@requires_root
def test_parked_counts_follow_their_maps() -> None:
    """The state-change program skips its lookups in tw_killed and
    pending_close while the map `parked` counts nothing there that could
    match. A TIME_WAIT ended by a new connection on its pair (parked in
    tw_killed, then claimed) and an abortive close (held in pending_close
    until its RST) still end as they must, and the counts are back to 0."""
    port = free_port()
    peers: dict = {}
    parked: list[list[int]] = []

    def body(tracer: Tracer) -> None:
        peers["tracer"] = tracer
        server, client = Peer(), Peer()
        peers.update(server=server, client=client)
        server.cmd(f"listen 127.0.0.1 {port}")
        cport = int(client.cmd(f"connect 127.0.0.1 {port} {free_port()}"))
        server.cmd("accept")
        server.cmd("close")
        time.sleep(0.1)
        client.cmd("close")
        time.sleep(0.2)
        # A SYN on the pair ends the server's TIME_WAIT at once.
        give_up = time.monotonic() + deadline(10)
        while not client.try_cmd(f"connect 127.0.0.1 {port} {cport}")[0]:
            assert time.monotonic() < give_up, "the TIME_WAIT pair was never reused"
            time.sleep(0.1)
        server.cmd("accept")
        client.cmd("linger0")
        client.cmd("close")
        server.cmd("close")
        server.cmd("close_listener")

    def settled(lives: list) -> bool:
        counts = [int(getattr(v, "value", v)) for v in peers["tracer"].table("parked").values()]
        parked.append(counts)
        return len(lives) >= 5 and not any(counts)

    try:
        _events, lives, _counters = _run_with_events(
            TracerOptions(emit_events=True, ports=frozenset({port})), body, until=settled
        )
    finally:
        for name in ("server", "client"):
            if name in peers:
                peers[name].close()
    servers = [life for life in lives if life.role == "server"]
    reused = next(life for life in servers if life.time_wait_end)
    assert reused.time_wait_end == "reused"
    assert reused.close == "active"
    aborted = next(life for life in lives if life.role == "client" and life.close != "passive")
    assert aborted.close == "reset_sent"
    assert parked[-1] == [0] * len(parked[-1])


@requires_root
def test_stale_timewait_is_swept() -> None:
    """A timewait socket followed past the staleness limit is closed as
    ended-unseen (its end was missed) rather than kept for ever."""
    port = free_port()
    options = dataclasses.replace(
        TracerOptions(emit_events=True, ports=frozenset({port})),
        stale_timewait_ns=500_000_000,
        stale_check_interval_ns=200_000_000,
    )

    def body(tracer: Tracer) -> None:
        with Peer() as server, Peer() as client:
            server.cmd(f"listen 127.0.0.1 {port}")
            client.cmd(f"connect 127.0.0.1 {port}")
            server.cmd("accept")
            client.cmd("close")
            server.cmd("close")
            server.cmd("close_listener")

    _events, lives, counters = _run_with_events(
        options, body, until=lambda lives: any(life.role == "client" for life in lives)
    )
    client_life = next(life for life in lives if life.role == "client")
    assert [span.state for span in client_life.states][-1] == 6  # it was in TIME_WAIT
    assert client_life.close is None
    assert client_life.lost is True
    assert counters["missed_ends"] == 1


@requires_root
def test_btf_raw_and_classic_tracepoints_see_the_same() -> None:
    """The BTF-typed program reads the socket with plain loads, the raw one
    with bpf_probe_read_kernel(); the classic one gets the kernel's formatted
    record. Side by side, they must report the same events."""
    btf_features = detect_features()
    assert btf_features.has("tp_btf")
    raw_features = without("tp_btf")
    assert raw_features.has("raw_set_state")
    classic_features = without(
        "tp_btf", "raw_set_state", "raw_timers", "raw_kfree", "raw_tcp_events"
    )
    ports = {free_port(), free_port("::1")}
    streams: dict[str, list] = {"btf": [], "raw": [], "classic": []}
    tracers = []
    variants = (("btf", btf_features), ("raw", raw_features), ("classic", classic_features))
    for name, features in variants:
        decoder = Decoder(clock_offset_ns())
        sink = streams[name]
        tracer = Tracer(
            # Cancelled timewait sockets are classified 1 s after (not 5 s).
            TracerOptions(emit_events=True, ports=frozenset(ports), kill_grace_ns=10**9),
            features,
            on_event=lambda raw, d=decoder, s=sink: s.append(d.decode(raw)),
        )
        tracer.start()
        tracers.append(tracer)
    attach_kinds = [dict(tracer.attach_kinds) for tracer in tracers]
    try:
        v4, v6 = sorted(ports)
        for host, port in (("127.0.0.1", v4), ("::1", v6)):
            with Peer() as server, Peer() as client:
                server.cmd(f"listen {host} {port}")
                cport = int(client.cmd(f"connect {host} {port} {free_port(host)}"))
                server.cmd("accept")
                client.cmd("close")
                server.cmd("close")
                client.cmd(f"connect {host} {port} {cport}")  # reuses the pair
                server.cmd("accept")
                server.cmd("close")  # the server closes first this time
                time.sleep(0.05)
                client.cmd("linger0")
                client.cmd("close")
                server.cmd("close_listener")
                client.try_cmd(f"connect {host} {port}")  # refused
        # Until the RST-killed timewait sockets are classified in all three.
        give_up = time.monotonic() + deadline(10)
        while time.monotonic() < give_up:
            for tracer in tracers:
                tracer.poll(50)
                tracer.sweep()
            if all(sum(e.tw_end == 3 for e in stream) == 2 for stream in streams.values()):
                break
    finally:
        for tracer in tracers:
            tracer.close()

    def seen(events: list) -> list:
        return sorted(
            (e.pair, e.old_state, e.new_state, e.tw_end,
             e.flags & (EventFlag.RESET_SENT | EventFlag.RESET_RECEIVED))
            for e in events
        )  # fmt: skip

    assert [kinds["sock:inet_sock_set_state"] for kinds in attach_kinds] == [
        "btf", "raw", "classic",
    ]  # fmt: skip
    # Where a new timewait socket is found in the connection table, no
    # timer_start or timer_cancel program (they run for every timer the host
    # starts or moves): a second program on the state change sees reuses.
    tw_ehash = macro_on(btf_features, "USE_TW_EHASH")
    timers = ("timer_expire_entry",) if tw_ehash else ("timer_start", "timer_cancel")
    assert {attach_kinds[0][f"timer:{t}"] for t in timers} == {"btf"}
    for timer in ("timer_start", "timer_cancel"):
        assert (f"timer:{timer}" in attach_kinds[0]) is not tw_ehash
    if tw_ehash:
        assert [kinds["sock:inet_sock_set_state/tw_reuse"] for kinds in attach_kinds] == [
            "btf", "raw", "classic",
        ]  # fmt: skip
    resets = ("tcp:tcp_receive_reset", "tcp:tcp_send_reset", "tcp:tcp_retransmit_skb")
    assert [{kinds[tp] for tp in resets} for kinds in attach_kinds] == [
        {"raw"}, {"raw"}, {"classic"},
    ]  # fmt: skip
    assert len(streams["btf"]) >= 20
    # The refused connects were told by tcp_receive_reset, the linger-0 closes by tcp_send_reset.
    assert any(e.has(EventFlag.RESET_RECEIVED) for e in streams["btf"])
    assert any(e.has(EventFlag.RESET_SENT) for e in streams["btf"])
    assert seen(streams["btf"]) == seen(streams["raw"]) == seen(streams["classic"])


@requires_root
def test_a_refused_btf_program_falls_back_to_raw(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the kernel will not have a BTF-typed program (another kernel's
    BTF, say), the raw one is attached instead, with a warning saying why.
    The refusal is the kernel's own: the programs are loaded for BTF type 1,
    which is no tracepoint's typedef (the loader process does the loading,
    so it cannot be faked in this one)."""
    features = detect_features()
    features.btf_trace_ids = dict.fromkeys(features.btf_trace_ids, 1)
    monkeypatch.setattr("tcptrace_ebpf.kernel.probe.detect_features", lambda: features)
    port = free_port()
    kinds: dict[str, str] = {}

    def body(tracer: Tracer) -> None:
        kinds.update(tracer.attach_kinds)
        _close_then_reuse_the_pair(port)

    _events, lives, _counters = _run_with_events(
        TracerOptions(emit_events=True, ports=frozenset({port})),
        body,
        until=lambda lives: len(lives) >= 5,
    )
    assert "BTF-typed program refused" in caplog.text
    assert "is not a typedef" in caplog.text  # the kernel's words
    assert set(kinds.values()) == {"raw"}
    assert kinds["sock:inet_sock_set_state"] == "raw"
    first_client = first_born(lives, "client")
    assert [span.state for span in first_client.states][-1] == 6  # TIME_WAIT, seen to end
    assert first_client.time_wait_end == "reused"


@requires_root
def test_perf_buffer_delivers_the_same_lifecycles() -> None:
    """Kernels without a BPF ring buffer get events through a perf buffer
    (one ring per CPU, read with libbpf): the same lifecycles come out."""
    port = free_port()
    _events, lives, counters = _run_with_events(
        TracerOptions(emit_events=True, ports=frozenset({port}), force_perf_buffer=True),
        lambda _tracer: _close_then_reuse_the_pair(port),
        until=lambda lives: len(lives) >= 5,
    )
    roles = sorted(life.role for life in lives)
    assert roles.count("client") >= 2
    assert roles.count("server") >= 2
    assert counters["lost_ringbuf"] == 0
    first_client = first_born(lives, "client")
    assert first_client.time_wait_end == "reused"


@requires_root
def test_timewait_sockets_are_found_in_the_connection_table_where_rx_sk_is() -> None:
    """Where kfree_skb has rx_sk (6.11+), a new timewait socket is found in
    the connection table and timer:timer_start, which runs for every timer
    on the host, is not hooked; before, it is. A kernel whose BTF lacked a
    field of the lookup would fall back silently but for this test."""
    features = detect_features()
    assert features.has("tw_ehash") == features.has("kfree_rx_sk"), features.capabilities[
        "tw_ehash"
    ].detail
    assert macro_on(features, "USE_TW_EHASH") == features.has("kfree_rx_sk")


@requires_root
def test_paused_programs_do_not_run_and_resume_runs_them_again() -> None:
    """pause() detaches every program (bench/toggle.py measures their cost
    by alternating): state changes made while paused run none of them, and
    resume() attaches the same programs again, once."""
    port = free_port()
    tracer = Tracer(TracerOptions(emit_events=False, collect_metrics=True, ports=frozenset({port})))

    def one_connection() -> None:
        server, client = Peer(), Peer()
        try:
            server.cmd(f"listen 127.0.0.1 {port}")
            client.cmd(f"connect 127.0.0.1 {port}")
            server.cmd("accept")
        finally:
            client.close()
            server.close()

    def set_state_runs() -> int:
        return tracer.program_runs()["sock:inet_sock_set_state"].runs

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    # Run counts are kept only while the kernel's BPF statistics are on.
    with bpfsys.run_stats():
        tracer.start()
        try:
            one_connection()
            wait_for(lambda: tracer.counters()["sockets_born"] >= 3 or None)
            attached_fds = open_fds()
            tracer.pause()
            assert open_fds() < attached_fds
            born, runs = tracer.counters()["sockets_born"], set_state_runs()
            one_connection()
            time.sleep(0.2)
            assert (tracer.counters()["sockets_born"], set_state_runs()) == (born, runs)
            tracer.resume()
            tracer.resume()  # a second call attaches nothing more
            assert open_fds() == attached_fds
            one_connection()
            wait_for(lambda: tracer.counters()["sockets_born"] >= born + 3 or None)
            assert set_state_runs() > runs
        finally:
            tracer.close()
