"""Tests for the BTF struct-layout reader.

Most tests run on small BTF blobs built here by ``BtfBuilder``, so every
encoding corner is covered regardless of the kernel. The rest read the running
kernel's /sys/kernel/btf/vmlinux and cross-check against bpftool.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tcptrace_ebpf.kernel.btf import Btf, BtfError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19


class BtfBuilder:
    """Encodes a BTF blob (header, type section, string section) for tests.

    Each ``add``-style method appends one type and returns its type id, which
    starts at 1 as in real BTF (0 is void).
    """

    def __init__(self, byte_order: str = "<") -> None:
        self.byte_order = byte_order
        self._types = bytearray()
        self._type_count = 0
        self._strings = bytearray(b"\0")
        self._string_offsets = {"": 0}

    @property
    def next_id(self) -> int:
        """The type id the next added type will get (to build self-references)."""
        return self._type_count + 1

    def _u32s(self, *values: int) -> bytes:
        return struct.pack(f"{self.byte_order}{len(values)}I", *values)

    def string(self, text: str) -> int:
        if text not in self._string_offsets:
            self._string_offsets[text] = len(self._strings)
            self._strings += text.encode() + b"\0"
        return self._string_offsets[text]

    def add(
        self,
        kind: int,
        name: str = "",
        *,
        vlen: int = 0,
        size_or_type: int = 0,
        kind_flag: bool = False,
        trailer: bytes = b"",
    ) -> int:
        info = (int(kind_flag) << 31) | (kind << 24) | vlen
        self._types += self._u32s(self.string(name), info, size_or_type) + trailer
        self._type_count += 1
        return self._type_count

    def int_(self, name: str, size: int, *, bits: int | None = None, bit_offset: int = 0) -> int:
        encoding = (bit_offset << 16) | (size * 8 if bits is None else bits)
        return self.add(KIND_INT, name, size_or_type=size, trailer=self._u32s(encoding))

    def ptr(self, target: int) -> int:
        return self.add(KIND_PTR, size_or_type=target)

    def array(self, element: int, index: int, count: int) -> int:
        return self.add(KIND_ARRAY, trailer=self._u32s(element, index, count))

    def composite(
        self,
        kind: int,
        name: str,
        size: int,
        members: list[tuple[str, int, int] | tuple[str, int, int, int]],
        *,
        kind_flag: bool = False,
    ) -> int:
        """A struct or union; members are (name, type, bit_offset[, bitfield_size])."""
        trailer = bytearray()
        for member_name, type_id, bit_offset, *bitfield in members:
            offset = bit_offset
            if bitfield:
                assert kind_flag, "bitfield_size needs kind_flag"
                offset |= bitfield[0] << 24
            trailer += self._u32s(self.string(member_name), type_id, offset)
        return self.add(
            kind,
            name,
            vlen=len(members),
            size_or_type=size,
            kind_flag=kind_flag,
            trailer=bytes(trailer),
        )

    def struct(
        self,
        name: str,
        size: int,
        members: list[tuple[str, int, int] | tuple[str, int, int, int]],
        *,
        kind_flag: bool = False,
    ) -> int:
        return self.composite(KIND_STRUCT, name, size, members, kind_flag=kind_flag)

    def union(
        self, name: str, size: int, members: list[tuple[str, int, int] | tuple[str, int, int, int]]
    ) -> int:
        return self.composite(KIND_UNION, name, size, members)

    def enum(self, name: str, values: list[tuple[str, int]]) -> int:
        trailer = b"".join(self._u32s(self.string(n), v & 0xFFFFFFFF) for n, v in values)
        return self.add(KIND_ENUM, name, vlen=len(values), size_or_type=4, trailer=trailer)

    def enum64(self, name: str, values: list[tuple[str, int]]) -> int:
        trailer = b"".join(self._u32s(self.string(n), v & 0xFFFFFFFF, v >> 32) for n, v in values)
        return self.add(KIND_ENUM64, name, vlen=len(values), size_or_type=8, trailer=trailer)

    def fwd(self, name: str, *, union: bool = False) -> int:
        return self.add(KIND_FWD, name, kind_flag=union)

    def typedef(self, name: str, target: int) -> int:
        return self.add(KIND_TYPEDEF, name, size_or_type=target)

    def modifier(self, kind: int, target: int) -> int:
        return self.add(kind, size_or_type=target)

    def func_proto(self, returns: int, params: list[tuple[str, int]]) -> int:
        trailer = b"".join(self._u32s(self.string(n), t) for n, t in params)
        return self.add(KIND_FUNC_PROTO, vlen=len(params), size_or_type=returns, trailer=trailer)

    def func(self, name: str, proto: int) -> int:
        return self.add(KIND_FUNC, name, vlen=1, size_or_type=proto)  # vlen = linkage (global)

    def var(self, name: str, type_id: int) -> int:
        return self.add(KIND_VAR, name, size_or_type=type_id, trailer=self._u32s(1))

    def datasec(self, name: str, size: int, variables: list[tuple[int, int, int]]) -> int:
        trailer = b"".join(self._u32s(*entry) for entry in variables)
        return self.add(KIND_DATASEC, name, vlen=len(variables), size_or_type=size, trailer=trailer)

    def float_(self, name: str, size: int) -> int:
        return self.add(KIND_FLOAT, name, size_or_type=size)

    def decl_tag(self, name: str, target: int, component_index: int) -> int:
        trailer = struct.pack(f"{self.byte_order}i", component_index)
        return self.add(KIND_DECL_TAG, name, size_or_type=target, trailer=trailer)

    def type_tag(self, name: str, target: int) -> int:
        return self.add(KIND_TYPE_TAG, name, size_or_type=target)

    def encode(self, *, magic: int = 0xEB9F, version: int = 1) -> bytes:
        header_len = 24
        header = struct.pack(
            f"{self.byte_order}HBBIIIII",
            magic,
            version,
            0,
            header_len,
            0,
            len(self._types),
            len(self._types),
            len(self._strings),
        )
        return header + bytes(self._types) + bytes(self._strings)


def build_sample(byte_order: str = "<") -> bytes:
    """A blob shaped like the kernel structs the tracer reads.

    Every BTF kind appears before the structs, so a wrong record length for any
    kind would shift the type ids of everything after it.
    """
    b = BtfBuilder(byte_order)
    u8 = b.int_("unsigned char", 1)
    u16 = b.int_("short unsigned int", 2)
    u32 = b.int_("unsigned int", 4)
    ulong = b.int_("long unsigned int", 8)
    u64 = b.int_("long long unsigned int", 8)

    b.enum("sample_state", [("SAMPLE_A", 1), ("SAMPLE_B", 2), ("SAMPLE_NEG", -1)])
    b.enum64("sample_big", [("BIG", 1 << 40), ("SMALL", 3)])
    callback = b.func_proto(u32, [("sk", u32), ("flags", ulong)])
    b.func("sample_func", callback)
    counter = b.var("sample_counter", u32)
    b.datasec(".data", 12, [(counter, 0, 4), (counter, 4, 4), (counter, 8, 4)])
    b.float_("double", 8)
    restricted = b.modifier(KIND_RESTRICT, b.ptr(u8))
    user_ptr = b.ptr(b.type_tag("user", u8))
    b.decl_tag("sample_tag", counter, -1)
    b.fwd("sock_common")  # a forward declaration must never be picked
    b.fwd("sample_union", union=True)

    be32 = b.typedef("__be32", u32)
    addrpair = b.typedef("__addrpair", u64)
    daddr_pair = b.struct("", 8, [("skc_daddr", be32, 0), ("skc_rcv_saddr", be32, 32)])
    address_union = b.union("", 8, [("skc_addrpair", addrpair, 0), ("", daddr_pair, 0)])

    ns_common = b.struct("ns_common", 16, [("ops", b.ptr(u8), 0), ("inum", u32, 64)])
    net = b.struct("net", 32, [("passive", u32, 0), ("ns", ns_common, 64), ("tail", u8, 192)])
    possible_net = b.typedef("possible_net_t", b.struct("", 8, [("net", b.ptr(net), 0)]))
    const_volatile_u8 = b.modifier(KIND_CONST, b.modifier(KIND_VOLATILE, u8))

    sock_common = b.struct(
        "sock_common",
        40,
        [
            ("", address_union, 0),
            ("skc_family", u16, 64),
            ("skc_state", const_volatile_u8, 80),
            ("skc_reuse", u8, 88, 4),
            ("skc_reuseport", u8, 92, 1),
            ("skc_net", possible_net, 128),
            ("skc_name", b.array(u8, u32, 12), 192),
            ("skc_restricted", restricted, 256),
            ("skc_user", user_ptr, 256),
            ("skc_tagged", b.type_tag("rcu", be32), 288),
        ],
        kind_flag=True,
    )
    timer_list = b.struct(
        "timer_list",
        24,
        [("entry", b.ptr(u8), 0), ("expires", ulong, 64), ("function", b.ptr(callback), 128)],
    )
    b.struct(
        "inet_timewait_sock",
        72,
        [("__tw_common", sock_common, 0), ("tw_substate", u8, 320), ("tw_timer", timer_list, 384)],
    )

    # Without kind_flag, a bitfield is a member whose INT type is narrower
    # than its size (or starts at a bit offset).
    three_bits = b.int_("unsigned int", 4, bits=3)
    b.struct(
        "legacy_bits",
        12,
        [("whole", u32, 0), ("narrow", three_bits, 32), ("misaligned", u8, 68)],
    )

    # Same-named definitions: the empty one is ignored, and the two full ones
    # must agree for an answer.
    b.struct("twice", 0, [])
    b.struct("twice", 8, [("same", u32, 0), ("differs", u32, 32)])
    b.struct("twice", 8, [("same", u32, 0), ("differs", u16, 48), ("only_here", u16, 32)])
    return b.encode()


@pytest.fixture(scope="module")
def sample() -> Btf:
    return Btf.from_bytes(build_sample())


# -- unit tests on the built blob ---------------------------------------------


def test_member_inside_anonymous_union_and_struct(sample: Btf) -> None:
    assert sample.member_offset("sock_common", "skc_daddr") == 0
    assert sample.member_offset("sock_common", "skc_rcv_saddr") == 4
    assert sample.member_offset("sock_common", "skc_addrpair") == 0


def test_plain_members(sample: Btf) -> None:
    assert sample.member_offset("sock_common", "skc_family") == 8
    assert sample.member_offset("sock_common", "skc_state") == 10
    assert sample.member_offset("sock_common", "skc_net") == 16
    assert sample.member_offset("timer_list", "function") == 16
    assert sample.member_offset("inet_timewait_sock", "tw_substate") == 40
    assert sample.member_offset("inet_timewait_sock", "tw_timer") == 48


def test_dotted_paths(sample: Btf) -> None:
    assert sample.member_offset("inet_timewait_sock", "__tw_common.skc_state") == 10
    assert sample.member_offset("inet_timewait_sock", "__tw_common.skc_rcv_saddr") == 4
    assert sample.member_offset("inet_timewait_sock", "tw_timer.expires") == 56
    assert sample.member_offset("net", "ns.inum") == 16
    # Through a typedef'd anonymous struct (possible_net_t).
    assert sample.member_offset("sock_common", "skc_net.net") == 16


def test_member_size_resolves_typedefs_and_modifiers(sample: Btf) -> None:
    assert sample.member_size("sock_common", "skc_daddr") == 4  # typedef __be32
    assert sample.member_size("sock_common", "skc_addrpair") == 8  # typedef __addrpair
    assert sample.member_size("sock_common", "skc_state") == 1  # const volatile u8
    assert sample.member_size("sock_common", "skc_net") == 8  # typedef of a struct
    assert sample.member_size("sock_common", "skc_name") == 12  # u8[12]
    assert sample.member_size("sock_common", "skc_restricted") == 8  # restrict pointer
    assert sample.member_size("sock_common", "skc_user") == 8  # pointer to type_tag
    assert sample.member_size("sock_common", "skc_tagged") == 4  # type_tag of a typedef
    assert sample.member_size("timer_list", "function") == 8
    assert sample.member_size("inet_timewait_sock", "tw_timer") == 24
    assert sample.member_size("net", "ns.inum") == 4


def test_struct_size(sample: Btf) -> None:
    assert sample.struct_size("sock_common") == 40
    assert sample.struct_size("inet_timewait_sock") == 72


@pytest.mark.parametrize(
    ("struct_name", "member"),
    [
        ("sock_common", "skc_reuse"),  # kind_flag bitfield at a byte boundary
        ("sock_common", "skc_reuseport"),  # kind_flag bitfield inside a byte
        ("inet_timewait_sock", "__tw_common.skc_reuse"),
        ("legacy_bits", "narrow"),  # no kind_flag: narrow INT type
        ("legacy_bits", "misaligned"),  # no kind_flag: bit offset not a byte
    ],
)
def test_bitfields_are_rejected(sample: Btf, struct_name: str, member: str) -> None:
    with pytest.raises(BtfError, match="bitfield"):
        sample.member_offset(struct_name, member)
    with pytest.raises(BtfError, match="bitfield"):
        sample.member_size(struct_name, member)


def test_legacy_struct_whole_member(sample: Btf) -> None:
    assert sample.member_offset("legacy_bits", "whole") == 0


@pytest.mark.parametrize(
    ("struct_name", "member", "message"),
    [
        ("no_such_struct", "x", "struct no_such_struct is not in the BTF"),
        ("sock_common", "skc_nope", "struct sock_common has no member 'skc_nope'"),
        ("inet_timewait_sock", "tw_timer.nope", "inet_timewait_sock.tw_timer has no member 'nope'"),
        ("inet_timewait_sock", "tw_substate.x", "not an embedded struct"),
        # A pointer is not embedded: its target is not at an offset in the struct.
        ("sock_common", "skc_net.net.ns", "not an embedded struct"),
        ("sock_common", "skc_net..net", "bad member path"),
        ("sock_common", "", "bad member path"),
        ("sample_union", "x", "not in the BTF"),  # only a FWD by that name
    ],
)
def test_missing_struct_or_member(sample: Btf, struct_name: str, member: str, message: str) -> None:
    with pytest.raises(BtfError, match=re.escape(message)):
        sample.member_offset(struct_name, member)


def test_missing_struct_size(sample: Btf) -> None:
    with pytest.raises(BtfError, match="not in the BTF"):
        sample.struct_size("no_such_struct")


def test_same_named_structs(sample: Btf) -> None:
    assert sample.struct_size("twice") == 8
    assert sample.member_offset("twice", "same") == 0
    assert sample.member_offset("twice", "only_here") == 4
    with pytest.raises(BtfError, match="disagree"):
        sample.member_offset("twice", "differs")


def test_big_endian_blob() -> None:
    btf = Btf.from_bytes(build_sample(">"))
    assert btf.member_offset("inet_timewait_sock", "tw_timer.expires") == 56
    assert btf.member_size("sock_common", "skc_daddr") == 4


def test_pointer_size_needs_a_long() -> None:
    b = BtfBuilder()
    b.struct("holder", 8, [("pointer", b.ptr(b.int_("int", 4)), 0)])
    btf = Btf.from_bytes(b.encode())
    assert btf.member_offset("holder", "pointer") == 0
    with pytest.raises(BtfError, match="pointer size"):
        btf.member_size("holder", "pointer")


def test_corrupt_self_references_raise() -> None:
    # Corrupt BTF must give a BtfError, not endless recursion.
    b = BtfBuilder()
    b.struct("nested_in_itself", 4, [("", b.next_id, 0)])
    b.struct("typedef_loop", 4, [("member", b.typedef("looping", b.next_id), 0)])
    btf = Btf.from_bytes(b.encode())
    with pytest.raises(BtfError, match="nest too deep"):
        btf.member_offset("nested_in_itself", "anything")
    with pytest.raises(BtfError, match="too long"):
        btf.member_size("typedef_loop", "member")


def test_bad_magic() -> None:
    with pytest.raises(BtfError, match="bad magic"):
        Btf.from_bytes(b"\x7fE" + build_sample()[2:])


def test_bad_version() -> None:
    b = BtfBuilder()
    b.int_("int", 4)
    with pytest.raises(BtfError, match="unsupported BTF version 2"):
        Btf.from_bytes(b.encode(version=2))


@pytest.mark.parametrize("length", [0, 3, 23, 24, 100, -1])
def test_truncated(length: int) -> None:
    with pytest.raises(BtfError, match="truncated"):
        Btf.from_bytes(build_sample()[:length])


def test_type_section_ending_mid_record() -> None:
    # A struct claims more members than the type section holds.
    b = BtfBuilder()
    u32 = b.int_("unsigned int", 4)
    b.add(KIND_STRUCT, "short", vlen=3, size_or_type=12, trailer=struct.pack("<3I", 0, u32, 0))
    with pytest.raises(BtfError, match="truncated"):
        Btf.from_bytes(b.encode())


def test_unknown_kind() -> None:
    b = BtfBuilder()
    b.add(25, "from_the_future")
    with pytest.raises(BtfError, match="unknown kind 25"):
        Btf.from_bytes(b.encode())


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(build_sample())
    assert Btf.load(str(path)).member_offset("net", "ns.inum") == 16


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match="does not exist"):
        Btf.load(str(tmp_path / "absent"))


def test_load_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"not btf at all, just some bytes")
    with pytest.raises(BtfError, match=re.escape(f"{path}: not BTF: bad magic")):
        Btf.load(str(path))


# -- the running kernel ---------------------------------------------------------

needs_vmlinux_btf = pytest.mark.skipif(
    not VMLINUX_BTF.exists(),
    reason=f"{VMLINUX_BTF} does not exist (kernel built without CONFIG_DEBUG_INFO_BTF)",
)

_TYPE_LINE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER_LINE = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?$")


@dataclass
class RawType:
    kind: str
    name: str
    attributes: dict[str, str]
    # (name, type_id, bits_offset, bitfield_size) for STRUCT and UNION
    members: list[tuple[str, int, int, int]] = field(default_factory=list)


class BpftoolDump:
    """The parsed output of ``bpftool btf dump ... format raw``."""

    def __init__(self, text: str) -> None:
        self.types: dict[int, RawType] = {}
        self.structs_by_name: dict[str, list[int]] = {}
        current: RawType | None = None
        for line in text.splitlines():
            if type_match := _TYPE_LINE.match(line):
                type_id, kind, name, rest = type_match.groups()
                attributes = dict(re.findall(r"(\w+)=(\S+)", rest))
                current = RawType(kind, name, attributes)
                self.types[int(type_id)] = current
                if kind == "STRUCT":
                    self.structs_by_name.setdefault(name, []).append(int(type_id))
            elif current is not None and current.kind in ("STRUCT", "UNION"):
                member_match = _MEMBER_LINE.match(line)
                assert member_match, f"unexpected bpftool line {line!r}"
                name, type_id, bits, bitfield = member_match.groups()
                current.members.append((name, int(type_id), int(bits), int(bitfield or 0)))

    def struct(self, name: str) -> RawType:
        (type_id,) = self.structs_by_name[name]
        return self.types[type_id]

    def member_bits(self, struct_name: str, member: str) -> int:
        for name, _, bits, bitfield in self.struct(struct_name).members:
            if name == member:
                assert bitfield == 0
                return bits
        raise AssertionError(f"bpftool shows no {struct_name}.{member}")

    def member_type(self, struct_name: str, member: str) -> RawType:
        for name, type_id, _, _ in self.struct(struct_name).members:
            if name == member:
                return self.types[type_id]
        raise AssertionError(f"bpftool shows no {struct_name}.{member}")


@pytest.fixture(scope="module")
def kernel_btf() -> Btf:
    if not VMLINUX_BTF.exists():
        pytest.skip(f"{VMLINUX_BTF} does not exist (kernel built without CONFIG_DEBUG_INFO_BTF)")
    return Btf.load()


@pytest.fixture(scope="module")
def bpftool_dump() -> BpftoolDump:
    if not VMLINUX_BTF.exists():
        pytest.skip(f"{VMLINUX_BTF} does not exist (kernel built without CONFIG_DEBUG_INFO_BTF)")
    # bpftool lives in /usr/sbin on Debian, which is not on every user's PATH.
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    bpftool = shutil.which("bpftool", path=search_path)
    assert bpftool, "bpftool is not installed (CI installs it: apt-get install bpftool)"
    result = subprocess.run(
        [bpftool, "btf", "dump", "file", str(VMLINUX_BTF), "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return BpftoolDump(result.stdout)


@needs_vmlinux_btf
def test_kernel_sock_common_addresses(kernel_btf: Btf) -> None:
    assert kernel_btf.member_offset("sock_common", "skc_daddr") == 0
    assert kernel_btf.member_offset("sock_common", "skc_rcv_saddr") == 4
    assert kernel_btf.member_size("sock_common", "skc_daddr") == 4


@needs_vmlinux_btf
@pytest.mark.parametrize(
    ("struct_name", "member"),
    [
        ("inet_timewait_sock", "tw_substate"),
        ("inet_timewait_sock", "tw_timer"),
        ("timer_list", "expires"),
        ("timer_list", "function"),
        ("sock_common", "skc_state"),
        ("sock_common", "skc_net"),
        ("tcp_sock", "srtt_us"),
    ],
)
def test_kernel_offsets_match_bpftool(
    kernel_btf: Btf, bpftool_dump: BpftoolDump, struct_name: str, member: str
) -> None:
    expected_bits = bpftool_dump.member_bits(struct_name, member)
    assert expected_bits % 8 == 0
    assert kernel_btf.member_offset(struct_name, member) == expected_bits // 8


@needs_vmlinux_btf
def test_kernel_dotted_paths(kernel_btf: Btf, bpftool_dump: BpftoolDump) -> None:
    tw_timer = kernel_btf.member_offset("inet_timewait_sock", "tw_timer")
    expires = kernel_btf.member_offset("timer_list", "expires")
    assert kernel_btf.member_offset("inet_timewait_sock", "tw_timer.expires") == tw_timer + expires
    assert kernel_btf.member_offset(
        "inet_timewait_sock", "__tw_common.skc_state"
    ) == kernel_btf.member_offset("sock_common", "skc_state")

    # The netns inode number: struct net embeds a struct ns_common as "ns".
    expected = (
        bpftool_dump.member_bits("net", "ns") + bpftool_dump.member_bits("ns_common", "inum")
    ) // 8
    assert kernel_btf.member_offset("net", "ns.inum") == expected
    assert kernel_btf.member_size("net", "ns.inum") == 4


@needs_vmlinux_btf
def test_kernel_possible_net_t(kernel_btf: Btf, bpftool_dump: BpftoolDump) -> None:
    possible_net = bpftool_dump.member_type("sock_common", "skc_net")
    assert (possible_net.kind, possible_net.name) == ("TYPEDEF", "possible_net_t")
    target = bpftool_dump.types[int(possible_net.attributes["type_id"])]
    assert kernel_btf.member_size("sock_common", "skc_net") == int(target.attributes["size"])


@needs_vmlinux_btf
def test_kernel_every_struct_matches_bpftool(kernel_btf: Btf, bpftool_dump: BpftoolDump) -> None:
    # A record length wrong for any kind would shift every later type id, so
    # compare every uniquely named struct and its byte-aligned members.
    checked = 0
    for name, type_ids in bpftool_dump.structs_by_name.items():
        if name == "(anon)" or len(type_ids) != 1:
            continue
        raw = bpftool_dump.types[type_ids[0]]
        assert kernel_btf.struct_size(name) == int(raw.attributes["size"]), name
        for member, _, bits, bitfield in raw.members:
            if member == "(anon)":
                continue
            if bitfield or bits % 8:
                with pytest.raises(BtfError, match="bitfield"):
                    kernel_btf.member_offset(name, member)
            else:
                assert kernel_btf.member_offset(name, member) == bits // 8, f"{name}.{member}"
            checked += 1
    assert checked > 10_000
