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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/run/tcptrace-ebpf/api.sock")
MAX_REQUEST = 256


class ApiUnavailable(Exception):
    """No usable answer at the path; ``no_daemon`` when nothing listens there."""

    def __init__(self, message: str, *, no_daemon: bool = False) -> None:
        super().__init__(message)
        self.no_daemon = no_daemon


def check_path(path: Path) -> None:
    """Refuse, in one line, an API socket path we would have to harm the host to use.

    We create (and later remove) only what is ours: the socket, and its
    directory when it does not exist yet. An existing directory is used as
    it is (never chmod-ed: it may be a shared one such as /tmp), and an
    existing file at the path is replaced only if it is a socket.
    """
    option = "--api.socket"
    if path.name in ("", ".", ".."):
        raise UserError(f"invalid {option} {str(path)!r}: give the path of a socket file")
    try:
        directory = path.parent.lstat()
    except FileNotFoundError:
        if not path.parent.parent.is_dir():
            raise UserError(
                f"invalid {option} {str(path)!r}: {path.parent.parent} does not exist; create"
                " it, or pick a path in an existing directory"
            ) from None
        return  # start() creates the directory, 0700
    except OSError as err:
        raise UserError(f"invalid {option} {str(path)!r}: {path.parent}: {err.strerror}") from None
    if not stat.S_ISDIR(directory.st_mode):
        raise UserError(f"invalid {option} {str(path)!r}: {path.parent} is not a directory")
    try:
        existing = path.lstat()
    except FileNotFoundError:
        return
    except OSError as err:
        raise UserError(f"invalid {option} {str(path)!r}: {err.strerror}") from None
    if not stat.S_ISSOCK(existing.st_mode):
        raise UserError(
            f"invalid {option} {str(path)!r}: a file that is not a socket is there; it is"
            " not ours to replace: pick another path"
        )


class ApiServer:
    def __init__(self, path: Path, handlers: dict[str, Callable[[], Any]]) -> None:
        self.path = path
        self.handlers = handlers
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # What start() made, so that close() removes that and nothing else.
        self._made_directory = False
        self._socket_inode: tuple[int, int] | None = None

    def start(self) -> bool:
        """Listen at the path; False (with a warning) if another daemon owns it.

        A path we must not touch (see check_path) raises UserError.
        """
        check_path(self.path)
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            self._made_directory = True
        if self.path.exists() or self.path.is_symlink():
            check_path(self.path)  # still a socket, not swapped since
            try:
                query(self.path, "ping", timeout=1.0)
            except ApiUnavailable as err:
                if not err.no_daemon:  # busy, or someone else's: not ours to replace
                    log.warning("not serving the local API at %s: %s", self.path, err)
                    self._remove_directory()
                    return False
                self.path.unlink()  # left over from a daemon that died
            else:
                log.warning("another tcptrace-ebpf daemon answers at %s: not serving it", self.path)
                self._remove_directory()
                return False
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            server.bind(str(self.path))
        except OSError:
            server.close()
            self._remove_directory()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)
        made = self.path.lstat()
        self._socket_inode = (made.st_dev, made.st_ino)
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
            # Only the socket we bound: another daemon may have taken the path since.
            with contextlib.suppress(OSError):
                now = self.path.lstat()
                if (now.st_dev, now.st_ino) == self._socket_inode:
                    self.path.unlink()
            self._remove_directory()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _remove_directory(self) -> None:
        if self._made_directory:
            self._made_directory = False
            with contextlib.suppress(OSError):  # not empty: something else is there now
                self.path.parent.rmdir()


# A reply larger than this is not from our daemon (its lists are bounded by
# the kernel maps, a few tens of MB at most): stop reading rather than eat
# memory.
MAX_REPLY = 256 << 20


def query(path: Path, command: str, timeout: float = 5.0) -> Any:
    """Ask the daemon; its answer's data.

    Raises ApiUnavailable saying why: no daemon (``no_daemon`` set), no
    permission, no answer in time, or an answer that is not ours.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    received = 0
    try:
        client.settimeout(timeout)
        client.connect(str(path))
        client.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            # One deadline for the whole answer, not one per recv: a daemon
            # trickling bytes cannot hold the command forever.
            client.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = client.recv(1 << 16)
            if not chunk:
                break
            received += len(chunk)
            if received > MAX_REPLY:
                raise ApiUnavailable(
                    f"the daemon at {path} sent more than {MAX_REPLY >> 20} MiB: not a"
                    " tcptrace-ebpf daemon"
                )
            chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError) as err:
        raise ApiUnavailable(f"no daemon at {path} ({err.strerror})", no_daemon=True) from None
    except PermissionError as err:
        raise ApiUnavailable(
            f"cannot connect to {path}: {err.strerror} (run as root, as the daemon does)"
        ) from None
    except TimeoutError:
        raise ApiUnavailable(
            f"the daemon at {path} did not answer within {timeout:g}s (busy?)"
        ) from None
    except OSError as err:
        raise ApiUnavailable(
            f"cannot talk to the daemon at {path} ({err.strerror or err})"
        ) from None
    finally:
        client.close()
    try:
        reply = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise ApiUnavailable(f"the daemon at {path} sent an unreadable answer") from None
    if not isinstance(reply, dict):
        raise ApiUnavailable(f"the daemon at {path} sent an unreadable answer")
    if reply.get("ok") is not True:
        error = str(reply.get("error"))[:200]
        raise ApiUnavailable(f"the daemon at {path} refused: {' '.join(error.split())}")
    return reply.get("data")
