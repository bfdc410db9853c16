"""When serve checks its socket gauges against sock_diag after a loss, and
how a check matches the listing with what the program follows (pure logic,
no root): the bound the README states depends on them."""

from __future__ import annotations

import socket
import time

from tcptrace_ebpf.host.snapshot import Preexisting, Record
from tcptrace_ebpf.kernel.probe import FollowedSocket
from tcptrace_ebpf.model.addresses import AddressPair
from tcptrace_ebpf.model.states import TcpState
from tcptrace_ebpf.serve.tracking import (
    HEAL_INTERVAL_S,
    HEAL_RECHECK_S,
    HEAL_RESYNC_S,
    SETTLED_NS,
    HealSchedule,
    reconcile,
)


def started_at(now: float) -> HealSchedule:
    schedule = HealSchedule()
    schedule.checked(now, losses=0, fixed=False)  # the start-up snapshot
    schedule.checked(now, losses=0, fixed=False)  # its confirmation
    return schedule


def test_the_start_up_check_is_confirmed_soon() -> None:
    """A socket that closed while the start-up listing ran is still in it,
    and no longer followed: counted from the listing, it would stay."""
    schedule = HealSchedule()
    schedule.checked(0.0, losses=0, fixed=False)
    assert not schedule.due(HEAL_RECHECK_S - 0.5, losses=0)
    assert schedule.due(HEAL_RECHECK_S, losses=0)
    schedule.checked(HEAL_RECHECK_S, losses=0, fixed=False)
    assert not schedule.due(HEAL_RECHECK_S + HEAL_INTERVAL_S, losses=0)


def test_rarely_while_nothing_is_lost() -> None:
    """A change the kernel never gave the program is no counted loss: a
    slow resync is its last word."""
    schedule = started_at(0.0)
    assert not schedule.due(HEAL_RESYNC_S - 1, losses=0)
    assert schedule.due(HEAL_RESYNC_S, losses=0)
    schedule.checked(HEAL_RESYNC_S, losses=0, fixed=False)
    assert not schedule.due(HEAL_RESYNC_S + HEAL_INTERVAL_S, losses=0)


def test_a_loss_is_checked_at_most_every_interval() -> None:
    schedule = started_at(0.0)
    assert not schedule.due(HEAL_INTERVAL_S - 1, losses=3)
    assert schedule.due(HEAL_INTERVAL_S, losses=3)
    schedule.checked(HEAL_INTERVAL_S, losses=3, fixed=False)
    assert not schedule.due(HEAL_INTERVAL_S + 1, losses=3)  # accounted for
    assert not schedule.due(2 * HEAL_INTERVAL_S - 1, losses=4)
    assert schedule.due(2 * HEAL_INTERVAL_S, losses=4)


def test_a_check_that_fixed_something_is_confirmed_soon_once() -> None:
    schedule = started_at(0.0)
    schedule.checked(100.0, losses=3, fixed=True)
    assert not schedule.due(100.0 + HEAL_RECHECK_S - 0.5, losses=3)
    assert schedule.due(100.0 + HEAL_RECHECK_S, losses=3)  # no new loss needed
    # The confirmation fixed something too: the next waits a whole interval.
    schedule.checked(105.0, losses=3, fixed=True)
    assert not schedule.due(105.0 + HEAL_RECHECK_S, losses=3)
    assert schedule.due(105.0 + HEAL_INTERVAL_S, losses=3)


def test_worst_case_after_a_loss_is_interval_plus_recheck() -> None:
    """A loss just after a check: it is checked one interval later and, if
    that check raced with changes, confirmed HEAL_RECHECK_S after."""
    schedule = started_at(0.0)
    loss_at = 0.1
    check = next(t / 10 for t in range(1, 1000) if schedule.due(t / 10, losses=1))
    schedule.checked(check, losses=1, fixed=True)
    confirm = next(check + t / 10 for t in range(1, 1000) if schedule.due(check + t / 10, losses=1))
    assert confirm - loss_at <= HEAL_INTERVAL_S + HEAL_RECHECK_S


def pair(lport: int) -> AddressPair:
    return AddressPair(1, socket.AF_INET, "127.0.0.1", lport, "127.0.0.1", 80)


# When the listings of these tests began (CLOCK_MONOTONIC, ns).
LISTED_AT = 100 * SETTLED_NS


def followed(
    lport: int, state: TcpState, timewait: bool = False, state_ns: int = 1
) -> FollowedSocket:
    return FollowedSocket(
        address=lport,
        sock_id=lport,
        state=state,
        state_ns=state_ns,
        pair=pair(lport),
        timewait=timewait,
    )


def listing(*records: Record) -> Preexisting:
    return Preexisting(records, time.time())


def test_a_check_ends_what_the_listing_shows_gone() -> None:
    """A followed socket the listing has is the program's to count; one it
    lacks is gone. So is a full socket whose pair the listing has as a
    timewait socket: the kernel skipped the program on its way there (seen
    under load: 64 in FIN_WAIT1 whose timewait sockets nothing counted). A
    timewait socket the program follows there keeps it."""
    listed = listing(
        Record(pair(1), TcpState.ESTABLISHED, timewait=False, client=True),
        Record(pair(2), TcpState.TIME_WAIT, timewait=True, client=True),
        Record(pair(3), TcpState.TIME_WAIT, timewait=True, client=True),
        Record(pair(4), TcpState.TIME_WAIT, timewait=True, client=True),
    )
    sockets = [
        followed(1, TcpState.ESTABLISHED),
        followed(2, TcpState.FIN_WAIT1),  # its close into TIME_WAIT unseen
        followed(3, TcpState.FIN_WAIT1),  # the same, but then followed as timewait
        followed(5, TcpState.CLOSE_WAIT),  # not listed
        followed(3, TcpState.TIME_WAIT, timewait=True),
        followed(4, TcpState.TIME_WAIT, timewait=True),
    ]
    gone = reconcile(listed, sockets, lambda sock: True, LISTED_AT).gone
    assert [(sock.pair.lport, sock.state) for sock in gone] == [
        (2, TcpState.FIN_WAIT1),
        (3, TcpState.FIN_WAIT1),
        (5, TcpState.CLOSE_WAIT),
    ]
    # Counted from the listing: only the timewait socket nothing follows.
    assert listed.keys() == {pair(2)}
    assert listed.counts() == {TcpState.TIME_WAIT: 1}
    # Not provably gone (born during the listing, say): neither ended nor claimed.
    listed = listing(Record(pair(2), TcpState.TIME_WAIT, timewait=True, client=True))
    found_out = reconcile(listed, [followed(2, TcpState.FIN_WAIT1)], lambda sock: False, LISTED_AT)
    assert found_out.gone == []
    assert found_out.behind == []
    assert listed.keys() == {pair(2)}


def test_a_check_moves_what_the_listing_shows_in_another_state() -> None:
    """A followed full socket listed in another state than the program's,
    which the program has had it in since SETTLED_NS before the listing
    began, missed a change (the kernel skipped the program: seen under
    load, 64 clients left in FIN_WAIT1 while ss had them in FIN_WAIT2). One
    whose state began later, or when is not known, may be a change the
    listing did not see yet: left to the program. It is the program's to
    count either way."""
    settled = LISTED_AT - SETTLED_NS
    listed = listing(
        *(
            Record(pair(port), TcpState.FIN_WAIT2, timewait=False, client=True)
            for port in (1, 2, 3, 4, 5)
        )
    )
    sockets = [
        followed(1, TcpState.FIN_WAIT1, state_ns=settled),  # behind
        followed(2, TcpState.FIN_WAIT1, state_ns=settled + 1),  # too recent to tell
        followed(3, TcpState.FIN_WAIT1, state_ns=0),  # since when unknown
        followed(4, TcpState.FIN_WAIT2, state_ns=1),  # agrees
        followed(5, TcpState.SYN_RECV, state_ns=1),  # not a state the gauge counts
    ]
    found_out = reconcile(listed, sockets, lambda sock: True, LISTED_AT)
    assert [(sock.pair.lport, state) for sock, state in found_out.behind] == [
        (1, TcpState.FIN_WAIT2)
    ]
    assert found_out.gone == []
    assert len(listed) == 0  # all the program's to count
