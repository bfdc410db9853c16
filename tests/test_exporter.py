"""The exporter's own choices, without a kernel: which CLOSE_WAIT sockets
get their holder looked up in /proc."""

from __future__ import annotations

import socket

from tcptrace_ebpf.kernel.probe import KernelCloseWait
from tcptrace_ebpf.model.addresses import AddressPair
from tcptrace_ebpf.serve.holders import holders_due

SECOND_NS = 1_000_000_000
NETNS = 4026531840


def close_wait(rport: int, since_ns: int, pid: int) -> KernelCloseWait:
    pair = AddressPair(NETNS, socket.AF_INET, "127.0.0.1", 80, "127.0.0.2", rport)
    return KernelCloseWait(pair, since_ns, sock_id=rport, pid=pid, comm="srv", owner_source=0)


def keyed(*socks: KernelCloseWait) -> dict[AddressPair, KernelCloseWait]:
    return {sock.pair: sock for sock in socks}


def test_only_sockets_past_the_minimum_age_are_looked_up() -> None:
    now = 100 * SECOND_NS
    young = close_wait(1001, now - SECOND_NS // 10, pid=7)
    exactly = close_wait(1002, now - SECOND_NS, pid=7)
    old = close_wait(1003, now - 30 * SECOND_NS, pid=8)
    due = holders_due(keyed(young, exactly, old), [], {}, now, SECOND_NS)
    assert due == {exactly.pair: 7, old.pair: 8}
    # The young one is due once it has aged.
    later = holders_due(keyed(young), [], {}, now + SECOND_NS, SECOND_NS)
    assert later == {young.pair: 7}


def test_named_sockets_are_not_looked_up_again_and_old_ones_always_are() -> None:
    now = 100 * SECOND_NS
    named = close_wait(1001, 0, pid=7)
    older_than_tracing = AddressPair(NETNS, socket.AF_INET, "127.0.0.1", 80, "127.0.0.2", 2000)
    due = holders_due(keyed(named), [older_than_tracing], {named.pair: "srv"}, now,
                      SECOND_NS)  # fmt: skip
    # No kernel-recorded owner for a socket older than tracing: pid 0.
    assert due == {older_than_tracing: 0}
