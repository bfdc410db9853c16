"""The BPF program itself: layout shared with Python, and loading on lesser kernels.

Kernels differ in which tracepoints and fields they have; the loader turns
each missing one into a compile-time switch. These tests load the real
program into the real kernel with capabilities taken away, one set at a
time, and check it still traces sane lifecycles.
"""

from __future__ import annotations

import ctypes
import time

import pytest
from support import Peer, free_port, requires_root

from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.events import EVENT_SIZE, EVENT_STRUCT, Decoder
from tcptrace_ebpf.kernel import Capability, detect_features
from tcptrace_ebpf.lifecycle import LifecycleEngine
from tcptrace_ebpf.probe import Tracer, TracerOptions, build_source
from tcptrace_ebpf.runner import clock_offset_ns


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


@requires_root
def test_event_layout_matches_bcc() -> None:
    """The Python mirror of struct tt_event has BCC's layout, field by field."""
    tracer = Tracer(TracerOptions(emit_events=True), on_event=lambda raw: None)
    tracer.start()
    try:
        values = (
            11, 22, 33, 44, 55, 66, bytes(range(16)), bytes(range(16, 32)),
            1001, 1002, 10, 7, 1, 8, 2, 3, 2, 0, 9, b"comm-name\0\0\0\0\0\0\0",
        )  # fmt: skip
        raw = ctypes.create_string_buffer(EVENT_STRUCT.pack(*values), EVENT_SIZE)
        event = tracer.bpf["events"].event(ctypes.addressof(raw))
        assert ctypes.sizeof(type(event)) == EVENT_SIZE
        assert (event.ts_ns, event.sock_id, event.skaddr, event.duration_ns) == (11, 22, 33, 44)
        assert (event.pid, event.flags) == (55, 66)
        assert bytes(event.saddr) == bytes(range(16))
        assert bytes(event.daddr) == bytes(range(16, 32))
        assert (event.sport, event.dport, event.family, event.seq) == (1001, 1002, 10, 7)
        assert (event.old_state, event.new_state, event.role) == (1, 8, 2)
        assert (event.owner_source, event.tw_end, event.syn_retrans) == (3, 2, 9)
        assert bytes(event.comm).rstrip(b"\0") == b"comm-name"
    finally:
        tracer.close()


DEGRADED = [
    ("timewait",),
    ("kfree_rx_sk",),
    ("tw_substate", "timer_expires"),
    ("netns",),
    ("reset_received", "reset_sent", "syn_retrans"),
    ("timewait", "netns", "reset_received", "reset_sent", "syn_retrans", "btf"),
]


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
    tracer = Tracer(
        options, features, on_event=lambda raw: lives.extend(engine.feed(decoder.decode(raw)))
    )
    tracer.start()
    try:
        with Peer() as server, Peer() as client:
            server.cmd(f"listen 127.0.0.1 {port}")
            cport = int(client.cmd(f"connect 127.0.0.1 {port}"))
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
        # Poll and sweep as the runner does, until the first two lifecycles are in.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len({life.sock for life in lives} & {1, 2}) < 2:
            tracer.poll(50)
            tracer.sweep()
        tracer.poll(0)
    finally:
        tracer.close()
    lives.extend(engine.flush())
    first = min((life for life in lives if life.role == "client"), key=lambda life: life.sock)
    child = min((life for life in lives if life.role == "server"), key=lambda life: life.sock)
    states = [span.state for span in first.states]
    closing = first.states[2].duration_s + first.states[3].duration_s  # FIN_WAIT1 + FIN_WAIT2
    assert first.close == "active"
    assert first.complete
    if "timewait" in missing:
        assert states == [2, 1, 4, 5]  # the timewait socket is invisible: ends in FIN_WAIT2
    else:
        assert states == [2, 1, 4, 5, 6]  # ... FIN_WAIT2, TIME_WAIT
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
