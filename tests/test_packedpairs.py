"""Address pairs packed and sorted in one buffer (pure logic, no root)."""

from __future__ import annotations

import socket

import pytest

from tcptrace_ebpf.host.packedpairs import PackedPairs, pack, unpack
from tcptrace_ebpf.model.addresses import AddressPair

NETNS = 4026531840


def test_a_pair_packs_and_unpacks_as_itself() -> None:
    v4 = AddressPair(NETNS, socket.AF_INET, "10.1.2.3", 443, "192.168.0.9", 51000)
    v6 = AddressPair(NETNS, socket.AF_INET6, "2001:db8::1", 443, "::ffff:10.0.0.1", 51000)
    assert len(pack(v4)) == 16
    assert len(pack(v6)) == 40
    assert unpack(socket.AF_INET, pack(v4)) == v4
    assert unpack(socket.AF_INET6, pack(v6)) == v6


def test_packed_pairs_sort_as_their_numbers() -> None:
    """Big-endian: a port of 256 sorts after one of 255 (not so in
    little-endian bytes), and the namespace comes first."""
    low = AddressPair(1, socket.AF_INET, "10.0.0.1", 255, "10.0.0.2", 80)
    high = low._replace(lport=256)
    other_netns = low._replace(netns=2, lport=1)
    assert pack(low) < pack(high) < pack(other_netns)


def test_positions_in_the_buffer() -> None:
    pairs = [
        AddressPair(NETNS, socket.AF_INET, "127.0.0.1", port, "127.0.0.1", 80)
        for port in range(1000, 3000, 2)
    ]
    packed = PackedPairs(socket.AF_INET, sorted(pack(pair) for pair in pairs))
    assert len(packed) == len(pairs)
    for index, pair in enumerate(pairs):
        assert packed.position(pack(pair)) == index
        assert packed[index] == pack(pair)
    assert list(packed) == [pack(pair) for pair in pairs]
    assert packed.position(pack(pairs[0]._replace(lport=1001))) == -1  # between two
    assert packed.position(pack(pairs[0]._replace(lport=999))) == -1  # before all
    assert packed.position(pack(pairs[0]._replace(lport=5000))) == -1  # after all
    assert PackedPairs(socket.AF_INET, []).position(pack(pairs[0])) == -1
    with pytest.raises(IndexError):
        packed[len(pairs)]


def test_pairs_of_another_width_are_refused() -> None:
    v6 = pack(AddressPair(NETNS, socket.AF_INET6, "::1", 1, "::1", 2))
    with pytest.raises(ValueError, match="16 bytes each"):
        PackedPairs(socket.AF_INET, [v6])


def test_bytes_spanning_two_pairs_are_not_a_pair() -> None:
    """A stretch of the buffer is searched as bytes: a match that starts
    inside one pair and ends in the next is not one."""
    first, second, third = bytes(16), b"\x01" * 8 + b"\x02" * 8, b"\x02" * 8 + b"\x03" * 8
    packed = PackedPairs(socket.AF_INET, [first, second, third])
    spanning = b"\x02" * 16  # the end of the second and the start of the third
    assert spanning in b"".join([first, second, third])
    assert packed.position(spanning) == -1
    assert packed.position(third) == 2
    assert packed.position(b"\x02" * 8) == -1  # not a whole pair
