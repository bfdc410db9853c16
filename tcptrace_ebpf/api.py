"""A root-only local endpoint of the daemon, for one-shot commands.

`serve` keeps what only a running tracer can know (when each socket entered
CLOSE_WAIT); `tcptrace-ebpf closewait` asks it over a unix socket in a
directory only root can enter. One request per connection: the client
sends a command name and a newline, the daemon answers with one JSON
document and closes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/run/tcptrace-ebpf/api.sock")
MAX_REQUEST = 256


class ApiUnavailable(Exception):
    """No daemon answers at the path (not running, or not as this user)."""


class ApiServer:
    def __init__(self, path: Path, handlers: dict[str, Callable[[], Any]]) -> None:
        self.path = path
        self.handlers = handlers
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> bool:
        """Listen at the path; False (with a warning) if another daemon owns it."""
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        if self.path.exists():
            try:
                query(self.path, "ping", timeout=1.0)
            except ApiUnavailable:
                self.path.unlink()  # left over from a daemon that died
            else:
                log.warning("another tcptrace-ebpf daemon answers at %s: not serving it", self.path)
                return False
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            server.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)
        server.listen(16)
        server.settimeout(0.5)
        self._sock = server
        self._thread = threading.Thread(target=self._serve, name="tcptrace-api", daemon=True)
        self._thread.start()
        return True

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                try:
                    self._answer(conn)
                except OSError as err:
                    log.debug("api client went away: %s", err)

    def _answer(self, conn: socket.socket) -> None:
        request = b""
        while b"\n" not in request and len(request) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            request += chunk
        command = request.split(b"\n", 1)[0].decode(errors="replace").strip()
        if command == "ping":
            reply: Any = {"ok": True}
        elif command in self.handlers:
            try:
                reply = {"ok": True, "data": self.handlers[command]()}
            except Exception as err:
                log.exception("api command %s failed", command)
                reply = {"ok": False, "error": str(err)}
        else:
            reply = {"ok": False, "error": f"unknown command {command!r}"}
        conn.sendall(json.dumps(reply, separators=(",", ":")).encode())

    def close(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._thread is not None:
            self._thread.join(timeout=2)


def query(path: Path, command: str, timeout: float = 5.0) -> Any:
    """Ask the daemon; its answer's data. Raises ApiUnavailable if none answers."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect(str(path))
        client.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := client.recv(1 << 16):
            chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError, PermissionError, TimeoutError) as err:
        raise ApiUnavailable(f"no daemon at {path} ({err.strerror or err})") from None
    except OSError as err:
        raise ApiUnavailable(f"no daemon at {path} ({err})") from None
    finally:
        client.close()
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise ApiUnavailable(f"the daemon at {path} sent an unreadable answer") from None
    if not reply.get("ok"):
        raise ApiUnavailable(f"the daemon at {path} refused: {reply.get('error')}")
    return reply.get("data")
