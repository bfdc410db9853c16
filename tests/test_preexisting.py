"""Sockets older than the exporter, counted from its snapshot until the
kernel program reports them (pure logic, no root)."""

from __future__ import annotations

import socket
import time
import tracemalloc

from tcptrace_ebpf.host.snapshot import (
    TIMEWAIT_GRACE_S,
    TIMEWAIT_LEN_S,
    Listed,
    OldCloseWait,
    Preexisting,
    Record,
    record_of,
    wanted,
)
from tcptrace_ebpf.host.sockdiag import DiagSocket
from tcptrace_ebpf.kernel.interface import ADOPT_OLD_TIMEWAIT
from tcptrace_ebpf.model.addresses import AddressPair
from tcptrace_ebpf.model.states import TcpState

NETNS = 4026531840


def key(lport: int, rport: int = 80) -> AddressPair:
    return AddressPair(NETNS, socket.AF_INET, "127.0.0.1", lport, "127.0.0.2", rport)


def snapshot(*records: Record) -> Preexisting:
    return Preexisting(records, time.time())


def test_followed_sockets_are_no_longer_counted_here() -> None:
    old = snapshot(
        Record(key(1000), TcpState.ESTABLISHED, timewait=False, client=True),
        Record(key(1001), TcpState.ESTABLISHED, timewait=False, client=True),
    )
    assert old.counts() == {TcpState.ESTABLISHED: 2}
    assert sum(old.dests().values()) == 2
    old.adopt([(key(1000), TcpState.ESTABLISHED)])
    assert old.counts() == {TcpState.ESTABLISHED: 1}
    assert sum(old.dests().values()) == 1


def test_timewait_news_from_the_kernel() -> None:
    gone, rearmed, other = key(2000), key(2001), key(2002)
    old = snapshot(
        *(
            Record(k, TcpState.TIME_WAIT, timewait=True, client=True, expires_ms=30_000)
            for k in (gone, rearmed)
        )
    )
    now = time.monotonic()
    old.adopt(
        [
            (gone, ADOPT_OLD_TIMEWAIT | TcpState.CLOSE),
            (rearmed, ADOPT_OLD_TIMEWAIT | TcpState.TIME_WAIT),
            # Not one of ours (made between the snapshot and the attach): ignored.
            (other, ADOPT_OLD_TIMEWAIT | TcpState.TIME_WAIT),
        ],
        now=now,
    )
    assert old.counts() == {TcpState.TIME_WAIT: 1}
    assert old.has_timewait
    # Re-armed: it runs a whole TIME_WAIT from now, past the snapshot's due time.
    old.expire_timewait(now + 30 + TIMEWAIT_GRACE_S + 1)
    assert old.counts() == {TcpState.TIME_WAIT: 1}
    old.expire_timewait(now + TIMEWAIT_LEN_S + TIMEWAIT_GRACE_S + 0.1)
    assert old.counts() == {}
    assert not old.has_timewait
    assert sum(old.dests().values()) == 0


def test_a_closing_news_does_not_touch_a_full_socket() -> None:
    """A CLOSE news is about a timewait socket: a full socket with the same
    pair (FIN_WAIT2, about to become one) stays counted until adopted."""
    pair = key(3000)
    old = snapshot(Record(pair, TcpState.FIN_WAIT2, timewait=False, client=True))
    old.adopt([(pair, ADOPT_OLD_TIMEWAIT | TcpState.CLOSE)])
    assert old.counts() == {TcpState.FIN_WAIT2: 1}


def test_timewait_goes_when_its_timer_is_past_due() -> None:
    soon, late = key(4000), key(4001)
    old = snapshot(
        Record(soon, TcpState.TIME_WAIT, timewait=True, client=False, expires_ms=1_000),
        Record(late, TcpState.TIME_WAIT, timewait=True, client=False, expires_ms=50_000),
    )
    now = time.monotonic()
    old.expire_timewait(now + 1 + TIMEWAIT_GRACE_S / 2)
    assert old.counts() == {TcpState.TIME_WAIT: 2}
    old.expire_timewait(now + 1 + TIMEWAIT_GRACE_S + 0.5)
    assert old.counts() == {TcpState.TIME_WAIT: 1}
    old.expire_timewait(now + 50 + TIMEWAIT_GRACE_S + 0.5)
    assert old.counts() == {}


def test_a_listing_keeps_only_what_the_program_does_not_follow() -> None:
    """A heal claims from its listing the sockets the program follows; what
    it keeps to count is the rest, their CLOSE_WAIT ages with them."""
    followed, leaking = key(3000), key(3001)
    listed = Listed()  # as list_sockets() fills it, socket by socket
    listed.add(Record(followed, TcpState.CLOSE_WAIT, timewait=False, client=True))
    listed.add(Record(leaking, TcpState.CLOSE_WAIT, timewait=False, client=True))
    listing = Preexisting(
        listed,
        time.time(),
        [
            OldCloseWait(followed, inode=1, since=1.0, comm="a"),
            OldCloseWait(leaking, inode=2, since=1.0, comm="b"),
        ],
    )
    index, state, timewait = listing.listed(followed)
    assert (state, timewait) == (TcpState.CLOSE_WAIT, False)
    listing.claim(index)
    listing.claim(index)  # twice: once counted out
    assert listing.listed(followed)[1] == 0
    assert listing.listed(key(3002)) == (-1, 0, False)
    assert listing.keys() == {leaking}
    assert [item.pair for item in listing.close_wait()] == [leaking]
    assert listing.counts() == {TcpState.CLOSE_WAIT: 1}
    assert listing.dests() == {leaking.destination: 1}


def test_a_close_wait_age_goes_with_the_socket_listed_last() -> None:
    """A socket closing while the listing ran may be listed twice, in
    CLOSE_WAIT and then in LAST_ACK: it is counted as listed last, so no
    CLOSE_WAIT age stays behind for it."""
    moved, leaking = key(3100), key(3101)
    listing = Preexisting(
        [
            Record(moved, TcpState.CLOSE_WAIT, timewait=False, client=False),
            Record(leaking, TcpState.CLOSE_WAIT, timewait=False, client=False),
            Record(moved, TcpState.LAST_ACK, timewait=False, client=False),
        ],
        time.time(),
        [OldCloseWait(pair, inode=1, since=1.0, comm="a") for pair in (moved, leaking)],
    )
    assert listing.counts() == {TcpState.CLOSE_WAIT: 1, TcpState.LAST_ACK: 1}
    assert [item.pair for item in listing.close_wait()] == [leaking]


def test_a_new_snapshot_tells_what_the_earlier_one_did_not_count() -> None:
    """A heal counts the sockets its listing found that the snapshot before
    it did not count: new ones, and ones it had forgotten (missed by the
    program: a loss)."""
    kept, adopted, fresh = key(4000), key(4001), key(4002)
    earlier = snapshot(
        Record(kept, TcpState.ESTABLISHED, timewait=False, client=True),
        Record(adopted, TcpState.ESTABLISHED, timewait=False, client=True),
        Record(key(4003), TcpState.ESTABLISHED, timewait=False, client=True),
    )
    earlier.adopt([(adopted, TcpState.ESTABLISHED)])
    v6 = AddressPair(NETNS, socket.AF_INET6, "::1", 4000, "::1", 80)
    later = snapshot(
        *(
            Record(pair, TcpState.CLOSE_WAIT, timewait=False, client=True)
            for pair in (kept, adopted, fresh, v6)
        )
    )
    assert later.count_not_in(earlier) == 3
    assert earlier.count_not_in(later) == 1  # key(4003)
    assert later.count_not_in(later) == 0


def test_families_namespaces_and_duplicates() -> None:
    """Pairs that differ only by family or network namespace are different
    sockets; a pair listed twice (closing as the listing ran) is counted
    once, as listed last."""
    v4 = key(5000)
    v6 = AddressPair(NETNS, socket.AF_INET6, "::1", 5000, "::2", 80)
    elsewhere = v4.in_netns(NETNS + 1)
    old = snapshot(
        *(
            Record(pair, TcpState.ESTABLISHED, timewait=False, client=False)
            for pair in (v4, v6, elsewhere)
        ),
        Record(v4, TcpState.FIN_WAIT1, timewait=False, client=False),
    )
    assert len(old) == 3
    assert old.keys() == {v4, v6, elsewhere}
    assert old.counts() == {TcpState.ESTABLISHED: 2, TcpState.FIN_WAIT1: 1}
    old.adopt([(v6, TcpState.ESTABLISHED), (v6.in_netns(NETNS + 2), TcpState.ESTABLISHED)])
    assert old.keys() == {v4, elsewhere}
    old.adopt([(elsewhere, TcpState.ESTABLISHED)])
    assert old.keys() == {v4}
    assert old.counts() == {TcpState.FIN_WAIT1: 1}


def test_a_timewait_socket_re_armed_twice_waits_for_its_last_timer() -> None:
    pair = key(6000)
    old = snapshot(Record(pair, TcpState.TIME_WAIT, timewait=True, client=True, expires_ms=5_000))
    now = time.monotonic()
    old.adopt([(pair, ADOPT_OLD_TIMEWAIT | TcpState.TIME_WAIT)], now=now)
    old.adopt([(pair, ADOPT_OLD_TIMEWAIT | TcpState.TIME_WAIT)], now=now + 20)
    old.expire_timewait(now + TIMEWAIT_LEN_S + TIMEWAIT_GRACE_S + 1)
    assert old.counts() == {TcpState.TIME_WAIT: 1}
    old.expire_timewait(now + 20 + TIMEWAIT_LEN_S + TIMEWAIT_GRACE_S + 1)
    assert old.counts() == {}
    assert not old.has_timewait


def test_the_snapshot_keeps_no_object_per_socket() -> None:
    """A busy host has hundreds of thousands of sockets older than the
    exporter: what is kept of each is a few bytes in shared buffers (as
    dicts of address pairs, about 180 bytes; README, "Footprint")."""
    count = 20_000
    records = [
        Record(
            AddressPair(NETNS, socket.AF_INET, "127.0.0.1", 10_000 + i % 50_000, "10.0.0.1", 80),
            TcpState.TIME_WAIT if i % 4 == 0 else TcpState.ESTABLISHED,
            timewait=i % 4 == 0,
            client=True,
            expires_ms=30_000,
        )
        for i in range(count)
    ]
    tracemalloc.start()
    try:
        old = snapshot(*records)
        kept, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(old) == count
    assert old.counts() == {TcpState.TIME_WAIT: count // 4, TcpState.ESTABLISHED: count * 3 // 4}
    assert kept < 40 * count, f"{kept / count:.0f} bytes kept per socket"


def listed(state: int, lport: int, rport: int, inode: int, timewait: bool = False) -> DiagSocket:
    return DiagSocket(
        family=socket.AF_INET, state=state, laddr="127.0.0.1", lport=lport, raddr="127.0.0.2",
        rport=rport, inode=inode, uid=0, recv_q=0, send_q=0, timer=3 if timewait else 0,
        expires_ms=42_000, cookie=0, is_timewait=timewait,
    )  # fmt: skip


def test_what_is_kept_of_a_listed_socket() -> None:
    """A connection whose local port listens is a server's; any other a
    client's. Only a timewait socket keeps its timer."""
    server = record_of(listed(TcpState.ESTABLISHED, 80, 40000, 7), NETNS, {80})
    client = record_of(listed(TcpState.ESTABLISHED, 40000, 80, 8), NETNS, {80})
    waiting = record_of(listed(TcpState.TIME_WAIT, 40001, 80, 0, timewait=True), NETNS, {80})
    assert server == Record(key(80, 40000), TcpState.ESTABLISHED, timewait=False, client=False)
    assert client == Record(key(40000), TcpState.ESTABLISHED, timewait=False, client=True)
    assert waiting.expires_ms == 42_000
    assert waiting.timewait
    assert waiting.client


def test_the_tracers_filters_apply_to_listed_sockets() -> None:
    sock = listed(TcpState.ESTABLISHED, 40000, 80, 7)
    assert wanted(sock, frozenset(), None, None)
    assert wanted(sock, frozenset({80}), socket.AF_INET, None)
    assert not wanted(sock, frozenset({443}), None, None)
    assert not wanted(sock, frozenset(), socket.AF_INET6, None)
    assert wanted(sock, frozenset(), None, {7})  # --pid: the process holds inode 7
    assert not wanted(sock, frozenset(), None, {8})
