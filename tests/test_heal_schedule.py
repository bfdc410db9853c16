"""When serve checks its socket gauges against sock_diag after a loss (pure
logic, no root): the bound the README states depends on it."""

from __future__ import annotations

from tcptrace_ebpf.kernel.interface import ADOPT_OLD_TIMEWAIT
from tcptrace_ebpf.model.states import TcpState
from tcptrace_ebpf.serve.tracking import (
    HEAL_INTERVAL_S,
    HEAL_RECHECK_S,
    HEAL_RESYNC_S,
    HealSchedule,
    closed_into_timewait,
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


def test_an_unfollowed_socket_closing_into_time_wait_calls_for_a_check() -> None:
    """The program follows no timewait socket whose full socket it did not
    follow: news of one first seen leaving FIN_WAIT2 or CLOSING makes a
    check due, which lists it. Other news does not."""
    assert closed_into_timewait(TcpState.FIN_WAIT2)
    assert closed_into_timewait(TcpState.CLOSING)
    assert not closed_into_timewait(TcpState.ESTABLISHED)
    assert not closed_into_timewait(TcpState.LAST_ACK)
    # News of a timewait socket older than tracing (its end, or a re-arm).
    assert not closed_into_timewait(ADOPT_OLD_TIMEWAIT | TcpState.FIN_WAIT2)
    assert not closed_into_timewait(ADOPT_OLD_TIMEWAIT | TcpState.CLOSE)
