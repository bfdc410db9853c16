"""Our counters against the kernel's own (issue 13): a mixed workload in a
network namespace the test creates, then every rule "this MIB counter =
these metrics" checked exactly, and the socket gauge against ss.

The rules are the project's definition of exact; README.md ("Exact: the
kernel's own counters") says why each holds. They hold for this workload,
which avoids what the metrics do not tell apart (a connect() given up by the
application in SYN_SENT, established connections timing out).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import close_pipes, netns_single, nft, requires_root, sh, wait_for
from test_serve import Samples, delta, scrape, serving, value

from tcptrace_ebpf.kernel.tracefs import find_tracefs

WORKLOAD = Path(__file__).resolve().parent / "crosscheck_workload.py"
CLOSED = "tcptrace_connections_closed_total"
OPENED = "tcptrace_connections_opened_total"
TRANSITIONS = "tcptrace_state_transitions_total"
SYN_RETRANSMITS = "tcptrace_syn_retransmits_total"
SS_NAMES = {
    "ESTAB": "ESTABLISHED", "SYN-SENT": "SYN_SENT", "SYN-RECV": "SYN_RECV",
    "FIN-WAIT-1": "FIN_WAIT1", "FIN-WAIT-2": "FIN_WAIT2", "TIME-WAIT": "TIME_WAIT",
    "CLOSE-WAIT": "CLOSE_WAIT", "LAST-ACK": "LAST_ACK", "LISTEN": "LISTEN",
    "CLOSING": "CLOSING",
}  # fmt: skip
STATES = tuple(SS_NAMES.values())


def mib(netns: str) -> dict[str, int]:
    """The namespace's TCP counters (what nstat -az reads), by name."""
    counters: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = sh("ip", "netns", "exec", netns, "cat", path).stdout.splitlines()
        for header, values in zip(lines[::2], lines[1::2], strict=True):
            prefix, names = header.split(":", 1)
            if prefix not in ("Tcp", "TcpExt"):
                continue
            numbers = values.split(":", 1)[1].split()
            counters.update(zip(names.split(), map(int, numbers), strict=True))
    return counters


def firewall_drops(netns: str) -> int:
    """Packets the test's nftables rule dropped (its counter)."""
    out = sh("ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet",
             "tcptrace_crosscheck").stdout  # fmt: skip
    return sum(
        expr["counter"]["packets"]
        for item in json.loads(out)["nftables"]
        if "rule" in item
        for expr in item["rule"]["expr"]
        if isinstance(expr, dict) and "counter" in expr
    )


def lost_or_skipped(samples: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every loss counted, and every program run the kernel skipped (of any
    program: a skipped retransmit or timer program loses no event, but it
    explains a miss)."""
    counted = ("tcptrace_lost_events_total", "tcptrace_program_skipped_runs_total")
    return {key: v for key, v in samples.items() if key[0] in counted and v}


# What a failed rule's message shows of ours besides connections opened and
# closed: how the close sequences went (the FIN_WAIT2 and TIME_WAIT rules).
TIME_WAIT_COUNTS = (
    TRANSITIONS,
    "tcptrace_time_wait_skipped_total",
    "tcptrace_time_wait_duration_seconds_count",
)


def connection_counts(before: Samples, after: Samples) -> dict[str, float]:
    """Our connections opened and closed, the state changes into and out of
    FIN_WAIT2 and TIME_WAIT and the TIME_WAIT ends since `before`, and the
    socket gauge now, by labels, where not zero (said when a rule does not
    hold)."""
    counts: dict[str, float] = {}
    for (name, labels), v in after.items():
        if name == "tcptrace_sockets":
            moved = v
        elif name in (OPENED, CLOSED) or (
            name in TIME_WAIT_COUNTS
            and (name != TRANSITIONS or {"FIN_WAIT2", "TIME_WAIT"} & {x for _, x in labels})
        ):
            moved = v - before.get((name, labels), 0)
        else:
            continue
        if moved:
            counts[f"{name}{dict(labels)}"] = moved
    return counts


def followed_in_syn_sent() -> list[dict[str, object]]:
    """The program's own records of sockets it holds in SYN_SENT (every
    `socks` map of a running tracer, through bpftool, and the closes its
    `pending_close` holds), said when a rule does not hold: whether a
    connect the kernel timed out is still followed there (its CLOSE never
    applied), held, or gone from both. BCC's maps carry no BTF: the values
    are raw bytes, and both begin with struct tt_ident (bpf/tcptrace.h)."""
    found: list[dict[str, object]] = []
    for name in ("socks", "pending_close"):
        out = subprocess.run(
            ["bpftool", "-j", "map", "dump", "name", name],
            check=False, capture_output=True, text=True,
        ).stdout  # fmt: skip
        try:
            entries = [
                (bytes(int(b, 16) for b in e["key"]), bytes(int(b, 16) for b in e["value"]))
                for e in json.loads(out or "[]")
            ]
        except (json.JSONDecodeError, KeyError, TypeError):
            found.append({"bpftool": out[:200]})
            continue
        for key, raw in entries:
            sock_id, _birth, state_ns = struct.unpack_from("<QQQ", raw)
            seq, syn_retrans, state, _role, _owner, flags = struct.unpack_from("<HHBBBB", raw, 28)
            if state == 2:  # SYN_SENT
                found.append(
                    {
                        "map": name,
                        "sk": hex(int.from_bytes(key, "little")),
                        "sock_id": sock_id,
                        "state_ns": state_ns,
                        "seq": seq,
                        "syn_retrans": syn_retrans,
                        "flags": flags,
                    }
                )
    return found


def ss_states(netns: str) -> collections.Counter[str]:
    out = sh("ip", "netns", "exec", netns, "ss", "-tanH").stdout
    return collections.Counter(SS_NAMES[line.split()[0]] for line in out.splitlines() if line)


class KernelRanNoProgram(Exception):
    """Some of the workload's state changes ran no BPF program at all, and
    the kernel counted none as skipped: the run proves nothing either way."""


@contextlib.contextmanager
def kernel_trace(base: int) -> Iterator[Callable[[], list[int]]]:
    """The kernel's own record of the workload's state changes: a tracefs
    instance of ours (removed on exit) with sock:inet_sock_set_state for
    ports BASE..BASE+9 at either end. Yields a function giving the threads
    of PID 1 that some of them ran in, where the development machine's
    kernel runs no BPF program, softirqs that happen to run there included
    (README, "Kernels"): the cross-check's own workload ran there when the
    agent's threads took softirqs."""
    root = find_tracefs()
    if root is None:
        yield lambda: []
        return
    instance = root / "instances" / f"tcptrace_crosscheck_{uuid.uuid4().hex[:8]}"
    instance.mkdir()
    try:
        event = instance / "events" / "sock" / "inet_sock_set_state"
        last = base + 9
        ports = f"(sport >= {base} && sport <= {last}) || (dport >= {base} && dport <= {last})"
        (event / "filter").write_text(ports)
        (event / "enable").write_text("1")

        def in_pid1_threads() -> list[int]:
            threads = []
            for line in (instance / "trace").read_text().splitlines():
                if line.startswith("#") or "inet_sock_set_state:" not in line:
                    continue
                tid = int(line.split("[", 1)[0].rsplit("-", 1)[1])
                if tid == 1 or Path(f"/proc/1/task/{tid}").exists():
                    threads.append(tid)
            return threads

        yield in_pid1_threads
    finally:
        with contextlib.suppress(OSError):
            (instance / "events" / "sock" / "inet_sock_set_state" / "enable").write_text("0")
        instance.rmdir()


def closed(before: Samples, after: Samples, close: str, *roles: str) -> float:
    return sum(delta(before, after, CLOSED, role=role, close=close) for role in roles)


BOTH = ("client", "server")


def rules(
    before: Samples, after: Samples, kernel: Callable[[str], int], firewall_drops: int
) -> list[tuple[str, float, float]]:
    """(rule, kernel's count, ours) for every rule. `firewall_drops`: SYNs the
    test's nftables rule dropped (its counter)."""
    d = lambda name, **labels: delta(before, after, name, **labels)  # noqa: E731
    reset_sent = closed(before, after, "reset_sent", *BOTH)
    # Each connect() that timed out sent its SYN and every retransmission of
    # it (how many in how long differs by kernel), none answered.
    unanswered_syns = closed(before, after, "timeout", "client") + d(SYN_RETRANSMITS)
    return [
        (
            "ActiveOpens = opened{client} - closed{client,connect_failed}",
            kernel("ActiveOpens"),
            d(OPENED, role="client") - closed(before, after, "connect_failed", "client"),
        ),
        ("PassiveOpens = opened{server}", kernel("PassiveOpens"), d(OPENED, role="server")),
        (
            "AttemptFails = closed{client,refused} + closed{client,timeout}",
            kernel("AttemptFails"),
            closed(before, after, "refused", "client") + closed(before, after, "timeout", "client"),
        ),
        (
            # A RST sent from FIN_WAIT2 (TCP_LINGER2 < 0: TCPAbortOnLinger)
            # ends no established connection; its peer's, in CLOSE_WAIT, does.
            "EstabResets + TCPAbortOnLinger = closed{reset_sent} + closed{reset_received}",
            kernel("EstabResets") + kernel("TCPAbortOnLinger"),
            reset_sent + closed(before, after, "reset_received", *BOTH),
        ),
        (
            "OutRsts = closed{reset_sent} + closed{client,refused}",
            kernel("OutRsts"),
            reset_sent + closed(before, after, "refused", "client"),
        ),
        (
            "TCPAbortOnData + TCPAbortOnClose + TCPAbortOnLinger = closed{reset_sent}",
            kernel("TCPAbortOnData") + kernel("TCPAbortOnClose") + kernel("TCPAbortOnLinger"),
            reset_sent,
        ),
        (
            "TWRecycled = time_wait_duration_seconds_count{end=reused}",
            kernel("TWRecycled"),
            d("tcptrace_time_wait_duration_seconds_count", end="reused"),
        ),
        (
            # Counted when the timewait socket is made (since 5.18); TWKilled
            # when its timer is 4 s or less.
            "TW + TWKilled = closed{active} + closed{simultaneous} - time_wait_skipped_total",
            kernel("TW") + kernel("TWKilled"),
            closed(before, after, "active", *BOTH)
            + closed(before, after, "simultaneous", *BOTH)
            - d("tcptrace_time_wait_skipped_total"),
        ),
        (
            "TCPTimeWaitOverflow = time_wait_skipped_total",
            kernel("TCPTimeWaitOverflow"),
            d("tcptrace_time_wait_skipped_total"),
        ),
        (
            # No SYN-ACK is sent again here (TCPSynRetrans counts those too).
            "TCPSynRetrans = syn_retransmits_total",
            kernel("TCPSynRetrans"),
            d(SYN_RETRANSMITS),
        ),
        (
            # A SYN dropped by a full accept queue changes no socket's state:
            # the client sends it again, and its connect() ends in timeout.
            "ListenDrops + firewall drops = closed{client,timeout} + syn_retransmits_total",
            kernel("ListenDrops") + firewall_drops,
            unanswered_syns,
        ),
        (
            "ListenOverflows + firewall drops = closed{client,timeout} + syn_retransmits_total",
            kernel("ListenOverflows") + firewall_drops,
            unanswered_syns,
        ),
        (
            # A timewait socket in FIN_WAIT2 whose timer (TCP_LINGER2, 4 s or
            # less) ran out before the peer's FIN, or a close in FIN_WAIT2 with
            # TCP_LINGER2 < 0 (a RST); the rest of FIN_WAIT2 -> CLOSE are
            # closes that got no timewait socket.
            "TWKilled + TCPAbortOnLinger = transitions{FIN_WAIT2->CLOSE} - time_wait_skipped_total",
            kernel("TWKilled") + kernel("TCPAbortOnLinger"),
            d(TRANSITIONS, old_state="FIN_WAIT2", new_state="CLOSE")
            - d("tcptrace_time_wait_skipped_total"),
        ),
        (
            "CurrEstab = sockets{ESTABLISHED}",
            kernel("CurrEstab"),
            value(after, "tcptrace_sockets", state="ESTABLISHED"),
        ),
    ]


# Runs of the cross-check in one pytest session (issue 13 asks for 20 in a
# row on every kernel): TCPTRACE_CROSSCHECK_RUNS=20, which the kernel
# matrix passes into its guests, where one boot and one compile serve all.
RUNS = int(os.environ.get("TCPTRACE_CROSSCHECK_RUNS", "1"))


# A run is made again, this many times in all, when the kernel ran no
# program for some of its changes (KernelRanNoProgram).
ATTEMPTS = 3


@requires_root
@pytest.mark.parametrize("run", range(1, RUNS + 1))
def test_counters_equal_the_kernels(run: int) -> None:  # each run the same
    void: list[str] = []
    for _ in range(ATTEMPTS):
        try:
            cross_check()
            return
        except KernelRanNoProgram as err:
            print(f"run again: {err}")  # pytest -s
            void.append(str(err))
    pytest.fail(f"no attempt of {ATTEMPTS} had every change run the program: {void}")


def cross_check() -> None:
    base = random.randrange(61000, 64000, 10)  # outside the ephemeral range
    ports = [*range(base, base + 10)]
    with netns_single() as ns, kernel_trace(base) as in_pid1_threads:
        nft(
            ns,
            f"""
            table inet tcptrace_crosscheck {{
                chain input {{
                    type filter hook input priority 0;
                    tcp dport {base + 5} tcp flags & (syn | ack) == syn counter drop
                }}
            }}
            """,
        )
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")
        args = [arg for port in ports for arg in ("--port", str(port))]
        with serving(*args) as (run_, http_port):
            before = scrape(http_port)
            mib_before = mib(ns)
            workload = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, str(WORKLOAD), str(base)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert workload.stdout is not None
                did = json.loads(workload.stdout.readline())
                assert did["syn_timeout"] == 2, did
                assert did["refused"] == 12, did
                assert did.get("connect_failed") == 1, did
                assert did["tw_overflow"] == 3, did
                assert did["queued"] == 2, did
                assert did["full_queue_timeout"] == 2, did
                assert did["fin_wait2_timeout"] == 3, did
                assert did["abort_on_linger"] == 3, did
                # Kill the server side's timewait sockets (server-first closes).
                sh("ip", "netns", "exec", ns, "ss", "-K", "-tan", "state", "time-wait",
                   f"( sport = :{base + 1} )")  # fmt: skip
                table: list[tuple[str, float, float]] = []
                losses: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
                moved: dict[str, int] = {}
                ours_moved: dict[str, float] = {}

                def exact() -> bool:
                    after = scrape(http_port)
                    now = mib(ns)
                    moved.clear()
                    moved.update(
                        {k: v - mib_before[k] for k, v in now.items() if v != mib_before[k]}
                    )
                    ours_moved.clear()
                    ours_moved.update(connection_counts(before, after))
                    table[:] = rules(
                        before, after, lambda name: now[name] - mib_before[name], firewall_drops(ns)
                    )
                    losses.clear()
                    losses.update(lost_or_skipped(after))
                    return all(kernel == ours for _, kernel, ours in table)

                try:
                    wait_for(
                        exact,
                        timeout=60,
                        interval=0.5,
                        what=lambda: (
                            f"rules {[r for r in table if r[1] != r[2]]} (losses {losses};"
                            f" kernel counters that moved {moved}; ours {ours_moved};"
                            f" followed in SYN_SENT {followed_in_syn_sent()};"
                            f" ss {dict(ss_states(ns))}; serve's log {run_.stderr[-12:]})"
                        ),
                    )
                    print(*table, sep="\n")  # what was compared (pytest -s)
                    gauge: dict[str, float] = {}
                    truth: dict[str, float] = {}

                    def gauge_is_ss() -> bool:
                        samples = scrape(http_port)
                        gauge.update(
                            {s: value(samples, "tcptrace_sockets", state=s) for s in STATES}
                        )
                        counts = ss_states(ns)
                        truth.update({s: float(counts[s]) for s in STATES})
                        return gauge == truth

                    # Kernels without kfree_skb's rx_sk see a FIN reach a timewait
                    # socket in FIN_WAIT2 within a second, not at once.
                    wait_for(gauge_is_ss, timeout=10, what=lambda: f"gauge {gauge} vs ss {truth}")
                    after = scrape(http_port)
                    lost = {
                        labels: v
                        for (name, labels), v in after.items()
                        if name == "tcptrace_lost_events_total" and v
                    }
                    assert not lost
                except AssertionError as err:
                    threads = in_pid1_threads()
                    if not threads:
                        raise
                    raise KernelRanNoProgram(
                        f"{len(threads)} of the workload's state changes ran in threads"
                        f" {sorted(set(threads))} of PID 1: {str(err)[:300]}"
                    ) from err
            finally:
                with contextlib.suppress(Exception):
                    workload.communicate("\n", timeout=30)
                if workload.poll() is None:
                    workload.kill()
                    workload.wait()
                close_pipes(workload)
