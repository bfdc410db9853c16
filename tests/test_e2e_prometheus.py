"""End to end with a real Prometheus: `tcptrace-ebpf serve` traces real
loopback traffic, a Prometheus server (Debian's /usr/bin/prometheus, started
here on loopback with its own temporary storage) scrapes it and evaluates
deploy/prometheus/tcptrace-alerts.yml, and every dashboard query is run
against it. Then the exporter's web config (TLS and basic auth) through the
real `serve` command, scraped by Python and by Prometheus.

Every process started here (Prometheus, serve, the leaking program) is
stopped by its pid, by a fixture finalizer or a context manager, also when a
test fails.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import json
import math
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import cli_argv, free_port, requires_root, run_cli, wait_for
from test_dashboards import EXPORTED_METRICS, dashboard_queries, require_tool, substitute
from test_serve import Samples, scrape, value

from tcptrace_ebpf.kernel import bpfsys

REPO = Path(__file__).resolve().parent.parent
ALERT_RULES = REPO / "deploy" / "prometheus" / "tcptrace-alerts.yml"

JOB = "tcptrace"  # the job name the dashboards' examples and TCPTraceExporterDown use
LEAKER_COMM = "tt-e2e-leak"  # the leaking program's name, as the metrics label it
IO_TIMEOUT_S = 10.0

# ---------------------------------------------------------------------------
# A Prometheus server of our own
# ---------------------------------------------------------------------------


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET /api/v1/<path>; the JSON answer, errors (HTTP 4xx/5xx) included."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=IO_TIMEOUT_S) as response:
                answer: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as err:
            answer = json.load(err)
        return answer

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at now that must succeed; its result vector."""
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        assert answer["data"]["resultType"] == "vector", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        """The single value of a query, or None when it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """start(scrape_configs, rule_files) -> a ready Prometheus on a free loopback
    port, storing in tmp_path; stopped (SIGTERM, then SIGKILL) by its pid at teardown."""
    binary = require_tool("prometheus", "prometheus")
    started: list[Prometheus] = []

    def start(
        scrape_configs: list[dict[str, Any]], rule_files: tuple[Path, ...] = ()
    ) -> Prometheus:
        directory = tmp_path / f"prometheus{len(started)}"
        directory.mkdir()
        config = directory / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": "1s",
                        "scrape_timeout": "1s",
                        "evaluation_interval": "1s",
                    },
                    "rule_files": [str(path) for path in rule_files],
                    "scrape_configs": scrape_configs,
                },
                sort_keys=False,
            )
        )
        for _attempt in range(3):  # another process may take the free port first
            port = free_port()
            log = directory / f"prometheus-{port}.log"
            with log.open("wb") as sink:
                proc = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={directory / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            prometheus = Prometheus(proc, port, log)
            started.append(prometheus)
            deadline = time.monotonic() + 30
            while proc.poll() is None and not prometheus.ready():
                assert time.monotonic() < deadline, (
                    f"Prometheus not ready:\n{prometheus.log_tail()}"
                )
                time.sleep(0.1)
            if proc.poll() is None:
                return prometheus
            if "address already in use" not in log.read_text(errors="replace"):
                break
        raise AssertionError(f"Prometheus exited:\n{prometheus.log_tail()}")

    yield start
    for prometheus in started:
        if prometheus.proc.poll() is None:
            prometheus.proc.terminate()
        try:
            prometheus.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prometheus.proc.kill()
            prometheus.proc.wait()


def wait_up(prometheus: Prometheus, job: str, expected: float = 1.0) -> None:
    wait_for(
        lambda: prometheus.scalar(f'max(up{{job="{job}"}})') == expected,
        what=lambda: f'up{{job="{job}"}} == {expected}; Prometheus log:\n{prometheus.log_tail()}',
        timeout=30,
        interval=0.25,
    )


# ---------------------------------------------------------------------------
# Traffic
# ---------------------------------------------------------------------------


def tcp_socket() -> socket.socket:
    sock = socket.socket()
    sock.settimeout(IO_TIMEOUT_S)
    # Lets a later bind() to this port reuse the address pair's TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def linger0(sock: socket.socket) -> None:
    """The next close() sends a RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass
class Traffic:
    """Connections to a listener of ours on `port`, every kind the panels show.

    Clients bind ports outside the ephemeral range (free_port), so that no
    other traffic on the host holds the address pairs reused later.
    """

    port: int
    refused_port: int  # nothing listens there
    listener: socket.socket = field(init=False)
    refused: int = 0
    reused: int = 0
    # (client port, when its pair went TIME_WAIT): TIME_WAITs to end by reuse.
    time_waits: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.listener = tcp_socket()
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(256)

    def close(self) -> None:
        self.listener.close()

    def fresh_port(self) -> int:
        """A free client port that is in none of our TIME_WAIT pairs: a
        server-side TIME_WAIT does not hold its client's port, and a SYN from
        that port would end it by reuse unannounced."""
        in_time_wait = {cport for cport, _since in self.time_waits}
        while (port := free_port()) in in_time_wait:
            pass
        return port

    def connect(self, cport: int | None = None) -> tuple[socket.socket, socket.socket]:
        deadline = time.monotonic() + 5
        while True:
            client = tcp_socket()
            try:
                client.bind(("127.0.0.1", cport or self.fresh_port()))
                client.connect(("127.0.0.1", self.port))
                break
            except OSError as err:
                client.close()
                # A fresh port was taken meanwhile, or a TIME_WAIT pair is not
                # reusable yet: try again.
                retry = err.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
                if not retry or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        child, _ = self.listener.accept()
        child.settimeout(IO_TIMEOUT_S)
        return client, child

    def client_closes_first(self) -> None:
        """The client goes TIME_WAIT."""
        client, child = self.connect()
        client.sendall(b"ping")
        assert child.recv(4) == b"ping"
        self.time_waits.append((client.getsockname()[1], time.monotonic()))
        client.close()
        assert child.recv(1) == b""
        child.close()

    def server_closes_first(self) -> None:
        """The server's child goes TIME_WAIT, the client CLOSE_WAIT for a moment."""
        client, child = self.connect()
        child.sendall(b"pong")
        assert client.recv(4) == b"pong"
        self.time_waits.append((client.getsockname()[1], time.monotonic()))
        child.close()
        assert client.recv(1) == b""
        client.close()

    def server_resets(self) -> None:
        client, child = self.connect()
        linger0(child)
        child.close()
        with contextlib.suppress(OSError):
            client.recv(1)
        client.close()

    def refuse(self) -> None:
        sock = tcp_socket()
        try:
            with pytest.raises(ConnectionRefusedError):
                sock.connect(("127.0.0.1", self.refused_port))
        finally:
            sock.close()
        self.refused += 1

    def reuse_old_pairs(self, age_s: float = 2.1) -> None:
        """A new connection on each pair that went TIME_WAIT `age_s` ago or more
        (on loopback the kernel lets connect() reuse its own TIME_WAIT pair after
        a second; a SYN ends the server's TIME_WAIT at once), reset by the client
        so that it leaves no TIME_WAIT behind."""
        now = time.monotonic()
        ready = [cport for cport, since in self.time_waits if now - since >= age_s]
        self.time_waits = [(c, since) for c, since in self.time_waits if now - since < age_s]
        for cport in ready:
            client, child = self.connect(cport)
            linger0(client)
            client.close()
            with contextlib.suppress(OSError):
                child.recv(1)
            child.close()
            self.reused += 1


LEAKER = textwrap.dedent(
    """
    import ctypes, socket, sys
    # PR_SET_NAME: a comm of its own, so that the metrics name this program.
    ctypes.CDLL(None).prctl(15, sys.argv[3].encode(), 0, 0, 0)
    port, count = int(sys.argv[1]), int(sys.argv[2])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1024)
    print("listening", flush=True)
    held = [srv.accept()[0] for _ in range(count)]
    print("accepted", flush=True)
    for line in sys.stdin:  # "N": close N of the sockets
        for sock in held[: int(line)]:
            sock.close()
        del held[: int(line)]
        print("closed", len(held), flush=True)
    """
)


class Leaker:
    """A program that accepts `count` connections and closes them only when told:
    once their clients close, its sockets sit in CLOSE_WAIT."""

    def __init__(self, directory: Path, port: int, count: int) -> None:
        script = directory / "leaker.py"
        script.write_text(LEAKER)
        self.count = count
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(port), str(count), LEAKER_COMM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        clients: list[socket.socket] = []
        try:
            assert self.read() == "listening"
            for _ in range(count):
                clients.append(socket.create_connection(("127.0.0.1", port), IO_TIMEOUT_S))
            assert self.read() == "accepted"
            assert Path(f"/proc/{self.proc.pid}/comm").read_text().strip() == LEAKER_COMM
        except BaseException:
            self.stop()
            raise
        finally:
            for client in clients:
                client.close()  # the peer closes: the leaker's sockets go CLOSE_WAIT
        self.leaking_since = time.time()

    def read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def close_some(self, n: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        self.count -= n
        assert self.read() == f"closed {self.count}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def leaking(directory: Path, port: int, count: int) -> Iterator[Leaker]:
    leaker = None
    try:
        leaker = Leaker(directory, port, count)
        yield leaker
    finally:
        if leaker is not None:
            leaker.stop()


# ---------------------------------------------------------------------------
# Test 1: every dashboard query returns data from a real Prometheus
# ---------------------------------------------------------------------------

# Panels whose value may be zero in a healthy test run (they still must
# return a series): nothing was lost, no scrape failed, no exporter is down,
# tcp_max_tw_buckets was not reached.
MAY_BE_ZERO = {
    "Exporters down",
    "Lost events per second (worst in range)",
    "Share of events lost",
    "Collection errors per second",
    "TIME_WAIT sockets not created per second",
    "SYNs sent again per second",  # no SYN goes unanswered on loopback
}
# Panels that filter their series with "> 0" and are therefore empty in a
# healthy run on a quiet host: only checked to be valid PromQL, and that the
# series they filter exist (the query without the trailing "> 0" has data).
# On a busy host (another tracing BPF program running) the kernel skips runs
# of the tracer's programs, so data there is allowed too.
FILTERED_TO_NONZERO = {
    "Lost events per second, by cause",
    "BPF program runs skipped by the kernel, by tracepoint",
}

TRAFFIC_S = 22.0
ROUND_S = 0.5
LEAK_SIZE = 12
# Closed mid-run, so CLOSE_WAIT durations are observed, all of them over
# LEAK_CLOSED_AFTER_S (the CLOSE_WAITs of the other traffic last milliseconds).
LEAK_CLOSED_EARLY = 5
LEAK_CLOSED_AFTER_S = 11.0


def losses(samples: Samples) -> tuple[float, float]:
    """(events lost and socket tracepoint runs the kernel skipped, timer
    tracepoint runs it skipped), so far. On a busy host (another tracing BPF
    program running) the kernel skips some runs; then counts may be off by as
    many. Timer runs are skipped far more often and nearly all concern other
    timers than TIME_WAIT's, so only the TIME_WAIT count allows for them."""
    sockets = timers = 0.0
    for (name, labels), number in samples.items():
        if name == "tcptrace_lost_events_total":
            sockets += number
        elif name == "tcptrace_program_skipped_runs_total":
            tracepoint = dict(labels)["tracepoint"]
            if tracepoint.startswith("timer:"):
                timers += number
            elif tracepoint != "sock:inet_sock_set_state":  # that one is kernel_skipped
                sockets += number
    return sockets, timers


def assert_count(got: float | None, expected: float, lost: float, what: str) -> None:
    """`got` is `expected`, exactly when nothing was lost, else within the losses."""
    assert got is not None, f"{what}: no data"
    if lost == 0:
        assert got == expected, f"{what}: {got}, expected {expected}"
    else:
        assert abs(got - expected) <= lost, f"{what}: {got}, expected {expected} (+-{lost} lost)"


def _numbers(result: list[dict[str, Any]]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


@requires_root
def test_every_dashboard_query_returns_data(
    tmp_path: Path, start_prometheus: Callable[..., Prometheus]
) -> None:
    http_port, port, refused_port, leak_port = (free_port() for _ in range(4))
    instance = f"127.0.0.1:{http_port}"
    # Prometheus first: it starts while serve compiles its BPF program.
    prometheus = start_prometheus(
        [{"job_name": JOB, "static_configs": [{"targets": [instance]}]}], (ALERT_RULES,)
    )
    ports = ("--port", str(port), "--port", str(refused_port), "--port", str(leak_port))
    api = str(tmp_path / "api.sock")
    with run_cli("serve", "--web.listen-address", instance, "--api.socket", api, *ports) as run:
        wait_up(prometheus, JOB)
        sel = f'job="{JOB}", instance="{instance}"'
        refused_expr = f'sum(tcptrace_connections_closed_total{{{sel}, close="refused"}})'
        reused_expr = f'sum(tcptrace_time_wait_duration_seconds_count{{{sel}, end="reused"}})'
        leak_expr = f'sum(tcptrace_close_wait_sockets{{{sel}, comm="{LEAKER_COMM}"}})'
        refused_before = _numbers(
            wait_for(
                lambda: prometheus.query(refused_expr),
                what="a first sample of refused closes",
                timeout=20,
                interval=0.25,
            )
        )[0]
        reused_before = prometheus.scalar(reused_expr) or 0.0
        lost_before = losses(scrape(http_port))

        with contextlib.ExitStack() as stack:
            # The kernel times BPF programs only while someone asks: the
            # panels of the programs' own cost need it (released with the stack).
            stack.enter_context(bpfsys.run_stats())
            traffic = Traffic(port, refused_port)
            stack.callback(traffic.close)
            leaker = stack.enter_context(leaking(tmp_path, leak_port, LEAK_SIZE))
            for sock in traffic.connect():  # stays ESTABLISHED until the queries ran
                stack.callback(sock.close)
            leak_peak = 0.0  # the most CLOSE_WAIT sockets Prometheus saw for the leaker
            started = time.monotonic()
            while time.monotonic() - started < TRAFFIC_S:
                round_started = time.monotonic()
                traffic.client_closes_first()
                traffic.server_closes_first()
                traffic.server_resets()
                traffic.refuse()
                traffic.reuse_old_pairs()
                if leaker.count == LEAK_SIZE:
                    leak_peak = max(leak_peak, prometheus.scalar(leak_expr) or 0.0)
                    if time.time() - leaker.leaking_since > LEAK_CLOSED_AFTER_S:
                        leaker.close_some(LEAK_CLOSED_EARLY)
                time.sleep(max(0.0, ROUND_S - (time.monotonic() - round_started)))
            assert leaker.count < LEAK_SIZE

            # Prometheus saw what serve exported, which is what the traffic did.
            def settled() -> bool:
                return (
                    prometheus.scalar(refused_expr) == refused_before + traffic.refused
                    and prometheus.scalar(reused_expr) == reused_before + traffic.reused
                    and prometheus.scalar(leak_expr) == leaker.count
                )

            with contextlib.suppress(AssertionError):  # may never settle when events were lost
                wait_for(settled, what="Prometheus to have the final counts", interval=0.25)
            samples = scrape(http_port)
            lost, timer_skips = (a - b for a, b in zip(losses(samples), lost_before, strict=True))
            assert_count(
                prometheus.scalar(refused_expr) - refused_before,
                traffic.refused,
                lost,
                "refused connects in Prometheus",
            )
            assert_count(
                value(samples, "tcptrace_connections_closed_total", role="client", close="refused")
                - refused_before,
                traffic.refused,
                lost,
                "refused connects in serve's metrics",
            )
            assert_count(
                (prometheus.scalar(reused_expr) or 0.0) - reused_before,
                traffic.reused,
                lost + timer_skips,
                "TIME_WAITs ended by reuse in Prometheus",
            )
            assert_count(leak_peak, LEAK_SIZE, lost, f"{LEAKER_COMM}'s CLOSE_WAIT peak")
            assert_count(
                prometheus.scalar(leak_expr), leaker.count, lost, "CLOSE_WAIT sockets left"
            )
            oldest = prometheus.scalar(
                f'max(tcptrace_close_wait_oldest_seconds{{{sel}, comm="{LEAKER_COMM}"}})'
            )
            age = time.time() - leaker.leaking_since
            assert oldest is not None
            assert age - 3.0 <= oldest <= age + 0.5, (oldest, age)
            assert_count(
                value(samples, "tcptrace_sockets", state="ESTABLISHED"), 2, lost, "the held pair"
            )
            close_wait = "tcptrace_close_wait_duration_seconds_bucket"
            assert_count(
                value(samples, close_wait, le="+Inf") - value(samples, close_wait, le="10.0"),
                LEAK_CLOSED_EARLY,
                lost,
                "CLOSE_WAITs that lasted over 10 s",
            )

            failures = run_dashboard_queries(prometheus, instance)
            assert not failures, "dashboard queries without data:\n" + "\n".join(failures)

        check_metrics_and_rules(prometheus, sel)
    assert run.returncode == 0, run.stderr


def run_dashboard_queries(prometheus: Prometheus, instance: str) -> list[str]:
    """Every dashboard query at now; one line per query that fails or lacks data."""
    failures = []
    titles = set()
    for dashboard, title, expr in dashboard_queries():
        titles.add(title)
        query = substitute(expr, JOB, instance, "1m")
        where = f"{dashboard}: {title!r}: {' '.join(query.split())}"
        answer = prometheus.api("query", query=query)
        if answer["status"] != "success":
            failures.append(f"{where}: {answer.get('errorType')}: {answer.get('error')}")
            continue
        result = answer["data"]["result"]
        if title in FILTERED_TO_NONZERO:
            inner = query.rstrip().removesuffix("> 0")
            assert inner != query.rstrip(), f"{where}: no trailing '> 0' any more"
            if not prometheus.query(inner):
                failures.append(f"{where}: its series are missing (even before '> 0')")
            if any(not v > 0 for v in _numbers(result)):
                failures.append(f"{where}: '> 0' let through {_numbers(result)}")
            continue
        values = _numbers(result)
        if not values:
            failures.append(f"{where}: empty result")
        elif not any(math.isfinite(v) for v in values):
            failures.append(f"{where}: no finite value (no observations in the window?): {values}")
        elif title not in MAY_BE_ZERO and not any(math.isfinite(v) and v != 0 for v in values):
            failures.append(f"{where}: only zeros: {values}")
    # The special cases must not go stale silently.
    special = MAY_BE_ZERO | FILTERED_TO_NONZERO
    assert not special - titles, f"no such panels any more: {special - titles}"
    return failures


def check_metrics_and_rules(prometheus: Prometheus, sel: str) -> None:
    # Every metric the dashboards are linted against reached Prometheus.
    names = {
        sample["metric"]["__name__"]
        for sample in prometheus.query(f'count by (__name__) ({{{sel}, __name__=~".+"}})')
    }
    missing = [
        metric
        for metric in EXPORTED_METRICS
        if metric not in names and f"{metric}_count" not in names
    ]
    assert not missing, f"exported metrics Prometheus never got: {missing}"

    # Every alerting rule was evaluated, without error.
    def rules() -> list[dict[str, Any]]:
        answer = prometheus.api("rules")
        assert answer["status"] == "success", answer
        found = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
        return found if found and all(rule["health"] != "unknown" for rule in found) else []

    evaluated = wait_for(rules, what="every rule evaluated once", timeout=20, interval=0.25)
    bad = [(rule["name"], rule["health"], rule.get("lastError")) for rule in evaluated]
    bad = [entry for entry in bad if entry[1] != "ok"]
    assert not bad, bad
    alerts = {rule["name"]: rule for rule in evaluated}
    rule_names = [
        rule.get("alert") or rule["record"]
        for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
        for rule in group["rules"]
    ]
    assert sorted(alerts) == sorted(rule_names)
    # The exporter is up under the job name the alert watches.
    assert alerts["TCPTraceExporterDown"]["state"] == "inactive", alerts["TCPTraceExporterDown"]


# ---------------------------------------------------------------------------
# Test 2: the web config (TLS, basic auth) through `serve`
# ---------------------------------------------------------------------------

USER = "e2e"
PASSWORD = "s3cret e2e"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    other_key: Path  # not the key of cert


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    require_tool("openssl", "openssl")
    files = TlsFiles(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other-key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(files.key), "-out", str(files.cert),
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    subprocess.run(
        [
            "openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-out", str(files.other_key),
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return files


def basic_auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def https_get(
    port: int, context: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(f"https://127.0.0.1:{port}/metrics", headers=headers or {})
    try:
        with urllib.request.urlopen(request, context=context, timeout=IO_TIMEOUT_S) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode(errors="replace")


@requires_root
def test_tls_and_basic_auth_through_serve(
    tmp_path: Path, tls_files: TlsFiles, start_prometheus: Callable[..., Prometheus]
) -> None:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    web_config = tmp_path / "web.yml"
    web_config.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {
                    "cert_file": str(tls_files.cert),
                    "key_file": str(tls_files.key),
                },
                "basic_auth_users": {USER: hashed},
            }
        )
    )
    http_port = free_port()
    instance = f"127.0.0.1:{http_port}"
    tls = {"ca_file": str(tls_files.cert)}
    target = [{"targets": [instance]}]
    prometheus = start_prometheus(
        [
            {
                "job_name": "tcptrace-tls",
                "scheme": "https",
                "tls_config": tls,
                "basic_auth": {"username": USER, "password": PASSWORD},
                "static_configs": target,
            },
            {
                "job_name": "tcptrace-tls-wrong-password",
                "scheme": "https",
                "tls_config": tls,
                "basic_auth": {"username": USER, "password": "wrong"},
                "static_configs": target,
            },
            {"job_name": "tcptrace-plain-http", "scheme": "http", "static_configs": target},
        ]
    )
    with run_cli(
        "serve", "--web.listen-address", instance, "--web.config.file", str(web_config),
        "--api.socket", str(tmp_path / "api.sock"), "--port", str(free_port()),
    ) as run:  # fmt: skip
        assert any("https://127.0.0.1" in line for line in run.stderr), run.stderr
        verified = ssl.create_default_context(cafile=str(tls_files.cert))

        status, _, body = https_get(http_port, verified, basic_auth(USER, PASSWORD))
        assert status == 200, body
        names = {
            sample.name
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }
        assert {"tcptrace_events_total", "tcptrace_sockets", "tcptrace_build_info"} <= names

        for headers in (basic_auth(USER, "wrong"), basic_auth("nobody", PASSWORD), {}):
            status, response_headers, body = https_get(http_port, verified, headers)
            assert status == 401, (headers, status, body)
            assert "tcptrace_" not in body
            assert response_headers.get("WWW-Authenticate", "").startswith("Basic"), (
                response_headers
            )

        # The certificate served is the one generated: unknown to the system CAs.
        with pytest.raises(urllib.error.URLError) as not_trusted:
            https_get(http_port, ssl.create_default_context(), basic_auth(USER, PASSWORD))
        assert isinstance(not_trusted.value.reason, ssl.SSLCertVerificationError)

        # Plain HTTP to the TLS port: no metrics (a dropped connection or a 400).
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=IO_TIMEOUT_S)
        try:
            connection.request("GET", "/metrics", headers=basic_auth(USER, PASSWORD))
            response = connection.getresponse()
            plain_status, plain_body = response.status, response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as err:
            plain_status, plain_body = None, repr(err)
        finally:
            connection.close()
        assert plain_status in (None, 400), (plain_status, plain_body)
        assert "tcptrace_" not in plain_body

        # Prometheus scrapes it over TLS with basic auth, and fails without them.
        wait_up(prometheus, "tcptrace-tls")
        assert prometheus.scalar('max(tcptrace_build_info{job="tcptrace-tls"})') == 1
        wait_up(prometheus, "tcptrace-tls-wrong-password", expected=0)
        wait_up(prometheus, "tcptrace-plain-http", expected=0)
        assert prometheus.query('tcptrace_build_info{job!="tcptrace-tls"}') == []
        errors = {
            target["labels"]["job"]: target["lastError"]
            for target in prometheus.api("targets")["data"]["activeTargets"]
        }
        assert "401" in errors["tcptrace-tls-wrong-password"], errors
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    ("variant", "needles"),
    [
        ("unknown_top_key", ["basic_auth_user"]),
        ("unknown_tls_key", ["tls_server_config.cert_files"]),
        ("missing_key_file", ["key_file"]),
        ("not_bcrypt", [f"basic_auth_users.{USER}", "bcrypt"]),
        ("md5_crypt", [f"basic_auth_users.{USER}", "bcrypt"]),
        ("cert_missing", ["{tmp}/missing.pem"]),
        ("cert_is_a_directory", ["{tmp}", "directory"]),
        ("cert_not_pem", ["{tmp}/garbage.pem", "certificate"]),
        ("key_not_of_cert", ["{other_key}", "{cert}"]),
    ],
)
def test_malformed_web_config_variants(
    variant: str, needles: list[str], tmp_path: Path, tls_files: TlsFiles
) -> None:
    """serve refuses a bad web config at once: non-zero exit, one line naming
    the file and the problem, no traceback. (A basic variant is in test_serve.)"""
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    cert, key = str(tls_files.cert), str(tls_files.key)
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)).decode()
    tls = {"cert_file": cert, "key_file": key}
    configs: dict[str, dict[str, Any]] = {
        "unknown_top_key": {"tls_server_config": tls, "basic_auth_user": {USER: hashed}},
        "unknown_tls_key": {"tls_server_config": {"cert_files": cert, "key_file": key}},
        "missing_key_file": {"tls_server_config": {"cert_file": cert}},
        "not_bcrypt": {"basic_auth_users": {USER: PASSWORD}},
        "md5_crypt": {"basic_auth_users": {USER: "$1$saltsalt$2vnaRpHa6Jxjz5n83ok8Z0"}},
        "cert_missing": {"tls_server_config": {**tls, "cert_file": str(tmp_path / "missing.pem")}},
        "cert_is_a_directory": {"tls_server_config": {**tls, "cert_file": str(tmp_path)}},
        "cert_not_pem": {"tls_server_config": {**tls, "cert_file": str(tmp_path / "garbage.pem")}},
        "key_not_of_cert": {"tls_server_config": {**tls, "key_file": str(tls_files.other_key)}},
    }
    config = tmp_path / f"{variant}.yml"
    config.write_text(yaml.safe_dump(configs[variant]))
    result = subprocess.run(
        cli_argv(
            "serve", "--web.listen-address", f"127.0.0.1:{free_port()}",
            "--api.socket", str(tmp_path / "api.sock"), "--web.config.file", str(config),
        ),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert str(config) in line
    for needle in needles:
        expected = needle.format(tmp=tmp_path, cert=cert, other_key=tls_files.other_key)
        assert expected in line, (expected, line)
    assert "tracing started" not in result.stderr
