"""The BPF program's maps and event buffer, read by file descriptor, without BCC.

The loader process (loader.py) hands over each map's fd with its type, sizes
and the key and value layouts BCC's compiler described (the same JSON BCC's
own tables decode), so the long-running process reads and writes maps with
bpf() calls (bpfsys.py) and ctypes types built here, and reads the ring
buffer (or perf buffer) through libbpf, which BCC's package already installs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from . import bpfsys

# enum bpf_map_type values the program uses with per-CPU values.
PERCPU_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
ARRAY_TYPES = {2, 6}

_SCALARS: dict[str, Any] = {
    "_Bool": ctypes.c_bool,
    "char": ctypes.c_char,
    "unsigned char": ctypes.c_ubyte,
    "signed char": ctypes.c_byte,
    "short": ctypes.c_short,
    "unsigned short": ctypes.c_ushort,
    "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "long": ctypes.c_long,
    "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong,
    "__int128": ctypes.c_int64 * 2,
    "unsigned __int128": ctypes.c_uint64 * 2,
}


def decode_type(desc: Any) -> Any:
    """A ctypes type from BCC's JSON type description (bpf_table_key_desc):
    a scalar name, or [name, [[field, type], [field, type, [n]] (array),
    [field, type, bits] (bit field), ...], "struct" | "union" | "struct_packed"]."""
    if isinstance(desc, str):
        try:
            return _SCALARS[desc]
        except KeyError:
            raise ValueError(f"unknown C type {desc!r} in a map layout") from None
    anonymous: list[str] = []
    fields: list[tuple[Any, ...]] = []
    for item in desc[1]:
        if len(item) == 2:
            fields.append((item[0], decode_type(item[1])))
        elif isinstance(item[2], list):
            fields.append((item[0], decode_type(item[1]) * item[2][0]))
        elif isinstance(item[2], int):
            fields.append((item[0], decode_type(item[1]), item[2]))
        elif item[2] in ("struct", "union", "struct_packed"):
            name = item[0] or f"__anon{len(anonymous)}"
            if not item[0]:
                anonymous.append(name)
            fields.append((name, decode_type(item)))
        else:
            raise ValueError(f"cannot decode map layout {item!r}")
    kind = desc[2] if len(desc) > 2 else "struct"
    base: type = ctypes.Union if kind == "union" else ctypes.Structure
    namespace: dict[str, Any] = {"_anonymous_": anonymous, "_fields_": fields}
    if kind == "struct_packed":
        namespace["_pack_"] = 1
    return type(str(desc[0]) or "anon", (base,), namespace)


@dataclass(frozen=True)
class MapInfo:
    """What the loader tells about one map (JSON-friendly)."""

    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    key_desc: Any
    value_desc: Any


class Table:
    """One map by fd, with the BCC Table methods the tracer uses: Key, Leaf,
    items(), values(), keys (iteration), [key], [key] = value, del [key],
    items_lookup_batch() and pop_all(). Per-CPU maps give one value per possible CPU."""

    def __init__(self, fd: int, info: MapInfo) -> None:
        self.fd = fd
        self.info = info
        self.Key: Any = decode_type(info.key_desc)
        self.Leaf: Any = decode_type(info.value_desc)
        self.percpu = info.map_type in PERCPU_TYPES
        self.cpus = bpfsys.possible_cpus() if self.percpu else 1
        # The kernel rounds each CPU's value up to 8 bytes.
        self._slot = (info.value_size + 7) // 8 * 8 if self.percpu else info.value_size
        self._value_size = self._slot * self.cpus

    def _key_bytes(self, key: Any) -> bytes:
        if isinstance(key, int):
            key = self.Key(key)
        return bytes(key)

    def _value_bytes(self, value: Any) -> bytes:
        if isinstance(value, int):
            value = self.Leaf(value)
        data = bytes(value)
        if self.percpu and len(data) == self.info.value_size:
            # One value for every CPU, as BCC's per-CPU tables take a single value.
            data = (data + bytes(self._slot - len(data))) * self.cpus
        return data

    def _decode(self, raw: bytes) -> Any:
        if not self.percpu:
            return self.Leaf.from_buffer_copy(raw)
        values = [self.Leaf.from_buffer_copy(raw, cpu * self._slot) for cpu in range(self.cpus)]
        if issubclass(self.Leaf, ctypes._SimpleCData):
            return [value.value for value in values]
        return values

    def __getitem__(self, key: Any) -> Any:
        key_buffer = ctypes.create_string_buffer(self._key_bytes(key), self.info.key_size)
        value = ctypes.create_string_buffer(self._value_size)
        if not bpfsys.map_lookup(self.fd, key_buffer, value):
            raise KeyError(key)
        return self._decode(value.raw)

    def __setitem__(self, key: Any, value: Any) -> None:
        bpfsys.map_update(self.fd, self._key_bytes(key), self._value_bytes(value))

    def __delitem__(self, key: Any) -> None:
        if not bpfsys.map_delete(self.fd, self._key_bytes(key)):
            raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        for raw in bpfsys.map_keys(self.fd, self.info.key_size):
            yield self.Key.from_buffer_copy(raw)

    def keys(self) -> list[Any]:
        return list(self)

    def items(self) -> list[tuple[Any, Any]]:
        """(key, value) pairs; keys removed while iterating are skipped."""
        result = []
        for key in self:
            try:
                result.append((key, self[key]))
            except KeyError:
                continue
        return result

    def values(self) -> list[Any]:
        return [value for _key, value in self.items()]

    def items_lookup_batch(self) -> Iterator[tuple[Any, Any]]:
        """(key, value) pairs, a chunk of thousands per syscall, decoded as
        they are taken (iterating where the kernel has no batch lookups for
        this map type). An empty map yields nothing."""
        return self._batches(delete=False)

    def pop_all(self) -> Iterator[tuple[Any, Any]]:
        """(key, value) pairs as items_lookup_batch() gives them, each
        deleted as it is read: what the program writes meanwhile is yielded
        or stays in the map."""
        return self._batches(delete=True)

    def _batches(self, delete: bool) -> Iterator[tuple[Any, Any]]:
        pairs = bpfsys.map_lookup_batch(
            self.fd, self.info.key_size, self._value_size, self.info.max_entries, delete
        )
        try:
            first = next(pairs, None)
        except bpfsys.BpfError:
            yield from self._pop_each() if delete else self.items()
            return
        if first is None:
            return
        for key, value in itertools.chain((first,), pairs):
            yield self.Key.from_buffer_copy(key), self._decode(value)

    def _pop_each(self) -> Iterator[tuple[Any, Any]]:
        # Kernels before 5.6: a value written between the read and the
        # delete is lost.
        for key, value in self.items():
            with contextlib.suppress(KeyError):
                del self[key]
            yield key, value


# -- the event buffer ----------------------------------------------------------

_RING_SAMPLE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_PERF_SAMPLE = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32
)
_PERF_LOST = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64)


@functools.cache
def libbpf() -> ctypes.CDLL:
    """libbpf (Debian libbpf1, a dependency of BCC's package)."""
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise UserError(
            "libbpf is missing (it reads the BPF ring buffer): install it "
            "(Debian: apt-get install libbpf1)"
        ) from None
    lib.ring_buffer__new.restype = ctypes.c_void_p
    lib.ring_buffer__new.argtypes = [ctypes.c_int, _RING_SAMPLE, ctypes.c_void_p, ctypes.c_void_p]
    lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.ring_buffer__consume.argtypes = [ctypes.c_void_p]
    lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
    lib.perf_buffer__new.restype = ctypes.c_void_p
    lib.perf_buffer__new.argtypes = [
        ctypes.c_int,
        ctypes.c_size_t,
        _PERF_SAMPLE,
        _PERF_LOST,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.perf_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.perf_buffer__free.argtypes = [ctypes.c_void_p]
    return lib


class EventBuffer:
    """The program's `events` map read with libbpf: a BPF ring buffer, or a
    perf buffer (one ring per CPU) on kernels without one. `deliver` gets
    each event's bytes; an exception it raises ends the poll and is raised
    from poll()."""

    def __init__(
        self,
        map_fd: int,
        deliver: Callable[[bytes], None],
        *,
        ring: bool,
        perf_pages: int = 64,
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        self._ring = ring
        self._error: BaseException | None = None
        lib = libbpf()

        def sample(data: int | None, size: int) -> int:
            if self._error is not None:
                return -1
            try:
                deliver(ctypes.string_at(data or 0, size))
            except BaseException as err:  # raised again from poll()
                self._error = err
                return -1
            return 0

        if ring:
            self._ring_cb = _RING_SAMPLE(lambda _ctx, data, size: sample(data, size))
            handle = lib.ring_buffer__new(map_fd, self._ring_cb, None, None)
        else:
            self._perf_cb = _PERF_SAMPLE(lambda _ctx, _cpu, data, size: sample(data, size) and None)
            self._lost_cb = _PERF_LOST(
                lambda _ctx, _cpu, count: on_lost(count) if on_lost is not None else None
            )
            handle = lib.perf_buffer__new(
                map_fd, perf_pages, self._perf_cb, self._lost_cb, None, None
            )
        if not handle:
            errno = ctypes.get_errno()
            raise bpfsys.BpfError(errno, f"could not open the event buffer (errno {errno})")
        self._handle: int | None = handle

    def poll(self, timeout_ms: int) -> None:
        if self._handle is None:
            return
        lib = libbpf()
        if self._ring:
            lib.ring_buffer__poll(self._handle, timeout_ms)
            # The program wakes us only once plenty is waiting; take the rest.
            if self._error is None:
                lib.ring_buffer__consume(self._handle)
        else:
            lib.perf_buffer__poll(self._handle, timeout_ms)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        if self._handle is None:
            return
        if self._ring:
            libbpf().ring_buffer__free(self._handle)
        else:
            libbpf().perf_buffer__free(self._handle)
        self._handle = None
