"""Compile and load the BPF program with BCC in a short-lived process.

BCC's compiler (libLLVM, libclang: over 100 MB mapped and touched) is needed
once, at start; a daemon that imported bcc would keep it for life. So the
tracer runs this module as a child process (`python -m tcptrace_ebpf.kernel.loader`):
it compiles the program text it is given on stdin, creates the maps, loads
the programs the plan names (tp_btf variants first, where asked: their
raw fallbacks are compiled, in a second compile, only if one is refused), and sends
back, over a unix socket (SCM_RIGHTS), every map's and program's file
descriptor, with each map's type, sizes and key/value layouts as the
compiler described them. Then it exits; the maps and programs live on in the
descriptors the caller holds. Attaching stays with the caller (it seeds maps
first), through bpfsys.

The compile takes seconds (tens under emulation), so the loader also writes
what it loaded to a cache (`$CACHE_DIRECTORY`, else /var/cache/tcptrace-ebpf):
each map's type, sizes, flags and layouts, and each program's instructions
with the places that refer to a map. The next start with the same key (the
program text, compiler flags and plan, the kernel's release, build and BTF,
BCC's version, the number of CPUs) re-creates the maps and loads the same
instructions itself, with no compiler and no child process; the kernel's
verifier checks them as always. A cache entry that does not match its key,
fails its checksum or is refused is removed and the program compiled again.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import bpfsys
from .maps import MapInfo

log = logging.getLogger(__name__)

BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_TRACING = 26
# SCM_MAX_FD: the most descriptors one message may carry.
MAX_FDS_PER_MESSAGE = 250
REPLY_BYTES = 1 << 20
# An error is one line for the user. One SOCK_SEQPACKET message must fit the
# socket's send buffer (net.core.wmem_default, 208 KiB on Debian), and a
# compiler's line can be longer (it quotes the identifier it chokes on), so
# the loader cuts it to this many characters.
ERROR_CHARS = 2000
CACHE_FORMAT = 1
CACHE_DEFAULT = Path("/var/cache/tcptrace-ebpf")
# Entries kept, the least recently used removed first: one per kernel and set
# of options in use, and every `trace --pid N` is a set of its own (the pid is
# compiled in); a few tens of those must not evict the daemon's. 30-110 KB each.
CACHE_KEEP = 64
# BPF_LD | BPF_IMM | BPF_DW with src_reg BPF_PSEUDO_MAP_FD: "load this map's address".
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1


@dataclass(frozen=True)
class ProgramRequest:
    """One program to load. `key` names it for the caller (a tracepoint
    "category:name", or a sweeper's name). For a tracepoint, the loader
    tries btf_<name> as tp_btf if `btf_id` is given, else (or when the
    verifier refuses it) raw_<name> if `raw`, else on_<name>."""

    key: str
    name: str
    raw: bool = False
    btf_id: int | None = None
    sweeper: bool = False


@dataclass(frozen=True)
class LoadedProgram:
    key: str
    function: str
    kind: str  # "btf", "raw", "classic" or "sweeper"


@dataclass
class Loaded:
    """What the loader handed over; the caller owns (and must close) every fd."""

    maps: dict[str, tuple[int, MapInfo]]
    programs: dict[str, tuple[int, LoadedProgram]]
    warnings: list[str]

    def close(self) -> None:
        for fd, _ in [*self.programs.values(), *self.maps.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.programs.clear()
        self.maps.clear()


def cache_dir() -> Path | None:
    """Where compiled programs are cached: systemd's CacheDirectory=, else
    /var/cache/tcptrace-ebpf; None when TCPTRACE_EBPF_NO_CACHE is set."""
    if os.environ.get("TCPTRACE_EBPF_NO_CACHE"):
        return None
    return Path(os.environ.get("CACHE_DIRECTORY", "").split(":")[0] or CACHE_DEFAULT)


def _safe_dir(path: Path, create: bool) -> bool:
    """Only a directory root owns and nobody else can write: what is in it
    gets loaded into the kernel."""
    if create:
        with contextlib.suppress(OSError):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        info = path.stat()
    except OSError:
        return False
    return info.st_uid == 0 and not info.st_mode & 0o022


def _bcc_version() -> str:
    """BCC's version, read without importing it (that would map the compiler)."""
    import importlib.util

    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        return "none"
    try:
        return (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return "unknown"


def _included_headers(cflags: list[str]) -> dict[str, str]:
    """The headers in the program's include directories (-I), by name: the
    program text includes them, so they are part of what it compiles to."""
    headers = {}
    for flag in cflags:
        if flag.startswith("-I"):
            for path in sorted(Path(flag[2:]).glob("*.h")):
                headers[str(path)] = path.read_text()
    return headers


def cache_key(text: str, cflags: list[str], requests: list[ProgramRequest]) -> str:
    digest = hashlib.sha256()
    try:
        digest.update(Path("/sys/kernel/btf/vmlinux").read_bytes())
    except OSError:
        digest.update(b"no btf")
    uname = os.uname()
    digest.update(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "text": text,
                "headers": _included_headers(cflags),
                "cflags": cflags,
                "programs": [asdict(item) for item in requests],
                "release": uname.release,
                "build": uname.version,
                "machine": uname.machine,
                "bcc": _bcc_version(),
                "cpus": bpfsys.possible_cpus(),
            },
            sort_keys=True,
        ).encode()
    )
    return digest.hexdigest()


def _entry_digest(entry: dict[str, Any]) -> str:
    body = {name: value for name, value in entry.items() if name != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _load_cached(path: Path, key: str) -> Loaded | None:
    """Re-create the maps and load the programs of a cache entry; None (and
    the entry removed) if it is missing, not this key's, damaged or refused."""
    if not _safe_dir(path.parent, create=False):
        return None
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.debug("cache entry %s unreadable: %s", path, err)
        path.unlink(missing_ok=True)
        return None
    if entry.get("key") != key or entry.get("digest") != _entry_digest(entry):
        log.debug("cache entry %s does not match its key or checksum: removed", path)
        path.unlink(missing_ok=True)
        return None
    loaded = Loaded(maps={}, programs={}, warnings=list(entry.get("warnings", [])))
    try:
        for item in entry["maps"]:
            flags = item.pop("flags")
            info = MapInfo(**item)
            fd = bpfsys.map_create(
                info.map_type,
                info.key_size,
                info.value_size,
                info.max_entries,
                flags=flags,
                name=info.name,
            )
            loaded.maps[info.name] = (fd, info)
        for item in entry["programs"]:
            code = bytearray(base64.b64decode(item["insns"]))
            for index, map_name in item["relocs"]:
                fd = loaded.maps[map_name][0]
                code[index * 8 + 4 : index * 8 + 8] = fd.to_bytes(4, "little", signed=True)
            program = LoadedProgram(item["key"], item["function"], item["kind"])
            if program.kind == "btf":
                fd = bpfsys.load_tp_btf(bytes(code), program.function, "GPL", item["btf_id"])
            else:
                fd = bpfsys.prog_load(item["prog_type"], bytes(code), program.function, "GPL")
            loaded.programs[program.key] = (fd, program)
    except (bpfsys.BpfError, KeyError, TypeError, ValueError) as err:
        loaded.close()
        log.warning("cached BPF program not loaded (%s): compiling it again", err)
        path.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept when pruning
    log.debug("BPF program loaded from the cache (%s)", path)
    return loaded


def _prune(directory: Path) -> None:
    entries = sorted(directory.glob("*.json"), key=lambda entry: entry.stat().st_mtime)
    for old in entries[:-CACHE_KEEP]:
        old.unlink(missing_ok=True)


def load(
    text: str, cflags: list[str], requests: list[ProgramRequest], *, use_cache: bool = True
) -> Loaded:
    """The program loaded: from the cache if it holds this very program for
    this very kernel (and `use_cache`), else compiled by the loader process,
    which caches it."""
    directory = cache_dir()
    cache_file: Path | None = None
    if directory is not None:
        cache_file = directory / f"{cache_key(text, cflags, requests)}.json"
        cached = _load_cached(cache_file, cache_file.stem) if use_cache else None
        if cached is not None:
            return cached
    return _run_loader(text, cflags, requests, cache_file)


def _run_loader(
    text: str, cflags: list[str], requests: list[ProgramRequest], cache_file: Path | None
) -> Loaded:
    """Run the loader process and take what it hands over."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = json.dumps(
        {
            "text": text,
            "cflags": cflags,
            "programs": [asdict(item) for item in requests],
            "cache_file": str(cache_file) if cache_file is not None else None,
        }
    )
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    env["TCPTRACE_LOADER_FD"] = str(child.fileno())
    env["TCPTRACE_LOADER_DEBUG"] = "1" if log.isEnabledFor(logging.DEBUG) else ""
    try:
        with child:
            proc = subprocess.Popen(
                # The caller's warning options (python -W) hold in the loader too.
                [
                    sys.executable,
                    *(f"-W{option}" for option in sys.warnoptions),
                    "-m",
                    "tcptrace_ebpf.kernel.loader",
                ],
                stdin=subprocess.PIPE,
                pass_fds=[child.fileno()],
                env=env,
            )
        assert proc.stdin is not None
        # A loader that died at once is reported below, from its exit status.
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            proc.stdin.write(request.encode())
        fds: list[int] = []
        header: dict[str, Any] = {}
        try:
            while True:
                message, received, _flags, _addr = socket.recv_fds(
                    parent, REPLY_BYTES, MAX_FDS_PER_MESSAGE
                )
                if not message:  # the loader exited without a word
                    break
                fds.extend(received)
                part = json.loads(message)
                if part.get("more"):
                    continue
                header = part
                break
        except BaseException:
            proc.kill()  # interrupted: the compile is of no use any more
            for fd in fds:
                os.close(fd)
            raise
        finally:
            proc.wait()
    finally:
        parent.close()
    if "error" in header or not header:
        for fd in fds:
            os.close(fd)
        raise UserError(
            header.get("error") or f"the BPF loader process failed (exit status {proc.returncode})"
        )
    maps_info = [MapInfo(**item) for item in header["maps"]]
    programs_info = [LoadedProgram(**item) for item in header["programs"]]
    if len(fds) != len(maps_info) + len(programs_info):
        for fd in fds:
            os.close(fd)
        raise UserError("the BPF loader process handed over fewer descriptors than it described")
    maps = {info.name: (fd, info) for fd, info in zip(fds, maps_info, strict=False)}
    programs = {
        info.key: (fd, info) for fd, info in zip(fds[len(maps_info) :], programs_info, strict=True)
    }
    return Loaded(maps=maps, programs=programs, warnings=list(header.get("warnings", [])))


# -- the child -------------------------------------------------------------------


def one_line_error(message: str) -> str:
    """`message` as the one line the loader sends: its lines joined, cut in
    the middle to ERROR_CHARS (the end holds the hint on what to do)."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    if len(line) > ERROR_CHARS:
        cut = ERROR_CHARS // 2
        line = f"{line[:cut]} [... {len(line) - 2 * cut} characters ...] {line[-cut:]}"
    return line


def _table_infos(bpf: Any) -> list[tuple[int, MapInfo]]:
    lib = bpf_lib()
    result = []
    for index in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, index)
        map_id = lib.bpf_table_id(bpf.module, name)
        fd = lib.bpf_table_fd(bpf.module, name)
        if fd < 0:
            continue
        result.append(
            (
                fd,
                MapInfo(
                    name=name.decode(),
                    map_type=int(lib.bpf_table_type_id(bpf.module, map_id)),
                    key_size=int(lib.bpf_table_key_size_id(bpf.module, map_id)),
                    value_size=int(lib.bpf_table_leaf_size_id(bpf.module, map_id)),
                    max_entries=int(lib.bpf_table_max_entries_id(bpf.module, map_id)),
                    key_desc=json.loads(lib.bpf_table_key_desc(bpf.module, name) or b'"int"'),
                    value_desc=json.loads(lib.bpf_table_leaf_desc(bpf.module, name) or b'"int"'),
                ),
            )
        )
    return result


def bpf_lib() -> Any:
    from bcc.libbcc import lib

    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    for function in (lib.bpf_table_key_size_id, lib.bpf_table_leaf_size_id):
        function.restype = ctypes.c_size_t
        function.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    return lib


class _FallbacksNeeded(Exception):
    """A program compiled without its fallbacks (COMPILE_FALLBACKS 0) needs one."""


def _load_programs(
    bpf: Any, requests: list[ProgramRequest], warnings: list[str], *, fallbacks: bool
) -> list[tuple[int, LoadedProgram]]:
    """Load what `requests` name from the compiled `bpf`. Without
    `fallbacks` compiled in, a refused tp_btf program (or a program not
    compiled) raises _FallbacksNeeded, with nothing left loaded."""
    from .probe import _capture_stderr, _first_error, _verifier_reason

    loaded: list[tuple[int, LoadedProgram]] = []

    def fallbacks_needed(why: str) -> _FallbacksNeeded:
        for fd, _ in loaded:
            os.close(fd)
        return _FallbacksNeeded(why)

    for request in requests:
        if request.btf_id is not None:
            function = f"btf_{request.name}"
            try:
                # The license of bpf/tcptrace.bpf.c (GPL helpers need it).
                code = bpf.dump_func(function.encode())
                fd = bpfsys.load_tp_btf(code, function, "GPL", request.btf_id)
                loaded.append((fd, LoadedProgram(request.key, function, "btf")))
                continue
            except bpfsys.BpfError as err:
                if not fallbacks:
                    raise fallbacks_needed(f"{function} refused ({err.strerror})") from None
                warnings.append(
                    f"{request.key}: BTF-typed program refused ({err.strerror}), using a raw "
                    f"tracepoint: {_verifier_reason(err.log)}"
                )
        if request.sweeper:
            function, kind, prog_type = request.name, "sweeper", BPF_PROG_TYPE_RAW_TRACEPOINT
        elif request.raw:
            function, kind, prog_type = f"raw_{request.name}", "raw", BPF_PROG_TYPE_RAW_TRACEPOINT
        else:
            function, kind, prog_type = f"on_{request.name}", "classic", BPF_PROG_TYPE_TRACEPOINT
        if not fallbacks and not bpf_lib().bpf_function_start(bpf.module, function.encode()):
            raise fallbacks_needed(f"{function} not compiled")
        with _capture_stderr() as output:
            try:
                fd = int(bpf.load_func(function.encode(), prog_type).fd)
            except Exception as err:
                raise UserError(
                    f"could not load {function}: {_first_error(output()) or err}"
                ) from None
        # BCC closes its descriptors at exit; ours must outlive it.
        loaded.append((os.dup(fd), LoadedProgram(request.key, function, kind)))
    return loaded


def _compile(bcc: Any, text: str, cflags: list[str]) -> Any:
    from .probe import _capture_stderr, _first_error

    with _capture_stderr() as output:
        try:
            # BCC takes bytes (a str costs a DeprecationWarning that quotes the whole program).
            return bcc.BPF(text=text.encode(), cflags=cflags)
        except Exception:
            raise UserError(
                f"the BPF program did not compile: {_first_error(output())} "
                "(run 'tcptrace-ebpf doctor'; --debug shows the compiler output)"
            ) from None


def _write_cache(  # noqa: PLR0917 (one call site, all parts of one entry)
    path: Path,
    bpf: Any,
    tables: list[tuple[int, MapInfo]],
    programs: list[tuple[int, LoadedProgram]],
    requests: list[ProgramRequest],
    warnings: list[str],
) -> None:
    if not _safe_dir(path.parent, create=True):
        return
    by_fd = {fd: info.name for fd, info in tables}
    btf_ids = {request.key: request.btf_id for request in requests}
    entry_programs = []
    for _fd, program in programs:
        code = bpf.dump_func(program.function.encode())
        relocs = []
        for index in range(len(code) // 8):
            if code[index * 8] == LD_IMM64 and code[index * 8 + 1] >> 4 == PSEUDO_MAP_FD:
                imm = int.from_bytes(code[index * 8 + 4 : index * 8 + 8], "little", signed=True)
                relocs.append([index, by_fd[imm]])
        entry_programs.append(
            {
                **asdict(program),
                "prog_type": BPF_PROG_TYPE_RAW_TRACEPOINT
                if program.kind in ("raw", "sweeper")
                else BPF_PROG_TYPE_TRACEPOINT,
                "btf_id": btf_ids.get(program.key),
                "insns": base64.b64encode(code).decode(),
                "relocs": relocs,
            }
        )
    entry: dict[str, Any] = {
        "key": path.stem,
        "maps": [{**asdict(info), "flags": bpfsys.map_flags(fd)} for fd, info in tables],
        "programs": entry_programs,
        "warnings": warnings,
    }
    entry["digest"] = _entry_digest(entry)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(entry, out)
    os.replace(temporary, path)
    _prune(path.parent)


def _child() -> int:
    from .probe import import_bcc

    # Ctrl-C reaches the whole process group: the caller decides (it kills
    # this process if it gives up), so no traceback from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = socket.socket(fileno=int(os.environ["TCPTRACE_LOADER_FD"]))
    if os.environ.get("TCPTRACE_LOADER_DEBUG"):
        logging.basicConfig(level=logging.DEBUG, format="tcptrace-ebpf loader: %(message)s")

    def reply(header: dict[str, Any], fds: list[int]) -> None:
        if "error" in header:
            header = {"error": one_line_error(header["error"])}
        for start in range(0, len(fds), MAX_FDS_PER_MESSAGE):
            chunk = fds[start : start + MAX_FDS_PER_MESSAGE]
            if start + MAX_FDS_PER_MESSAGE < len(fds):
                socket.send_fds(channel, [b'{"more": true}'], chunk)
            else:
                socket.send_fds(channel, [json.dumps(header).encode()], chunk)
        if not fds:
            channel.send(json.dumps(header).encode())

    try:
        request = json.loads(sys.stdin.buffer.read())
        bcc = import_bcc()
        text, cflags = request["text"], request["cflags"]
        warnings: list[str] = []
        requests = [ProgramRequest(**item) for item in request["programs"]]
        # The fallbacks of tp_btf programs are compiled only if one is refused
        # (COMPILE_FALLBACKS in bpf/tcptrace.bpf.c).
        fallbacks = all(item.btf_id is None for item in requests)
        while True:
            bpf = _compile(bcc, text, [*cflags, f"-DCOMPILE_FALLBACKS={int(fallbacks)}"])
            try:
                programs = _load_programs(bpf, requests, warnings, fallbacks=fallbacks)
                break
            except _FallbacksNeeded as why:
                logging.getLogger(__name__).debug("compiling the fallbacks: %s", why)
                bpf.cleanup()
                fallbacks = True
        tables = _table_infos(bpf)
        fds = [os.dup(fd) for fd, _ in tables] + [fd for fd, _ in programs]
        if request.get("cache_file"):
            try:
                _write_cache(Path(request["cache_file"]), bpf, tables, programs, requests, warnings)
            except (OSError, bpfsys.BpfError) as err:  # only the next start is slower
                logging.getLogger(__name__).debug("not cached: %s", err)
        reply(
            {
                "maps": [asdict(info) for _, info in tables],
                "programs": [asdict(info) for _, info in programs],
                "warnings": warnings,
            },
            fds,
        )
    except UserError as err:
        reply({"error": str(err)}, [])
        return 1
    except Exception as err:  # reported by the caller as one line
        reply({"error": f"the BPF loader failed: {type(err).__name__}: {err}"}, [])
        return 1
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(_child())
