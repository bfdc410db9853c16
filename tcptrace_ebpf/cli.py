"""The tcptrace-ebpf command: a thin click layer over the library.

Every expected failure (bad flag, not root, no BCC, no headers, missing
tracepoint, port in use) ends as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TextIO

import click

from . import __version__
from .errors import UserError

log = logging.getLogger("tcptrace_ebpf")

PROG = "tcptrace-ebpf"


def notice(message: str) -> None:
    """A status line on stderr (tests and scripts wait for some of them)."""
    click.echo(f"{PROG}: {message}", err=True)


class ReaderGone(Exception):
    """Our stdout's reader went away (EPIPE): end quietly, as Unix filters do."""


class OutputInterrupted(Exception):
    """A signal arrived while a write was blocked on a stalled reader."""


# What a shell reports for a program killed by SIGPIPE (128 + 13): `yes | head`
# ends `yes` so. Python ignores SIGPIPE and gets EPIPE instead, so we exit with
# the same status ourselves.
EXIT_READER_GONE = 141


class Output:
    """Buffered stdout, flushed after each batch of events.

    A write that fails ends the command: a reader gone (EPIPE) quietly with
    ``ReaderGone``, anything else (a full disk, ``> /dev/full``) with one
    line. ``failed`` says so; ``on_failure`` (the command's stop) is called
    once. While a write is blocked on a stalled reader, ``interrupt()``
    (called from a SIGINT/SIGTERM handler) abandons it, so that signals
    work whatever the output does.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.closed = False
        self.reader_gone = False
        self.error: OSError | None = None
        self.on_failure: Callable[[], None] | None = None
        self._writing = False

    @property
    def failed(self) -> bool:
        return self.reader_gone or self.error is not None

    def write(self, line: str) -> None:
        if self.closed:
            return
        self._guarded(self.stream.write, line + "\n")

    def flush(self) -> None:
        if self.closed:
            return
        self._guarded(self.stream.flush)

    def _guarded(self, operation: Callable[..., Any], *args: Any) -> None:
        self._writing = True
        try:
            operation(*args)
        except BrokenPipeError:
            self.reader_gone = True
            self._close()
        except OSError as err:
            self.error = err
            self._close()
        except OutputInterrupted:
            self._close()
        finally:
            self._writing = False

    def interrupt(self) -> None:
        """From a signal handler: abandon a write blocked on the reader."""
        if self._writing:
            self._writing = False
            raise OutputInterrupted

    def watch_reader(self) -> None:
        """Notice a reader that went away even when there is nothing to write."""
        if self.closed:
            return
        try:
            poller = select.poll()
            poller.register(self.stream.fileno(), 0)  # POLLERR and POLLHUP are always reported
            events = poller.poll(0)
        except (OSError, ValueError, io.UnsupportedOperation):
            return
        if any(mask & select.POLLERR for _fd, mask in events):
            # On a pipe's write end, POLLERR means its read end is closed.
            self.reader_gone = True
            self._close()

    def _close(self) -> None:
        self.closed = True
        # What is still buffered would be flushed (and fail again, or block
        # on the stalled reader) at interpreter exit: send it nowhere.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        if self.on_failure is not None:
            self.on_failure()

    def raise_failure(self) -> None:
        """After the command stopped: how it ends."""
        if self.reader_gone:
            raise ReaderGone
        if self.error is not None:
            raise UserError(
                f"cannot write the output: {self.error.strerror or self.error}", exit_code=1
            )


# The kernel program's port filter holds this many (filter_ports in bpf/tcptrace.bpf.c).
MAX_PORTS = 1024


def _check_port_count(
    _ctx: click.Context, _param: click.Parameter, ports: tuple[int, ...]
) -> tuple[int, ...]:
    if len(set(ports)) > MAX_PORTS:
        raise click.BadParameter(
            f"{len(set(ports))} ports given, {MAX_PORTS} at most; trace without --port"
            " and filter the output instead"
        )
    return ports


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Which sockets to follow, and how many at most: shared by every command that traces."""
    decorators = [
        click.option(
            "--port",
            "ports",
            multiple=True,
            type=click.IntRange(1, 65535),
            callback=_check_port_count,
            help=f"Only sockets with this local or remote port (repeatable, {MAX_PORTS} at most).",
        ),
        click.option("--pid", type=click.IntRange(min=1), help="Only sockets owned by this pid."),
        click.option("-4", "--ipv4", "ipv4", is_flag=True, help="Only IPv4."),
        click.option("-6", "--ipv6", "ipv6", is_flag=True, help="Only IPv6."),
        click.option(
            "--max-sockets",
            type=click.IntRange(1024, 16_777_216),
            default=262_144,
            show_default=True,
            help="Sockets followed at once in the kernel (bounds its memory).",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def tracer_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Filters, plus the event buffer of the commands that stream events."""
    decorators = [
        filter_options,
        click.option(
            "--buffer-mb",
            type=click.IntRange(1, 1024),
            default=16,
            show_default=True,
            help="Event buffer size shared with the kernel.",
        ),
        click.option(
            "--perf-buffer",
            is_flag=True,
            hidden=True,
            help="Use a perf buffer even if the kernel has a BPF ring buffer.",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


class SecondsParam(click.ParamType):  # type: ignore[type-arg]
    """A finite number of seconds, more than 0 (nan, inf and 1e400 are not)."""

    name = "seconds"
    MAX = 10 * 365 * 86400.0

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds, e.g. 30 or 0.5", param, ctx)
        if not math.isfinite(seconds) or not 0 < seconds <= self.MAX:
            self.fail(
                f"{value!r} is not a number of seconds from 0 (excluded) to {self.MAX:.0f}",
                param,
                ctx,
            )
        return seconds


def workload_filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--pod / --container: only sockets whose owner runs there (checked in user
    space, on each event's cgroup id, so only when asked for)."""
    func = click.option(
        "--container", default=None, help="Only sockets owned in this container (name or id)."
    )(func)
    return click.option(
        "--pod", default=None, help="Only sockets owned in this Kubernetes pod (NAME or NS/NAME)."
    )(func)


def _workload_filter(
    workload_of: Callable[[int], Any], pod: str | None, container: str | None
) -> Callable[[int], bool] | None:
    """cgroup id -> whether --pod/--container want it; None without those filters."""
    if pod is None and container is None:
        return None
    return lambda cgroup_id: bool(workload_of(cgroup_id).matches(pod, container))


def duration_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--duration",
        type=SecondsParam(),
        help="Stop by itself after this many seconds.",
    )(func)


def _build_options(
    *,
    emit_events: bool,
    collect_metrics: bool,
    ports: tuple[int, ...],
    pid: int | None,
    ipv4: bool,
    ipv6: bool,
    max_sockets: int,
    buffer_mb: int = 16,
    perf_buffer: bool = False,
    **extra: Any,
) -> Any:
    from .probe import TracerOptions, family_from_flag

    return TracerOptions(
        emit_events=emit_events,
        collect_metrics=collect_metrics,
        ports=frozenset(ports),
        pid=pid,
        family=family_from_flag(ipv4, ipv6),
        max_sockets=max_sockets,
        max_timewait=max_sockets,
        ringbuf_bytes=buffer_mb << 20,
        force_perf_buffer=perf_buffer,
        **extra,
    )


def _describe_start(tracer: Any) -> str:
    features = tracer.features
    parts = [f"{len(tracer.attached)} tracepoints"]
    if not features.has("timewait"):
        parts.append("TIME_WAIT not measured on this kernel (see 'tcptrace-ebpf doctor')")
    return "tracing started (" + ", ".join(parts) + "); Ctrl-C to stop"


def _lost_summary(counters: dict[str, int]) -> str:
    labels = {
        "lost_ringbuf": "buffer full",
        "lost_socket_map": "socket map full",
        "lost_timewait_map": "timewait map full",
        "lost_killed_map": "killed-timewait map full",
        "lost_listener_map": "listener map full",
        "lost_close_wait_map": "close-wait map full",
        "lost_adopted_map": "adopted map full",
        "lost_dest_map": "destination map full",
        "lost_fin_wait2_map": "FIN_WAIT2 check map full",
        "kernel_skipped": "skipped by the kernel",
    }
    total = sum(counters.get(key, 0) for key in labels)
    detail = ", ".join(
        f"{label}: {counters[key]}" for key, label in labels.items() if counters.get(key)
    )
    return f"{total} lost" + (f" ({detail})" if detail else "")


def _skipped_tcp_runs(program_skips: dict[str, int]) -> str:
    """The reset and retransmission programs' runs the kernel skipped, if any:
    a skipped one leaves a close kind or a SYN retransmission count short.
    (Timer programs' skips are left out: nearly all concern other timers.)"""
    skipped = {tp: n for tp, n in sorted(program_skips.items()) if tp.startswith("tcp:") and n}
    if not skipped:
        return ""
    detail = ", ".join(f"{tp}: {n}" for tp, n in skipped.items())
    return f"; runs skipped by the kernel ({detail})"


def seed_existing(tracer: Any) -> None:
    """Give the kernel program the owners of listeners that predate it."""
    from .seed import collect_listener_seeds

    seeded = tracer.seed_listeners(collect_listener_seeds())
    log.debug("seeded %d existing listening ports", seeded)


def _run_event_command(
    options: Any,
    *,
    duration: float | None,
    make_handler: Callable[[Any], Callable[[bytes], None]],
    finish: Callable[[set[int]], str],
    out: Output,
) -> None:
    """Load the tracer, hand raw events to the handler `make_handler(decoder)`
    returns until stopped, then print a summary."""
    from .events import Decoder
    from .probe import Tracer
    from .runner import StopFlag, clock_offset_ns, run
    from .workloads import shared as shared_workloads

    # Owners' cgroup ids name their container and pod in the JSON output.
    decoder = Decoder(clock_offset_ns(), shared_workloads().of_id)
    handle = make_handler(decoder)
    delivered = [0]

    def on_event(raw: bytes) -> None:
        delivered[0] += 1
        handle(raw)

    with StopFlag() as stop:
        out.on_failure = stop.set
        stop.on_signal = out.interrupt
        tracer = Tracer(options, on_event=on_event, prepare=seed_existing)
        try:
            tracer.start()
            notice(_describe_start(tracer))
            run(
                tracer,
                decoder,
                duration,
                stop=stop,
                after_poll=out.flush,
                on_tick=out.watch_reader,
            )
            counters = tracer.counters()
            skipped = _skipped_tcp_runs(tracer.program_skips())
            lost_socks = tracer.lost_sock_ids()
        finally:
            tracer.close()
    out.raise_failure()
    extra = finish(lost_socks)
    notice(
        f"stopped: {delivered[0]} events reported ({counters['events']} TCP state changes "
        f"seen on the host), {_lost_summary(counters)}{skipped}{extra}"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name=PROG)
@click.option("--debug", is_flag=True, help="Log details (BPF compiler output, degradations).")
def cli(debug: bool) -> None:
    """See every TCP socket's lifecycle, live, from the Linux kernel (needs root)."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format=f"{PROG}: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per state change.")
@tracer_options
@workload_filter_options
@duration_option
def trace(
    as_json: bool,
    duration: float | None,
    pod: str | None,
    container: str | None,
    **filters: Any,
) -> None:
    """Print every TCP state change: time, owner, address pair, OLD>NEW, time in OLD."""
    from .render import trace_line

    options = _build_options(emit_events=True, collect_metrics=False, **filters)
    out = Output()

    def make_handler(decoder: Any) -> Callable[[bytes], None]:
        decode = decoder.decode
        wanted = _workload_filter(decoder.workload_of, pod, container)
        if as_json:
            json_line = decoder.json_line
            if wanted is None:
                return lambda raw: out.write(json_line(raw))

            def write_json(raw: bytes) -> None:
                if wanted(decode(raw).cgroup_id):
                    out.write(json_line(raw))

            return write_json
        if wanted is None:
            return lambda raw: out.write(trace_line(decode(raw)))

        def write_line(raw: bytes) -> None:
            event = decode(raw)
            if wanted(event.cgroup_id):
                out.write(trace_line(event))

        return write_line

    def finish(_lost_socks: set[int]) -> str:
        out.flush()
        return ""

    _run_event_command(
        options, duration=duration, make_handler=make_handler, finish=finish, out=out
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per lifecycle.")
@click.option(
    "--events-to",
    type=click.File("w", lazy=False),
    hidden=True,
    help="Also write every event, as `trace --json` would, to this file (records test streams).",
)
@tracer_options
@workload_filter_options
@duration_option
def lifecycles(
    as_json: bool,
    events_to: TextIO | None,
    duration: float | None,
    pod: str | None,
    container: str | None,
    **filters: Any,
) -> None:
    """Print each socket's whole lifecycle once it ends: path, durations, how it closed."""
    from .lifecycle import LifecycleEngine
    from .render import lifecycle_line

    options = _build_options(emit_events=True, collect_metrics=False, **filters)
    out = Output()
    engine = LifecycleEngine()
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    from .workloads import shared as shared_workloads

    workload_of = shared_workloads().of_id
    wanted = _workload_filter(workload_of, pod, container)
    shown = (
        (lambda life: dumps(life.to_json(workload_of(life.cgroup_id))))
        if as_json
        else lifecycle_line
    )

    def write(life: Any) -> None:
        if wanted is None or wanted(life.cgroup_id):
            out.write(shown(life))

    def make_handler(decoder: Any) -> Callable[[bytes], None]:
        decode = decoder.decode

        def handle(raw: bytes) -> None:
            event = decode(raw)
            if events_to is not None:
                events_to.write(decoder.json_line(raw) + "\n")
            for life in engine.feed(event):
                write(life)

        return handle

    def finish(lost_socks: set[int]) -> str:
        still_open = engine.flush(lost_socks)
        for life in still_open:
            write(life)
        out.flush()
        stats = engine.stats
        return f"; {stats.lifecycles} lifecycles, {len(still_open)} still open" + (
            f", {stats.evicted} evicted" if stats.evicted else ""
        )

    _run_event_command(
        options, duration=duration, make_handler=make_handler, finish=finish, out=out
    )


DEFAULT_LISTEN = ":10072"
# Served by serve besides the metrics: not available as --web.telemetry-path.
RESERVED_PATHS = ("/", "/-/healthy", "/-/ready")
DEFAULT_API_SOCKET = Path("/run/tcptrace-ebpf/api.sock")


def api_socket_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--api.socket`: where serve answers (and closewait/timewait ask)."""
    return click.option(
        "--api.socket",
        "api_socket",
        default=str(DEFAULT_API_SOCKET),
        show_default=True,
        help=help_text,
    )


@cli.command()
@click.option(
    "--web.listen-address",
    "--listen-address",
    "listen_address",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Where to serve metrics (10072 is free in Prometheus' default-port list).",
)
@click.option(
    "--web.telemetry-path",
    "telemetry_path",
    default="/metrics",
    show_default=True,
    help="Path of the metrics page.",
)
@click.option(
    "--web.config.file",
    "web_config_file",
    type=click.Path(dir_okay=False),
    help="Prometheus exporter-toolkit web config: TLS and basic-auth users.",
)
@click.option(
    "--metrics.port-label",
    "port_label",
    is_flag=True,
    help='Add a `port` label (local listening port, 19 at most, then "other") to per-role metrics.',
)
@api_socket_option("Root-only unix socket where `closewait` gets CLOSE_WAIT ages ('' to disable).")
@click.option(
    "--log.level",
    "log_level",
    type=click.Choice(["debug", "info", "warn", "error"]),
    default="info",
    show_default=True,
)
@filter_options
def serve(
    *,
    listen_address: str,
    telemetry_path: str,
    web_config_file: str | None,
    port_label: bool,
    api_socket: str,
    log_level: str,
    **filters: Any,
) -> None:
    """Export Prometheus metrics of every TCP socket's life (the daemon)."""
    from .api import check_path as check_api_path
    from .exporter import Exporter, ServeOptions
    from .probe import require_root
    from .runner import StopFlag
    from .webserver import load_web_config, parse_listen_address

    level = {"warn": "WARNING"}.get(log_level, log_level.upper())
    logging.getLogger().setLevel(level)
    if not telemetry_path.startswith("/"):
        raise UserError(f"invalid --web.telemetry-path {telemetry_path!r}: it must start with '/'")
    if telemetry_path in RESERVED_PATHS:
        raise UserError(
            f"invalid --web.telemetry-path {telemetry_path!r}: {', '.join(RESERVED_PATHS)} are"
            " the landing page and probes; use another path, e.g. /metrics"
        )
    api_path = Path(api_socket) if api_socket else None
    # Everything the user can get wrong is checked before anything starts,
    # so that nothing says "serving" first.
    listen = parse_listen_address(listen_address)
    web_config = load_web_config(web_config_file)
    require_root()
    if api_path is not None:
        check_api_path(api_path)
    options = ServeOptions(
        listen=listen,
        telemetry_path=telemetry_path,
        web_config=web_config,
        tracer=_build_options(emit_events=False, collect_metrics=True, **filters),
        port_label=port_label,
        api_path=api_path,
    )
    exporter = Exporter(options)
    with StopFlag() as stop:
        exporter.start()
        try:
            assert exporter.server is not None
            host, port = exporter.server.address
            scheme = exporter.server.scheme
            shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
            notice(
                f"tracing started ({len(exporter.tracer.attached)} tracepoints); serving "
                f"metrics at {scheme}://{shown}:{port}{telemetry_path}"
            )
            exporter.serve_forever(stop)
            counters = exporter.tracer.counters()
            skipped = _skipped_tcp_runs(exporter.tracer.program_skips())
        finally:
            exporter.close()
    notice(
        f"stopped: {counters['events']} TCP state changes seen, {_lost_summary(counters)}{skipped}"
    )


class DurationParam(click.ParamType):  # type: ignore[type-arg]
    """A duration: 90, 90s, 1m30s, 2h."""

    name = "duration"
    _PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
    _UNITS: ClassVar[dict[str | None, float]] = {
        "ms": 0.001,
        "s": 1,
        "m": 60,
        "h": 3600,
        "d": 86400,
        None: 1,
    }

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip()
        total, position = 0.0, 0
        for match in self._PART.finditer(text):
            if match.start() != position:
                break
            total += float(match.group(1)) * self._UNITS[match.group(2)]
            position = match.end()
        if not text or position != len(text):
            self.fail(f"{value!r} is not a duration like 30s, 2m or 1h30m", param, ctx)
        return total


@cli.command()
@click.option(
    "--min-age",
    type=DurationParam(),
    default="30s",
    show_default=True,
    help="Only sockets in CLOSE_WAIT at least this long.",
)
@click.option("--sockets", "per_socket", is_flag=True, help="One line per socket, not per process.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per process (or socket).")
@click.option("--watch", is_flag=True, help="Refresh a live table in place until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@click.option(
    "--pod", default=None, help="Only sockets held in this Kubernetes pod (NAME or NAMESPACE/NAME)."
)
@click.option("--container", default=None, help="Only sockets held in this container (name or id).")
@api_socket_option("Where the running `serve` answers with CLOSE_WAIT ages.")
def closewait(
    *,
    min_age: float,
    per_socket: bool,
    as_json: bool,
    watch: bool,
    interval: float,
    pod: str | None,
    container: str | None,
    api_socket: str,
) -> None:
    """Find CLOSE_WAIT leaks: which process holds sockets whose peer closed, how many, since when.

    Ages come from the running `tcptrace-ebpf serve`; without it, --watch
    traces by itself (ages exact from then on), a one-shot run shows none.
    """
    from .api import ApiUnavailable, query
    from .closewait import ages_from_api
    from .probe import require_root
    from .seed import own_netns_inum

    require_root()
    netns = own_netns_inum()
    path = Path(api_socket)
    own_tracer: Any = None
    try:
        query(path, "ping", timeout=2.0)
    except ApiUnavailable as err:
        if watch:
            own_tracer = _start_own_tracer()
            source = "this command's own tracer (no daemon running)"
            # As trace says it: scripts wait for this line (ages count from here).
            notice(f"tracing started: {source}; ages count from now")
        else:
            hint = (
                "; start 'tcptrace-ebpf serve', or use --watch to measure from now"
                if err.no_daemon
                else ""
            )
            notice(f"ages unknown: {err}{hint}")
            source = ""
    else:
        source = f"tcptrace-ebpf serve at {path}"

    def ages() -> Any:
        if own_tracer is not None:
            return ages_from_api(own_tracer.close_wait_list(), netns)
        if not source:
            return {}
        try:
            return ages_from_api(query(path, "close_wait"), netns)
        except ApiUnavailable as err:
            notice(f"ages unknown: {err}")
            return {}
        except (KeyError, TypeError, ValueError, AttributeError, OSError, OverflowError):
            # Valid JSON but not our daemon's list: root talks to whatever
            # owns the path, so its answer is not trusted to be well formed.
            notice(f"ages unknown: the daemon at {path} sent a malformed answer")
            return {}

    out = Output()
    try:
        if not watch:
            _show_close_wait(
                out,
                ages=ages(),
                min_age=min_age,
                per_socket=per_socket,
                as_json=as_json,
                source=source,
                clear=False,
                pod=pod,
                container=container,
            )
            out.flush()
            out.raise_failure()
            return
        from .runner import StopFlag

        with StopFlag() as stop:
            out.on_failure = stop.set
            stop.on_signal = out.interrupt
            while not stop.stopped:
                _show_close_wait(
                    out,
                    ages=ages(),
                    min_age=min_age,
                    per_socket=per_socket,
                    as_json=as_json,
                    source=source,
                    clear=not as_json,
                    pod=pod,
                    container=container,
                )
                out.flush()
                deadline = time.monotonic() + interval
                while not stop.stopped and time.monotonic() < deadline:
                    if own_tracer is not None:
                        own_tracer.tick()
                    time.sleep(min(0.2, interval))
                    out.watch_reader()
    finally:
        if own_tracer is not None:
            own_tracer.close()
    out.raise_failure()


def _start_own_tracer() -> Any:
    from .exporter import Exporter, ServeOptions
    from .probe import TracerOptions

    exporter = Exporter(
        ServeOptions(
            listen=None,
            api_path=None,
            tracer=TracerOptions(emit_events=False, collect_metrics=True),
        )
    )
    exporter.start()
    return exporter


def _show_close_wait(
    out: Output,
    *,
    ages: Any,
    min_age: float,
    per_socket: bool,
    as_json: bool,
    source: str,
    clear: bool,
    pod: str | None = None,
    container: str | None = None,
) -> None:
    from .closewait import format_age, gather, group_by_process, old_enough
    from .render import format_endpoint

    sockets = old_enough(gather(ages), min_age)
    if pod is not None or container is not None:
        sockets = [sock for sock in sockets if any(h.matches(pod, container) for h in sock.holders)]
    groups = group_by_process(sockets)
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    if as_json:
        for group in groups:
            if per_socket:
                for sock in group.sockets:
                    out.write(dumps(sock.to_json(group.holder)))
            else:
                out.write(dumps(group.to_json()))
        return
    if clear:
        out.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S"))
    held = sum(group.count for group in groups if group.holder is not None)
    what = f"ages from {source}" if source else "ages unknown"
    out.write(
        f"{len(sockets)} sockets in CLOSE_WAIT for at least {min_age:g}s "
        f"({len([g for g in groups if g.holder])} processes hold {held}); {what}"
    )
    if per_socket:
        out.write(f"{'PID':>7} {'COMM':<15} {'LOCAL':<23} {'REMOTE':<23} {'AGE':>8} {'RECV-Q':>7}")
        for group in groups:
            for sock in sorted(group.sockets, key=lambda s: -(s.age_s or 0)):
                out.write(
                    f"{group.holder.pid if group.holder else '-':>7} "
                    f"{(group.holder.comm if group.holder else 'unknown')[:15]:<15} "
                    f"{format_endpoint(sock.family, sock.laddr, sock.lport):<23} "
                    f"{format_endpoint(sock.family, sock.raddr, sock.rport):<23} "
                    f"{format_age(sock.age_s, sock.age_is_lower_bound):>8} {sock.recv_q:>7}"
                )
        return
    out.write(f"{'PID':>7} {'COMM':<15} {'COUNT':>6} {'OLDEST':>8} {'MEDIAN':>8}  PORTS  TOP PEERS")
    for group in groups:
        holder = group.holder
        peers = ", ".join(f"{raddr}:{rport} x{count}" for raddr, rport, count in group.top_peers(3))
        ports = ",".join(str(port) for port in group.local_ports[:4])
        out.write(
            f"{holder.pid if holder else '-':>7} {(holder.comm if holder else 'unknown')[:15]:<15} "
            f"{group.count:>6} {format_age(group.oldest_age_s, group.oldest_is_lower_bound):>8} "
            f"{format_age(group.median_age_s, False):>8}  {ports}  {peers}"
        )
        if holder is not None:
            if holder.pod:
                where = f"pod: {holder.namespace}/{holder.pod}  container: {holder.container}"
            elif holder.container_id:
                where = f"container: {holder.container_id[:12]}"
            else:
                where = f"cgroup: {holder.cgroup}"
            out.write(f"{'':>7} cmd: {holder.cmdline[:60]}  {where}")


@cli.command()
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@api_socket_option("Where the running `serve` answers with the programs behind TIME_WAIT.")
def timewait(top: int, as_json: bool, api_socket: str) -> None:
    """TIME_WAIT pressure: ports in use per destination against the ephemeral range,
    TIME_WAIT per local service port and per program."""
    from .api import ApiUnavailable, query
    from .seed import own_netns_inum
    from .timewait import gather

    owners: dict[tuple[str, int, str, int], str] | None = None
    data: list[dict[str, Any]] = []
    try:
        data = query(Path(api_socket), "time_wait", timeout=10.0)
    except ApiUnavailable as err:
        hint = "; start 'tcptrace-ebpf serve' to know them" if err.no_daemon else ""
        notice(f"programs unknown: {err}{hint}")
    else:
        netns = own_netns_inum()
        try:
            owners = {
                (str(item["laddr"]), int(item["lport"]), str(item["raddr"]), int(item["rport"])): (
                    str(item["comm"])
                )
                for item in data
                if item["netns"] in (netns, 0)
            }
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            # Valid JSON, but not our daemon's list (see closewait).
            notice(f"programs unknown: the daemon at {api_socket} sent a malformed answer")
            owners = None
            data = []
    view = gather(owners, data)
    if as_json:
        click.echo(json.dumps(view.to_json(top), separators=(",", ":")))
        return
    size = view.range_size
    low, high = view.range
    click.echo(f"ephemeral ports {low}-{high}: {size} per destination")
    click.echo(f"{'DESTINATION':<40} {'IN USE':>7} {'TIME_WAIT':>9} {'OF RANGE':>8}")
    for dest in view.destinations[:top]:
        where = (
            f"[{dest.raddr}]:{dest.rport}" if ":" in dest.raddr else f"{dest.raddr}:{dest.rport}"
        )
        share = f"{100 * dest.in_use / size:.1f}%" if size else "?"
        click.echo(f"{where:<40} {dest.in_use:>7} {dest.time_wait:>9} {share:>8}")
    if view.service_ports:
        click.echo(f"{'LOCAL SERVICE PORT':<40} {'TIME_WAIT':>9}")
        for port, count in view.service_ports[:top]:
            click.echo(f"{port:<40} {count:>9}")
    if view.programs:
        click.echo(f"{'PROGRAM':<40} {'TIME_WAIT':>9}")
        for comm, count in view.programs[:top]:
            click.echo(f"{comm:<40} {count:>9}")
    if any(any(workload) for workload, _count in view.workloads):
        # Every network namespace: pods have their own.
        click.echo(f"{'POD/CONTAINER (ALL NETWORK NAMESPACES)':<40} {'TIME_WAIT':>9}")
        for (namespace, pod, container), count in view.workloads[:top]:
            where = f"{namespace}/{pod}/{container}" if pod else (container or "(host)")
            click.echo(f"{where:<40} {count:>9}")


@cli.command()
@click.option("--fix", is_flag=True, help="Apply the fixes that can be applied safely.")
def doctor(fix: bool) -> None:
    """Check that this host can run tcptrace-ebpf, and say how to fix what is missing."""
    from .doctor import run_doctor

    ok = run_doctor(fix=fix, echo=click.echo)
    if not ok:
        raise UserError("some checks failed (see above)", exit_code=1)


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.UsageError as err:
        where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        message = err.format_message().replace("\n", " ")
        click.echo(f"{PROG}: error: {message}{where}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except UserError as err:
        click.echo(f"{PROG}: error: {err}", err=True)
        sys.exit(err.exit_code)
    except ReaderGone:
        sys.exit(EXIT_READER_GONE)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
