"""Build, load and attach the BPF program; read what it produces.

BCC compiles and loads the program in a short-lived loader process
(loader.py, the only place bcc is imported at run time), so the tracer keeps
no compiler in memory: it gets the maps' and programs' file descriptors,
attaches the programs itself and reads maps and the event buffer without
BCC (bpfsys.py, maps.py). Everything it needs to know about the running
kernel comes from `kernel.detect_features()`; `build_source()` is pure so
the generated program can be inspected (and tested) without loading it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..host.memory import release_freed_memory
from ..model.addresses import AddressPair, Destination
from ..model.owners import ListenerSeed
from . import bpfsys, buckets, loader
from .features import (
    ADDR_FIELDS,
    FEATURE_MACROS,
    RAW_TCP_EVENTS,
    REQUIRED,
    SET_STATE_FIELDS,
    TIMEWAIT_LEN_S,
    TW_HEAD_LEN,
    Features,
    detect_features,
    macro_on,
    unsupported_reason,
)
from .features import headers_dir as find_headers_dir
from .interface import (
    COUNTER_NAMES,
    KERNEL_SKIPPED,
    METRIC_ARRAYS,
    TW_CHECK_BATCH,
    destination_of,
    pair_of_tuple,
)
from .maps import EventBuffer, Table
from .tracefs import c_struct, ensure_tracefs

log = logging.getLogger(__name__)


SET_STATE = "sock:inet_sock_set_state"


def tracepoint_of(key: str) -> str:
    """The tracepoint ("category:event") of a program's key: the key itself,
    or "category:event/program" for a second program on the tracepoint."""
    return key.split("/", 1)[0]


def bpf_source_dir() -> Path:
    """Directory of tcptrace.bpf.c: inside the installed package, or the repo's bpf/."""
    packaged = resources.files("tcptrace_ebpf") / "bpf"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "bpf"
    if (checkout / "tcptrace.bpf.c").is_file():
        return checkout
    raise UserError("the BPF sources (tcptrace.bpf.c) are missing from the installation: reinstall")


_LOCAL_INCLUDE = re.compile(r'^#include "([\w.-]+)"[ \t]*$', re.MULTILINE)


def program_text(source_dir: Path, name: str = "tcptrace.bpf.c") -> str:
    """The program as one text: `name` with each header of source_dir it
    includes (and they include) put in place of its #include, once.

    BCC rewrites map calls (`socks.lookup(&key)`) only in the text it is
    given, never in a file the compiler includes, so the program's parts
    reach it as one text. `#line` markers keep the compiler's messages
    pointing at the header and line they are about."""
    done: set[str] = set()

    def expand(file: str) -> str:
        done.add(file)
        lines = (source_dir / file).read_text().splitlines(keepends=True)
        parts = [f'#line 1 "{file}"\n']
        for number, line in enumerate(lines, start=1):
            match = _LOCAL_INCLUDE.match(line)
            if match is None or not (source_dir / match[1]).is_file():
                parts.append(line)
                continue
            if match[1] not in done:
                parts.append(expand(match[1]))
                parts.append(f'#line {number + 1} "{file}"\n')
        return "".join(parts) if parts[-1].endswith("\n") else "".join(parts) + "\n"

    return expand(name)


@dataclass(frozen=True)
class TracerOptions:
    """What to trace and how. Map sizes bound the kernel memory used."""

    emit_events: bool = True
    collect_metrics: bool = False
    ports: frozenset[int] = frozenset()
    pid: int | None = None
    family: int | None = None  # socket.AF_INET or AF_INET6
    max_sockets: int = 262144
    max_timewait: int = 262144
    max_killed: int = 65536
    max_listeners: int = 16384
    max_close_wait: int = 65536
    max_adopted: int = 65536
    max_pending_close: int = 16384
    max_dests: int = 65536
    ringbuf_bytes: int = 16 << 20
    port_slots: int = 1
    force_perf_buffer: bool = False
    # Load the compiled program from the cache when it holds it (loader.py);
    # doctor turns this off to check that the program compiles.
    use_cache: bool = True
    # How long a cancelled timewait socket may wait for the new connection
    # that reused its address pair (a SYN-ACK may need one retransmission).
    kill_grace_ns: int = 5_000_000_000
    # How long a close is held waiting for the RST of an abortive close,
    # which follows within microseconds in the same system call.
    pending_close_grace_ns: int = 100_000_000
    # A timewait socket followed this long ended unseen (TIME_WAIT lasts about
    # 60 s; a peer's retransmitted FINs can each restart it). Checked rarely.
    stale_timewait_ns: int = 600_000_000_000
    stale_check_interval_ns: int = 60_000_000_000
    # Where no program sees a timewait socket killed (USE_TW_EHASH), how
    # often each followed one is checked (less often when there are so many
    # that checks would take over 1 % of the time).
    timewait_check_interval_ns: int = 1_000_000_000


def _pow2_pages(nbytes: int) -> int:
    pages = max(1, nbytes // 4096)
    return 1 << (pages - 1).bit_length()


def _use_ringbuf(features: Features, options: TracerOptions) -> bool:
    """The BPF ring buffer where the kernel has one (5.8+), else a perf buffer."""
    return macro_on(features, "USE_RINGBUF") and not options.force_perf_buffer


def build_source(features: Features, options: TracerOptions) -> tuple[str, list[str]]:
    """The program text (generated preamble + tcptrace.bpf.c) and cflags."""
    unsupported = unsupported_reason(features)
    if unsupported:
        raise UserError(unsupported)
    source_dir = bpf_source_dir()
    defines: dict[str, int | str] = {
        "MAX_SOCKETS": options.max_sockets,
        "MAX_TIMEWAIT": options.max_timewait,
        "MAX_KILLED": options.max_killed,
        "MAX_LISTENERS": options.max_listeners,
        "MAX_CLOSE_WAIT": options.max_close_wait,
        "MAX_ADOPTED": options.max_adopted,
        "MAX_PENDING_CLOSE": options.max_pending_close,
        "MAX_DESTS": options.max_dests,
        "EMIT_EVENTS": int(options.emit_events),
        "COLLECT_METRICS": int(options.collect_metrics),
        "RINGBUF_PAGES": _pow2_pages(options.ringbuf_bytes),
        "FILTER_PORTS": int(bool(options.ports)),
        "FILTER_PID": options.pid or 0,
        "FILTER_FAMILY": options.family or 0,
        "PORT_SLOTS": max(1, options.port_slots),
        "SK_HEAD_START": features.sk_head[0],
        "SK_HEAD_LEN": max(8, features.sk_head[1]),
        "INET_HEAD_START": features.inet_head[0],
        "INET_HEAD_LEN": max(8, features.inet_head[1]),
        "KFREE_SKB_RX_SK_ARG": max(0, features.kfree_skb_rx_sk_arg),
    }
    for macro in FEATURE_MACROS:
        defines[macro] = int(macro_on(features, macro))
    defines["USE_RINGBUF"] = int(_use_ringbuf(features, options))
    defines["WATCH_OLD_TIMEWAIT"] = int(
        macro_on(features, "WATCH_OLD_TIMEWAIT")
        and options.collect_metrics
        and "OFF_TIMER_FUNCTION" in features.offsets
    )
    for name, offset in features.offsets.items():
        defines[name] = offset
    defines["TW_TIMER_HANDLER"] = f"0x{features.tw_timer_handler:x}ULL"
    defines["EHASH_BUCKET_SIZE"] = features.ehash_bucket_size
    defines["TW_HEAD_LEN"] = TW_HEAD_LEN
    hz = features.hz or 250  # only used when HAVE_TIMER_EXPIRES, which needs hz
    defines["NS_PER_JIFFY"] = f"{1_000_000_000 // hz}ULL"
    defines["TIMEWAIT_LEN_JIFFIES"] = f"{TIMEWAIT_LEN_S * hz}ULL"

    preamble = [f"#define {name} {value}" for name, value in defines.items()]
    structs = [
        ("tp_inet_sock_set_state", "inet_sock_set_state", list(SET_STATE_FIELDS), "set_state"),
        ("tp_tcp_receive_reset", "tcp_receive_reset", ["skaddr"], "reset_received"),
        ("tp_tcp_send_reset", "tcp_send_reset", ["skaddr"], "reset_sent"),
        (
            "tp_tcp_retransmit_skb",
            "tcp_retransmit_skb",
            ["skaddr", "state", *ADDR_FIELDS],
            "syn_retrans",
        ),
        ("tp_timer_start", "timer_start", ["timer", "function"], "timewait"),
        ("tp_timer_cancel", "timer_cancel", ["timer"], "timewait"),
        ("tp_timer_expire_entry", "timer_expire_entry", ["timer", "function"], "timewait"),
        ("tp_kfree_skb", "kfree_skb", ["rx_sk"], "kfree_rx_sk"),
    ]
    for struct_name, key, fields, capability in structs:
        if features.has(capability):
            preamble.append(c_struct(struct_name, features.formats[key], fields))
    for name, bounds in buckets.ALL.items():
        preamble.append(buckets.c_bucket_function(name, bounds))
    text = "\n".join(preamble) + "\n" + program_text(source_dir)
    cflags = [f"-I{source_dir}", "-Wno-macro-redefined", "-Wno-unused-function"]
    return text, cflags


@contextlib.contextmanager
def _capture_stderr() -> Iterator[Callable[[], str]]:
    """Collect what BCC's C++ code writes on fd 2 (clang and verifier output).

    BCC prints compiler warnings and verifier logs straight to fd 2; we keep
    them out of the user's terminal and log them, or put the useful line
    into the error message when loading fails.
    """
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:

        def read() -> str:
            sink.seek(0)
            return sink.read().decode(errors="replace")

        os.dup2(sink.fileno(), 2)
        try:
            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            text = read()
            if text.strip():
                log.debug("BCC output:\n%s", text)


def _verifier_reason(verifier_log: str) -> str:
    """The verifier's complaint: the last line of its log that says something."""
    lines = [line.strip() for line in verifier_log.splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("processed ", "verification time", "stack depth")):
            return line
    return "no verifier log"


def _first_error(output: str) -> str:
    for line in output.splitlines():
        if "error:" in line or line.startswith(("Unable to", "chdir(")):
            return line.strip()
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no details"


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError:
        raise UserError(
            "BCC's Python bindings are not importable: install them "
            "(Debian: apt-get install python3-bpfcc) and run tcptrace-ebpf from a virtual "
            "environment created with --system-site-packages (see README)"
        ) from None
    return bcc


def require_root() -> None:
    if os.geteuid() != 0:
        raise UserError("tcptrace-ebpf must run as root to load its BPF program: run it with sudo")


@dataclass(frozen=True, slots=True)
class KernelCloseWait:
    """A socket in CLOSE_WAIT as the kernel program recorded it."""

    pair: AddressPair
    since_ns: int  # CLOCK_MONOTONIC
    sock_id: int
    pid: int
    comm: str
    owner_source: int
    cgroup_id: int = 0  # the owner's cgroup v2 id (0: unknown)


@dataclass(frozen=True, slots=True)
class FollowedSocket:
    """A socket the kernel program follows: its map key, lifecycle and address pair."""

    address: int  # kernel address: the socks or timewait map's key
    sock_id: int
    state: int
    state_ns: int  # when its state began (bpf_ktime_get_ns, CLOCK_MONOTONIC); 0: unknown
    pair: AddressPair
    timewait: bool  # a timewait socket (else a full one)


@dataclass
class KilledTimewait:
    """A cancelled timewait socket awaiting classification (for tests and debugging)."""

    sock_id: int
    killed_ns: int


@dataclass
class Tracer:
    """The loaded BPF program. Use as a context manager, or call close()."""

    options: TracerOptions
    features: Features | None = None
    on_event: Callable[[bytes], None] | None = None
    # Runs after the program is loaded and before its probes are attached:
    # the moment to seed maps from a snapshot of what already exists.
    prepare: Callable[[Tracer], None] | None = None
    # The program's maps by name (None until loaded, and after close()).
    bpf: dict[str, Table] | None = field(default=None, init=False)
    attached: list[str] = field(default_factory=list, init=False)
    # How each tracepoint is attached: "btf" (tp_btf), "raw" or "classic".
    attach_kinds: dict[str, str] = field(default_factory=dict, init=False)
    tracefs_mounted: bool = field(default=False, init=False)
    # Programs user space runs (BPF_PROG_TEST_RUN), never attached: name -> fd.
    _sweepers: dict[str, int] = field(default_factory=dict, init=False)
    _next_stale_check_ns: int = field(default=0, init=False)
    _next_timewait_check_ns: int = field(default=0, init=False)
    _loaded: loader.Loaded | None = field(default=None, init=False)
    # Attachments (raw tracepoint and tp_btf links, perf events): closing one detaches.
    _attachments: list[int] = field(default_factory=list, init=False)
    # Attached programs: tracepoint -> program fd (for their skipped-run counts).
    _attached_progs: dict[str, int] = field(default_factory=dict, init=False)
    _events: EventBuffer | None = field(default=None, init=False)
    _tracefs: Path = field(default=Path("/sys/kernel/tracing"), init=False)
    _ring: bool = field(default=True, init=False)

    def start(self) -> None:
        require_root()
        self._tracefs, self.tracefs_mounted = ensure_tracefs()
        if self.tracefs_mounted:
            log.warning("tracefs was not mounted: mounted it at /sys/kernel/tracing")
        if self.features is None:
            self.features = detect_features()
        unsupported = unsupported_reason(self.features)
        if unsupported:  # before the headers, and the warnings of what it would lose
            raise UserError(unsupported)
        if find_headers_dir(self.features.release) is None:
            raise UserError(
                f"no kernel headers for kernel {self.features.release}, which BCC needs to "
                "compile the BPF program: run 'tcptrace-ebpf doctor --fix' (or install the "
                f"linux-headers package for {self.features.release})"
            )
        text, cflags = build_source(self.features, self.options)
        self._ring = _use_ringbuf(self.features, self.options)
        self._loaded = loader.load(text, cflags, self._plan(), use_cache=self.options.use_cache)
        # What this kernel lacks, once the program is loaded: an error that
        # stops the start (no BCC, a refused program) stays one line.
        for name, cap in self.features.capabilities.items():
            if not cap.available and name not in REQUIRED:
                log.warning("degraded: %s", cap.detail)
        for warning in self._loaded.warnings:
            log.warning("%s", warning)
        try:
            self.bpf = {name: Table(fd, info) for name, (fd, info) in self._loaded.maps.items()}
            self._fill_filters()
            if self.prepare is not None:
                self.prepare(self)
            self._attach_all()
        except BaseException:
            self.close()
            raise
        # What start-up needed only once: the kernel's BTF parsed for
        # offsets, the program text.
        release_freed_memory()

    def _fill_filters(self) -> None:
        if self.options.ports:
            table = self.table("filter_ports")
            for port in self.options.ports:
                table[table.Key(port)] = table.Leaf(1)

    def seed_listeners(self, seeds: Iterable[ListenerSeed]) -> int:
        """Record owners of listeners that existed before tracing started."""
        table = self.table("listeners")
        count = 0
        for seed in seeds:
            key = table.Key()
            key.netns = seed.netns
            key.port = seed.port
            value = table.Leaf()
            value.pid = seed.pid
            value.count = seed.count
            value.ambiguous = int(seed.ambiguous)
            value.comm = seed.comm.encode()[:15]
            value.cgroup_id = seed.cgroup_id
            table[key] = value
            count += 1
        return count

    def _plan(self) -> list[loader.ProgramRequest]:
        """The programs to load, in the order they are attached: the timer
        programs first (without USE_TW_EHASH the set_state program relies on
        seeing each timewait socket's timer start just before its close),
        set_state last. A busy program is tried as tp_btf (btf_<name>) where
        the kernel has it."""
        assert self.features is not None
        features = self.features
        plan: list[loader.ProgramRequest] = []

        def tracepoint(key: str, raw: bool, fastest: bool = True, name: str = "") -> None:
            # `name`: a second program on the tracepoint (key "category:event/name").
            event = tracepoint_of(key).split(":", 1)[1]
            btf_id = features.btf_trace_ids.get(event)
            use_btf = fastest and raw and btf_id is not None and macro_on(features, "USE_TP_BTF")
            plan.append(
                loader.ProgramRequest(
                    key=key,
                    name=name or event,
                    raw=raw,
                    btf_id=btf_id if use_btf else None,
                )
            )

        tw_ehash = macro_on(features, "USE_TW_EHASH")  # (implies HAVE_TIMEWAIT)
        if macro_on(features, "HAVE_TIMEWAIT"):
            raw_timers = macro_on(features, "USE_RAW_TIMERS")
            timers = ["timer_start", "timer_cancel", "timer_expire_entry"]
            if tw_ehash:
                # (each runs for every timer the host starts or moves: see tcptrace.bpf.c)
                timers = ["timer_expire_entry"]
            for event in timers:
                tracepoint(f"timer:{event}", raw_timers)
            if macro_on(features, "HAVE_KFREE_RX_SK"):
                tracepoint("skb:kfree_skb", macro_on(features, "USE_RAW_KFREE"))
            sweepers = ["sweep_killed", "sweep_timewait"]
            if tw_ehash:
                sweepers += ["check_timewait", "sweep_unhashed"]
            if macro_on(features, "CHECK_TW_FIN"):
                sweepers.append("sweep_fin_wait2")
            for sweeper in sweepers:
                plan.append(loader.ProgramRequest(key=sweeper, name=sweeper, sweeper=True))
        raw_tcp = macro_on(features, "USE_RAW_TCP_EVENTS")
        for name, feature in RAW_TCP_EVENTS.items():
            if features.has(feature):
                tracepoint(f"tcp:{name}", raw_tcp, fastest=False)
        for sweeper in ("sweep_pending_close", "sweep_gone", "sweep_behind"):
            plan.append(loader.ProgramRequest(key=sweeper, name=sweeper, sweeper=True))
        raw_set_state = macro_on(features, "USE_RAW_SET_STATE")
        if tw_ehash:
            tracepoint(f"{SET_STATE}/tw_reuse", raw_set_state, name="tw_reuse")
        tracepoint(SET_STATE, raw_set_state)
        return plan

    def _attach_all(self) -> None:
        assert self._loaded is not None
        for key, (prog_fd, program) in self._loaded.programs.items():
            if program.kind == "sweeper":
                self._sweepers[key] = prog_fd
                continue
            if key == SET_STATE and self.options.emit_events:
                self._open_event_buffer()
            self._attach(key, prog_fd, program.kind)
        if self.options.emit_events and self._events is None:
            self._open_event_buffer()

    def _attach(self, tracepoint: str, prog_fd: int, kind: str) -> None:
        self._attachments.append(self._link(tracepoint, prog_fd, kind))
        self._attached_progs[tracepoint] = prog_fd
        self.attached.append(tracepoint)
        self.attach_kinds[tracepoint] = kind

    def _link(self, tracepoint: str, prog_fd: int, kind: str) -> int:
        """Attach a loaded program: a tp_btf program where it was loaded for,
        a raw one to the raw tracepoint, a classic one to the tracepoint.
        Returns the attachment's fd (closing it detaches)."""
        try:
            if kind == "btf":
                return bpfsys.raw_tracepoint_open(prog_fd)
            if kind == "raw":
                return bpfsys.raw_tracepoint_attach(
                    prog_fd, tracepoint_of(tracepoint).split(":", 1)[1]
                )
            return bpfsys.tracepoint_attach(prog_fd, self._tracefs, tracepoint_of(tracepoint))
        except (bpfsys.BpfError, OSError) as err:
            what = {"btf": "BTF-typed raw tracepoint", "raw": "raw tracepoint"}.get(
                kind, "tracepoint"
            )
            raise UserError(f"could not attach to {what} {tracepoint}: {err.strerror}") from None

    def pause(self) -> None:
        """Detach every program, keeping them and their maps: until resume(),
        the kernel runs none of them. bench/toggle.py alternates the two to
        measure what the programs cost under the same load, second by second."""
        for fd in self._attachments:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._attachments.clear()

    def resume(self) -> None:
        """Attach again every program pause() detached."""
        if self._attachments:
            return
        for tracepoint, prog_fd in self._attached_progs.items():
            self._attachments.append(self._link(tracepoint, prog_fd, self.attach_kinds[tracepoint]))

    def _open_event_buffer(self) -> None:
        handler = self.on_event

        def deliver(raw: bytes) -> None:
            if handler is not None:
                handler(raw)

        def lost(count: int) -> None:
            # The kernel side counts these too (lost_ringbuf); just log.
            log.debug("perf buffer lost %d events", count)

        pages = _pow2_pages(self.options.ringbuf_bytes // max(1, os.cpu_count() or 1))
        try:
            self._events = EventBuffer(
                self.table("events").fd, deliver, ring=self._ring, perf_pages=pages, on_lost=lost
            )
        except bpfsys.BpfError as err:
            raise UserError(f"could not read the BPF event buffer: {err.strerror}") from None

    # -- running ---------------------------------------------------------

    def poll(self, timeout_ms: int) -> None:
        """Deliver waiting events to on_event; wait up to timeout_ms for some."""
        if not self.options.emit_events or self._events is None:
            time.sleep(timeout_ms / 1000)
            return
        self._events.poll(timeout_ms)

    def sweep(self, now_ns: int | None = None) -> int:
        """Finish what waited in the kernel past its grace period: closes no RST
        followed (timeouts), and timewait sockets removed early that no new
        connection claimed (killed); on 6.11+, first find the ones removed
        unseen (_check_timewait). Returns how many."""
        if self.bpf is None:
            return 0
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        done = 0
        if "sweep_pending_close" in self._sweepers:
            held = [
                key.value
                for key, value in self.table("pending_close").items()
                if value.ts_ns + self.options.pending_close_grace_ns <= now_ns
            ]
            request_sk = self.table("sweep_request_sk")
            for skaddr in held:
                request_sk[ctypes.c_int(0)] = ctypes.c_uint64(skaddr)
                bpfsys.prog_test_run(self._sweepers["sweep_pending_close"])
            done += len(held)
        if "sweep_fin_wait2" in self._sweepers:
            done += self._sweep_fin_wait2()
        if "check_timewait" in self._sweepers and now_ns >= self._next_timewait_check_ns:
            started = time.monotonic_ns()
            done += self._check_timewait()
            # Every second, or less often while a check costs more than 1 %
            # of the time between two (some 15,000 timewait sockets followed).
            spent = time.monotonic_ns() - started
            self._next_timewait_check_ns = now_ns + max(
                self.options.timewait_check_interval_ns, 100 * spent
            )
        if "sweep_timewait" in self._sweepers and now_ns >= self._next_stale_check_ns:
            self._next_stale_check_ns = now_ns + self.options.stale_check_interval_ns
            done += self._sweep_stale_timewait(now_ns)
        if "sweep_killed" not in self._sweepers:
            return done
        killed = self.table("tw_killed")
        due = [
            key
            for key, value in killed.items()
            if value.killed_ns + self.options.kill_grace_ns <= now_ns
        ]
        request = self.table("sweep_request")
        for key in due:
            request[ctypes.c_int(0)] = key
            bpfsys.prog_test_run(self._sweepers["sweep_killed"])
        return done + len(due)

    def _sweep_fin_wait2(self) -> int:
        """Timewait sockets in FIN_WAIT2 that the peer's FIN reached unseen
        (kernels before 6.11): moved to TIME_WAIT. Returns how many."""
        table = self.table("tw_fin_wait2")
        try:
            addresses = [int(getattr(key, "value", key)) for key, _ in table.items_lookup_batch()]
        except Exception:  # empty map: the batch call reports ENOENT
            return 0
        sweeper = self._sweepers["sweep_fin_wait2"]
        return sum(bpfsys.prog_test_run(sweeper, address) for address in addresses)

    def _check_timewait(self) -> int:
        """Timewait sockets killed unseen (ss -K, their namespace's exit) on
        kernels where no program sees a timer cancelled (USE_TW_EHASH): every
        one followed is checked, TW_CHECK_BATCH per run of check_timewait,
        and those found are parked by sweep_unhashed. Their addresses, the
        values of tw_pairs, go back to the kernel as read, with no Python
        object per socket. Returns how many were parked."""
        pairs = self.table("tw_pairs")
        batch = self.table("tw_check")
        zero = ctypes.c_int(0)
        parked = 0
        for _pairs, addresses, count in bpfsys.map_chunks(
            pairs.fd, pairs.info.key_size, pairs.info.value_size, TW_CHECK_BATCH
        ):
            if not count:
                continue
            packed = addresses[: count * pairs.info.value_size]
            bpfsys.map_update(batch.fd, bytes(zero), packed.ljust(batch.info.value_size, b"\0"))
            if not bpfsys.prog_test_run(self._sweepers["check_timewait"], count):
                continue
            found = bytes(batch[zero])
            size = pairs.info.value_size
            for index in range(0, len(packed), size):
                address = int.from_bytes(found[index : index + size], sys.byteorder)
                if address:
                    parked += bpfsys.prog_test_run(self._sweepers["sweep_unhashed"], address)
        return parked

    def _sweep_stale_timewait(self, now_ns: int) -> int:
        stale = [
            int(getattr(key, "value", key))  # batch lookups give plain ints for u64 keys
            for key, value in self.table("timewait").items_lookup_batch()
            if value.created_ns + self.options.stale_timewait_ns <= now_ns
        ]
        request_sk = self.table("sweep_request_sk")
        for address in stale:
            request_sk[ctypes.c_int(0)] = ctypes.c_uint64(address)
            bpfsys.prog_test_run(self._sweepers["sweep_timewait"])
        return len(stale)

    def followed(self) -> Iterator[FollowedSocket]:
        """Every socket the program follows now: full sockets, then timewait
        ones, read a chunk at a time (the maps may hold hundreds of
        thousands: a caller that keeps only what it needs stays small)."""
        if self.bpf is None:
            return
        for name in ("socks", "timewait"):
            try:
                table = self.bpf[name]
            except KeyError:  # no timewait map without TIME_WAIT tracking
                continue
            for key, value in table.items_lookup_batch():
                yield FollowedSocket(
                    address=int(getattr(key, "value", key)),
                    sock_id=int(value.id.sock_id),
                    state=int(value.id.state),
                    state_ns=int(value.id.state_ns),
                    pair=pair_of_tuple(value.tuple),
                    timewait=name == "timewait",
                )

    def id_marks(self) -> list[int]:
        """Where each CPU's lifecycle-id counter stands now: with
        interface.born_by(), tells the sockets followed by now from those
        the program meets later."""
        if self.bpf is None:
            return []
        return [int(mark) for mark in self.table("next_sock_id")[ctypes.c_int(0)]]

    def end_gone(self, gone: Iterable[FollowedSocket]) -> int:
        """Close, as ended unseen, followed sockets that no longer exist (their
        end was lost). Each only if it is still the same lifecycle. How many."""
        if self.bpf is None or "sweep_gone" not in self._sweepers:
            return 0
        request_sk = self.bpf["sweep_request_sk"]
        request_id = self.bpf["sweep_request_id"]
        ended = 0
        for sock in gone:
            request_sk[ctypes.c_int(0)] = ctypes.c_uint64(sock.address)
            request_id[ctypes.c_int(0)] = ctypes.c_uint64(sock.sock_id)
            ended += bpfsys.prog_test_run(self._sweepers["sweep_gone"])
        return ended

    def catch_up(self, behind: Iterable[tuple[FollowedSocket, int]]) -> int:
        """Move followed sockets to the state sock_diag lists them in (a
        change of theirs went unseen), each only if the program still has it
        as it was read. How many were moved."""
        if self.bpf is None or "sweep_behind" not in self._sweepers:
            return 0
        request_sk = self.bpf["sweep_request_sk"]
        request = self.bpf["sweep_request_behind"]
        moved = 0
        for sock, listed_state in behind:
            want = request.Leaf()
            want.sock_id = sock.sock_id
            want.state_ns = sock.state_ns
            want.recorded = sock.state
            want.listed = listed_state
            request_sk[ctypes.c_int(0)] = ctypes.c_uint64(sock.address)
            request[ctypes.c_int(0)] = want
            moved += bpfsys.prog_test_run(self._sweepers["sweep_behind"])
        return moved

    def program_runs(self) -> dict[str, bpfsys.ProgramRuns]:
        """The kernel's counts of each attached program, by tracepoint."""
        if self.bpf is None:
            return {}
        return {
            tracepoint: bpfsys.program_runs(prog_fd)
            for tracepoint, prog_fd in self._attached_progs.items()
        }

    def program_skips(self) -> dict[str, int]:
        """Runs skipped by the kernel, by tracepoint: the program was not run
        because another tracing BPF program was running on that CPU."""
        return {tracepoint: runs.skipped for tracepoint, runs in self.program_runs().items()}

    def pending_killed(self) -> list[KilledTimewait]:
        if self.bpf is None or "sweep_killed" not in self._sweepers:
            return []
        return [
            KilledTimewait(sock_id=value.id.sock_id, killed_ns=value.killed_ns)
            for value in self.table("tw_killed").values()
        ]

    def lost_sock_ids(self) -> set[int]:
        """Lifecycles that lost at least one event (bounded: the most recent 65536)."""
        if self.bpf is None or not self.options.emit_events:
            return set()
        return {int(key.value) for key in self.table("lost_socks")}

    def counters(self) -> dict[str, int]:
        """Self counters summed over CPUs, by name (see COUNTER_NAMES), plus
        `kernel_skipped`: state changes whose program run the kernel skipped."""
        if self.bpf is None:
            return dict.fromkeys([*COUNTER_NAMES.values(), KERNEL_SKIPPED], 0)
        table = self.table("counters")
        values = {}
        for index, name in COUNTER_NAMES.items():
            values[name] = int(sum(table[ctypes.c_int(index)]))
        values[KERNEL_SKIPPED] = self.program_skips().get(SET_STATE, 0)
        return values

    def metric_arrays(self) -> dict[str, list[int]]:
        """Every per-CPU metric array, summed over CPUs (one batch syscall each)."""
        return {name: self.percpu_array(name) for name in METRIC_ARRAYS}

    def close_wait_sockets(self) -> list[KernelCloseWait]:
        """Sockets the program saw enter CLOSE_WAIT and not leave it yet."""
        result = []
        for _key, value in self.table("close_wait").items():
            result.append(
                KernelCloseWait(
                    pair=pair_of_tuple(value.tuple),
                    since_ns=int(value.since_ns),
                    sock_id=int(value.sock_id),
                    pid=int(value.pid),
                    comm=bytes(value.comm).split(b"\0", 1)[0].decode(errors="replace"),
                    owner_source=int(value.owner_source),
                    cgroup_id=int(value.cgroup_id),
                )
            )
        return result

    def timewait_owners(self) -> list[tuple[AddressPair, str, int]]:
        """Each followed timewait socket's address pair, the program that made
        the connection and its cgroup id (no process holds a timewait socket;
        the kernel program remembers who owned the connection)."""
        return [
            (
                pair_of_tuple(value.tuple),
                bytes(value.id.comm).split(b"\0", 1)[0].decode(errors="replace"),
                int(value.id.cgroup_id),
            )
            for _key, value in self.table("timewait").items_lookup_batch()
        ]

    def dest_ports(self) -> dict[Destination, int]:
        """Local ports in use per remote address:port (client sockets, TIME_WAIT included)."""
        result: dict[Destination, int] = {}
        table = self.table("dest_ports")
        try:
            items = list(table.items_lookup_batch())
        except Exception:  # an empty hash map makes the batch call fail with ENOENT
            items = list(table.items())
        for key, value in items:
            result[destination_of(key)] = int(value.value if hasattr(value, "value") else value)
        return result

    def drain_adopted(self) -> list[tuple[AddressPair, int]]:
        """News of pre-existing sockets since the last call (then forgotten):
        (address pair, value), the value being the state a socket
        was first seen leaving, or TT_ADOPT_OLD_TIMEWAIT | the state of a
        timewait socket (CLOSE once it is gone)."""
        # Read and deleted in one step: news the program writes for a socket
        # meanwhile is read now or stays for the next call.
        return [
            (pair_of_tuple(key), int(value.value)) for key, value in self.table("adopted").pop_all()
        ]

    def watch_old_timewait(self, on: bool) -> bool:
        """Have the program report when timewait sockets older than tracing
        go (only while user space counts some: it costs a read per timer
        cancelled). False if this kernel cannot."""
        if self.bpf is None or self.features is None or not self.features.has("tw_tuple"):
            return False
        try:
            table = self.table("watch_old_timewait")
        except KeyError:
            return False
        table[ctypes.c_int(0)] = ctypes.c_uint32(int(on))
        return True

    def percpu_array(self, name: str) -> list[int]:
        """A per-CPU array map, summed over CPUs (signed values stay signed)."""
        table = self.table(name)
        result = []
        for _key, per_cpu in table.items_lookup_batch():
            result.append(int(sum(per_cpu)))
        return result

    def table(self, name: str) -> Table:
        if self.bpf is None:
            raise RuntimeError("the BPF program is not loaded")
        return self.bpf[name]

    def close(self) -> None:
        """Detach every probe and free the program; safe to call twice."""
        if self._events is not None:
            self._events.close()
            self._events = None
        self.pause()  # the attachments first: that detaches
        self._attached_progs.clear()
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
        self._sweepers.clear()
        self.bpf = None
        self.attached.clear()
        self.attach_kinds.clear()

    def __enter__(self) -> Tracer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def family_from_flag(ipv4: bool, ipv6: bool) -> int | None:
    if ipv4 and ipv6:
        return None
    if ipv4:
        return socket.AF_INET
    if ipv6:
        return socket.AF_INET6
    return None
