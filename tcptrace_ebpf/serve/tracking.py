"""Every TCP socket, counted: those the kernel program follows, plus those
older than it (the start-up snapshot) until the program sees them.

Start-up order matters: the probes attach first, and only then are existing
sockets snapshotted: a socket that changes state between the two is seen by
the program, and the snapshot's copy of a socket the program already follows
is dropped (the program's wins), so none falls between them. After a
recorded loss the counts are healed against sock_diag (see `heal`).

The daemon builds its metrics on this; `closewait --watch` uses it alone,
without the daemon's HTTP server, API or metrics, for CLOSE_WAIT ages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import UserError
from ..host.memory import release_freed_memory
from ..host.snapshot import COUNTED, Preexisting, list_sockets
from ..kernel.interface import LOST_CAUSES, born_by
from ..kernel.probe import FollowedSocket, Tracer, TracerOptions

log = logging.getLogger(__name__)

# After a recorded loss, the gauges are checked against sock_diag at most this
# often (a listing costs a dump of every socket of the namespace).
HEAL_INTERVAL_S = 30.0
# A check that fixed something may have raced with sockets changing state
# while it listed them: it is confirmed once, this much later (not a whole
# interval, which made the worst case two intervals). So tcptrace_sockets is
# back to the truth within HEAL_INTERVAL_S + HEAL_RECHECK_S plus two listings
# after a loss (README, "Gauges heal").
HEAL_RECHECK_S = 5.0
# And this often with nothing recorded lost: the last word on a change the
# kernel never gave the program at all (no loss to count), which would
# otherwise stay in the gauges for good. A listing costs about 12 µs per
# socket (bench/heal.py: 1.6 s for 128,000), so at most 0.5 % of a core.
HEAL_RESYNC_S = 300.0


@dataclass
class HealSchedule:
    """When the gauges are next checked against sock_diag. After a loss: at
    most every HEAL_INTERVAL_S. After a check that fixed something, and
    after the start-up one (a socket that closed while it listed would stay
    counted): again, HEAL_RECHECK_S later the first time, then every
    HEAL_INTERVAL_S while checks keep fixing something (a steady trickle of
    losses is checked no more often than that, which bounds the cost of
    listing). Otherwise every HEAL_RESYNC_S."""

    last_check: float = float("-inf")
    losses_checked: int = 0  # the loss count the last check accounted for
    fixed_in_a_row: int = 0  # consecutive checks that fixed something

    def due(self, now: float, losses: int) -> bool:
        since = now - self.last_check
        if self.fixed_in_a_row == 1:
            return since >= HEAL_RECHECK_S
        if self.fixed_in_a_row > 1 or losses != self.losses_checked:
            return since >= HEAL_INTERVAL_S
        return since >= HEAL_RESYNC_S

    def checked(self, now: float, losses: int, fixed: bool) -> None:
        first = self.last_check == float("-inf")
        self.fixed_in_a_row = self.fixed_in_a_row + 1 if fixed or first else 0
        self.last_check = now
        self.losses_checked = losses


# A followed socket whose state began at least this long before a listing
# did, and which the listing has in another state, missed a change: the
# kernel stores a new state just after the program saw it change, and a
# listing that began later reads what the program saw, unless that CPU stalls
# for longer than this (a virtual machine's may, for milliseconds).
SETTLED_NS = 1_000_000_000


@dataclass
class Reconciled:
    """What a listing tells of the sockets the program follows."""

    gone: list[FollowedSocket]  # not listed (or listed as a timewait socket): ended unseen
    behind: list[tuple[FollowedSocket, int]]  # listed in another state: that state


def reconcile(
    listed: Preexisting,
    followed: Iterable[FollowedSocket],
    provably_gone: Callable[[FollowedSocket], bool],
    listing_began_ns: int,
) -> Reconciled:
    """Match a listing with the sockets the program follows: claim from
    `listed` those it follows (the program's count wins) and tell those it
    follows that the listing shows gone (if `provably_gone` agrees) or in
    another state than the program's, one that began SETTLED_NS before the
    listing (on CLOCK_MONOTONIC, the program's clock) or earlier. A full
    socket whose pair is listed as a timewait socket is gone too: the kernel
    skipped the program as it closed (it comes before any timewait socket
    the program follows there: full sockets come first in followed())."""
    result = Reconciled(gone=[], behind=[])
    for sock in followed:
        index, state, timewait = listed.listed(sock.pair)
        if index >= 0 and (not state or not timewait or sock.timewait):
            if state:  # not claimed yet
                listed.claim(index)
                if (
                    not sock.timewait
                    and state != sock.state
                    and sock.state in COUNTED
                    and 0 < sock.state_ns <= listing_began_ns - SETTLED_NS
                ):
                    result.behind.append((sock, state))
            continue
        if provably_gone(sock):
            result.gone.append(sock)
    return result


class SocketTracking:
    """The loaded tracer and the snapshot of the sockets older than it."""

    def __init__(
        self,
        options: TracerOptions,
        netns: int,
        prepare: Callable[[Tracer], None] | None = None,
    ) -> None:
        self.netns = netns
        self.tracer = Tracer(options, prepare=prepare)
        self.preexisting: Preexisting | None = None
        self._watching_old_timewait = False
        self._heal_schedule = HealSchedule()

    def start(self) -> None:
        """Load and attach the program, then count the sockets already there."""
        try:
            self.tracer.start()
            self.heal()
        except BaseException:
            self.tracer.close()
            raise

    def close(self) -> None:
        self.tracer.close()

    def heal(self) -> None:
        """Make the counted sockets what sock_diag lists (every namespace it
        could enter: pods have their own).

        Run once the probes are attached, then after any recorded loss. A
        socket the program follows but sock_diag no longer lists (or lists
        as a timewait socket, see reconcile()) ended unseen: the program
        closes it (counted as end_unseen). A listed socket the program does
        not follow (older than tracing, or missed for a full map) is counted
        from this listing until the program sees it change state. A
        followed socket it lists in another state, one the program has had
        it in since before the listing, missed a change: the program moves
        it to the listed state (counted as missed_transition), or a
        CLOSE_WAIT leak whose change the kernel skipped would never show.

        The program's maps are read once, after the listing, a chunk at a
        time, and only what is kept is kept (on a busy host both hold
        hundreds of thousands of sockets): a socket is declared gone only
        if the program followed it before the listing began (its lifecycle
        id was given by then), since one born during the listing may have
        been missed by it; a socket both lists have is the program's.
        """
        started = time.monotonic()
        losses = self.losses()
        marks = self.tracer.id_marks()
        filters = self.tracer.options
        if not self._watching_old_timewait:
            # Before the listing: one of its timewait sockets may go right after it.
            self._watching_old_timewait = self.tracer.watch_old_timewait(True)
        listing_began_ns = time.monotonic_ns()
        try:
            listing = list_sockets(self.netns, filters.ports, filters.family, filters.pid)
        except (UserError, OSError) as err:
            self._heal_schedule.checked(started, losses, fixed=False)  # not retried at once
            if self.preexisting is None:
                log.warning(
                    "no start-up snapshot (%s): sockets older than the exporter are not counted",
                    err,
                )
                self.preexisting = Preexisting([], time.time())
            return
        # With --pid the listing has only that process's sockets: not its
        # orphans or timewait sockets, which no process holds. Not a proof
        # of death, then; nor is a namespace the listing could not enter.
        found_out = reconcile(
            listing,
            self.tracer.followed(),
            lambda sock: (
                filters.pid is None
                and sock.pair.netns in listing.namespaces
                and sock.state in COUNTED
                and born_by(sock.sock_id, marks)
            ),
            listing_began_ns,
        )
        ended = self.tracer.end_gone(found_out.gone)
        # A socket not moved changed state since it was read: the program saw it.
        moved = self.tracer.catch_up(found_out.behind)
        previous = self.preexisting
        snapshot = listing  # what the program does not follow, counted from here on
        if previous is not None:
            snapshot.keep_ages_from(previous)
            # Found now, not counted before: missed by the program (a loss).
            found = snapshot.count_not_in(previous)
        else:
            found = 0
            log.info("start-up snapshot: %d existing sockets", len(snapshot))
        self.preexisting = snapshot
        if ended or found or moved:
            log.info(
                "gauges healed: %d sockets gone unseen, %d found unfollowed, %d in another state",
                ended,
                found,
                moved,
            )
        self._heal_schedule.checked(started, losses, fixed=bool(ended or found or moved))
        release_freed_memory()  # the listing's, or each check leaves more heap held

    def losses(self) -> int:
        """Everything counted as lost so far (the counters with a loss cause)."""
        counters = self.tracer.counters()
        return sum(counters.get(name, 0) for name in LOST_CAUSES)

    def tick(self) -> None:
        """Housekeeping, once a second: sweep what waits in the kernel, heal
        after a loss, take in what the kernel saw of the older sockets."""
        self.tracer.sweep()
        if self._heal_schedule.due(time.monotonic(), self.losses()):
            self.heal()
        if self.preexisting is not None:
            self.preexisting.adopt(self.tracer.drain_adopted())
            self.preexisting.expire_timewait()
            if self._watching_old_timewait and not self.preexisting.has_timewait:
                # All gone: spare every timer cancel in the system the check.
                self.tracer.watch_old_timewait(False)
                self._watching_old_timewait = False
