"""Which program holds each CLOSE_WAIT socket, as `ss -p` names it (from /proc).

The kernel knows the owner it saw (the connect() caller, the listener's
owner); the holder may differ (a worker it was passed to). Finding it means
reading fd tables, which on a host with many sockets is costly and holds
the GIL the scrapes need: so only sockets not named yet and no longer new
are looked up (see `holders_due`), first in the fd table of the owner the
kernel recorded, and every process is searched at most once a minute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container, Iterable, Mapping

from ..errors import UserError
from ..host.snapshot import OldCloseWait
from ..kernel.probe import KernelCloseWait
from ..model.addresses import AddressPair
from ..model.states import TcpState

log = logging.getLogger(__name__)

HOLDER_MIN_AGE_S = 1.0  # younger CLOSE_WAIT sockets are left to the owner the kernel saw
FULL_HOLDER_SCAN_S = 60.0  # at most this often, every process's fd table is searched


def holders_due(
    tracked: Mapping[AddressPair, KernelCloseWait],
    old: Iterable[AddressPair],
    named: Container[AddressPair],
    now_ns: int,
    min_age_ns: int,
) -> dict[AddressPair, int]:
    """The CLOSE_WAIT sockets whose holder to look up now, with the pid the
    kernel recorded (0: none): those not named yet and at least `min_age_ns`
    in CLOSE_WAIT (`now_ns` and their start on CLOCK_MONOTONIC).

    Most CLOSE_WAIT sockets last a moment: the program closes right after
    reading the peer's FIN. Looking those up would read fd tables at every
    refresh on a busy host, for sockets gone before anyone asks. Sockets
    older than tracing (`old`) are always old enough.
    """
    due = {pair: s.pid for pair, s in tracked.items() if now_ns - s.since_ns >= min_age_ns}
    due.update(dict.fromkeys(old, 0))
    return {pair: pid for pair, pid in due.items() if pair not in named}


class CloseWaitHolders:
    """The programs holding CLOSE_WAIT sockets of our network namespace, and
    their cgroup paths (their container and pod), by address pair."""

    def __init__(self, netns: int) -> None:
        self.netns = netns
        self.comm: dict[AddressPair, str] = {}
        self.cgroup: dict[AddressPair, str] = {}
        self._last_full_scan = -FULL_HOLDER_SCAN_S

    def _ours(self, pair: AddressPair) -> AddressPair:
        """The kernel reports netns 0 where it cannot read it (no BTF): ours, then."""
        return pair if pair.netns else pair.in_netns(self.netns)

    def comm_of(self, pair: AddressPair) -> str | None:
        return self.comm.get(self._ours(pair))

    def cgroup_of(self, pair: AddressPair) -> str | None:
        return self.cgroup.get(self._ours(pair))

    def refresh(self, tracked: Iterable[KernelCloseWait], old: Iterable[OldCloseWait]) -> None:
        """Forget the sockets no longer in CLOSE_WAIT, look up those due."""
        from ..host import procfs, sockdiag

        by_pair = {self._ours(sock.pair): sock for sock in tracked}
        old_pairs = [item.pair for item in old]
        current = set(by_pair).union(old_pairs)
        names = {pair: comm for pair, comm in self.comm.items() if pair in current}
        self.comm = names
        cgroups = {pair: path for pair, path in self.cgroup.items() if pair in current}
        self.cgroup = cgroups
        missing = holders_due(
            by_pair, old_pairs, names, time.monotonic_ns(), int(HOLDER_MIN_AGE_S * 1e9)
        )
        if not missing:
            return
        try:
            listed = sockdiag.snapshot(states=[TcpState.CLOSE_WAIT])
        except (UserError, OSError) as err:
            log.debug("CLOSE_WAIT holders not refreshed: %s", err)
            return
        inode_of = {AddressPair.of(sock, self.netns): sock.inode for sock in listed if sock.inode}
        wanted = {inode_of[pair]: pair for pair in missing if pair in inode_of}
        if not wanted:
            return
        known_owners = {pid for pid in missing.values() if pid}
        holders = procfs.socket_holders(wanted, pids=known_owners) if known_owners else {}
        now = time.monotonic()
        if len(holders) < len(wanted) and now - self._last_full_scan >= FULL_HOLDER_SCAN_S:
            self._last_full_scan = now
            holders = procfs.socket_holders(wanted)
        for inode, pids in holders.items():
            for pid in pids:
                info = procfs.process_info(pid)
                if info is not None:
                    names[wanted[inode]] = info.comm
                    cgroups[wanted[inode]] = info.cgroup
                    break
