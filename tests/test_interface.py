"""The kernel interface is stated once (tcptrace_ebpf/kernel/interface.py): the
header the BPF program includes is the one it generates, and the layouts
Python reads events and address pairs with are what a C compiler makes of
that header. No root needed."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tcptrace_ebpf.kernel import interface
from tcptrace_ebpf.kernel.interface import HEADER_NAME, STRUCTS, Struct, c_header

BPF = Path(__file__).resolve().parent.parent / "bpf"


def test_the_committed_header_is_the_generated_one() -> None:
    committed = (BPF / HEADER_NAME).read_text()
    assert committed == c_header(), (
        f"bpf/{HEADER_NAME} differs from what kernel/interface.py states: run `make interface`"
    )
    assert "do not edit" in committed.splitlines()[3]
    assert f'#include "{HEADER_NAME}"' in (BPF / "tcptrace.h").read_text()


def _compiler() -> str:
    # The kernel headers BCC compiles against depend on gcc (Debian:
    # linux-headers-*-amd64 -> linux-compiler-gcc-*), so set-up installs one.
    for name in ("cc", "gcc", "gcc-12"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no C compiler (cc, gcc): scripts/setup.sh installs one with the kernel headers")


def _c_layouts(tmp_path: Path) -> dict[str, tuple[int, dict[str, tuple[int, int]]]]:
    """sizeof each struct and (offsetof, sizeof) each field, as the C compiler lays them out."""
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "typedef unsigned char u8; typedef unsigned short u16;",
        "typedef unsigned int u32; typedef unsigned long long u64;",
        f'#include "{HEADER_NAME}"',
        "int main(void) {",
    ]
    for struct in STRUCTS:
        lines.append(f'printf("{struct.name} %zu\\n", sizeof(struct {struct.name}));')
        for field in struct.fields:
            lines.append(
                f'printf("{struct.name}.{field.name} %zu %zu\\n", '
                f"offsetof(struct {struct.name}, {field.name}), "
                f"sizeof(((struct {struct.name} *)0)->{field.name}));"
            )
    lines += ["return 0;", "}"]
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines) + "\n")
    binary = tmp_path / "layout"
    subprocess.run(
        [_compiler(), "-Wall", "-Werror", f"-I{BPF}", "-o", str(binary), str(source)], check=True
    )
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    layouts: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}
    for line in output.splitlines():
        name, *numbers = line.split()
        if "." in name:
            struct_name, field_name = name.split(".")
            layouts[struct_name][1][field_name] = (int(numbers[0]), int(numbers[1]))
        else:
            layouts[name] = (int(numbers[0]), {})
    return layouts


def _python_layout(struct: Struct) -> tuple[int, dict[str, tuple[int, int]]]:
    ctype = struct.ctypes_type()
    fields = {
        field.name: (getattr(ctype, field.name).offset, getattr(ctype, field.name).size)
        for field in struct.fields
    }
    return ctypes.sizeof(ctype), fields


def test_python_layouts_are_what_the_c_compiler_makes(tmp_path: Path) -> None:
    c_layouts = _c_layouts(tmp_path)
    for struct in STRUCTS:
        assert _python_layout(struct) == c_layouts[struct.name], struct.name
    # The decoder's struct format reads the same bytes: no padding anywhere.
    size, fields = c_layouts["tt_event"]
    assert interface.EVENT_STRUCT.size == interface.EVENT_SIZE == size == 112
    offset = 0
    for field in interface.TT_EVENT.fields:
        assert fields[field.name][0] == offset, field.name
        offset += fields[field.name][1]


def test_lifecycle_ids_tell_who_was_born_by_a_mark() -> None:
    """A lifecycle id is its CPU's counter with the CPU in the low bits:
    born by a reading of the counters iff its counter had been reached."""
    bits = interface.ID_CPU_BITS
    marks = [5, 9]  # CPU 0 had given 5 ids, CPU 1 nine
    assert interface.born_by((5 << bits) | 0, marks)
    assert not interface.born_by((6 << bits) | 0, marks)
    assert interface.born_by((9 << bits) | 1, marks)
    assert not interface.born_by((10 << bits) | 1, marks)
    assert not interface.born_by((1 << bits) | 2, marks)  # a CPU the reading did not have


def test_loss_causes_are_named_once() -> None:
    """Every counter that records a loss has a cause label, and every cause
    label a counter (or the kernel's own skip count)."""
    lost = {c.name for c in interface.COUNTERS if c.name.startswith("lost_")}
    assert lost <= set(interface.LOST_CAUSES)
    assert set(interface.LOSS_SUMMARY) <= set(interface.LOST_CAUSES)
    assert interface.KERNEL_SKIPPED in interface.LOST_CAUSES
    assert len(set(interface.LOST_CAUSES.values())) == len(interface.LOST_CAUSES)
    assert max(c.index for c in interface.COUNTERS) < interface.COUNTER_SLOTS


# -- one close-kind rule ---------------------------------------------------------
#
# The program's close_kind() is the rule (it is what tcptrace_connections_closed_total
# counts). The lifecycle engine keeps a Python classify_close() because it must
# classify from events alone: trace and lifecycles load the program without its
# metrics (close_kind() is compiled only with them, and putting it on the event
# path would add to the state-change program, near the verifier's limit), and
# recorded streams and replays carry no close kind. So the two are checked to
# agree: the program's C functions, compiled here, on the recorded streams.

STREAMS = Path(__file__).resolve().parent / "data" / "streams"


def _c_function(source: str, name: str) -> str:
    """The text of a `static __always_inline` function of the program."""
    start = source.index(f" {name}(", source.index("static __always_inline"))
    start = source.rindex("static __always_inline", 0, start)
    end = source.index("\n}\n", start) + 3
    return source[start:end]


def _kernel_close_kinds(tmp_path: Path, cases: list[list[int]]) -> list[int]:
    program = (BPF / "lifecycle.h").read_text()
    harness = "\n".join(
        [
            "#include <stdio.h>",
            "#include <stdbool.h>",
            "typedef unsigned char u8; typedef unsigned short u16;",
            "typedef unsigned int u32; typedef unsigned long long u64;",
            # The streams were recorded before the program flagged no_syn: as
            # on a kernel without tcp_sock.segs_out, a missing local port tells.
            "#define HAVE_SEGS_OUT 0",
            '#include "tcptrace.h"',
            _c_function(program, "note_close_path"),
            _c_function(program, "close_kind"),
            "int main(void) {",
            "  unsigned role, last_reset, old, sport, evflags, n, state;",
            '  while (scanf("%u %u %u %u %u %u", &role, &last_reset, &old, &sport, &evflags,'
            " &n) == 6) {",
            "    struct tt_ident id = {0};",
            "    id.role = role; id.last_reset = last_reset;",
            '    while (n--) { scanf("%u", &state); note_close_path(&id, state); }',
            '    printf("%u\\n", close_kind(&id, old, sport, evflags));',
            "  }",
            "  return 0;",
            "}",
        ]
    )
    source = tmp_path / "close_kind.c"
    source.write_text(harness + "\n")
    binary = tmp_path / "close_kind"
    subprocess.run(
        [_compiler(), "-Wall", "-Werror", f"-I{BPF}", "-o", str(binary), str(source)], check=True
    )
    given = "".join(" ".join(str(n) for n in case) + "\n" for case in cases)
    output = subprocess.run(
        [str(binary)], input=given, check=True, capture_output=True, text=True
    ).stdout
    return [int(line) for line in output.split()]


def test_the_lifecycle_engine_closes_as_the_program_does(tmp_path: Path) -> None:
    from tcptrace_ebpf.kernel.interface import Close, EventFlag
    from tcptrace_ebpf.model.events import Event
    from tcptrace_ebpf.model.lifecycle import LifecycleEngine
    from tcptrace_ebpf.model.states import TcpState

    reset = {int(EventFlag.RESET_SENT): 1, int(EventFlag.RESET_RECEIVED): 2}  # TT_RESET_*
    cases: list[list[int]] = []
    expected: list[tuple[str, int, str]] = []
    for events_file in sorted(STREAMS.glob("*.events.jsonl")):
        events = [
            Event.from_json(json.loads(line)) for line in events_file.read_text().splitlines()
        ]
        engine = LifecycleEngine()
        lives = [life for event in events for life in engine.feed(event)] + engine.flush()
        closes = {life.sock: life.close for life in lives if life.close and life.complete}
        by_sock: dict[int, list[Event]] = {}
        for event in events:
            by_sock.setdefault(event.sock, []).append(event)
        for sock, lifecycle in by_sock.items():
            if sock not in closes:
                continue
            path: list[int] = []
            for event in sorted(lifecycle, key=lambda e: e.seq):
                # note_close_path() sees each change's old and new state.
                path += [event.old_state, event.new_state]
                if event.new_state in (TcpState.CLOSE, TcpState.TIME_WAIT):
                    last_reset = next(
                        (code for flag, code in reset.items() if event.flags & flag), 0
                    )
                    cases.append(
                        [event.role, last_reset, event.old_state, event.pair.lport, event.flags,
                         len(path), *path]
                    )  # fmt: skip
                    expected.append((events_file.name, sock, closes[sock]))
                    break
    assert len(cases) >= 20, "the recorded streams hold fewer closes than they did"
    kinds = _kernel_close_kinds(tmp_path, cases)
    disagreements = [
        (where, sock, python, Close(kind).name.lower())
        for (where, sock, python), kind in zip(expected, kinds, strict=True)
        if Close(kind).name.lower() != python
    ]
    assert disagreements == []
    assert {python for _where, _sock, python in expected} >= {
        "active", "passive", "simultaneous", "refused", "timeout", "reset_sent",
        "reset_received", "connect_failed", "listener_closed",
    }  # fmt: skip
