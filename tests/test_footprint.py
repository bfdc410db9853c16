"""The daemon's footprint: BCC's compiler runs in a short-lived loader process,
so a running `serve` has no libLLVM/libclang mapped and stays small, while it
still reads the kernel's maps right."""

from __future__ import annotations

import ctypes
import json
import os
import socket
from pathlib import Path

import pytest
from support import Peer, free_port, requires_root, wait_for
from test_serve import scrape, serving, value

from tcptrace_ebpf.errors import UserError
from tcptrace_ebpf.kernel import bpfsys, loader, maps
from tcptrace_ebpf.kernel.features import detect_features

# Issue 17: a node agent stays within tens of megabytes.
MAX_RSS_MB = 50
COMPILER_LIBRARIES = ("libLLVM", "libclang", "libbcc")


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def children_commands(pid: int) -> list[str]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:  # gone meanwhile
                continue
            found.append(command.replace(b"\0", b" ").decode(errors="replace"))
    return found


def serve_pid(run: object) -> int:
    """`serve` runs as `python -m tcptrace_ebpf serve`: the process itself."""
    return int(run.proc.pid)  # type: ignore[attr-defined]


@requires_root
def test_serve_keeps_no_compiler_and_stays_small() -> None:
    with serving("--api.socket", "") as (run, port):
        pid = serve_pid(run)
        mapped = Path(f"/proc/{pid}/maps").read_text()
        assert [name for name in COMPILER_LIBRARIES if name in mapped] == []
        assert [cmd for cmd in children_commands(pid) if "tcptrace_ebpf.kernel.loader" in cmd] == []
        # It still reads the kernel's maps: connections made now are counted.
        before = value(scrape(port), "tcptrace_connections_opened_total", role="client")
        target = free_port()
        with Peer() as server:
            server.cmd(f"listen 127.0.0.1 {target}")
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", target), timeout=5):
                    server.cmd("accept")
                    server.cmd("close")
        wait_for(
            lambda: (
                value(scrape(port), "tcptrace_connections_opened_total", role="client")
                >= before + 5
            )
        )
        for _ in range(3):
            scrape(port)
        rss = vm_rss_mb(pid)
        assert rss <= MAX_RSS_MB, f"serve uses {rss:.1f} MB (bound {MAX_RSS_MB} MB)"


@requires_root
def test_loader_reports_a_compile_error_in_one_line() -> None:
    with pytest.raises(UserError, match=r"did not compile: .*error") as caught:
        loader.load("int broken(void *ctx) { return undefined_thing; }", [], [])
    assert "\n" not in str(caught.value)
    assert "Traceback" not in str(caught.value)


@requires_root
def test_loader_reports_an_error_longer_than_its_socket_takes_in_one_line() -> None:
    """A compiler's error line can quote 300,000 characters: more than one
    message of the loader's socket may carry (net.core.wmem_default). The
    error still arrives, cut, as one line."""
    quoted = "x" * 300_000
    with pytest.raises(UserError, match=r"did not compile: .*error: x+ \[\.\.\. ") as caught:
        loader.load(f"#error {quoted}\nint broken(void *ctx) {{ return 0; }}", [], [])
    message = str(caught.value)
    assert "\n" not in message
    assert len(message) <= loader.ERROR_CHARS + 100
    assert message.endswith("--debug shows the compiler output)")


def test_an_error_is_cut_in_the_middle_to_one_line() -> None:
    assert loader.one_line_error("  first\n\n  second  \n") == "first second"
    cut = loader.one_line_error("head " + "y" * 10_000 + " tail")
    assert cut.startswith("head ")
    assert cut.endswith(" tail")
    assert "characters ...]" in cut
    assert len(cut) <= loader.ERROR_CHARS + 50


@requires_root
def test_loader_hands_over_maps_with_their_layouts() -> None:
    """A map the loader created is read and written through its fd with the
    layout the compiler described, without BCC in this process."""
    text = """
struct pair { u32 a; u16 b[3]; };
BPF_HASH(pairs, u64, struct pair, 16);
BPF_PERCPU_ARRAY(per_cpu, u64, 4);
int noop(void *ctx) { return 0; }
"""
    loaded = loader.load(text, [], [loader.ProgramRequest(key="noop", name="noop", sweeper=True)])
    try:
        tables = {name: maps.Table(fd, info) for name, (fd, info) in loaded.maps.items()}
        assert "noop" in loaded.programs
        pairs = tables["pairs"]
        value_ = pairs.Leaf()
        value_.a = 7
        value_.b[2] = 9
        pairs[pairs.Key(42)] = value_
        assert [(int(key.value), got.a, list(got.b)) for key, got in pairs.items()] == [
            (42, 7, [0, 0, 9])
        ]
        del pairs[42]
        assert pairs.items() == []
        for number in (1, 2, 3):
            value_.a = number
            pairs[pairs.Key(number)] = value_
        assert sorted((int(key.value), got.a) for key, got in pairs.pop_all()) == [
            (1, 1),
            (2, 2),
            (3, 3),
        ]
        assert pairs.items() == []
        assert list(pairs.pop_all()) == []
        # This kernel reads and deletes a chunk per call (no key-by-key fallback).
        pairs[pairs.Key(4)] = value_
        chunk = bpfsys.map_lookup_batch(
            pairs.fd, pairs.info.key_size, pairs.info.value_size, 16, delete=True
        )
        assert [key for key, _value in chunk] == [bytes(pairs.Key(4))]
        assert pairs.items() == []
        per_cpu = tables["per_cpu"]
        per_cpu[ctypes.c_int(3)] = ctypes.c_uint64(5)
        rows = [sum(values) for _key, values in per_cpu.items_lookup_batch()]
        assert rows == [0, 0, 0, 5 * per_cpu.cpus]
    finally:
        loaded.close()


@requires_root
@pytest.mark.parametrize("refused", [False, True], ids=["accepted", "refused"])
def test_fallbacks_are_compiled_only_for_a_refused_btf_program(
    refused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracepoint's raw program, the fallback of its tp_btf one, is left
    out of the compile (COMPILE_FALLBACKS 0) and compiled, in a second
    compile, only when the kernel refuses the tp_btf program (here: loaded
    for BTF type 1, no tracepoint's typedef)."""
    monkeypatch.setenv("TCPTRACE_EBPF_NO_CACHE", "1")
    btf_id = 1 if refused else detect_features().btf_trace_ids["timer_start"]
    text = """
int btf_timer_start(u64 *ctx) { return 0; }
#if COMPILE_FALLBACKS
BPF_ARRAY(fallbacks_compiled, u32, 1);
int raw_timer_start(struct bpf_raw_tracepoint_args *ctx) {
    int zero = 0;
    fallbacks_compiled.lookup(&zero);
    return 0;
}
#endif
"""
    request = loader.ProgramRequest(
        key="timer:timer_start", name="timer_start", raw=True, btf_id=btf_id
    )
    loaded = loader.load(text, [], [request])
    try:
        kind = loaded.programs["timer:timer_start"][1].kind
        assert (kind, "fallbacks_compiled" in loaded.maps) == (
            ("raw", True) if refused else ("btf", False)
        )
        assert any("BTF-typed program refused" in line for line in loaded.warnings) == refused
    finally:
        loaded.close()


def _program_for_cache() -> tuple[str, list[loader.ProgramRequest]]:
    text = """
BPF_ARRAY(hits, u64, 1);
int sweep_count(struct bpf_raw_tracepoint_args *ctx) {
    int zero = 0;
    u64 *value = hits.lookup(&zero);
    if (value)
        __sync_fetch_and_add(value, 1);
    return 0;
}
"""
    return text, [loader.ProgramRequest(key="count", name="sweep_count", sweeper=True)]


def _run_and_count(loaded: loader.Loaded) -> int:
    """Run the program once through its fd; what it counted, through the map's."""
    from tcptrace_ebpf.kernel import bpfsys

    bpfsys.prog_test_run(loaded.programs["count"][0])
    fd, info = loaded.maps["hits"]
    return int(maps.Table(fd, info)[ctypes.c_int(0)].value)


@requires_root
def test_cached_program_is_loaded_without_the_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("TCPTRACE_EBPF_NO_CACHE", raising=False)
    text, plan = _program_for_cache()
    first = loader.load(text, [], plan)
    try:
        assert _run_and_count(first) == 1
    finally:
        first.close()
    entries = list(tmp_path.glob("*.json"))
    assert len(entries) == 1

    def no_compiler(*_args: object) -> loader.Loaded:
        raise AssertionError("compiled again")

    monkeypatch.setattr(loader, "_run_loader", no_compiler)
    again = loader.load(text, [], plan)
    try:
        # Fresh maps, the same program: it counts from zero again.
        assert _run_and_count(again) == 1
    finally:
        again.close()


@requires_root
def test_stale_or_damaged_cache_entries_are_never_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("TCPTRACE_EBPF_NO_CACHE", raising=False)
    text, plan = _program_for_cache()
    loader.load(text, [], plan).close()
    (entry,) = tmp_path.glob("*.json")
    # Another program text is another key: compiled, not the cached one.
    assert loader.cache_key(text + "\n", [], plan) != entry.stem
    # A damaged entry (instructions changed, checksum not) is removed.
    data = json.loads(entry.read_text())
    data["programs"][0]["insns"] = data["programs"][0]["insns"][::-1]
    entry.write_text(json.dumps(data))
    compiled = []
    real = loader._run_loader

    def counting(*args: object) -> loader.Loaded:
        compiled.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(loader, "_run_loader", counting)
    again = loader.load(text, [], plan)
    try:
        assert compiled == [1]
        assert _run_and_count(again) == 1
    finally:
        again.close()
    # An entry under another key's name (a stale kernel's, say) is not used either.
    (rewritten,) = tmp_path.glob("*.json")
    assert json.loads(rewritten.read_text())["digest"]
    other = tmp_path / f"{loader.cache_key(text, ['-DX'], plan)}.json"
    rewritten.rename(other)
    loader.load(text, ["-DX"], plan).close()
    assert compiled == [1, 1]


def test_the_cache_keeps_the_entries_used_last(tmp_path: Path) -> None:
    """Pruning removes the least recently used entries (a load from the cache
    touches its entry), not the oldest written: a daemon's entry, used at
    every restart, outlives any number of one-off traces."""
    count = loader.CACHE_KEEP + 5
    for index in range(count):
        entry = tmp_path / f"{index:064x}.json"
        entry.write_text("{}")
        os.utime(entry, (1_000_000 + index, 1_000_000 + index))
    daemon = tmp_path / f"{0:064x}.json"  # written first, used last
    os.utime(daemon, (2_000_000, 2_000_000))
    loader._prune(tmp_path)
    kept = sorted(path.name for path in tmp_path.glob("*.json"))
    assert len(kept) == loader.CACHE_KEEP
    assert daemon.name in kept
    assert f"{1:064x}.json" not in kept
    assert f"{count - 1:064x}.json" in kept


@requires_root
def test_maps_are_read_a_chunk_at_a_time() -> None:
    """A hash map larger than one batch (4096) is read whole, each entry
    once, and the reading starts before it is all read: the daemon never
    holds a map of hundreds of thousands of sockets at once."""
    text = """
BPF_HASH(many, u64, u64, 20000);
int noop(void *ctx) { return 0; }
"""
    loaded = loader.load(text, [], [loader.ProgramRequest(key="noop", name="noop", sweeper=True)])
    try:
        fd, info = loaded.maps["many"]
        table = maps.Table(fd, info)
        assert list(table.items_lookup_batch()) == []
        from tcptrace_ebpf.kernel import bpfsys

        for key in range(10_000):
            bpfsys.map_update(fd, key.to_bytes(8, "little"), (key * 3).to_bytes(8, "little"))
        pairs = bpfsys.map_lookup_batch(fd, 8, 8, info.max_entries)
        first = [next(pairs) for _ in range(10)]
        assert len(first) == 10
        read = {int(key.value): int(value.value) for key, value in table.items_lookup_batch()}
        assert read == {key: key * 3 for key in range(10_000)}
    finally:
        loaded.close()


@requires_root
def test_a_program_is_named_by_its_id_as_the_kernel_keeps_it() -> None:
    """The benchmarks name another process's programs from /proc/PID/fdinfo's
    prog_id; the name is the kernel's (15 characters), and a program that is
    gone has none."""
    # BPF_PROG_TYPE_SOCKET_FILTER: r0 = 0; exit.
    fd = bpfsys.prog_load(
        1, bytes.fromhex("b7000000000000009500000000000000"), "tt_name_probe_long", "GPL"
    )
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
        )
        prog_id = int(fields["prog_id"])
        assert bpfsys.program_name_by_id(prog_id) == "tt_name_probe_l"
    finally:
        os.close(fd)
    # Freed once its last reference goes (after an RCU grace period).
    wait_for(lambda: bpfsys.program_name_by_id(prog_id) is None, timeout=10)
