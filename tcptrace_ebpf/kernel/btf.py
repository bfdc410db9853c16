"""Struct member offsets from the running kernel's BTF.

The kernel headers installed next to a kernel do not always match it, so
struct layouts compiled from them can be wrong. The running kernel describes
its own types in BTF (``/sys/kernel/btf/vmlinux``); this module reads just
enough of that to answer "at which byte offset does member X of struct Y
sit", so the answer can be passed to the BPF C code as a ``-D`` macro.

The format is described in the kernel's ``Documentation/bpf/btf.rst`` and
``include/uapi/linux/btf.h``. vmlinux BTF is several MB with over 100,000
types, and this runs at every tracer start, so parsing is lazy: one pass
records where each type starts and the names of structs, and members are
decoded only for the structs that are asked about.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from struct import Struct, calcsize, unpack_from
from typing import Final

VMLINUX_BTF_PATH: Final = "/sys/kernel/btf/vmlinux"

_BTF_MAGIC: Final = 0xEB9F
_BTF_VERSION: Final = 1
# magic u16, version u8, flags u8, hdr_len u32, type_off, type_len, str_off, str_len (all u32).
_HEADER_FORMAT: Final = "HBBIIIII"
_HEADER_SIZE: Final = calcsize("<" + _HEADER_FORMAT)
# Every type starts with struct btf_type: name_off, info, size-or-type (three u32).
_TYPE_RECORD_SIZE: Final = 12

_KIND_INT: Final = 1
_KIND_PTR: Final = 2
_KIND_ARRAY: Final = 3
_KIND_STRUCT: Final = 4
_KIND_UNION: Final = 5
_KIND_ENUM: Final = 6
_KIND_FWD: Final = 7
_KIND_TYPEDEF: Final = 8
_KIND_VOLATILE: Final = 9
_KIND_CONST: Final = 10
_KIND_RESTRICT: Final = 11
_KIND_FUNC: Final = 12
_KIND_FUNC_PROTO: Final = 13
_KIND_VAR: Final = 14
_KIND_DATASEC: Final = 15
_KIND_FLOAT: Final = 16
_KIND_DECL_TAG: Final = 17
_KIND_TYPE_TAG: Final = 18
_KIND_ENUM64: Final = 19

_KIND_NAMES: Final = (
    "UNKN",
    "INT",
    "PTR",
    "ARRAY",
    "STRUCT",
    "UNION",
    "ENUM",
    "FWD",
    "TYPEDEF",
    "VOLATILE",
    "CONST",
    "RESTRICT",
    "FUNC",
    "FUNC_PROTO",
    "VAR",
    "DATASEC",
    "FLOAT",
    "DECL_TAG",
    "TYPE_TAG",
    "ENUM64",
)

# Bytes that follow the 12-byte struct btf_type, per kind: a fixed part plus a
# part repeated vlen times. Indexed by kind (5 bits, so 32 slots); None marks a
# kind this reader does not know, where walking on would desynchronise.
_UNKNOWN_KIND: Final = None
_FIXED_TRAILER: Final[tuple[int | None, ...]] = (
    _UNKNOWN_KIND,  # 0 UNKN is never a valid type record
    4,  # INT: u32 encoding/offset/bits
    0,  # PTR
    12,  # ARRAY: struct btf_array {type, index_type, nelems}
    0,  # STRUCT
    0,  # UNION
    0,  # ENUM
    0,  # FWD
    0,  # TYPEDEF
    0,  # VOLATILE
    0,  # CONST
    0,  # RESTRICT
    0,  # FUNC
    0,  # FUNC_PROTO
    4,  # VAR: struct btf_var {linkage}
    0,  # DATASEC
    0,  # FLOAT
    4,  # DECL_TAG: struct btf_decl_tag {component_idx}
    0,  # TYPE_TAG
    0,  # ENUM64
    *([_UNKNOWN_KIND] * 12),
)
_PER_VLEN_TRAILER: Final[tuple[int, ...]] = (
    0,  # UNKN
    0,  # INT
    0,  # PTR
    0,  # ARRAY
    12,  # STRUCT: struct btf_member {name_off, type, offset}
    12,  # UNION: struct btf_member
    8,  # ENUM: struct btf_enum {name_off, val}
    0,  # FWD
    0,  # TYPEDEF
    0,  # VOLATILE
    0,  # CONST
    0,  # RESTRICT
    0,  # FUNC: vlen holds the linkage, not a count
    8,  # FUNC_PROTO: struct btf_param {name_off, type}
    0,  # VAR
    12,  # DATASEC: struct btf_var_secinfo {type, offset, size}
    0,  # FLOAT
    0,  # DECL_TAG
    0,  # TYPE_TAG
    12,  # ENUM64: struct btf_enum64 {name_off, val_lo32, val_hi32}
    *([0] * 12),
)

# Kinds that only qualify or rename another type; member_size and path walking
# look through them to the type underneath.
_TRANSPARENT_KINDS: Final = frozenset(
    {_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG}
)
# Kinds whose third btf_type word is a size in bytes.
_SIZED_KINDS: Final = frozenset(
    {_KIND_INT, _KIND_STRUCT, _KIND_UNION, _KIND_ENUM, _KIND_ENUM64, _KIND_FLOAT}
)
_COMPOSITE_KINDS: Final = frozenset({_KIND_STRUCT, _KIND_UNION})
# The kernel's own limit on typedef/modifier chains (MAX_RESOLVE_DEPTH in
# kernel/bpf/btf.c); also bounds nesting of anonymous members, so a corrupt
# file that makes a type contain itself cannot recurse forever.
_MAX_RESOLVE_DEPTH: Final = 32
# BTF has no pointer kind with a size: like libbpf, take the size of C "long",
# which is pointer-sized on every ABI Linux runs on.
_LONG_INT_NAMES: Final = frozenset(
    {"long", "long int", "long unsigned int", "unsigned long", "long signed int"}
)


class BtfError(Exception):
    """The BTF could not be read, or does not have the type or member asked for."""


@dataclass(frozen=True, slots=True)
class _Member:
    name: str  # "" for an anonymous struct/union member
    type_id: int
    bit_offset: int  # from the start of the enclosing struct/union
    bitfield_size: int  # 0 unless the member is a bitfield


class Btf:
    """Read-only view of a BTF blob, answering struct layout questions."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        byte_order = self._byte_order(data)
        self._u32 = Struct(byte_order + "I")
        self._u32x3 = Struct(byte_order + "III")

        header = unpack_from(byte_order + _HEADER_FORMAT, data)
        _magic, version, _flags, header_len, type_off, type_len, str_off, str_len = header
        if version != _BTF_VERSION:
            raise BtfError(f"unsupported BTF version {version} (expected {_BTF_VERSION})")
        if header_len < _HEADER_SIZE:
            raise BtfError(f"BTF header length {header_len} is shorter than {_HEADER_SIZE}")
        # Section offsets count from the end of the header.
        self._types_start = header_len + type_off
        self._types_end = self._types_start + type_len
        self._strings_start = header_len + str_off
        self._strings_end = self._strings_start + str_len
        if self._types_end > len(data) or self._strings_end > len(data):
            raise BtfError(
                f"BTF is truncated: sections end at byte "
                f"{max(self._types_end, self._strings_end)} but the data has {len(data)}"
            )

        # Byte position of each type record, indexed by type id; id 0 is "void"
        # and has no record.
        self._type_positions = array("I", [0])
        self._struct_ids_by_name: dict[str, list[int]] = {}
        # The first typedef of each name, by the name's string offset (raw
        # tracepoints' prototypes are typedefs): found without a second walk.
        self._typedef_ids_by_name_off: dict[int, int] = {}
        self._int_ids: list[int] = []
        self._index_types()

        self._members_cache: dict[int, tuple[_Member, ...]] = {}
        self._pointer_size: int | None = None

    @classmethod
    def load(cls, path: str = VMLINUX_BTF_PATH) -> Btf:
        """Read and index the BTF file at ``path`` (by default the running kernel's)."""
        try:
            with open(path, "rb") as btf_file:
                data = btf_file.read()
        except FileNotFoundError:
            hint = (
                " (the kernel was built without CONFIG_DEBUG_INFO_BTF)"
                if path == VMLINUX_BTF_PATH
                else ""
            )
            raise BtfError(f"cannot read BTF: {path} does not exist{hint}") from None
        except OSError as err:
            raise BtfError(f"cannot read BTF from {path}: {err.strerror or err}") from err
        try:
            return cls(data)
        except BtfError as err:
            raise BtfError(f"{path}: {err}") from None

    @classmethod
    def from_bytes(cls, data: bytes) -> Btf:
        """Index a BTF blob already in memory."""
        return cls(data)

    def struct_size(self, name: str) -> int:
        """Size in bytes of ``struct <name>``."""
        sizes = {self._size_or_type(type_id) for type_id in self._struct_ids(name)}
        if len(sizes) > 1:
            raise BtfError(
                f"struct {name} is defined several times with different sizes "
                f"({', '.join(map(str, sorted(sizes)))})"
            )
        return sizes.pop()

    def member_offset(self, struct: str, member: str) -> int:
        """Byte offset of ``member`` in ``struct <struct>``.

        ``member`` may be a dotted path through embedded structs and unions
        (``"__tw_common.skc_state"``); a name is also found inside anonymous
        struct/union members, as C allows. Bitfields have no byte offset and
        raise ``BtfError``.
        """
        bit_offset, _ = self._resolve_byte_aligned(struct, member)
        return bit_offset // 8

    def member_size(self, struct: str, member: str) -> int:
        """Size in bytes of the type of ``member`` (see ``member_offset``)."""
        _, found = self._resolve_byte_aligned(struct, member)
        return self._type_size(found.type_id)

    # -- first pass ---------------------------------------------------------

    @staticmethod
    def _byte_order(data: bytes) -> str:
        if len(data) < _HEADER_SIZE:
            raise BtfError(
                f"BTF is truncated: {len(data)} bytes, the header alone is {_HEADER_SIZE}"
            )
        # BTF is written in the byte order of the machine it describes; the
        # magic tells which.
        if unpack_from("<H", data)[0] == _BTF_MAGIC:
            return "<"
        if unpack_from(">H", data)[0] == _BTF_MAGIC:
            return ">"
        raise BtfError(f"not BTF: bad magic 0x{data[0]:02x}{data[1]:02x}")

    def _index_types(self) -> None:
        """Walk the type section once, recording where each type starts.

        This is the hot loop (over 100,000 iterations for vmlinux), hence the
        local aliases. Only struct names are decoded; everything else about a
        type is read when it is needed.
        """
        data = self._data
        end = self._types_end
        unpack_type = self._u32x3.unpack_from
        fixed_trailer = _FIXED_TRAILER
        per_vlen_trailer = _PER_VLEN_TRAILER
        positions = self._type_positions
        append_position = positions.append
        struct_name_offsets: list[tuple[int, int]] = []  # (name_off, type id)
        int_ids = self._int_ids
        typedef_ids = self._typedef_ids_by_name_off

        position = self._types_start
        while position < end:
            if position + _TYPE_RECORD_SIZE > end:
                raise BtfError(f"BTF type section is truncated at byte {position}")
            name_off, info, _ = unpack_type(data, position)
            kind = (info >> 24) & 0x1F
            fixed = fixed_trailer[kind]
            if fixed is None:
                raise BtfError(
                    f"BTF type {len(positions)} at byte {position} has unknown kind {kind}"
                )
            append_position(position)
            if kind == _KIND_STRUCT:
                struct_name_offsets.append((name_off, len(positions) - 1))
            elif kind == _KIND_INT:
                int_ids.append(len(positions) - 1)
            elif kind == _KIND_TYPEDEF:
                typedef_ids.setdefault(name_off, len(positions) - 1)
            position += _TYPE_RECORD_SIZE + fixed + per_vlen_trailer[kind] * (info & 0xFFFF)
        if position != end:
            raise BtfError(f"BTF type section is truncated: last type runs past byte {end}")

        by_name = self._struct_ids_by_name
        for name_off, type_id in struct_name_offsets:
            if name_off:
                by_name.setdefault(self._string(name_off), []).append(type_id)

    def raw_tracepoint_arg_index(self, tracepoint: str, struct: str) -> int:
        """Position, among the arguments of raw tracepoint ``tracepoint``, of its
        one ``struct <struct> *`` argument.

        A raw tracepoint program sees the tracepoint's C arguments, whose order
        is not its tracefs format's. The kernel describes them in the BTF as
        the prototype behind ``typedef btf_trace_<tracepoint>``; its parameters
        are unnamed, so the argument is found by type. The prototype's first
        parameter (the tracepoint's private data) is not an argument.
        """
        name = f"btf_trace_{tracepoint}"
        typedef_id = self.typedef_ids([name]).get(name)
        if typedef_id is None:
            raise BtfError(f"typedef {name} is not in the BTF")
        proto_id = self._strip_transparent(self._size_or_type(typedef_id))
        if self._kind(proto_id) == _KIND_PTR:
            proto_id = self._strip_transparent(self._size_or_type(proto_id))
        if self._kind(proto_id) != _KIND_FUNC_PROTO:
            raise BtfError(f"btf_trace_{tracepoint} is not a function prototype")
        _, info, _, position = self._record(proto_id)
        found = []
        for index in range(1, info & 0xFFFF):
            param_type = self._u32.unpack_from(
                self._data, position + _TYPE_RECORD_SIZE + 8 * index + 4
            )[0]
            pointer = self._strip_transparent(param_type)
            if self._kind(pointer) != _KIND_PTR:
                continue
            target = self._strip_transparent(self._size_or_type(pointer))
            if self._kind(target) == _KIND_STRUCT and self._type_name(target) == struct:
                found.append(index - 1)
        if len(found) != 1:
            raise BtfError(
                f"raw tracepoint {tracepoint} has {len(found)} struct {struct} * arguments, not one"
            )
        return found[0]

    def typedef_ids(self, names: Iterable[str]) -> dict[str, int]:
        """Type ids of the typedefs of these names that the BTF has.

        A tp_btf program is loaded against ``typedef btf_trace_<tracepoint>``."""
        strings = self._data[self._strings_start : self._strings_end]
        result: dict[str, int] = {}
        for name in set(names):
            needle = name.encode() + b"\0"
            start = 0
            # Every place the name is a whole string; the first typedef wins.
            while (found := strings.find(needle, start)) >= 0:
                if found == 0 or strings[found - 1] == 0:
                    type_id = self._typedef_ids_by_name_off.get(found)
                    if type_id is not None:
                        result[name] = min(type_id, result.get(name, type_id))
                start = found + 1
        return result

    def _type_name(self, type_id: int) -> str:
        name_off = self._record(type_id)[0]
        return self._string(name_off) if name_off else ""

    # -- reading types ------------------------------------------------------

    def _string(self, offset: int) -> str:
        start = self._strings_start + offset
        if start >= self._strings_end:
            raise BtfError(f"BTF string offset {offset} is outside the string section")
        end = self._data.find(b"\0", start, self._strings_end)
        if end < 0:
            raise BtfError(f"BTF string at offset {offset} is not NUL-terminated")
        return self._data[start:end].decode("utf-8", errors="replace")

    def _record(self, type_id: int) -> tuple[int, int, int, int]:
        """(name_off, info, size-or-type, byte position) of type ``type_id``."""
        if not 0 < type_id < len(self._type_positions):
            raise BtfError(f"BTF type id {type_id} does not exist")
        position = self._type_positions[type_id]
        name_off, info, size_or_type = self._u32x3.unpack_from(self._data, position)
        return name_off, info, size_or_type, position

    def _kind(self, type_id: int) -> int:
        if type_id == 0:
            return 0  # void
        return (self._record(type_id)[1] >> 24) & 0x1F

    def _size_or_type(self, type_id: int) -> int:
        return self._record(type_id)[2]

    def _describe(self, type_id: int) -> str:
        if type_id == 0:
            return "void"
        name_off, info, _, _ = self._record(type_id)
        kind_name = _KIND_NAMES[(info >> 24) & 0x1F]
        return f"{kind_name} '{self._string(name_off) if name_off else '(anon)'}' [{type_id}]"

    def _strip_transparent(self, type_id: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the type underneath."""
        for _ in range(_MAX_RESOLVE_DEPTH):
            if self._kind(type_id) not in _TRANSPARENT_KINDS:
                return type_id
            type_id = self._size_or_type(type_id)
        raise BtfError(f"BTF type chain from {self._describe(type_id)} is too long (a loop?)")

    def _struct_ids(self, name: str) -> list[int]:
        """Every STRUCT named ``name`` that has members, or the empty ones if none has.

        vmlinux holds a few genuinely different structs under one name (file-local
        types from different compilation units, e.g. two ``struct dma_chan``);
        forward declarations are FWD, not STRUCT, so never show up here. Callers
        accept an answer only if all definitions agree on it, because picking one
        would silently hand back the wrong offset when it is the other.
        """
        ids = self._struct_ids_by_name.get(name)
        if not ids:
            raise BtfError(f"struct {name} is not in the BTF")
        with_members = [type_id for type_id in ids if self._record(type_id)[1] & 0xFFFF]
        return with_members or ids

    def _members(self, composite_id: int) -> tuple[_Member, ...]:
        cached = self._members_cache.get(composite_id)
        if cached is not None:
            return cached
        _, info, _, position = self._record(composite_id)
        # With kind_flag set, each member's offset packs bitfield_size in the
        # top 8 bits and the bit offset in the low 24; without it, the whole
        # word is the bit offset and bitfields are told by their INT type.
        has_bitfield_sizes = bool(info >> 31)
        members = []
        unpack_member = self._u32x3.unpack_from
        for index in range(info & 0xFFFF):
            name_off, type_id, offset = unpack_member(
                self._data, position + _TYPE_RECORD_SIZE + 12 * index
            )
            if has_bitfield_sizes:
                bit_offset, bitfield_size = offset & 0xFFFFFF, offset >> 24
            else:
                bit_offset, bitfield_size = offset, self._legacy_bitfield_size(type_id)
            name = self._string(name_off) if name_off else ""
            members.append(_Member(name, type_id, bit_offset, bitfield_size))
        result = tuple(members)
        self._members_cache[composite_id] = result
        return result

    def _legacy_bitfield_size(self, type_id: int) -> int:
        """Bitfield width of a member of a struct without kind_flag, or 0.

        In that encoding a bitfield's type is an INT whose own bit offset or bit
        count differs from a whole integer of its size.
        """
        type_id = self._strip_transparent(type_id)
        if self._kind(type_id) != _KIND_INT:
            return 0
        _, _, size, position = self._record(type_id)
        int_info: int = self._u32.unpack_from(self._data, position + _TYPE_RECORD_SIZE)[0]
        int_bit_offset, int_bits = (int_info >> 16) & 0xFF, int_info & 0xFF
        if int_bit_offset or int_bits != size * 8:
            return int_bits
        return 0

    def _find_member(
        self, composite_id: int, name: str, depth: int = 0
    ) -> tuple[int, _Member] | None:
        """Member ``name`` of a struct/union, looking inside anonymous members.

        Returns its bit offset from the start of ``composite_id`` and the member.
        """
        if depth > _MAX_RESOLVE_DEPTH:
            raise BtfError(f"anonymous members of {self._describe(composite_id)} nest too deep")
        members = self._members(composite_id)
        for member in members:
            if member.name == name:
                return member.bit_offset, member
        # C forbids a name from appearing twice in the flattened member list,
        # so the search order through anonymous members does not matter.
        for member in members:
            if member.name:
                continue
            inner_id = self._strip_transparent(member.type_id)
            if self._kind(inner_id) not in _COMPOSITE_KINDS:
                continue
            found = self._find_member(inner_id, name, depth + 1)
            if found is not None:
                return member.bit_offset + found[0], found[1]
        return None

    def _resolve_path(self, composite_id: int, path: str, label: str) -> tuple[int, _Member]:
        """Bit offset and final member of a dotted ``path`` inside ``composite_id``.

        ``label`` names ``composite_id`` in error messages ("struct sock").
        """
        parts = path.split(".")
        if not all(parts):
            raise BtfError(f"bad member path {path!r}")
        bit_offset = 0
        current_id = composite_id
        walked = [label]
        member: _Member | None = None
        for part in parts:
            if member is not None:
                current_id = self._strip_transparent(member.type_id)
                if self._kind(current_id) not in _COMPOSITE_KINDS:
                    raise BtfError(
                        f"{'.'.join(walked)} is {self._describe(current_id)}, "
                        f"not an embedded struct or union, so it has no member {part!r}"
                    )
            found = self._find_member(current_id, part)
            if found is None:
                raise BtfError(f"{'.'.join(walked)} has no member {part!r}")
            member_bit_offset, member = found
            bit_offset += member_bit_offset
            walked.append(part)
        assert member is not None  # parts is never empty
        return bit_offset, member

    def _resolve_byte_aligned(self, struct: str, member: str) -> tuple[int, _Member]:
        """Resolve ``struct.member`` in every definition of ``struct``; they must agree."""
        # Keyed by everything a caller could learn, so same-named definitions
        # count as agreeing only if no answer would differ between them.
        answers: dict[tuple[int, int, int | None], _Member] = {}
        first_error: BtfError | None = None
        for struct_id in self._struct_ids(struct):
            try:
                bit_offset, found = self._resolve_path(struct_id, member, f"struct {struct}")
            except BtfError as err:
                first_error = first_error or err
                continue
            size = self._type_size_or_none(found.type_id)
            answers[(bit_offset, found.bitfield_size, size)] = found
        if not answers:
            raise first_error or BtfError(f"struct {struct} has no member {member!r}")
        if len(answers) > 1:
            raise BtfError(
                f"struct {struct} is defined several times and they disagree on {member}"
            )
        (bit_offset, _, _), found = answers.popitem()
        if found.bitfield_size or bit_offset % 8:
            raise BtfError(
                f"struct {struct} member {member} is a bitfield "
                f"(bit offset {bit_offset}, {found.bitfield_size} bits) and has no byte offset"
            )
        return bit_offset, found

    # -- sizes --------------------------------------------------------------

    def _type_size_or_none(self, type_id: int) -> int | None:
        try:
            return self._type_size(type_id)
        except BtfError:
            return None

    def _type_size(self, type_id: int) -> int:
        for _ in range(_MAX_RESOLVE_DEPTH):
            kind = self._kind(type_id)
            if kind in _SIZED_KINDS:
                return self._size_or_type(type_id)
            if kind in _TRANSPARENT_KINDS:
                type_id = self._size_or_type(type_id)
            elif kind == _KIND_PTR:
                return self._long_size()
            elif kind == _KIND_ARRAY:
                position = self._record(type_id)[3]
                element_id, _index_id, element_count = self._u32x3.unpack_from(
                    self._data, position + _TYPE_RECORD_SIZE
                )
                element_size = self._type_size(element_id)
                return int(element_count) * element_size
            else:
                raise BtfError(f"{self._describe(type_id)} has no size")
        raise BtfError(f"BTF type chain from {self._describe(type_id)} is too long (a loop?)")

    def _long_size(self) -> int:
        if self._pointer_size is None:
            for int_id in self._int_ids:
                name_off, _, size, _ = self._record(int_id)
                if name_off and self._string(name_off) in _LONG_INT_NAMES:
                    self._pointer_size = size
                    break
            else:
                raise BtfError("BTF has no 'long' integer type to tell the pointer size by")
        return self._pointer_size
