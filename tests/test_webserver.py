"""Tests for the metrics HTTP(S) server and the web config file.

Everything runs on loopback with real sockets and ephemeral ports; no root
needed. Certificates are made with the openssl CLI in a temporary directory
that is removed afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import logging
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from support import close_pipes

from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.web import server as webserver
from tcptrace_ebpf.web.config import WebConfig, load_web_config, parse_listen_address
from tcptrace_ebpf.web.server import MetricsServer

PASSWORD = "correct horse"
LOOPBACK = ("127.0.0.1", 0)

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    directory: Path
    server_cert: Path  # self-signed, for 127.0.0.1, ::1 and localhost
    server_key: Path
    other_key: Path  # a key that does not belong to server_cert
    encrypted_key: Path
    client_ca: Path
    client_cert: Path  # signed by client_ca, SAN DNS:prometheus.example
    client_key: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _new_key_and_cert(directory: Path, name: str, subject: str, *extra: str) -> None:
    _openssl(
        directory,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-subj",
        subject,
        "-days",
        "2",
        *extra,
    )


@pytest.fixture(scope="module")
def certs() -> Iterator[Certificates]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    directory = Path(tempfile.mkdtemp(prefix="tcptrace-webserver-certs-"))
    try:
        _new_key_and_cert(
            directory,
            "server",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost",
        )
        _new_key_and_cert(directory, "other", "/CN=other")
        _openssl(
            directory,
            "pkey",
            "-in",
            "server.key",
            "-aes256",
            "-passout",
            "pass:secret",
            "-out",
            "encrypted.key",
        )
        _new_key_and_cert(directory, "client-ca", "/CN=test client CA")
        _openssl(
            directory,
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=prometheus",
        )
        (directory / "client.ext").write_text(
            "subjectAltName=DNS:prometheus.example\nextendedKeyUsage=clientAuth\n"
        )
        _openssl(
            directory,
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "client-ca.crt",
            "-CAkey",
            "client-ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "client.ext",
            "-out",
            "client.crt",
        )
        yield Certificates(
            directory=directory,
            server_cert=directory / "server.crt",
            server_key=directory / "server.key",
            other_key=directory / "other.key",
            encrypted_key=directory / "encrypted.key",
            client_ca=directory / "client-ca.crt",
            client_cert=directory / "client.crt",
            client_key=directory / "client.key",
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def password_hash() -> str:
    # Cost 4 (the minimum) keeps the tests fast; real configs use 10 or more.
    return bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="tcptrace-webserver-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def write_config(workdir: Path) -> Callable[[str], str]:
    def write(text: str) -> str:
        path = workdir / "web-config.yml"
        path.write_text(text)
        return str(path)

    return write


class FlakyCollector(Collector):
    """Raises while ``failing`` is set, to test scrape errors."""

    def __init__(self) -> None:
        self.failing = False

    def collect(self) -> Iterator[object]:  # type: ignore[override]
        if self.failing:
            raise RuntimeError("collector broke")
        return iter(())


@pytest.fixture
def flaky_collector() -> FlakyCollector:
    return FlakyCollector()


@pytest.fixture
def registry(flaky_collector: FlakyCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    scrapes = Counter("test_scrapes", "A test counter.", registry=registry)
    scrapes.inc(3)
    Gauge("test_sockets", "A test gauge.", ["state"], registry=registry).labels("ESTABLISHED").set(
        7
    )
    registry.register(flaky_collector)
    return registry


@pytest.fixture
def start_server(registry: CollectorRegistry) -> Iterator[Callable[..., MetricsServer]]:
    """Start MetricsServers on loopback; all are shut down after the test."""
    servers: list[MetricsServer] = []

    def start(
        web_config: WebConfig | None = None,
        listen_address: tuple[str, int] = LOOPBACK,
        **kwargs: object,
    ) -> MetricsServer:
        server = MetricsServer(registry, listen_address, web_config=web_config, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def open_sockets() -> Iterator[list[socket.socket]]:
    """Raw client sockets, closed after the test."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def fetch(
    server: MetricsServer,
    path: str = "/metrics",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> Response:
    host, port = server.address
    connection: http.client.HTTPConnection
    if tls is not None:
        connection = http.client.HTTPSConnection(host, port, context=tls, timeout=timeout)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        connection.close()


def basic_auth(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def client_tls_context(certs: Certificates, with_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.server_cert))
    if with_client_cert:
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


def metric_values(text: str) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def tls_config(certs: Certificates, extra: str = "") -> str:
    return (
        "tls_server_config:\n"
        f"  cert_file: {certs.server_cert}\n"
        f"  key_file: {certs.server_key}\n"
        f"{extra}"
    )


def assert_one_line_user_error(err: pytest.ExceptionInfo[UserError], *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------
# --web.listen-address
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        (":9100", ("", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("[::]:0", ("::", 0)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
        ("localhost:65535", ("localhost", 65535)),
        ("metrics-host.example.com:1", ("metrics-host.example.com", 1)),
    ],
)
def test_parse_listen_address_accepts(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "foo",
        "",
        "9100",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "127.0.0.1: 9100",
        "::1:9100",
        "[::1]9100",
        "[::1]",
        "[not-ipv6]:9100",
        "1.2.3.400:9100",
        "host name:9100",
        "bad/host:9100",
    ],
)
def test_parse_listen_address_rejects(value: str) -> None:
    with pytest.raises(UserError) as err:
        parse_listen_address(value)
    assert_one_line_user_error(err, f"invalid --web.listen-address {value!r}: ")


def test_parse_listen_address_names_the_option() -> None:
    with pytest.raises(UserError, match=r"^invalid --other\.address 'foo': expected HOST:PORT"):
        parse_listen_address("foo", option_name="--other.address")


# ---------------------------------------------------------------------------
# Plain HTTP
# ---------------------------------------------------------------------------


def test_scrape_returns_prometheus_text(start_server: Callable[..., MetricsServer]) -> None:
    server = start_server()
    response = fetch(server)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert response.headers.get("Content-Encoding") is None
    values = metric_values(response.body.decode())
    assert values["test_scrapes_total"] == 3
    assert values["test_sockets"] == 7


def test_scrape_honours_openmetrics_accept_header(
    start_server: Callable[..., MetricsServer],
) -> None:
    server = start_server()
    response = fetch(server, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.body.endswith(b"# EOF\n")


def test_scrape_is_gzipped_when_asked(start_server: Callable[..., MetricsServer]) -> None:
    server = start_server()
    response = fetch(server, headers={"Accept-Encoding": "gzip"})
    assert response.status == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert metric_values(gzip.decompress(response.body).decode())["test_sockets"] == 7

    refused = fetch(server, headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert refused.headers.get("Content-Encoding") is None
    assert b"test_sockets" in refused.body


def test_scrape_can_select_metric_names(start_server: Callable[..., MetricsServer]) -> None:
    server = start_server()
    body = fetch(server, "/metrics?name[]=test_sockets").body.decode()
    assert "test_sockets" in body
    assert "test_scrapes" not in body


def test_head_sends_headers_only(start_server: Callable[..., MetricsServer]) -> None:
    server = start_server()
    response = fetch(server, method="HEAD")
    assert response.status == 200
    assert int(response.headers["Content-Length"]) > 0
    assert response.body == b""


def test_landing_page_links_to_telemetry_path(start_server: Callable[..., MetricsServer]) -> None:
    server = start_server(telemetry_path="/custom/metrics", landing_page_title="Test <exporter>")
    page = fetch(server, "/")
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'href="/custom/metrics"' in page.body
    assert b"Test &lt;exporter&gt;" in page.body
    assert fetch(server, "/custom/metrics").status == 200
    assert fetch(server, "/metrics").status == 404


def test_unknown_path_is_404_and_other_methods_405(
    start_server: Callable[..., MetricsServer],
) -> None:
    server = start_server()
    assert fetch(server, "/nope").status == 404
    assert fetch(server, "/metrics/").status == 404
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        response = fetch(server, method=method)
        assert response.status == 405, method
        assert response.headers["Allow"] == "GET, HEAD"


def test_keep_alive_connection_serves_several_requests(
    start_server: Callable[..., MetricsServer],
) -> None:
    server = start_server()
    connection = http.client.HTTPConnection(*server.address, timeout=5)
    try:
        for method, path, expected_status in (
            ("GET", "/metrics", 200),
            ("GET", "/nope", 404),
            ("HEAD", "/metrics", 200),
            ("GET", "/", 200),
        ):
            connection.request(method, path)
            response = connection.getresponse()
            response.read()
            assert response.status == expected_status
            assert not response.will_close
        # A request body is never read, so the connection must not be reused.
        connection.request("POST", "/metrics", body=b"x" * 100)
        response = connection.getresponse()
        response.read()
        assert response.status == 405
        assert response.will_close
    finally:
        connection.close()


def test_bad_telemetry_path_is_a_user_error(registry: CollectorRegistry) -> None:
    with pytest.raises(UserError) as err:
        MetricsServer(registry, LOOPBACK, telemetry_path="metrics")
    assert_one_line_user_error(err, "invalid --web.telemetry-path 'metrics'")


def test_extra_route(start_server: Callable[..., MetricsServer]) -> None:
    server = start_server()
    server.add_route("/healthz", lambda: (200, "text/plain; charset=utf-8", b"ok\n"))
    response = fetch(server, "/healthz")
    assert (response.status, response.body) == (200, b"ok\n")
    assert b'href="/healthz"' in fetch(server, "/").body

    def broken() -> tuple[int, str, bytes]:
        raise RuntimeError("broken")

    server.add_route("/broken", broken)
    assert fetch(server, "/broken").status == 500
    assert fetch(server, "/healthz").status == 200
    with pytest.raises(ValueError, match="cannot add route"):
        server.add_route("/metrics", lambda: (200, "text/plain", b""))


def test_collector_exception_gives_500_and_server_survives(
    start_server: Callable[..., MetricsServer],
    flaky_collector: FlakyCollector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start_server()
    flaky_collector.failing = True
    with caplog.at_level(logging.ERROR, logger="tcptrace_ebpf.web"):
        failed = fetch(server)
    assert failed.status == 500
    assert failed.headers["Content-Type"].startswith("text/plain")
    assert b"collecting metrics failed" in failed.body
    assert any("collector broke" in (record.exc_text or "") for record in caplog.records)

    flaky_collector.failing = False
    assert fetch(server).status == 200


def test_scrapes_are_not_logged_at_info(
    start_server: Callable[..., MetricsServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server()
    with caplog.at_level(logging.INFO, logger="tcptrace_ebpf.web"):
        caplog.clear()
        for _ in range(3):
            fetch(server)
        fetch(server, "/nope")
    assert [record for record in caplog.records if record.levelno >= logging.INFO] == []


def test_port_in_use_is_a_user_error(start_server: Callable[..., MetricsServer]) -> None:
    first = start_server()
    host, port = first.address
    with pytest.raises(UserError) as err:
        start_server(listen_address=(host, port))
    assert_one_line_user_error(
        err,
        f"cannot listen on 127.0.0.1:{port}: address already in use",
        "--web.listen-address",
    )


def test_unassignable_address_is_a_user_error(start_server: Callable[..., MetricsServer]) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this host.
    with pytest.raises(UserError) as err:
        start_server(listen_address=("192.0.2.1", 0))
    assert_one_line_user_error(err, "cannot listen on 192.0.2.1:0: cannot assign requested address")


def test_serves_on_ipv6_loopback(start_server: Callable[..., MetricsServer]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = start_server(listen_address=("::1", 0))
    except UserError as err:
        pytest.skip(f"IPv6 loopback unavailable: {err}")
    assert server.address[0] == "::1"
    assert fetch(server).status == 200


def test_shutdown_is_idempotent_and_closes_everything(
    start_server: Callable[..., MetricsServer], open_sockets: list[socket.socket]
) -> None:
    server = start_server()
    address = server.address
    idle = socket.create_connection(address, timeout=5)
    open_sockets.append(idle)
    time.sleep(0.05)  # let the server take the connection
    server.shutdown()
    server.shutdown()
    # The idle keep-alive connection is closed, not left to its timeout.
    assert idle.recv(1) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()


# ---------------------------------------------------------------------------
# TLS and basic auth
# ---------------------------------------------------------------------------


def test_tls_scrape_verifies_against_the_certificate(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    certs: Certificates,
) -> None:
    config = load_web_config(write_config(tls_config(certs)))
    assert config is not None
    assert config.ssl_context is not None
    server = start_server(config)
    assert server.scheme == "https"
    response = fetch(server, tls=client_tls_context(certs))
    assert response.status == 200
    assert metric_values(response.body.decode())["test_sockets"] == 7
    # A client that offers HTTP/2 is told the server speaks HTTP/1.1.
    client = client_tls_context(certs)
    client.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(server.address, timeout=5) as raw,
        client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.selected_alpn_protocol() == "http/1.1"
    # Plain HTTP to the HTTPS port gets a 400 saying so, as from Go.
    response = fetch(server)
    assert response.status == 400
    assert b"HTTP request to an HTTPS server" in response.body


def test_basic_auth(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    password_hash: str,
) -> None:
    config = load_web_config(write_config(f"basic_auth_users:\n  alice: '{password_hash}'\n"))
    server = start_server(config)
    assert fetch(server, headers=basic_auth("alice", PASSWORD)).status == 200

    for headers in (
        {},
        basic_auth("alice", "wrong"),
        basic_auth("mallory", PASSWORD),
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic !!!"},
    ):
        response = fetch(server, headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"] == "Basic"
    # The landing page and unknown paths are behind auth too.
    assert fetch(server, "/").status == 401
    assert fetch(server, "/nope").status == 401
    assert fetch(server, "/", headers=basic_auth("alice", PASSWORD)).status == 200


def test_basic_auth_over_tls(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    certs: Certificates,
    password_hash: str,
) -> None:
    config = load_web_config(
        write_config(tls_config(certs) + f"basic_auth_users:\n  alice: {password_hash}\n")
    )
    server = start_server(config)
    tls = client_tls_context(certs)
    assert fetch(server, tls=tls, headers=basic_auth("alice", PASSWORD)).status == 200
    assert fetch(server, tls=tls, headers=basic_auth("alice", "nope")).status == 401
    assert fetch(server, tls=tls).status == 401


def test_successful_credentials_are_cached(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    password_hash: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bcrypt_checks: list[bytes] = []
    real_checkpw = bcrypt.checkpw

    def counting_checkpw(password: bytes, hashed: bytes) -> bool:
        bcrypt_checks.append(password)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
    config = load_web_config(write_config(f"basic_auth_users:\n  alice: {password_hash}\n"))
    server = start_server(config)
    for _ in range(3):
        assert fetch(server, headers=basic_auth("alice", PASSWORD)).status == 200
    assert len(bcrypt_checks) == 1
    for _ in range(2):
        assert fetch(server, headers=basic_auth("alice", "wrong")).status == 401
    assert len(bcrypt_checks) == 3  # failures are checked every time


def test_configured_headers_are_sent(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    password_hash: str,
) -> None:
    config = load_web_config(
        write_config(
            "http_server_config:\n"
            "  http2: true\n"
            "  headers:\n"
            "    X-Frame-Options: deny\n"
            "    X-Content-Type-Options: nosniff\n"
            "    Content-Security-Policy: default-src 'self'\n"
            "    X-XSS-Protection: ''\n"
            f"basic_auth_users:\n  alice: {password_hash}\n"
        )
    )
    assert config is not None
    assert dict(config.headers) == {
        "X-Frame-Options": "deny",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'self'",
    }
    server = start_server(config)
    for response in (fetch(server), fetch(server, headers=basic_auth("alice", PASSWORD))):
        assert response.headers["X-Frame-Options"] == "deny"
        assert response.headers["Content-Security-Policy"] == "default-src 'self'"
        assert response.headers.get_all("X-Content-Type-Options") == ["nosniff"]
        assert response.headers.get("X-XSS-Protection") is None


def test_rate_limit(
    start_server: Callable[..., MetricsServer], write_config: Callable[[str], str]
) -> None:
    config = load_web_config(write_config("rate_limit:\n  interval: 1h\n  burst: 2\n"))
    server = start_server(config)
    assert [fetch(server).status for _ in range(3)] == [200, 200, 429]


def test_silent_tls_client_does_not_block_scrapes(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    certs: Certificates,
    open_sockets: list[socket.socket],
) -> None:
    server = start_server(load_web_config(write_config(tls_config(certs))))
    # Connects, then never says a word: no ClientHello.
    open_sockets.append(socket.create_connection(server.address, timeout=5))
    # A half-finished handshake: a few bytes of a TLS record header.
    half = socket.create_connection(server.address, timeout=5)
    open_sockets.append(half)
    half.sendall(b"\x16\x03\x01")
    started = time.monotonic()
    response = fetch(server, tls=client_tls_context(certs), timeout=5)
    assert response.status == 200
    assert time.monotonic() - started < webserver.TLS_HANDSHAKE_TIMEOUT_SECONDS / 2


def test_tls_handshake_times_out(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    certs: Certificates,
    open_sockets: list[socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(webserver, "TLS_HANDSHAKE_TIMEOUT_SECONDS", 0.2)
    server = start_server(load_web_config(write_config(tls_config(certs))))
    silent = socket.create_connection(server.address, timeout=5)
    open_sockets.append(silent)
    # The server gives up on the handshake and closes the connection.
    with contextlib.suppress(ConnectionResetError):
        assert silent.recv(1) == b""


def test_client_certificates(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    certs: Certificates,
) -> None:
    config = load_web_config(
        write_config(
            tls_config(
                certs,
                "  client_auth_type: RequireAndVerifyClientCert\n"
                f"  client_ca_file: {certs.client_ca}\n"
                "  client_allowed_sans: [prometheus.example]\n",
            )
        )
    )
    server = start_server(config)
    assert fetch(server, tls=client_tls_context(certs, with_client_cert=True)).status == 200
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        fetch(server, tls=client_tls_context(certs))


def test_client_certificate_without_an_allowed_san_is_refused(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    certs: Certificates,
) -> None:
    config = load_web_config(
        write_config(
            tls_config(
                certs,
                "  client_auth_type: RequireAndVerifyClientCert\n"
                f"  client_ca_file: {certs.client_ca}\n"
                "  client_allowed_sans: [someone-else.example, 10.0.0.1]\n",
            )
        )
    )
    server = start_server(config)
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        fetch(server, tls=client_tls_context(certs, with_client_cert=True))


def test_cipher_suites_and_tls_versions_are_applied(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    certs: Certificates,
) -> None:
    config = load_web_config(
        write_config(
            tls_config(
                certs,
                "  max_version: TLS12\n"
                "  cipher_suites:\n"
                "    - TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384\n"
                "    - TLS_AES_128_GCM_SHA256\n"
                "  prefer_server_cipher_suites: true\n"
                "  curve_preferences: [CurveP384]\n",
            )
        )
    )
    server = start_server(config)
    client = client_tls_context(certs)
    with (
        socket.create_connection(server.address, timeout=5) as raw,
        client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.2"
        cipher = tls.cipher()
        assert cipher is not None
        assert cipher[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"

    only_tls13 = client_tls_context(certs)
    only_tls13.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises((ssl.SSLError, ConnectionError)):
        fetch(server, tls=only_tls13)


def test_inline_certificate_and_relative_paths(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    workdir: Path,
    certs: Certificates,
) -> None:
    # cert inline, key_file relative to the config file's directory.
    shutil.copy(certs.server_key, workdir / "server.key")
    cert_lines = "".join(f"    {line}\n" for line in certs.server_cert.read_text().splitlines())
    config = load_web_config(
        write_config(f"tls_server_config:\n  cert: |\n{cert_lines}  key_file: server.key\n")
    )
    assert config is not None
    assert config.tls is not None
    assert config.tls.cert_source == "inline"
    assert config.tls.key_source == str(workdir / "server.key")
    server = start_server(config)
    assert fetch(server, tls=client_tls_context(certs)).status == 200


def test_inline_key(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    certs: Certificates,
) -> None:
    key_lines = "".join(f"    {line}\n" for line in certs.server_key.read_text().splitlines())
    config = load_web_config(
        write_config(f"tls_server_config:\n  cert_file: {certs.server_cert}\n  key: |\n{key_lines}")
    )
    assert config is not None
    assert config.tls is not None
    assert config.tls.key_source == "inline"
    server = start_server(config)
    assert fetch(server, tls=client_tls_context(certs)).status == 200


def test_silent_plain_client_does_not_block_scrapes(
    start_server: Callable[..., MetricsServer], open_sockets: list[socket.socket]
) -> None:
    server = start_server()
    silent = socket.create_connection(server.address, timeout=5)
    open_sockets.append(silent)
    silent.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
    assert fetch(server, timeout=5).status == 200


# ---------------------------------------------------------------------------
# Loading web config files
# ---------------------------------------------------------------------------


def test_no_path_means_no_config() -> None:
    assert load_web_config(None) is None


def test_empty_file_means_plain_http(write_config: Callable[[str], str]) -> None:
    config = load_web_config(write_config("# nothing yet\n"))
    assert config is not None
    assert config.ssl_context is None
    assert not config.basic_auth_users
    assert config.http2 is True


def test_full_config_loads(
    write_config: Callable[[str], str], certs: Certificates, password_hash: str
) -> None:
    config = load_web_config(
        write_config(
            tls_config(
                certs,
                "  client_auth_type: VerifyClientCertIfGiven\n"
                f"  client_ca_file: {certs.client_ca}\n"
                "  min_version: TLS13\n"
                "  max_version: TLS13\n"
                "http_server_config:\n"
                "  http2: false\n"
                f"basic_auth_users:\n  alice: {password_hash}\n  bob: {password_hash}\n"
                "rate_limit:\n  interval: 1m30s\n  burst: 10\n",
            )
        )
    )
    assert config is not None
    assert config.tls is not None
    assert config.tls.client_auth_type == "VerifyClientCertIfGiven"
    assert config.ssl_context is not None
    assert config.ssl_context.verify_mode == ssl.CERT_OPTIONAL
    assert config.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert set(config.basic_auth_users) == {"alice", "bob"}
    assert config.rate_limit is not None
    assert config.rate_limit.interval_seconds == 90
    assert password_hash not in repr(config)


# Each case: the file's text, then fragments the one-line error must contain.
# {cert}, {key}, {other_key}, {encrypted_key}, {ca}, {hash} and {dir} are
# filled in by the test.
BAD_CONFIGS = {
    "unknown top-level key": ("tls_config:\n  cert_file: x\n", ["unknown key tls_config"]),
    "unknown nested key with suggestion": (
        "tls_server_config:\n  certfile: {cert}\n",
        ["unknown key tls_server_config.certfile (did you mean cert_file?)"],
    ),
    "bad YAML": ("tls_server_config: [oops\n", ["invalid YAML at line"]),
    "not a mapping": ("- just\n- a list\n", ["the file must be a mapping"]),
    "duplicate key": (
        "basic_auth_users:\n  alice: '{hash}'\n  alice: '{hash}'\n",
        ["duplicate key 'alice'"],
    ),
    "missing key_file": (
        "tls_server_config:\n  cert_file: {cert}\n",
        ["tls_server_config is missing key_file"],
    ),
    "key_file does not exist": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: /nonexistent/tls.key\n",
        ["tls_server_config.key_file /nonexistent/tls.key: no such file"],
    ),
    "cert_file is a directory": (
        "tls_server_config:\n  cert_file: {dir}\n  key_file: {key}\n",
        ["tls_server_config.cert_file", "is a directory"],
    ),
    "cert_file is not a certificate": (
        "tls_server_config:\n  cert_file: {key}\n  key_file: {key}\n",
        ["tls_server_config.cert_file", "no PEM certificate"],
    ),
    "key_file is not a key": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {cert}\n",
        ["tls_server_config.key_file", "no PEM private key"],
    ),
    "key does not match cert": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {other_key}\n",
        ["is not the key of tls_server_config.cert_file"],
    ),
    "encrypted key": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {encrypted_key}\n",
        ["the key is encrypted"],
    ),
    "both cert and cert_file": (
        "tls_server_config:\n  cert: x\n  cert_file: {cert}\n  key_file: {key}\n",
        ["sets both cert and cert_file"],
    ),
    "settings but no certificate": (
        "tls_server_config:\n  min_version: TLS13\n",
        ["sets min_version but no certificate"],
    ),
    "bad client_auth_type": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  client_auth_type: Sometimes\n",
        ["client_auth_type 'Sometimes' is not a client auth type"],
    ),
    "unverified client_auth_type": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  client_auth_type: RequireAnyClientCert\n  client_ca_file: {ca}\n",
        ["RequireAnyClientCert", "not supported by Python's ssl module"],
    ),
    "verification without a CA": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  client_auth_type: RequireAndVerifyClientCert\n",
        ["needs the CA that signs client certificates"],
    ),
    "CA without client auth": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: {ca}\n",
        ["client_auth_type is NoClientCert"],
    ),
    "allowed SANs without required certs": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {ca}\n"
        "  client_allowed_sans: [x]\n",
        ["client_allowed_sans needs client_auth_type RequireAndVerifyClientCert"],
    ),
    "bad min_version": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS1.2\n",
        ["tls_server_config.min_version 'TLS1.2' is not a TLS version"],
    ),
    "min_version not a string": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: 12\n",
        ["tls_server_config.min_version must be a string, got 12 (int)"],
    ),
    "min above max": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  min_version: TLS13\n  max_version: TLS12\n",
        ["min_version TLS13 is above max_version TLS12"],
    ),
    "unknown cipher suite": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
        ["cipher_suites: unknown cipher suite 'TLS_RSA_WITH_RC4_128_SHA'"],
    ),
    "several curves": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  curve_preferences: [CurveP256, CurveP384]\n",
        ["curve_preferences", "one curve only"],
    ),
    "unknown curve": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  curve_preferences: [Curve25519]\n",
        ["curve_preferences: unknown curve 'Curve25519'; use one of: CurveP256,", "X25519"],
    ),
    "prefer_server_cipher_suites not a bool": (
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  prefer_server_cipher_suites: maybe\n",
        ["prefer_server_cipher_suites must be true or false"],
    ),
    "plain-text password": (
        "basic_auth_users:\n  alice: hunter2\n",
        ["basic_auth_users.alice: it is not a bcrypt hash", "htpasswd"],
    ),
    "user name not a string": (
        "basic_auth_users:\n  yes: '{hash}'\n",
        ["the user name True (bool) must be a string: quote it"],
    ),
    "basic_auth_users not a mapping": (
        "basic_auth_users: [alice]\n",
        ["basic_auth_users must be a mapping"],
    ),
    "header not allowed": (
        "http_server_config:\n  headers:\n    Server: nginx\n",
        ["HTTP header 'Server' cannot be configured"],
    ),
    "header value not allowed": (
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        ["X-Frame-Options 'allow' is not allowed: use one of deny, sameorigin"],
    ),
    "http2 not a bool": (
        "http_server_config:\n  http2: 'on please'\n",
        ["http_server_config.http2 must be true or false"],
    ),
    "rate limit without burst": (
        "rate_limit:\n  interval: 1s\n",
        ["rate_limit.burst must be at least 1"],
    ),
    "rate limit bad interval": (
        "rate_limit:\n  interval: 1d\n  burst: 1\n",
        ["rate_limit.interval '1d' (str) is not a duration"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_a_one_line_user_error(
    case: str,
    write_config: Callable[[str], str],
    workdir: Path,
    certs: Certificates,
    password_hash: str,
) -> None:
    text, fragments = BAD_CONFIGS[case]
    for placeholder, value in {
        "{cert}": str(certs.server_cert),
        "{key}": str(certs.server_key),
        "{other_key}": str(certs.other_key),
        "{encrypted_key}": str(certs.encrypted_key),
        "{ca}": str(certs.client_ca),
        "{hash}": password_hash,
        "{dir}": str(workdir),
    }.items():
        text = text.replace(placeholder, value)
    path = write_config(text)
    with pytest.raises(UserError) as err:
        load_web_config(path)
    assert_one_line_user_error(err, f"web config {path}: ", *fragments)


def test_missing_config_file_is_a_user_error(workdir: Path) -> None:
    path = str(workdir / "absent.yml")
    with pytest.raises(UserError) as err:
        load_web_config(path)
    assert_one_line_user_error(err, f"web config {path}: cannot read the file: no such file")


def test_handshakes_run_in_parallel(
    start_server: Callable[..., MetricsServer],
    write_config: Callable[[str], str],
    certs: Certificates,
) -> None:
    server = start_server(load_web_config(write_config(tls_config(certs))))
    results: list[int] = []
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            results.append(fetch(server, tls=client_tls_context(certs), timeout=5).status)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert results == [200] * 8


# ---------------------------------------------------------------------------
# Hostile and slow clients, readiness (issue 14)
# ---------------------------------------------------------------------------


def raw_exchange(server: MetricsServer, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection(server.address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics HTTP/1.1 extra\r\n\r\n",
        b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon here\r\nAccept: text/plain\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",
    ],
    ids=[
        "garbage",
        "no-version",
        "extra-token",
        "binary",
        "header-without-colon",
        "space-before-colon",
    ],
)
def test_malformed_requests_get_a_status_line(
    start_server: Callable[..., MetricsServer], request_bytes: bytes
) -> None:
    answer = raw_exchange(start_server(), request_bytes)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert body.startswith(b"Bad Request")


def test_oversized_request_head_is_431(start_server: Callable[..., MetricsServer]) -> None:
    big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    answer = raw_exchange(start_server(), big)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_request_head_has_one_deadline(
    start_server: Callable[..., MetricsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webserver, "REQUEST_HEAD_TIMEOUT_SECONDS", 1.0)
    server = start_server()
    with socket.create_connection(server.address, timeout=10) as sock:
        started = time.monotonic()
        answer = b""
        # One header byte every 0.2 s: each read is quick, the head never ends.
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 200:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                answer = sock.recv(65536)
                break
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert took < 8, took


def test_idle_connection_before_any_request_is_closed_at_the_head_deadline(
    start_server: Callable[..., MetricsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webserver, "REQUEST_HEAD_TIMEOUT_SECONDS", 0.5)
    server = start_server()
    with socket.create_connection(server.address, timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed without a word, as Go does
        assert time.monotonic() - started < 8


def test_listen_backlog_is_the_hosts_somaxconn(start_server: Callable[..., MetricsServer]) -> None:
    server = start_server()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    # For a listening socket, ss shows the backlog as Send-Q.
    listing = subprocess.run(
        ["ss", "-Hltn", f"sport = :{server.address[1]}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.split()
    assert int(listing[2]) == somaxconn, listing


def test_kept_alive_requests_do_not_wait_for_delayed_acks(
    start_server: Callable[..., MetricsServer],
) -> None:
    server = start_server()
    connection = http.client.HTTPConnection(*server.address, timeout=10)
    took = []
    try:
        for _ in range(15):
            started = time.monotonic()
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            took.append(time.monotonic() - started)
            assert response.status == 200
    finally:
        connection.close()
    # Headers and body in separate sends without TCP_NODELAY made each
    # request on a kept-alive connection wait for a 40 ms delayed ACK.
    took.sort()
    assert took[len(took) // 2] < 0.03, took


def test_connections_are_capped_and_scrapes_still_served(
    start_server: Callable[..., MetricsServer],
    open_sockets: list[socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(webserver, "MAX_CONNECTIONS", 20)
    server = start_server()
    for _ in range(60):
        sock = socket.create_connection(server.address, timeout=10)
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        open_sockets.append(sock)
    assert fetch(server, timeout=10).status == 200
    # The oldest silent ones were closed to make room for the newer ones.
    oldest = open_sockets[0]
    oldest.settimeout(10)
    assert oldest.recv(1) == b""

    def server_side_connections() -> int:
        listing = subprocess.run(
            ["ss", "-Htn", "state", "established", f"sport = :{server.address[1]}"],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return len(listing.splitlines())

    deadline = time.monotonic() + 10
    while server_side_connections() > 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_side_connections() <= 20


def test_threads_are_bounded(
    start_server: Callable[..., MetricsServer], open_sockets: list[socket.socket]
) -> None:
    server = start_server()
    # Every thread the server will ever run is there from the start.
    started = threading.active_count()
    assert server._server is not None
    assert len(server._server.workers._threads) == webserver.SCRAPE_WORKERS
    for _ in range(100):
        sock = socket.create_connection(server.address, timeout=10)
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        open_sockets.append(sock)
    assert fetch(server, timeout=10).status == 200
    assert threading.active_count() <= started


def test_many_concurrent_scrapers_are_all_served(
    start_server: Callable[..., MetricsServer],
) -> None:
    server = start_server()
    statuses: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def scrape() -> None:
        try:
            status = fetch(server, timeout=30).status
        except BaseException as err:  # reported below
            with lock:
                errors.append(err)
        else:
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=scrape) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert statuses == [200] * 200


def test_metrics_answer_503_until_ready(
    registry: CollectorRegistry, start_server: Callable[..., MetricsServer]
) -> None:
    tracing = threading.Event()
    server = start_server(ready=tracing.is_set)
    server_routes_ok = fetch(server, "/")
    assert server_routes_ok.status == 200
    not_ready = fetch(server)
    assert not_ready.status == 503
    assert b"tracing has not started" in not_ready.body
    assert fetch(server, "/metrics", method="HEAD").status == 503
    tracing.set()
    assert fetch(server).status == 200


def test_ready_defaults_to_always(start_server: Callable[..., MetricsServer]) -> None:
    assert fetch(start_server()).status == 200


def _pids_cgroup_parent() -> Path | None:
    unified = Path("/sys/fs/cgroup")
    controllers = unified / "cgroup.controllers"
    if controllers.exists():
        subtree = unified / "cgroup.subtree_control"
        if "pids" in subtree.read_text().split():
            return unified
        return None
    v1 = unified / "pids"
    return v1 if (v1 / "cgroup.procs").exists() else None


_SERVER_SCRIPT = """
import sys, time
from prometheus_client import CollectorRegistry, Gauge
from tcptrace_ebpf.web.server import MetricsServer
registry = CollectorRegistry()
Gauge("test_up", "Up.", registry=registry).set(1)
server = MetricsServer(registry, ("127.0.0.1", 0))
server.start()
print(server.address[1], flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(180)
def test_slow_clients_under_a_task_limit_do_not_stop_scrapes() -> None:
    """A pids cgroup of 150 (a systemd TasksMax, a Kubernetes pids limit) and
    147 slow clients: every legitimate scrape is still served."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a pids cgroup")
    parent = _pids_cgroup_parent()
    if parent is None:
        pytest.skip("no pids cgroup controller to limit tasks with")
    cgroup = parent / f"tcptrace-test-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    proc: subprocess.Popen[str] | None = None
    slow: list[socket.socket] = []
    try:
        (cgroup / "pids.max").write_text("150\n")
        procs_file = str(cgroup / "cgroup.procs")

        def join_cgroup() -> None:
            with open(procs_file, "w") as stream:
                stream.write(str(os.getpid()))

        proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=join_cgroup,  # noqa: PLW1509 (no threads to deadlock in here)
        )
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(147):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            slow.append(sock)
        statuses = []
        for _ in range(30):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                body = response.read()
                statuses.append(response.status)
                assert b"test_up 1.0" in body
            finally:
                connection.close()
        assert statuses == [200] * 30
        assert proc.poll() is None
    finally:
        for sock in slow:
            sock.close()
        if proc is not None:
            proc.kill()
            proc.wait()
            close_pipes(proc)
        for _ in range(50):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_shutdown_right_after_start_stops_the_server(registry: CollectorRegistry) -> None:
    # stop() may reach the serving thread before its event loop runs.
    for _ in range(20):
        server = MetricsServer(registry, LOOPBACK)
        server.start()
        address = server.address
        started = time.monotonic()
        server.shutdown()
        assert time.monotonic() - started < 5
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5).close()
