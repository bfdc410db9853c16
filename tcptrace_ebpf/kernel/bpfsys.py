"""The bpf() (and perf_event_open()) system calls the tracer makes itself.

BCC compiles the program and creates its maps, in a short-lived loader
process (loader.py); the daemon, which never imports BCC, then uses these:
map reads and writes by file descriptor, attaching programs to raw and
classic tracepoints, running a program on demand (BPF_PROG_TEST_RUN),
reading what the kernel counts of a program (BPF_OBJ_GET_INFO_BY_FD), and loading
BTF-typed raw tracepoint (tp_btf) programs, which BCC 0.26 cannot load: it
gives every tracing program the attach type of its name prefix, and none
means tp_btf.
"""

from __future__ import annotations

import ctypes
import errno as errnos
import fcntl
import functools
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
NR_PERF_EVENT_OPEN = {
    "x86_64": 298,
    "aarch64": 241,
    "riscv64": 241,
    "ppc64le": 319,
    "s390x": 331,
}

# enum bpf_cmd, bpf_prog_type, bpf_attach_type (include/uapi/linux/bpf.h)
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_RAW_TP = 23

VERIFIER_LOG_BYTES = 1 << 22


class BpfError(OSError):
    """A bpf() call failed; `log` holds the verifier's words for a refused program."""

    def __init__(self, errno: int, message: str, log: str = "") -> None:
        super().__init__(errno, message)
        self.log = log


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _bpf(command: int, attr: ctypes.Structure) -> int:
    number = NR_BPF.get(platform.machine())
    if number is None:
        raise BpfError(0, f"bpf() syscall number unknown for {platform.machine()}")
    result = int(_libc().syscall(number, command, ctypes.byref(attr), ctypes.sizeof(attr)))
    if result < 0:
        errno = ctypes.get_errno()
        raise BpfError(errno, os.strerror(errno))
    return result


class _TestRunAttr(ctypes.Structure):
    # union bpf_attr, the BPF_PROG_TEST_RUN member (include/uapi/linux/bpf.h)
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _ProgLoadAttr(ctypes.Structure):
    # union bpf_attr, the BPF_PROG_LOAD member, up to attach_btf_obj_fd
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
    ]


class _RawTracepointAttr(ctypes.Structure):
    # union bpf_attr, the BPF_RAW_TRACEPOINT_OPEN member
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class _ProgInfo(ctypes.Structure):
    # struct bpf_prog_info (include/uapi/linux/bpf.h), up to recursion_misses.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


def prog_test_run(prog_fd: int, arg: int = 0) -> int:
    """Run a loaded raw_tracepoint program once, now (BPF_PROG_TEST_RUN),
    with `arg` as its ctx->args[0]. Returns what the program returned."""
    ctx = (ctypes.c_uint64 * 1)(arg)
    attr = _TestRunAttr(prog_fd=prog_fd)
    attr.ctx_in = ctypes.addressof(ctx)
    attr.ctx_size_in = ctypes.sizeof(ctx)
    _bpf(BPF_PROG_TEST_RUN, attr)
    return int(attr.retval)


@dataclass(frozen=True)
class ProgramRuns:
    """What the kernel counts of one program: its runs and their time (both
    only while its BPF statistics are on: kernel.bpf_stats_enabled, or a
    BPF_ENABLE_STATS file descriptor held by anyone) and its skipped runs
    (always)."""

    runs: int
    run_ns: int
    skipped: int


def _prog_info(prog_fd: int) -> tuple[_ProgInfo, int] | None:
    """A loaded program's struct bpf_prog_info and how many bytes of it the
    kernel filled (older kernels fill less: the fields past that are not
    there); None if the kernel would not say."""
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=prog_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    try:
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    except BpfError:
        return None
    return info, int(attr.info_len)


def program_runs(prog_fd: int) -> ProgramRuns:
    """The kernel's counts for a loaded program (zeros where not reported)."""
    got = _prog_info(prog_fd)
    if got is None:
        return ProgramRuns(0, 0, 0)
    info, filled = got

    def counted(name: str) -> int:
        offset: int = getattr(_ProgInfo, name).offset
        return int(getattr(info, name)) if filled >= offset + 8 else 0

    return ProgramRuns(
        runs=counted("run_cnt"), run_ns=counted("run_time_ns"), skipped=counted("recursion_misses")
    )


class _GetFdByIdAttr(ctypes.Structure):
    # union bpf_attr, the BPF_*_GET_FD_BY_ID member
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


def program_name_by_id(prog_id: int) -> str | None:
    """The name the kernel keeps for a loaded program (15 characters at most;
    any process's, by its id as /proc/PID/fdinfo shows it), or None if it is
    gone or has none."""
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, _GetFdByIdAttr(id=prog_id))
    except BpfError:
        return None
    try:
        got = _prog_info(fd)
    finally:
        os.close(fd)
    if got is None:
        return None
    return got[0].name.decode(errors="replace") or None


class _EnableStatsAttr(ctypes.Structure):
    # union bpf_attr, the BPF_ENABLE_STATS member
    _fields_ = [("type", ctypes.c_uint32)]


@contextmanager
def run_stats() -> Iterator[None]:
    """The kernel counts every BPF program's runs and run time while this is
    held (BPF_ENABLE_STATS, Linux 5.8; it adds a little to every run). The
    sysctl kernel.bpf_stats_enabled is neither read nor written, so another
    user of it is not disturbed."""
    fd = _bpf(BPF_ENABLE_STATS, _EnableStatsAttr(type=BPF_STATS_RUN_TIME))
    try:
        yield
    finally:
        os.close(fd)


def load_tp_btf(instructions: bytes, name: str, license: str, btf_id: int) -> int:
    """Load BPF instructions (map references already resolved, as BCC leaves
    them) as a tp_btf program for the tracepoint whose `typedef
    btf_trace_<name>` has BTF type id `btf_id`. Returns the program's fd."""
    code = ctypes.create_string_buffer(instructions, len(instructions))
    license_text = ctypes.create_string_buffer(license.encode())
    attr = _ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_TRACING,
        insn_cnt=len(instructions) // 8,
        insns=ctypes.addressof(code),
        license=ctypes.addressof(license_text),
        prog_name=name.encode()[:15],
        expected_attach_type=BPF_TRACE_RAW_TP,
        attach_btf_id=btf_id,
    )
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except BpfError:
        pass
    # Again with the verifier's log, to say why.
    log = ctypes.create_string_buffer(VERIFIER_LOG_BYTES)
    attr.log_level = 1
    attr.log_size = VERIFIER_LOG_BYTES
    attr.log_buf = ctypes.addressof(log)
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except BpfError as err:
        verifier = log.value.decode(errors="replace")
        raise BpfError(err.errno or 0, err.strerror or "", verifier) from None


def raw_tracepoint_open(prog_fd: int) -> int:
    """Attach a tp_btf program where it was loaded for. Returns the link's fd
    (closing it detaches)."""
    return _bpf(BPF_RAW_TRACEPOINT_OPEN, _RawTracepointAttr(name=0, prog_fd=prog_fd))


# -- maps --------------------------------------------------------------------


class _MapElemAttr(ctypes.Structure):
    # union bpf_attr, the BPF_MAP_*_ELEM member
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # or next_key
        ("flags", ctypes.c_uint64),
    ]


class _MapBatchAttr(ctypes.Structure):
    # union bpf_attr, the BPF_MAP_*_BATCH member
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


def map_lookup(
    map_fd: int, key: ctypes.Array[ctypes.c_char], value: ctypes.Array[ctypes.c_char]
) -> bool:
    """Read `key`'s value into `value`; False if the key is absent."""
    attr = _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    except BpfError as err:
        if err.errno == errnos.ENOENT:
            return False
        raise
    return True


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value_buffer = ctypes.create_string_buffer(value, len(value))
    attr = _MapElemAttr(
        map_fd=map_fd, key=ctypes.addressof(key_buffer), value=ctypes.addressof(value_buffer)
    )
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


def map_delete(map_fd: int, key: bytes) -> bool:
    """Delete `key`; False if it was absent."""
    key_buffer = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key_buffer)))
    except BpfError as err:
        if err.errno == errnos.ENOENT:
            return False
        raise
    return True


def map_keys(map_fd: int, key_size: int) -> list[bytes]:
    """Every key, by BPF_MAP_GET_NEXT_KEY (a snapshot: the map changes meanwhile)."""
    keys: list[bytes] = []
    current = ctypes.create_string_buffer(key_size)
    following = ctypes.create_string_buffer(key_size)
    attr = _MapElemAttr(map_fd=map_fd, key=0, value=ctypes.addressof(following))
    while True:
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except BpfError as err:
            if err.errno == errnos.ENOENT:
                return keys
            raise
        keys.append(following.raw)
        ctypes.memmove(current, following, key_size)
        attr.key = ctypes.addressof(current)


def map_lookup_batch(
    map_fd: int, key_size: int, value_size: int, max_entries: int, delete: bool = False
) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value), read in chunks of up to 4096 by BPF_MAP_LOOKUP_BATCH
    (one call for a small array) and yielded as each chunk comes: a map of
    hundreds of thousands of sockets is never held whole in the daemon's
    heap. With `delete`, BPF_MAP_LOOKUP_AND_DELETE_BATCH: each chunk is
    deleted as it is read, a hash bucket at a time under its lock, so a
    value the program writes meanwhile is read or left, never deleted
    unread. Raises BpfError(EINVAL/ENOTSUPP) on the first next() on kernels
    or map types without it: the caller iterates instead."""
    chunk = max(1, min(max_entries, 4096))
    for raw_keys, raw_values, count in map_chunks(map_fd, key_size, value_size, chunk, delete):
        for index in range(count):
            yield (
                raw_keys[index * key_size : (index + 1) * key_size],
                raw_values[index * value_size : (index + 1) * value_size],
            )


def map_chunks(
    map_fd: int, key_size: int, value_size: int, chunk: int, delete: bool = False
) -> Iterator[tuple[bytes, bytes, int]]:
    """(packed keys, packed values, how many) for each chunk of up to `chunk`
    a batch call gives (see map_lookup_batch): for a caller that hands them
    on to the kernel as they are, with no Python object per entry."""
    command = BPF_MAP_LOOKUP_AND_DELETE_BATCH if delete else BPF_MAP_LOOKUP_BATCH
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    # The position token: a key for arrays, a bucket number for hashes.
    tokens = [ctypes.create_string_buffer(max(8, key_size)) for _ in range(2)]
    first = True
    while True:
        attr = _MapBatchAttr(
            in_batch=0 if first else ctypes.addressof(tokens[0]),
            out_batch=ctypes.addressof(tokens[1]),
            keys=ctypes.addressof(keys),
            values=ctypes.addressof(values),
            count=chunk,
            map_fd=map_fd,
        )
        done = False
        try:
            _bpf(command, attr)
        except BpfError as err:
            if err.errno != errnos.ENOENT:
                raise
            done = True  # the last (maybe empty) batch: attr.count says how many
        yield keys.raw, values.raw, attr.count
        if done:
            return
        ctypes.memmove(tokens[0], tokens[1], len(tokens[1]))
        first = False


@functools.cache
def possible_cpus() -> int:
    """How many CPUs per-CPU maps hold a value for (/sys/devices/system/cpu/possible)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


# -- attaching ---------------------------------------------------------------


def raw_tracepoint_attach(prog_fd: int, tracepoint: str) -> int:
    """Attach a raw tracepoint program to `tracepoint` (its name without the
    category). Returns the attachment's fd (closing it detaches)."""
    name = ctypes.create_string_buffer(tracepoint.encode())
    return _bpf(
        BPF_RAW_TRACEPOINT_OPEN,
        _RawTracepointAttr(name=ctypes.addressof(name), prog_fd=prog_fd),
    )


class _PerfEventAttr(ctypes.Structure):
    # struct perf_event_attr (include/uapi/linux/perf_event.h), PERF_ATTR_SIZE_VER5
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("_reserved", ctypes.c_uint16),
    ]


PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408


def tracepoint_attach(prog_fd: int, tracefs: Path, tracepoint: str) -> int:
    """Attach a tracepoint program to classic tracepoint "category:name", as
    BCC does (a perf event on CPU 0 for every process; the program runs on
    every CPU). Returns the perf event's fd (closing it detaches)."""
    category, name = tracepoint.split(":", 1)
    event_id = int((tracefs / "events" / category / name / "id").read_text())
    number = NR_PERF_EVENT_OPEN.get(platform.machine())
    if number is None:
        raise BpfError(0, f"perf_event_open() syscall number unknown for {platform.machine()}")
    attr = _PerfEventAttr(
        type=PERF_TYPE_TRACEPOINT,
        size=ctypes.sizeof(_PerfEventAttr),
        config=event_id,
        sample_period=1,
        sample_type=PERF_SAMPLE_RAW,
        wakeup_events=1,
    )
    fd = int(_libc().syscall(number, ctypes.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        errno = ctypes.get_errno()
        raise BpfError(errno, os.strerror(errno))
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as err:
        os.close(fd)
        raise BpfError(err.errno or 0, err.strerror or str(err)) from None
    return fd


# -- re-creating a cached program (loader.py) -----------------------------------

BPF_MAP_CREATE = 0


class _MapCreateAttr(ctypes.Structure):
    # union bpf_attr, the BPF_MAP_CREATE member, up to map_name
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


class _MapInfo(ctypes.Structure):
    # struct bpf_map_info (include/uapi/linux/bpf.h), up to name
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


def map_flags(map_fd: int) -> int:
    """The flags a map was created with (BPF_F_NO_PREALLOC, ...)."""
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=map_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return int(info.map_flags)


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, *, flags: int, name: str
) -> int:
    attr = _MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode()[:15],
    )
    return _bpf(BPF_MAP_CREATE, attr)


def prog_load(prog_type: int, instructions: bytes, name: str, license: str) -> int:
    """Load a tracepoint or raw tracepoint program (map references resolved
    to this process's fds). Returns its fd; BpfError with the verifier's log
    if refused."""
    code = ctypes.create_string_buffer(instructions, len(instructions))
    license_text = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(VERIFIER_LOG_BYTES)
    attr = _ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(instructions) // 8,
        insns=ctypes.addressof(code),
        license=ctypes.addressof(license_text),
        prog_name=name.encode()[:15],
    )
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except BpfError:
        pass
    attr.log_level = 1
    attr.log_size = VERIFIER_LOG_BYTES
    attr.log_buf = ctypes.addressof(log)
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except BpfError as err:
        verifier = log.value.decode(errors="replace")
        raise BpfError(err.errno or 0, err.strerror or "", verifier) from None
