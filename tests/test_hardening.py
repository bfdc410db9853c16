"""Issue 14: hostile input, dead or stalled readers, a host that must not be harmed.

Each test here failed before the fix: a traceback, a file or directory of
the host changed, or a command that kept running after its reader left.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import stat
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import cli_argv, close_pipes, deadline, free_port, requires_root, wait_for

from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.serve.api import ApiServer, ApiUnavailable, check_path, query

# As nobody, but able to read the checkout and its virtual environment, which
# may sit under a directory only root can enter (as in test_cli.test_not_root).
AS_NOBODY = (
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=+dac_read_search",
    "--ambient-caps=+dac_read_search",
    "--",
)


def run(
    *args: str, prefix: tuple[str, ...] = (), timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *cli_argv(*args)], check=False, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tcptrace-ebpf: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------
# One line, never a traceback
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "NaN"])
@pytest.mark.parametrize("command", ["trace", "lifecycles"])
def test_duration_must_be_finite(command: str, value: str) -> None:
    result = run(command, "--duration", value)
    assert_one_line_error(result, "--duration", value)
    assert result.returncode == 2


def test_more_ports_than_the_kernel_filter_holds() -> None:
    ports = [arg for port in range(1, 1026) for arg in ("--port", str(port))]
    result = run("trace", *ports)
    assert_one_line_error(result, "--port", "1024 at most")


@pytest.mark.parametrize("path", ["/-/healthy", "/-/ready", "/"])
def test_telemetry_path_cannot_hide_a_probe(path: str) -> None:
    result = run("serve", "--web.listen-address", "127.0.0.1:0", "--web.telemetry-path", path)
    assert_one_line_error(result, "--web.telemetry-path", path)


@requires_root
def test_doctor_as_non_root_reports_instead_of_crashing() -> None:
    result = run("doctor", prefix=AS_NOBODY)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 1
    assert "not root" in result.stdout
    assert "need root" in result.stdout
    assert result.stderr.strip() == "tcptrace-ebpf: error: some checks failed (see above)"


@requires_root
def test_serve_as_non_root_fails_before_serving() -> None:
    port = free_port()
    result = run("serve", "--web.listen-address", f"127.0.0.1:{port}", prefix=AS_NOBODY)
    assert_one_line_error(result, "root")
    assert "serving" not in result.stderr


# ---------------------------------------------------------------------------
# --api.socket: create only what is ours
# ---------------------------------------------------------------------------


def test_api_socket_in_a_shared_directory_leaves_it_as_it_was(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    server = ApiServer(shared / "api.sock", {})
    assert server.start()
    try:
        assert query(shared / "api.sock", "ping") is None
    finally:
        server.close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert shared.is_dir()
    assert not (shared / "api.sock").exists()


def test_api_socket_directory_made_for_it_is_private_and_removed(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "tcptrace-ebpf"
    directory.parent.mkdir()
    server = ApiServer(directory / "api.sock", {})
    assert server.start()
    try:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_ISSOCK((directory / "api.sock").lstat().st_mode)
    finally:
        server.close()
    assert not directory.exists()
    assert directory.parent.is_dir()


@pytest.mark.parametrize("kind", ["file", "symlink", "directory", "fifo"])
def test_api_socket_never_replaces_what_is_not_a_socket(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0:root:/root:/bin/bash\n")
    path = tmp_path / "api.sock"
    if kind == "file":
        path.write_text("precious\n")
    elif kind == "symlink":
        path.symlink_to(target)
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    before = path.lstat()
    with pytest.raises(UserError, match="not a socket"):
        check_path(path)
    with pytest.raises(UserError, match="not a socket"):
        ApiServer(path, {}).start()
    after = path.lstat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert target.read_text() == "root:x:0:0:root:/root:/bin/bash\n"


def test_api_socket_left_by_a_dead_daemon_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: connect() is refused
    server = ApiServer(path, {"x": lambda: 7})
    assert server.start()
    try:
        assert query(path, "x") == 7
    finally:
        server.close()
    assert not path.exists()


@requires_root
def test_serve_refuses_an_api_socket_path_that_is_a_file(tmp_path: Path) -> None:
    precious = tmp_path / "passwd"
    precious.write_text("precious\n")
    os.chmod(tmp_path, 0o1777)
    result = run(
        "serve",
        "--web.listen-address",
        f"127.0.0.1:{free_port()}",
        "--api.socket",
        str(precious),
    )
    assert_one_line_error(result, "--api.socket", "not a socket")
    assert "serving" not in result.stderr
    assert precious.read_text() == "precious\n"
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o1777


# ---------------------------------------------------------------------------
# The local API's client: the real cause, and hostile replies
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def fake_daemon(path: Path, reply: bytes | None, *, accept: bool = True) -> Iterator[None]:
    """A unix socket at `path` answering every connection with `reply`
    (None: accept and never answer; accept=False: never accept)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    stopping = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.1)
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if reply is None:
                held.append(conn)
                continue
            with conn:
                with contextlib.suppress(OSError):
                    conn.recv(256)
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    if accept:
        thread.start()
    try:
        yield
    finally:
        stopping.set()
        listener.close()
        if accept:
            thread.join(timeout=5)
        for conn in held:
            conn.close()


HOSTILE_REPLIES = [
    b"",
    b"not json",
    b"[1, 2, 3]",
    b'"ok"',
    b'{"ok": true, "data": "a string"}',
    b'{"ok": true, "data": [1, 2]}',
    b'{"ok": true, "data": [{"netns": 0}]}',
    b'{"ok": true, "data": [{"netns": 0, "family": "ipv4", "laddr": "x", "lport": "y",'
    b' "raddr": 3, "rport": null, "since": "z", "lower_bound": 1, "comm": []}]}',
    b'{"ok": true, "data": {"netns": 0}}',
    b'{"ok": false, "error": {"nested": "\\u001b[2J"}}',
    b"[" * 100_000 + b"]" * 100_000,
]


@requires_root
@pytest.mark.parametrize("reply", HOSTILE_REPLIES, ids=range(len(HOSTILE_REPLIES)))
@pytest.mark.parametrize("command", ["closewait", "timewait"])
def test_hostile_api_reply_is_one_line(tmp_path: Path, command: str, reply: bytes) -> None:
    path = tmp_path / "api.sock"
    with fake_daemon(path, reply):
        result = run(command, "--api.socket", str(path), timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    problems = [line for line in result.stderr.splitlines() if "unknown" in line]
    assert len(problems) == 1, result.stderr
    assert "no daemon" not in problems[0]
    assert "\x1b" not in result.stderr


@requires_root
def test_busy_api_is_not_reported_as_no_daemon(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with fake_daemon(path, None, accept=False):
        started = time.monotonic()
        result = run("closewait", "--api.socket", str(path))
    assert result.returncode == 0, result.stderr
    assert "did not answer within 2s" in result.stderr
    assert "no daemon" not in result.stderr
    assert "start 'tcptrace-ebpf serve'" not in result.stderr
    assert time.monotonic() - started < 60


@requires_root
def test_permission_error_is_not_reported_as_no_daemon(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "api.sock"
    with fake_daemon(path, b'{"ok": true, "data": []}'):
        os.chmod(path, 0o600)
        result = run("timewait", "--api.socket", str(path), prefix=AS_NOBODY)
    assert "Traceback" not in result.stderr
    assert "permission denied" in result.stderr.lower(), result.stderr
    assert "no daemon" not in result.stderr


def test_trickling_api_reply_has_one_deadline(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    stopping = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            while not stopping.is_set():
                with contextlib.suppress(OSError):
                    conn.sendall(b" ")
                time.sleep(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(ApiUnavailable, match="did not answer within 1s"):
            query(path, "close_wait", timeout=1.0)
        assert time.monotonic() - started < 5
    finally:
        stopping.set()
        listener.close()
        thread.join(timeout=5)


def test_no_daemon_is_said_so(tmp_path: Path) -> None:
    with pytest.raises(ApiUnavailable, match="no daemon") as caught:
        query(tmp_path / "none.sock", "ping")
    assert caught.value.no_daemon


# ---------------------------------------------------------------------------
# The CLI as a Unix filter
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def refused_connects(port: int) -> Iterator[None]:
    """Connect to 127.0.0.1:port (nothing listens) in a loop: two events each."""
    stopping = threading.Event()

    def loop() -> None:
        while not stopping.is_set():
            with socket.socket() as client, contextlib.suppress(OSError):
                client.connect(("127.0.0.1", port))
            time.sleep(0.002)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        thread.join(timeout=5)


def start_cli(*args: str, stdout: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cli_argv(*args), stdout=stdout, stderr=subprocess.PIPE)


def wait_started(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stderr is not None
    until = time.monotonic() + deadline(120)
    while time.monotonic() < until:
        line = proc.stderr.readline()
        if not line:
            break
        if b"tracing started" in line:
            return
    raise AssertionError(f"no 'tracing started' (exit {proc.poll()})")


def end(proc: subprocess.Popen[bytes]) -> str:
    """Make sure the command ended; what it wrote on stderr."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    assert proc.stderr is not None
    errors = proc.stderr.read().decode()
    close_pipes(proc)
    return errors


@requires_root
@pytest.mark.parametrize(
    "args",
    [
        ("trace", "--json"),
        ("trace",),
        ("lifecycles", "--json"),
        ("closewait", "--watch", "--interval", "0.2"),
        ("closewait", "--watch", "--json", "--interval", "0.2"),
    ],
    ids=["trace-json", "trace", "lifecycles", "closewait-watch", "closewait-watch-json"],
)
def test_reader_gone_ends_the_command_quietly(tmp_path: Path, args: tuple[str, ...]) -> None:
    port = free_port()
    if args[0] == "closewait":
        # No daemon at this path: --watch traces by itself.
        args = (*args, "--api.socket", str(tmp_path / "none.sock"))
    else:
        args = (*args, "--port", str(port))
    read_end, write_end = os.pipe()
    proc = start_cli(*args, stdout=write_end)
    os.close(write_end)
    try:
        with refused_connects(port):
            if args[0] != "closewait":
                wait_started(proc)
                # Like `head -1`: take one line, then go away.
                with os.fdopen(read_end, "rb", buffering=0) as reader:
                    wait_for(lambda: reader.read(1), timeout=60, what="a first line")
            else:
                time.sleep(0.5)
                os.close(read_end)
            # From here on every write would fail: the command must end by
            # itself, within a few of its one-second ticks.
            gone = time.monotonic()
            proc.wait(timeout=deadline(120))
            took = time.monotonic() - gone
    finally:
        errors = end(proc)
    assert proc.returncode == 141, errors
    assert "Traceback" not in errors, errors
    assert "Broken pipe" not in errors, errors
    # At the next write, or the next one-second tick; closewait --watch
    # compiles its own tracer after the reader left.
    assert took < deadline(5 if args[0] != "closewait" else 60), took


@requires_root
def test_write_error_is_one_line_and_a_failure() -> None:
    port = free_port()
    with open("/dev/full", "wb") as full:
        proc = start_cli("trace", "--port", str(port), stdout=full.fileno())
    try:
        wait_started(proc)
        with refused_connects(port):
            proc.wait(timeout=deadline(60))
    finally:
        errors = end(proc)
    assert proc.returncode == 1
    assert errors.strip().splitlines() == [
        "tcptrace-ebpf: error: cannot write the output: No space left on device"
    ]


def wait_for_a_full_pipe(read_end: int) -> None:
    """Until the writer of a pipe is blocked: what waits in it has stopped
    growing near a pipe's 64 KiB (how near depends on the size of the writes)."""
    last = [-1]

    def pipe_full() -> bool:
        queued = bytearray(4)
        fcntl.ioctl(read_end, termios.FIONREAD, queued)
        now = int.from_bytes(queued, "little")
        full = now >= 32_768 and now == last[0]
        last[0] = now
        return full

    wait_for(pipe_full, timeout=120, interval=0.5, what="the pipe to fill")
    time.sleep(0.5)  # and the command to be blocked writing


@requires_root
@pytest.mark.parametrize("command", ["trace", "lifecycles"])
def test_sigterm_works_with_a_stalled_reader(command: str) -> None:
    port = free_port()
    read_end, write_end = os.pipe()
    proc = start_cli(command, "--json", "--port", str(port), stdout=write_end)
    os.close(write_end)
    try:
        wait_started(proc)
        # lifecycles writes a line per connection once it ends: a refused
        # connect ends at once.
        with refused_connects(port):
            wait_for_a_full_pipe(read_end)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            proc.wait(timeout=deadline(60))
            took = time.monotonic() - sent
    finally:
        errors = end(proc)
        os.close(read_end)
    assert proc.returncode == 0, errors
    assert "stopped:" in errors
    assert "Traceback" not in errors
    # What could not be written is said, not dropped silently.
    assert re.search(r"output given up .*: up to [1-9]\d* lines not written$", errors.strip())
    # Within a second (detaching included) on the development machine.
    print(f"SIGTERM to exit: {took:.2f}s")
    assert took < deadline(1.5), took


@requires_root
def test_sigterm_keeps_writing_while_a_slow_reader_reads() -> None:
    """Stopped while its output waits on a reader that is slow but reading (a
    busy or emulated machine), lifecycles still writes every lifecycle its
    summary counts, the ones still open at the stop included: only a stalled
    reader's output is given up."""
    port = free_port()
    read_end, write_end = os.pipe()
    proc = start_cli("lifecycles", "--json", "--port", str(port), stdout=write_end)
    os.close(write_end)
    received = bytearray()
    try:
        wait_started(proc)
        with refused_connects(port):
            wait_for_a_full_pipe(read_end)
            proc.send_signal(signal.SIGTERM)
        # 4 KiB every 20 ms: a blocked write of the command's waits a few
        # tens of milliseconds at a time, never the half second of a stall.
        with os.fdopen(read_end, "rb", buffering=0) as reader:
            while chunk := reader.read(4096):
                received += chunk
                time.sleep(0.02)
        proc.wait(timeout=deadline(60))
    finally:
        errors = end(proc)
    assert proc.returncode == 0, errors
    summary = errors.strip().splitlines()[-1]
    assert "given up" not in summary, summary
    counted = re.search(r"; (\d+) lifecycles, \d+ still open", summary)
    assert counted, summary
    lines = received.decode().splitlines()
    assert len(lines) == int(counted.group(1)) > 0, summary
    assert all(line.startswith("{") and line.endswith("}") for line in lines)


# ---------------------------------------------------------------------------
# scripts/setup.sh: policy-rc.d
# ---------------------------------------------------------------------------

SETUP = Path(__file__).resolve().parent.parent / "scripts" / "setup.sh"

_FAKE_TOOLS = {
    # Nothing installed, so setup.sh installs; apt-get install does as told.
    "dpkg-query": "exit 1",
    "dpkg": "echo amd64",
    "apt-get": """
case "$1" in update) exit 0 ;; esac
[ -e /usr/sbin/policy-rc.d ] && echo "policy during install: $(tail -1 /usr/sbin/policy-rc.d)" >&2
case "$FAKE_APT" in
  fail) exit 100 ;;
  term) kill -TERM "$PPID"; sleep 1; exit 0 ;;
  *) exit 0 ;;
esac
""",
    "apt-cache": "exit 1",
}


@requires_root
@pytest.mark.parametrize("outcome", ["fail", "term", "ok"])
@pytest.mark.parametrize("host_policy", [False, True], ids=["no-host-policy", "host-policy"])
def test_setup_removes_only_its_own_policy_rc_d_on_every_exit(
    tmp_path: Path, outcome: str, host_policy: bool
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in _FAKE_TOOLS.items():
        (fake / name).write_text("#!/bin/sh\n" + body)
        (fake / name).chmod(0o755)
    # In a private mount namespace, over a tmpfs /usr/sbin: the host's own
    # /usr/sbin is never written.
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "scripts" / "setup.sh").write_text(SETUP.read_text())
    # What runs after apt: a stand-in virtual environment.
    (checkout / ".venv" / "bin").mkdir(parents=True)
    for name in ("python", "pip", "tcptrace-ebpf"):
        (checkout / ".venv" / "bin" / name).write_text("#!/bin/sh\nexit 0\n")
        (checkout / ".venv" / "bin" / name).chmod(0o755)
    prepare = (
        "printf '#!/bin/sh\\nexit 0\\n# host\\n' > /usr/sbin/policy-rc.d; " if host_policy else ""
    )
    script = (
        "mount -t tmpfs none /usr/sbin && "
        f"{prepare}"
        f"PATH={fake}:$PATH FAKE_APT={outcome} sh {checkout}/scripts/setup.sh; "
        "echo rc=$?; ls -A /usr/sbin; cat /usr/sbin/policy-rc.d 2>/dev/null; true"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    during = result.stderr
    if not host_policy:
        assert "policy during install: exit 101" in during, out + during
    rc = int(out.split("rc=")[1].split()[0])
    if outcome == "fail":
        assert rc == 100, out
    elif outcome == "term":
        assert rc == 143, out
    else:
        assert rc == 0, out + during
    if host_policy:
        assert "# host" in out, out  # the host's own policy, untouched
        assert "policy during install: # host" in during, during
    else:
        assert "policy-rc.d" not in out.split(f"rc={rc}")[1], out
