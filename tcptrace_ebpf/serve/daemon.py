"""`tcptrace-ebpf serve`: the Prometheus exporter daemon.

Start-up order matters: the HTTP port is bound first (a port in use fails
at once, before anything is loaded; /metrics answers 503 until tracing has
started), then the BPF program is loaded and attached and existing sockets
counted (see tracking.py). After that the main thread only does
housekeeping once a second (what `SocketTracking.tick` does, then port
labels and CLOSE_WAIT holders); metrics are read from the kernel when
Prometheus scrapes (reading.py, metrics.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector

from .. import __version__
from ..host.listeners import collect_listener_seeds, own_netns_inum
from ..host.workloads import shared as shared_workloads
from ..kernel.probe import Tracer, TracerOptions
from ..web.config import WebConfig
from ..web.server import MetricsServer
from .api import DEFAULT_PATH as DEFAULT_API_PATH
from .api import ApiServer
from .holders import CloseWaitHolders
from .metrics import KernelReading, NotReady, TcpTraceCollector
from .payloads import close_wait_list, time_wait_list
from .ports import PORT_LABEL_SLOTS, PortLabels
from .reading import read_kernel
from .tracking import SocketTracking

log = logging.getLogger(__name__)

TICK_S = 1.0
HOLDER_REFRESH_S = 5.0  # how often new CLOSE_WAIT sockets' holders are looked up in /proc


class Stopping(Protocol):
    """What tells the daemon to stop (commands.runner.StopFlag: a signal came)."""

    @property
    def stopped(self) -> bool: ...


@dataclass
class ServeOptions:
    listen: tuple[str, int]
    telemetry_path: str = "/metrics"
    web_config: WebConfig | None = None
    api_path: Path | None = DEFAULT_API_PATH
    tracer: TracerOptions = field(
        default_factory=lambda: TracerOptions(emit_events=False, collect_metrics=True)
    )
    port_label: bool = False


class Exporter:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.registry = CollectorRegistry(auto_describe=True)
        self.server = MetricsServer(
            self.registry,
            options.listen,
            telemetry_path=options.telemetry_path,
            web_config=options.web_config,
            ready=self.tracing,
        )
        self.port_labels = PortLabels(PORT_LABEL_SLOTS) if options.port_label else None
        tracer_options = options.tracer
        if self.port_labels is not None:
            tracer_options = TracerOptions(
                **{**tracer_options.__dict__, "port_slots": PORT_LABEL_SLOTS}
            )
        netns = own_netns_inum()
        self.tracking = SocketTracking(tracer_options, netns, prepare=self._prepare)
        self.tracer = self.tracking.tracer
        self.holders = CloseWaitHolders(netns)
        self._ready = threading.Event()
        self._last_holder_refresh = 0.0
        self.workloads = shared_workloads()
        self.api = (
            ApiServer(
                options.api_path,
                {
                    "close_wait": lambda: close_wait_list(
                        self.tracking, self.holders, self.workloads
                    ),
                    "time_wait": lambda: time_wait_list(self.tracking, self.workloads),
                },
            )
            if options.api_path is not None
            else None
        )

    # -- start and stop --------------------------------------------------

    def start(self) -> None:
        # Probes for supervisors (systemd, Kubernetes): healthy while
        # serving, ready once the BPF program is attached.
        self.server.add_route("/-/healthy", lambda: (200, "text/plain", b"Healthy.\n"))
        self.server.add_route("/-/ready", self._readiness)
        ProcessCollector(registry=self.registry)
        self.registry.register(
            TcpTraceCollector(
                self.read,
                version=__version__,
                kernel=os.uname().release,
                port_labels=self.port_labels.labels if self.port_labels else lambda: (),
            )
        )
        self.server.start()  # a port in use fails here, before the kernel work
        try:
            self.tracking.start()
        except BaseException:
            self.server.shutdown()
            raise
        if self.port_labels is not None:
            self.port_labels.update(self.tracer)
        self._ready.set()
        if self.api is not None:
            try:
                self.api.start()
            except OSError as err:
                log.warning(
                    "no local API at %s (%s): closewait will show no ages", self.api.path, err
                )
                self.api = None

    def tracing(self) -> bool:
        """Whether the probes are attached and existing sockets counted: until
        then a scrape would be partial, and /metrics answers 503."""
        return self._ready.is_set()

    def _readiness(self) -> tuple[int, str, bytes]:
        if self._ready.is_set():
            return 200, "text/plain", b"Ready: tracing.\n"
        return 503, "text/plain", b"Not ready: loading the BPF program.\n"

    def _prepare(self, tracer: Tracer) -> None:
        """Before the probes attach: the owners of existing listeners (their
        children are born in softirq, where the current task is not theirs)."""
        tracer.seed_listeners(collect_listener_seeds())

    def close(self) -> None:
        self._ready.clear()
        if self.api is not None:
            self.api.close()
        self.server.shutdown()
        self.tracking.close()

    def serve_forever(self, stop: Stopping) -> None:
        next_tick = time.monotonic()
        while not stop.stopped:
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                try:
                    self.tick()
                except Exception:  # housekeeping must not kill the daemon
                    log.exception("housekeeping failed")
            time.sleep(min(0.2, max(0.0, next_tick - time.monotonic())))

    # -- housekeeping ------------------------------------------------------

    def tick(self) -> None:
        self.tracking.tick()
        if self.port_labels is not None:
            self.port_labels.update(self.tracer)
        if time.monotonic() - self._last_holder_refresh >= HOLDER_REFRESH_S:
            self._last_holder_refresh = time.monotonic()
            preexisting = self.tracking.preexisting
            self.holders.refresh(
                self.tracer.close_wait_sockets(),
                preexisting.close_wait() if preexisting is not None else [],
            )

    # -- scrape --------------------------------------------------------------

    def read(self) -> KernelReading:
        """What one scrape needs from the kernel (called from the HTTP threads)."""
        if not self._ready.is_set():
            raise NotReady
        return read_kernel(self.tracking, self.holders, self.workloads)
