"""Every network namespace on the host, and running a function inside one.

sock_diag answers for the caller's network namespace only; pods have their
own. The namespaces are found through /proc/PID/ns/net (one process per
namespace is enough; they are told apart by the inode number, as the BPF
program's tuples are), and a function runs inside one in a thread of its own
that joins it with setns(2): only that thread moves, the process stays where
it is. Namespaces that no process holds (kept alive by a bind mount only,
as `ip netns add` makes them) are found under /run/netns.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import UserError

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def namespaces(proc: str = "/proc", mounted: str = "/run/netns") -> dict[int, str]:
    """inode number -> a path that opens it, one per network namespace."""
    found: dict[int, str] = {}
    candidates = [f"{proc}/self/ns/net"]
    with contextlib.suppress(OSError):
        candidates += [f"{proc}/{name}/ns/net" for name in os.listdir(proc) if name.isdigit()]
    with contextlib.suppress(OSError):
        candidates += [os.path.join(mounted, name) for name in sorted(os.listdir(mounted))]
    for path in candidates:
        try:
            inode = os.stat(path).st_ino
        except OSError:  # the process exited, or we may not look
            continue
        found.setdefault(inode, path)
    return found


def established(path: str) -> int | None:
    """CurrEstab of the namespace /proc/PID/ns/net opens (ESTABLISHED and
    CLOSE_WAIT sockets, from that process's /proc/PID/net/snmp): a cheap test
    of whether it can hold a CLOSE_WAIT socket at all. None if unknown."""
    if not path.endswith("/ns/net") or "/run/" in path:
        return None
    try:
        text = Path(path[: -len("ns/net")] + "net/snmp").read_text()
        lines = [line.split() for line in text.splitlines()]
    except OSError:
        return None
    tcp = [fields for fields in lines if fields and fields[0] == "Tcp:"]
    if len(tcp) != 2 or "CurrEstab" not in tcp[0]:
        return None
    return int(tcp[1][tcp[0].index("CurrEstab")])


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def run_in(path: str, function: Callable[[], T]) -> T:
    """`function()` run in the network namespace `path` opens (in a thread of its own)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result.append(function())
        except BaseException as err:  # handed to the caller's thread
            errors.append(err)

    thread = threading.Thread(target=body, name="netns", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def in_each_netns(
    own: int,
    function: Callable[[int], T],
    every_netns: bool = True,
    worth_entering: Callable[[str], bool] | None = None,
) -> list[tuple[int, T]]:
    """`function(inode)` here (network namespace `own`, its inode) and, with
    `every_netns`, in every other network namespace (pods have their own),
    each result with its namespace's inode. Here, an error is raised; a
    namespace gone meanwhile, or not ours to enter, is passed over, as is
    one `worth_entering(path)` says is not (entering one costs a thread)."""
    results = [(own, function(own))]
    if every_netns:
        for inode, path in namespaces().items():
            if inode == own or (worth_entering is not None and not worth_entering(path)):
                continue
            try:
                results.append((inode, run_in(path, functools.partial(function, inode))))
            except (UserError, OSError):
                continue
    return results
