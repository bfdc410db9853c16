"""Hold many loopback TCP connections open: the scrape test's 100,000 sockets.

Run by tcpbench.py as a separate process (so that killing it frees every
socket at once):

    python holdsockets.py --connections 50000 [--per-port 10000] [--host 127.0.0.1]

It listens on ceil(connections / per-port) ports of its own (port 0: the
kernel picks free ones), connects `per-port` clients to each and accepts
them, so each connection is two sockets and no listening port needs more
local ports than the ephemeral range has. It raises its own RLIMIT_NOFILE
(above the hard limit only with CAP_SYS_RESOURCE, up to fs.nr_open: the
caller checks both and starts several helpers when one may not hold them all).
When every connection is established it prints one line

    ready <sockets> ports=<p1>,<p2>,...

on stdout and holds them until stdin reaches end of file or SIGTERM/SIGINT.
It then closes everything with SO_LINGER 0 (an RST, so no TIME_WAIT is left
behind) and exits 0. On error it prints `error: ...` on stdout and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import signal
import socket
import struct
import sys
import time
from types import FrameType

BATCH = 1000  # connections made before draining the accept queue (backlog is 4096)
ACCEPT_TIMEOUT_S = 30.0


class Stop(Exception):
    pass


def _on_signal(_signum: int, _frame: FrameType | None) -> None:
    raise Stop


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= needed else needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, new_hard))


def accept_exactly(listener: socket.socket, count: int, held: list[socket.socket]) -> None:
    deadline = time.monotonic() + ACCEPT_TIMEOUT_S
    accepted = 0
    while accepted < count:
        try:
            conn, _peer = listener.accept()
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"accepted {accepted} of {count} connections") from None
            time.sleep(0.001)
            continue
        held.append(conn)
        accepted += 1


def open_connections(
    host: str, connections: int, per_port: int, held: list[socket.socket]
) -> list[int]:
    ports: list[int] = []
    left = connections
    while left > 0:
        on_this_port = min(per_port, left)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        held.append(listener)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(4096)
        listener.setblocking(False)
        port = int(listener.getsockname()[1])
        ports.append(port)
        made = 0
        while made < on_this_port:
            batch = min(BATCH, on_this_port - made)
            for _ in range(batch):
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(client)
                client.settimeout(10.0)
                client.connect((host, port))  # on loopback the handshake completes here
            accept_exactly(listener, batch, held)
            made += batch
        left -= on_this_port
    return ports


def close_all(held: list[socket.socket]) -> None:
    linger0 = struct.pack("ii", 1, 0)
    for sock in held:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        sock.close()
    held.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--per-port", type=int, default=10_000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    if args.connections < 1 or args.per_port < 1:
        parser.error("--connections and --per-port must be positive")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    held: list[socket.socket] = []
    try:
        ports_needed = -(-args.connections // args.per_port)
        raise_nofile(2 * args.connections + ports_needed + 256)
        ports = open_connections(args.host, args.connections, args.per_port, held)
        sockets = len(held) - len(ports)
        print(f"ready {sockets} ports={','.join(map(str, ports))}", flush=True)
        sys.stdin.read()  # hold until the caller closes our stdin (or signals us)
    except Stop:
        pass
    except (OSError, ValueError, TimeoutError) as err:
        print(f"error: {err} (after {len(held)} sockets)", flush=True)
        close_all(held)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        close_all(held)
    return 0


if __name__ == "__main__":
    sys.exit(main())
