"""`tcptrace-ebpf serve`: check everything the user can get wrong, then run the
daemon (serve/daemon.py) until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from ..kernel.probe import TracerOptions, require_root
from ..serve.api import check_path as check_api_path
from ..serve.daemon import Exporter, ServeOptions
from ..web.config import load_web_config, parse_listen_address
from .output import notice
from .runner import StopFlag, lost_summary, noticed_summary, skipped_tcp_runs

# Served by serve besides the metrics: not available as --web.telemetry-path.
RESERVED_PATHS = ("/", "/-/healthy", "/-/ready")


def run_serve(
    *,
    listen_address: str,
    telemetry_path: str,
    web_config_file: str | None,
    port_label: bool,
    api_socket: str,
    log_level: str,
    tracer: TracerOptions,
) -> None:
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
        tracer=tracer,
        port_label=port_label,
        api_path=api_path,
    )
    exporter = Exporter(options)
    with StopFlag() as stop:
        exporter.start()
        try:
            host, port = exporter.server.address
            scheme = exporter.server.scheme
            shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
            notice(
                f"tracing started ({len(exporter.tracer.attached)} tracepoints); serving "
                f"metrics at {scheme}://{shown}:{port}{telemetry_path}"
            )
            exporter.serve_forever(stop)
            counters = exporter.tracer.counters()
            skipped = skipped_tcp_runs(exporter.tracer.program_skips())
        finally:
            exporter.close()
    notice(
        f"stopped: {counters['events']} TCP state changes seen, {lost_summary(counters)}"
        f"{noticed_summary(counters)}{skipped}"
    )
