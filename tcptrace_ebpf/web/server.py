"""The exporter's HTTP(S) server: one asyncio event-loop thread holds every
connection (TLS handshakes, request heads, answers) and a fixed pool of
scrape workers builds the answers (site.py), so slow or silent clients cost
a socket, never a thread. Its settings come from the web config file
(config.py)."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from email.utils import formatdate
from types import MappingProxyType
from typing import Any

import h11
from prometheus_client import CollectorRegistry

from ..errors import UserError
from .config import LISTEN_ADDRESS_OPTION, WebConfig, format_address, normalise_san, os_error_text
from .site import (
    BasicAuthVerifier,
    Reply,
    Request,
    RouteHandler,
    Site,
    TokenBucket,
    answer,
    landing_page,
)

logger = logging.getLogger(__name__)

TELEMETRY_PATH_OPTION = "--web.telemetry-path"

# A client that connects and never finishes its TLS handshake holds its
# connection for at most this long.
TLS_HANDSHAKE_TIMEOUT_SECONDS = 10.0
# The whole request head (request line and headers) must arrive within this
# long: from the connection's start (after TLS) for its first request, from
# the first byte for the next ones on a kept-alive connection.
REQUEST_HEAD_TIMEOUT_SECONDS = 10.0
# A request head larger than this is refused (431), as Go's 1 MB default
# would be by far more than any scraper sends.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
# A client that does not read its answer holds its connection this long.
WRITE_TIMEOUT_SECONDS = 30.0
# Open connections at most (README): past it, the connection that has
# waited longest without a whole request is closed for the new one. Each
# costs a socket and a few kB, never a thread.
MAX_CONNECTIONS = 512
# Threads that build answers (collect metrics, bcrypt, routes), started
# with the server; with the event loop's thread, all the server ever runs.
SCRAPE_WORKERS = 4
# Longest wait for the next read on a connection, which is also how long an
# idle keep-alive connection stays open. Longer than the usual scrape
# intervals (15 s to 1 min) so that Prometheus can reuse its connection (and
# skip a TLS handshake) instead of racing the server closing it.
CONNECTION_IDLE_TIMEOUT_SECONDS = 90.0


def _raw_error(status: int, reason: str, text: str) -> bytes:
    """A whole response that closes the connection, for when h11 cannot frame one."""
    body = f"{text}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


# What Go's net/http answers plain HTTP sent to a TLS port with.
_PLAIN_HTTP_TO_TLS_PORT = (
    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
_TLS_HANDSHAKE_RECORD = b"\x16"


def _listen_backlog() -> int:
    # The host's own limit: the kernel caps a larger backlog to it anyway,
    # and a burst of scrapers should wait in the queue, not be refused.
    try:
        with open("/proc/sys/net/core/somaxconn") as stream:
            return max(1, int(stream.read().strip()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


class _Connection:
    """One client connection, as the event loop tracks it."""

    def __init__(self, sock: socket.socket, client: str) -> None:
        self.sock = sock
        self.client = client
        self.writer: asyncio.StreamWriter | None = None
        # Waiting for (or reading) a request head, not being answered: what
        # may be closed to make room for a new connection.
        self.idle = True
        self.task: asyncio.Task[None] | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        else:
            _close_quietly(self.sock)


class _Server:
    """The serving core: one asyncio event loop thread for every connection
    (TLS handshakes, reading request heads, writing answers) and a fixed pool
    of scrape workers for what takes CPU or blocks (collecting metrics,
    bcrypt, routes). Slow or silent clients cost a socket and a little
    memory, never a thread; there are at most ``MAX_CONNECTIONS`` of them,
    and when that many are open the one that has waited longest without
    sending a whole request is closed to make room.
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        site: Site,
        ssl_context: ssl.SSLContext | None,
        client_allowed_sans: frozenset[str],
    ) -> None:
        self.listener = listener
        self.site = site
        self.ssl_context = ssl_context
        self.client_allowed_sans = client_allowed_sans
        self.loop = asyncio.new_event_loop()
        self.connections: OrderedDict[int, _Connection] = OrderedDict()
        self.workers = ThreadPoolExecutor(
            max_workers=SCRAPE_WORKERS, thread_name_prefix="tcptrace-ebpf-scrape"
        )
        # Made here, not in the loop: stop() may come before the loop runs.
        self._stopped = asyncio.Event()
        self._next_id = 0

    def start_workers(self) -> None:
        """Start every worker thread now, while the process may: under a task
        limit (TasksMax, a pids cgroup) later is too late."""
        barrier = threading.Barrier(SCRAPE_WORKERS + 1)
        for _ in range(SCRAPE_WORKERS):
            self.workers.submit(barrier.wait, 10)
        barrier.wait(10)

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    def stop(self) -> None:
        """From another thread: close everything; run() returns."""

        with suppress(RuntimeError):  # the loop is already closed
            self.loop.call_soon_threadsafe(self._stopped.set)

    async def _serve(self) -> None:
        self.listener.setblocking(False)
        accepting = asyncio.ensure_future(self._accept_forever())
        await self._stopped.wait()
        accepting.cancel()
        with suppress(asyncio.CancelledError):
            await accepting
        self.listener.close()
        tasks = [conn.task for conn in self.connections.values() if conn.task is not None]
        for conn in list(self.connections.values()):
            conn.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self.workers.shutdown(wait=False, cancel_futures=True)

    async def _accept_forever(self) -> None:
        while True:
            try:
                sock, address = await self.loop.sock_accept(self.listener)
            except OSError as err:
                # EMFILE and the like: the listen queue keeps the client
                # waiting; try again shortly rather than spin.
                logger.warning("cannot accept a connection: %s", os_error_text(err))
                await asyncio.sleep(0.1)
                continue
            client = str(address[0]) if isinstance(address, tuple) else "?"
            self._make_room()
            self._next_id += 1
            conn = _Connection(sock, client)
            self.connections[self._next_id] = conn
            conn.task = asyncio.ensure_future(self._handle(self._next_id, conn))

    def _make_room(self) -> None:
        if len(self.connections) < MAX_CONNECTIONS:
            return
        for conn_id, conn in self.connections.items():  # oldest first
            if conn.idle:
                logger.debug(
                    "%s: closed to make room (%d connections)", conn.client, len(self.connections)
                )
                del self.connections[conn_id]
                conn.close()
                if conn.task is not None:
                    conn.task.cancel()
                return

    async def _handle(self, conn_id: int, conn: _Connection) -> None:
        try:
            await self._serve_connection(conn)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as err:
            logger.debug("%s: connection error: %s", conn.client, err)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("%s: error while serving a connection", conn.client)
        finally:
            self.connections.pop(conn_id, None)
            conn.close()

    async def _serve_connection(self, conn: _Connection) -> None:
        sock = conn.sock
        with suppress(OSError):
            # Headers and body go out in one write here, but a response
            # must never wait for the client's delayed ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = asyncio.StreamReader(limit=MAX_REQUEST_HEAD_BYTES * 4, loop=self.loop)
        started = self.loop.time()
        if self.ssl_context is not None:
            if not await self._wait_readable(sock, TLS_HANDSHAKE_TIMEOUT_SECONDS):
                return
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:
                return
            if first != _TLS_HANDSHAKE_RECORD:
                with suppress(OSError):
                    sock.send(_PLAIN_HTTP_TO_TLS_PORT)
                return
            try:
                transport, protocol = await self.loop.connect_accepted_socket(
                    lambda: asyncio.StreamReaderProtocol(reader),
                    sock=sock,
                    ssl=self.ssl_context,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_SECONDS,
                )
            except (TimeoutError, OSError, ConnectionError) as err:
                logger.debug("%s: TLS handshake failed: %s", conn.client, err)
                return
            conn.writer = asyncio.StreamWriter(transport, protocol, reader, self.loop)
            if self.client_allowed_sans and not _has_allowed_san(
                transport.get_extra_info("peercert"), self.client_allowed_sans
            ):
                logger.warning(
                    "%s: client certificate has none of the SANs in client_allowed_sans;"
                    " connection closed",
                    conn.client,
                )
                return
            # The handshake may have taken most of the head's time: the
            # request head gets its own.
            started = self.loop.time()
        else:
            transport, protocol = await self.loop.connect_accepted_socket(
                lambda: asyncio.StreamReaderProtocol(reader), sock=sock
            )
            conn.writer = asyncio.StreamWriter(transport, protocol, reader, self.loop)
        await self._serve_requests(conn, reader, conn.writer, started)

    async def _wait_readable(self, sock: socket.socket, timeout: float) -> bool:
        ready: asyncio.Future[None] = self.loop.create_future()

        def on_readable() -> None:
            if not ready.done():
                ready.set_result(None)

        self.loop.add_reader(sock.fileno(), on_readable)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            return False
        finally:
            self.loop.remove_reader(sock.fileno())
        return True

    async def _serve_requests(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        started: float,
    ) -> None:
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        # A new connection has REQUEST_HEAD_TIMEOUT_SECONDS from its start
        # for its first request head; a kept-alive one may idle for
        # CONNECTION_IDLE_TIMEOUT_SECONDS, then has as long for the head
        # from its first byte. Per head, not per read: a byte every few
        # seconds does not keep a connection.
        head_deadline: float | None = started + REQUEST_HEAD_TIMEOUT_SECONDS
        while True:
            conn.idle = True
            idle_deadline = self.loop.time() + CONNECTION_IDLE_TIMEOUT_SECONDS
            try:
                event = await self._next_event(http, reader, head_deadline, idle_deadline)
            except h11.RemoteProtocolError as err:
                status = err.error_status_hint
                reason = {431: "Request Header Fields Too Large", 505: "HTTP Version Not Supported"}
                writer.write(
                    _raw_error(status, reason.get(status, "Bad Request"), f"Bad Request: {err}")
                )
                await self._drain(writer)
                return
            if event is None:  # the head did not come in time
                if http.their_state is h11.IDLE and not http.trailing_data[0]:
                    return  # nothing started: just close, as Go does
                writer.write(_raw_error(408, "Request Timeout", "Request Timeout"))
                await self._drain(writer)
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed
            conn.idle = False
            request = _request_of(event, conn.client)
            reply = await self.loop.run_in_executor(self.workers, answer, self.site, request)
            has_body = (
                "content-length" in request.headers
                and request.headers["content-length"].strip() != "0"
            ) or "transfer-encoding" in request.headers
            writer.write(self._encode(http, reply, close=has_body))
            await self._drain(writer)
            if not has_body and http.their_state is h11.SEND_BODY:
                http.next_event()  # the EndOfMessage of a request without a body
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return  # closing (HTTP/1.0, Connection: close, an unread body)
            http.start_next_cycle()
            head_deadline = None

    async def _next_event(
        self,
        http: h11.Connection,
        reader: asyncio.StreamReader,
        head_deadline: float | None,
        idle_deadline: float,
    ) -> Any:
        while True:
            event = http.next_event()
            if event is not h11.NEED_DATA:
                return event
            deadline = head_deadline if head_deadline is not None else idle_deadline
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return None
            try:
                data = await asyncio.wait_for(reader.read(65536), remaining)
            except TimeoutError:
                return None
            http.receive_data(data)
            if data and head_deadline is None:
                head_deadline = self.loop.time() + REQUEST_HEAD_TIMEOUT_SECONDS

    @staticmethod
    async def _drain(writer: asyncio.StreamWriter) -> None:
        # A client that does not read its answer holds the connection this
        # long at most.
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_SECONDS)

    def _encode(self, http: h11.Connection, reply: Reply, close: bool) -> bytes:
        headers = [
            ("Server", "tcptrace-ebpf"),
            ("Date", formatdate(usegmt=True)),
        ]
        if close:
            # No page here reads a request body; on a kept-alive connection
            # the unread body would be taken for the next request.
            headers.append(("Connection", "close"))
        sent = set()
        for name, value in reply.headers:
            headers.append((name, value))
            sent.add(name.lower())
        for name, value in self.site.headers.items():
            if name.lower() not in sent:
                headers.append((name, value))
        headers.append(("Content-Type", reply.content_type))
        headers.append(("Content-Length", str(len(reply.body))))
        data = http.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        if reply.send_body and reply.body:
            data += http.send(h11.Data(data=reply.body)) or b""
        data += http.send(h11.EndOfMessage()) or b""
        return data


def _request_of(event: h11.Request, client: str) -> Request:
    headers: dict[str, str] = {}
    for name, value in event.headers:
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return Request(
        method=event.method.decode("ascii", "replace"),
        target=event.target.decode("ascii", "replace"),
        headers=headers,
        client=client,
    )


def _has_allowed_san(peer_certificate: Any, allowed_sans: frozenset[str]) -> bool:
    # getpeercert() lists ("DNS", "x"), ("IP Address", "1.2.3.4"),
    # ("email", "a@b"), ("URI", "spiffe://...") under subjectAltName: the
    # kinds exporter-toolkit matches.
    if not peer_certificate:
        return False
    for _kind, value in peer_certificate.get("subjectAltName", ()):
        if normalise_san(str(value).strip()) in allowed_sans:
            return True
    return False


def _close_quietly(connection: socket.socket) -> None:
    # A FIN before closing, as socketserver does for plain sockets, so a
    # client reading the end of the response gets it rather than a reset.
    with suppress(OSError):
        socket.socket.shutdown(connection, socket.SHUT_WR)
    connection.close()


class MetricsServer:
    """Serves a Prometheus registry over HTTP or HTTPS from a background thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        listen_address: tuple[str, int],
        telemetry_path: str = "/metrics",
        web_config: WebConfig | None = None,
        landing_page_title: str = "tcptrace-ebpf",
        *,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        """``ready()`` False makes the telemetry path answer 503 (the daemon
        passes "tracing has started"); the other pages answer regardless."""
        if not telemetry_path.startswith("/") or any(c in telemetry_path for c in "?# \t\r\n"):
            raise UserError(
                f"invalid {TELEMETRY_PATH_OPTION} {telemetry_path!r}: give a URL path that starts"
                " with '/', e.g. /metrics"
            )
        self._listen_address = listen_address
        self._telemetry_path = telemetry_path
        self._web_config = web_config
        self._landing_page_title = landing_page_title
        self._routes: dict[str, RouteHandler] = {}
        self._site = Site(
            registry=registry,
            telemetry_path=telemetry_path,
            landing_page=landing_page(landing_page_title, [telemetry_path]),
            routes=MappingProxyType(self._routes),
            headers=web_config.headers if web_config else {},
            basic_auth=(
                BasicAuthVerifier(web_config.basic_auth_users)
                if web_config and web_config.basic_auth_users
                else None
            ),
            rate_limiter=(
                TokenBucket(web_config.rate_limit) if web_config and web_config.rate_limit else None
            ),
            ready=ready,
        )
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._lifecycle_lock = threading.Lock()
        self._shut_down = False

    def add_route(self, path: str, handler: RouteHandler) -> None:
        """Serve ``handler()``'s ``(status, content_type, body)`` at ``path`` (GET/HEAD).

        Basic auth and the configured headers apply as to every other page.
        """
        if not path.startswith("/") or path in (self._telemetry_path, "/") or path in self._routes:
            raise ValueError(f"cannot add route {path!r}: it must start with '/' and be new")
        self._routes[path] = handler
        self._site.landing_page = landing_page(
            self._landing_page_title, [self._telemetry_path, *self._routes]
        )

    @property
    def scheme(self) -> str:
        """``https`` when a TLS certificate is configured, else ``http``."""
        return "https" if self._web_config and self._web_config.ssl_context else "http"

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound; with port 0 asked, the port picked."""
        if self._server is None:
            raise RuntimeError("MetricsServer.address is known only after start()")
        host, port = self._server.listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve in a daemon thread. Bind problems raise ``UserError``."""
        with self._lifecycle_lock:
            if self._server is not None or self._shut_down:
                raise RuntimeError("MetricsServer.start() can be called once")
            host, port = self._listen_address
            shown_address = format_address(host, port)
            family, bind_address, dual_stack = _bind_target(host, port, shown_address)
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if dual_stack:
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                listener.bind(bind_address)
                listener.listen(_listen_backlog())
            except OSError as err:
                listener.close()
                raise UserError(
                    f"cannot listen on {shown_address}: {_bind_error_text(err)}"
                ) from err
            tls = self._web_config.tls if self._web_config else None
            server = _Server(
                listener,
                site=self._site,
                ssl_context=self._web_config.ssl_context if self._web_config else None,
                client_allowed_sans=tls.client_allowed_sans if tls else frozenset(),
            )
            try:
                server.start_workers()
                thread = threading.Thread(target=server.run, name="tcptrace-ebpf-http", daemon=True)
                thread.start()
            except (RuntimeError, threading.BrokenBarrierError) as err:
                server.workers.shutdown(wait=False)
                listener.close()
                raise UserError(
                    f"cannot start the HTTP server's {SCRAPE_WORKERS + 1} threads ({err}): raise"
                    " the task limit (systemd TasksMax, the container's pids limit)"
                ) from err
            self._server = server
            self._serve_thread = thread
        bound_host, bound_port = self.address
        logger.info(
            "serving metrics on %s://%s%s (basic auth %s)",
            self.scheme,
            format_address(bound_host, bound_port),
            self._telemetry_path,
            "on" if self._site.basic_auth else "off",
        )

    def shutdown(self) -> None:
        """Stop serving, close the socket and open connections. Safe to call twice."""
        with self._lifecycle_lock:
            if self._shut_down:
                return
            self._shut_down = True
            if self._server is not None:
                self._server.stop()
            if self._serve_thread is not None:
                self._serve_thread.join(timeout=10)


def _bind_target(
    host: str, port: int, shown_address: str
) -> tuple[socket.AddressFamily, tuple[Any, ...], bool]:
    """Address family and socket address to bind, and whether to take IPv4 too on IPv6."""
    if host == "":
        # ":PORT" means every interface, IPv4 and IPv6, as in Go.
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, ("::", port), True
        return socket.AF_INET, ("0.0.0.0", port), False
    try:
        candidates = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise UserError(
            f"cannot listen on {shown_address}: cannot resolve {host!r} ({err.strerror}); use an"
            f" IP address in {LISTEN_ADDRESS_OPTION}"
        ) from err
    # Like Go, prefer IPv4 when a name resolves to both.
    candidates.sort(key=lambda candidate: candidate[0] != socket.AF_INET)
    family, _type, _proto, _canonname, socket_address = candidates[0]
    return family, socket_address, False


def _bind_error_text(err: OSError) -> str:
    hints = {
        errno.EADDRINUSE: "address already in use (is another tcptrace-ebpf running? pick"
        f" another port with {LISTEN_ADDRESS_OPTION})",
        errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE;"
        f" pick a port from 1024 up with {LISTEN_ADDRESS_OPTION})",
        errno.EADDRNOTAVAIL: "cannot assign requested address (no interface of this host has"
        f" that address; check {LISTEN_ADDRESS_OPTION})",
        errno.EAFNOSUPPORT: "address family not supported (is IPv6 disabled? use an IPv4"
        f" address in {LISTEN_ADDRESS_OPTION})",
    }
    if err.errno in hints:
        return hints[err.errno]
    return os_error_text(err)
