"""A TCP socket's address pair: the one way every part of the tool names a socket.

The kernel program, sock_diag, /proc and the local API each describe a socket
by its address pair; they are all turned into an `AddressPair` where they
enter (the packed `struct tt_tuple` only at the kernel boundary, see
`kernel.interface`), so sockets from different sources match by equality.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol


class HasEndpoints(Protocol):
    """Anything that carries a socket's two endpoints (a sock_diag listing's row)."""

    @property
    def family(self) -> int: ...
    @property
    def laddr(self) -> str: ...
    @property
    def lport(self) -> int: ...
    @property
    def raddr(self) -> str: ...
    @property
    def rport(self) -> int: ...


class AddressPair(NamedTuple):
    """Local and remote address and port of a socket in one network namespace.

    Addresses are text (`inet_ntop`), as `ss` shows them. `netns` is the
    network namespace's inode number: pods reuse addresses, so two sockets
    with the same endpoints in different namespaces are different sockets.
    A named tuple: hashable, cheap to build by the hundred thousand (a
    start-up snapshot) and to send from a child process.
    """

    netns: int
    family: int  # socket.AF_INET or AF_INET6
    laddr: str
    lport: int
    raddr: str
    rport: int

    @classmethod
    def of(cls, sock: HasEndpoints, netns: int) -> AddressPair:
        return cls(netns, sock.family, sock.laddr, sock.lport, sock.raddr, sock.rport)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], netns: int = 0) -> AddressPair:
        """The pair of a JSON object with the flat keys every output uses
        (`endpoints_json`, and "family" by name; without it the family is
        read from the address). Raises KeyError, TypeError or ValueError
        for an object that is not one."""
        laddr = str(obj["laddr"])
        family = family_from_name(obj["family"]) if "family" in obj else family_of(laddr)
        return cls(netns, family, laddr, int(obj["lport"]), str(obj["raddr"]), int(obj["rport"]))

    def endpoints_json(self) -> dict[str, Any]:
        """The four keys every JSON output and API payload names a pair's
        endpoints with (flat: users and tests parse them)."""
        return {"laddr": self.laddr, "lport": self.lport, "raddr": self.raddr, "rport": self.rport}

    @property
    def destination(self) -> Destination:
        return Destination(self.netns, self.family, self.raddr, self.rport)

    @property
    def family_name(self) -> str:
        return "ipv6" if self.family == socket.AF_INET6 else "ipv4"

    def in_netns(self, netns: int) -> AddressPair:
        return self._replace(netns=netns)


class Destination(NamedTuple):
    """A remote address and port, in one network namespace (where local ports
    run out: each connection to it needs one of its own)."""

    netns: int
    family: int
    raddr: str
    rport: int


def family_of(address: str) -> int:
    """The family of an address in text form (inet_ntop never writes ':' in IPv4)."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def family_from_name(name: str) -> int:
    """`ipv4`/`ipv6`, as the JSON outputs name a family."""
    return socket.AF_INET6 if name == "ipv6" else socket.AF_INET
