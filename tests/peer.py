"""A TCP peer driven line by line over stdin, run as its own process by the tests.

Each command gets one reply line: ``ok [value]`` or ``err <reason>``. A peer
holds at most one listener and one connection, which is all a scenario
needs, and gives the test a real process (pid, comm) owning its sockets.

Commands:
  pid                           -> ok <pid>
  listen <host> <port>          -> ok <port>      (IPv6 if host contains ':')
  defer_accept <seconds>        -> ok             (TCP_DEFER_ACCEPT on the listener)
  accept                        -> ok <remote port>
  connect <host> <port> [bind]  -> ok <local port> | err <errno name>
  send <n> / recv               -> ok <bytes>
  linger0                       -> ok             (next close sends RST)
  shutdown                      -> ok             (SHUT_WR: FIN, keep reading)
  close_on_eof                  -> ok <bytes>     (read to EOF, then close at once)
  close / close_listener        -> ok
  exit
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys

TIMEOUT_S = 30.0


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def main() -> None:
    listener: socket.socket | None = None
    conn: socket.socket | None = None

    def reply(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        command, args = words[0], words[1:]
        try:
            if command == "pid":
                reply(f"ok {os.getpid()}")
            elif command == "listen":
                host, port = args[0], int(args[1])
                listener = socket.socket(_family(host), socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((host, port))
                listener.listen(16)
                reply(f"ok {listener.getsockname()[1]}")
            elif command == "defer_accept":
                assert listener is not None
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, int(args[0]))
                reply("ok")
            elif command == "accept":
                assert listener is not None
                listener.settimeout(TIMEOUT_S)
                conn, remote = listener.accept()
                conn.settimeout(TIMEOUT_S)
                reply(f"ok {remote[1]}")
            elif command == "connect":
                host, port = args[0], int(args[1])
                conn = socket.socket(_family(host), socket.SOCK_STREAM)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if len(args) > 2:
                    conn.bind(("::" if ":" in host else "0.0.0.0", int(args[2])))
                conn.settimeout(TIMEOUT_S)
                try:
                    conn.connect((host, port))
                except OSError as err:
                    name = errno.errorcode.get(err.errno or 0, "TIMEOUT")
                    conn.close()
                    conn = None
                    reply(f"err {name}")
                    continue
                reply(f"ok {conn.getsockname()[1]}")
            elif command == "send":
                assert conn is not None
                conn.sendall(b"x" * int(args[0]))
                reply(f"ok {args[0]}")
            elif command == "recv":
                assert conn is not None
                data = conn.recv(65536)
                reply(f"ok {len(data)}")
            elif command == "close_on_eof":
                assert conn is not None
                total = 0
                while chunk := conn.recv(65536):
                    total += len(chunk)
                conn.close()
                conn = None
                reply(f"ok {total}")
            elif command == "linger0":
                assert conn is not None
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                reply("ok")
            elif command == "shutdown":
                assert conn is not None
                conn.shutdown(socket.SHUT_WR)
                reply("ok")
            elif command == "close":
                if conn is not None:
                    conn.close()
                    conn = None
                reply("ok")
            elif command == "close_listener":
                if listener is not None:
                    listener.close()
                    listener = None
                reply("ok")
            elif command == "exit":
                reply("ok")
                return
            else:
                reply(f"err unknown command {command}")
        except Exception as err:  # report, keep serving: the test decides
            reply(f"err {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
