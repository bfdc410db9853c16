"""The tcptrace-ebpf command: a thin click layer over the library.

Every expected failure (bad flag, not root, no BCC, no headers, missing
tracepoint, port in use) ends as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TextIO

import click

from . import __version__
from .commands.output import EXIT_READER_GONE, PROG, ReaderGone
from .errors import UserError

# The kernel program's port filter holds this many (filter_ports in bpf/maps.h).
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
    from .kernel.probe import TracerOptions, family_from_flag

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
    from .commands.trace import run_trace

    run_trace(
        _build_options(emit_events=True, collect_metrics=False, **filters),
        as_json=as_json,
        duration=duration,
        pod=pod,
        container=container,
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
    from .commands.lifecycles import run_lifecycles

    run_lifecycles(
        _build_options(emit_events=True, collect_metrics=False, **filters),
        as_json=as_json,
        events_to=events_to,
        duration=duration,
        pod=pod,
        container=container,
    )


DEFAULT_LISTEN = ":10072"
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
    from .commands.serve import run_serve

    run_serve(
        listen_address=listen_address,
        telemetry_path=telemetry_path,
        web_config_file=web_config_file,
        port_label=port_label,
        api_socket=api_socket,
        log_level=log_level,
        tracer=_build_options(emit_events=False, collect_metrics=True, **filters),
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
def closewait(**options: Any) -> None:
    """Find CLOSE_WAIT leaks: which process holds sockets whose peer closed, how many, since when.

    Ages come from the running `tcptrace-ebpf serve`; without it, --watch
    traces by itself (ages exact from then on), a one-shot run shows none.
    """
    from .commands.closewait import run_closewait

    run_closewait(**options)


@cli.command()
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@api_socket_option("Where the running `serve` answers with the programs behind TIME_WAIT.")
def timewait(top: int, as_json: bool, api_socket: str) -> None:
    """TIME_WAIT pressure: ports in use per destination against the ephemeral range,
    TIME_WAIT per local service port and per program."""
    from .commands.timewait import run_timewait

    run_timewait(top, as_json, api_socket)


@cli.command()
@click.option("--fix", is_flag=True, help="Apply the fixes that can be applied safely.")
def doctor(fix: bool) -> None:
    """Check that this host can run tcptrace-ebpf, and say how to fix what is missing."""
    from .commands.doctor import run_doctor

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
