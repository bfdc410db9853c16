"""The lifecycle engine on event streams recorded from the real kernel.

tests/data/streams/<scenario>.events.jsonl is what `trace --json` printed
while tests/test_scenarios.py ran that scenario (TCPTRACE_RECORD_DIR), and
<scenario>.lifecycles.jsonl what `lifecycles --json` printed for it. No root
needed: pure logic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tcptrace_ebpf.kernel.interface import EventFlag
from tcptrace_ebpf.model.events import Event
from tcptrace_ebpf.model.lifecycle import Lifecycle, LifecycleEngine, classify_close

STREAMS = Path(__file__).parent / "data" / "streams"
SCENARIOS = sorted(
    path.name.removesuffix(".events.jsonl") for path in STREAMS.glob("*.events.jsonl")
)


def load_events(scenario: str) -> list[Event]:
    lines = (STREAMS / f"{scenario}.events.jsonl").read_text().splitlines()
    return [Event.from_json(json.loads(line)) for line in lines if line]


def load_expected(scenario: str) -> dict[int, dict[str, Any]]:
    lines = (STREAMS / f"{scenario}.lifecycles.jsonl").read_text().splitlines()
    expected = {obj["sock"]: obj for obj in map(json.loads, filter(None, lines))}
    for obj in expected.values():
        # Streams recorded before owners' cgroups were: their events carry
        # none, so neither do the lifecycles rebuilt from them.
        for key in ("cgroup_id", "namespace", "pod", "container"):
            obj.setdefault(key, None)
    return expected


def run(events: list[Event], **engine_args: Any) -> tuple[list[Lifecycle], LifecycleEngine]:
    engine = LifecycleEngine(**engine_args)
    out: list[Lifecycle] = []
    for event in events:
        out.extend(engine.feed(event))
    out.extend(engine.flush())
    return out, engine


def by_sock(lives: list[Lifecycle]) -> dict[int, dict[str, Any]]:
    result = {}
    for life in lives:
        assert life.sock not in result, f"lifecycle {life.sock} reported twice"
        result[life.sock] = life.to_json()
    return result


def assert_well_formed(life: Lifecycle) -> None:
    for span in life.states:
        assert span.duration_s is None or span.duration_s >= 0, life
        assert span.state != 7, "the final CLOSE is not listed"
    if life.complete:
        assert life.close is not None
        assert all(span.start is not None for span in life.states)
    if not life.ended:
        assert life.close is None
        assert not life.complete


def test_streams_were_recorded() -> None:
    assert len(SCENARIOS) >= 10, SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_in_order_matches_live_run(scenario: str) -> None:
    """Fed in order, the engine gives exactly what the live run printed."""
    lives, engine = run(load_events(scenario))
    assert by_sock(lives) == load_expected(scenario)
    assert engine.open_count == 0
    for life in lives:
        assert_well_formed(life)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_shuffled(scenario: str, seed: int) -> None:
    """Events of one lifecycle are applied in seq order whatever order they come in."""
    events = load_events(scenario)
    random.Random(seed).shuffle(events)
    lives, _ = run(events)
    assert by_sock(lives) == load_expected(scenario)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_duplicated(scenario: str) -> None:
    """Every event delivered two or three times, some late: same result."""
    events = load_events(scenario)
    rng = random.Random(7)
    noisy = []
    for event in events:
        noisy.extend([event] * rng.randint(2, 3))
    noisy.extend(rng.sample(events, k=len(events) // 2))  # stragglers after the end
    lives, engine = run(noisy)
    assert by_sock(lives) == load_expected(scenario)
    assert engine.stats.duplicates >= len(events)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_truncated(scenario: str) -> None:
    """Cut anywhere: never a crash, never a negative duration; what did not end
    is reported open (close null, incomplete)."""
    events = load_events(scenario)
    expected = load_expected(scenario)
    for cut in range(len(events) + 1):
        lives, _ = run(events[:cut])
        seen_last = {event.sock for event in events[:cut] if event.has(1 << 6)}
        for life in lives:
            assert_well_formed(life)
            if life.sock in seen_last and expected[life.sock]["complete"]:
                assert life.to_json() == expected[life.sock]
            if life.sock not in seen_last:
                assert life.close is None
                assert life.complete is False


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lost_event_marks_incomplete(scenario: str) -> None:
    """Drop one event of a lifecycle, flag the next as the kernel would: the
    lifecycle is reported, incomplete, with what is known."""
    events = load_events(scenario)
    socks = sorted({event.sock for event in events})
    for sock in socks:
        mine = [event for event in events if event.sock == sock]
        if len(mine) < 2:
            continue
        victim = mine[len(mine) // 2 - 1] if len(mine) > 2 else mine[0]
        stream = [
            event._replace(flags=event.flags | EventFlag.LOST_BEFORE)
            if event.sock == sock and event.seq > victim.seq
            else event
            for event in events
            if event is not victim
        ]
        lives, engine = run(stream)
        (life,) = [life for life in lives if life.sock == sock]
        assert life.complete is False
        assert life.lost is True
        assert_well_formed(life)
        assert engine.open_count == 0


def test_bounded_memory() -> None:
    """Far more open lifecycles than allowed: the oldest are reported and dropped."""
    template = load_events("test_connection_refused")[0]
    engine = LifecycleEngine(max_open=50)
    reported = []
    for sock in range(1, 5001):
        reported.extend(engine.feed(template._replace(sock=sock)))
        assert engine.open_count <= 50
    assert engine.stats.evicted == 4950
    assert len(reported) == 4950
    assert all(not life.complete and life.close is None for life in reported)


def test_unseen_end_closes_incomplete() -> None:
    """The kernel program noticed the socket ended unseen: the lifecycle ends,
    how and when unknown."""
    events = [e for e in load_events("test_server_closes_first") if e.role == 1]
    sock = events[0].sock
    mine = [e for e in events if e.sock == sock][:2]  # CLOSE>SYN_SENT, SYN_SENT>ESTABLISHED
    unseen = mine[-1]._replace(
        seq=2,
        old_state=1,
        new_state=7,
        duration_s=None,
        flags=EventFlag.END_UNSEEN | EventFlag.LOST_BEFORE,
    )
    lives, engine = run([*mine, unseen])
    (life,) = lives
    assert [span.state for span in life.states] == [2, 1]
    assert life.states[-1].duration_s is None
    assert life.close is None
    assert life.lost is True
    assert life.complete is False
    assert engine.open_count == 0


def test_untracked_events_are_counted_not_rebuilt() -> None:
    event = load_events("test_connection_refused")[0]
    engine = LifecycleEngine()
    assert engine.feed(event._replace(sock=0, flags=EventFlag.UNTRACKED)) == []
    assert engine.stats.untracked == 1
    assert engine.flush() == []


def test_preexisting_socket_is_incomplete() -> None:
    """A socket first seen mid-life starts with the state it was in, start unknown."""
    first = load_events("test_server_closes_first")
    estab, close_wait = 1, 8
    mid = [event for event in first if (event.old_state, event.new_state) == (estab, close_wait)]
    assert mid, "the recording has a passive close"
    sock = mid[0].sock
    later = [event for event in first if event.sock == sock and event.seq >= mid[0].seq]
    renumbered = [
        event._replace(seq=event.seq - mid[0].seq, flags=event.flags | 2) for event in later
    ]  # 2 = preexisting
    lives, _ = run(renumbered)
    (life,) = lives
    assert [span.state for span in life.states][:2] == [1, 8]
    assert life.states[0].start is None
    assert life.preexisting is True
    assert life.complete is False
    assert life.close == "passive"


@pytest.mark.parametrize(
    ("role", "visited", "last_old", "sent", "received", "lport", "expected"),
    [
        ("listener", [10], 10, False, False, 80, "listener_closed"),
        ("client", [2], 2, False, True, 5000, "refused"),
        ("client", [2], 2, False, False, 5000, "timeout"),
        ("client", [2], 2, False, False, 0, "connect_failed"),
        ("client", [2, 1], 1, False, True, 5000, "reset_received"),
        ("server", [3, 1], 1, True, False, 80, "reset_sent"),
        ("client", [2, 1, 4, 11, 6], 6, False, False, 5000, "simultaneous"),
        ("client", [2, 1, 4, 5, 6], 6, False, False, 5000, "active"),
        ("server", [3, 1, 8, 9], 9, False, False, 80, "passive"),
        ("client", [5, 6], 6, False, False, 5000, "active"),  # first seen in FIN_WAIT2
        ("server", [3, 1], 1, False, False, 80, "timeout"),  # no FIN, no RST: it timed out
    ],
)
def test_classify_close(
    role: str,
    visited: list[int],
    last_old: int,
    sent: bool,
    received: bool,
    lport: int,
    expected: str,
) -> None:
    assert (
        classify_close(
            role=role,
            visited=visited,
            last_old_state=last_old,
            reset_sent=sent,
            reset_received=received,
            lport=lport,
        )
        == expected
    )


def test_connect_failing_before_its_syn_is_connect_failed_whatever_its_port() -> None:
    """A connect() from an explicitly bound port whose address pair is in use
    fails (EADDRNOTAVAIL) with a local port but no SYN sent: the kernel
    program flags it no_syn, and that, not the port, decides."""
    common = {"role": "client", "visited": [2], "last_old_state": 2}
    no_reset = {"reset_sent": False, "reset_received": False}
    assert classify_close(**common, **no_reset, lport=5000, no_syn=True) == "connect_failed"
    assert classify_close(**common, **no_reset, lport=5000, no_syn=False) == "timeout"
