"""The few bpf() system calls BCC does not make for us.

BCC compiles the program and creates its maps; these run a program on
demand (BPF_PROG_TEST_RUN), read a program's skipped-run count
(BPF_OBJ_GET_INFO_BY_FD), and load and attach BTF-typed raw tracepoint
(tp_btf) programs, which BCC 0.26 cannot load: it gives every tracing
program the attach type of its name prefix, and none means tp_btf.
"""

from __future__ import annotations

import ctypes
import os
import platform

NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}

# enum bpf_cmd, bpf_prog_type, bpf_attach_type (include/uapi/linux/bpf.h)
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_RAW_TP = 23

VERIFIER_LOG_BYTES = 1 << 22


class BpfError(OSError):
    """A bpf() call failed; `log` holds the verifier's words for a refused program."""

    def __init__(self, errno: int, message: str, log: str = "") -> None:
        super().__init__(errno, message)
        self.log = log


def _bpf(command: int, attr: ctypes.Structure) -> int:
    number = NR_BPF.get(platform.machine())
    if number is None:
        raise BpfError(0, f"bpf() syscall number unknown for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = int(libc.syscall(number, command, ctypes.byref(attr), ctypes.sizeof(attr)))
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


def prog_test_run(prog_fd: int) -> None:
    """Run a loaded raw_tracepoint program once, now (BPF_PROG_TEST_RUN)."""
    ctx = (ctypes.c_uint64 * 1)()
    attr = _TestRunAttr(prog_fd=prog_fd)
    attr.ctx_in = ctypes.addressof(ctx)
    attr.ctx_size_in = ctypes.sizeof(ctx)
    _bpf(BPF_PROG_TEST_RUN, attr)


def recursion_misses(prog_fd: int) -> int:
    """The kernel's count of skipped runs of a program (0 where not reported)."""
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=prog_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    try:
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    except BpfError:
        return 0
    # Older kernels fill less of the struct: then the field is not there.
    if attr.info_len < _ProgInfo.recursion_misses.offset + 8:
        return 0
    return int(info.recursion_misses)


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
