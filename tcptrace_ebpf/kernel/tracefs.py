"""Tracepoint formats from tracefs, and C structs laid out from them.

BCC's ``TRACEPOINT_PROBE`` builds the argument struct from the format file
but copies the field *types* too, so a field of a type the (mismatched)
kernel headers do not define breaks compilation; 6.18's ``tcp_send_reset``
has an ``enum sk_rst_reason`` field that the 6.1 headers lack. We generate
the structs ourselves: only the fields we read, typed by their size, at the
offsets the running kernel reports, with padding in between.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

_FIELD_RE = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>\d+);"
)


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    c_type: str  # as declared in the format file, e.g. "__u8 saddr[4]" -> "__u8"
    offset: int
    size: int
    signed: bool
    is_array: bool


@dataclass(frozen=True, slots=True)
class TracepointFormat:
    category: str
    event: str
    fields: dict[str, Field]

    def has(self, *names: str) -> bool:
        return all(name in self.fields for name in names)


def parse_format(category: str, event: str, text: str) -> TracepointFormat:
    """Parse the text of a tracefs ``format`` file."""
    fields: dict[str, Field] = {}
    for line in text.splitlines():
        match = _FIELD_RE.match(line)
        if not match:
            continue
        decl = match.group("decl").strip()
        # "const void * skaddr", "__u8 saddr[4]", "enum sk_rst_reason reason"
        name_part = decl.split()[-1].lstrip("*")
        name = name_part.split("[", 1)[0]
        c_type = decl[: decl.rfind(decl.split()[-1])].strip()
        fields[name] = Field(
            name=name,
            c_type=c_type,
            offset=int(match.group("offset")),
            size=int(match.group("size")),
            signed=match.group("signed") == "1",
            is_array="[" in decl,
        )
    return TracepointFormat(category=category, event=event, fields=fields)


def find_tracefs() -> Path | None:
    """The mounted tracefs, or None."""
    for root in TRACEFS_CANDIDATES:
        if (root / "events").is_dir():
            return root
    return None


def ensure_tracefs() -> tuple[Path, bool]:
    """Return the tracefs root, mounting it at /sys/kernel/tracing if needed.

    BCC reads tracepoint ids and formats from tracefs; some hosts boot
    without it mounted. Returns (root, mounted_by_us).
    """
    root = find_tracefs()
    if root is not None:
        return root, False
    target = TRACEFS_CANDIDATES[0]
    if os.geteuid() != 0:
        raise UserError(
            f"tracefs is not mounted and only root can mount it: run "
            f"'mount -t tracefs tracefs {target}' as root"
        )
    try:
        subprocess.run(
            ["mount", "-t", "tracefs", "tracefs", str(target)],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise UserError(
            f"tracefs is not mounted and mounting it at {target} failed ({detail.strip()}): "
            f"mount it with 'mount -t tracefs tracefs {target}'"
        ) from None
    root = find_tracefs()
    if root is None:
        raise UserError(f"mounted tracefs at {target} but it has no events/ directory")
    return root, True


def read_format(root: Path, category: str, event: str) -> TracepointFormat | None:
    """The format of tracepoint category:event, or None if the kernel lacks it."""
    path = root / "events" / category / event / "format"
    try:
        text = path.read_text()
    except OSError:
        return None
    return parse_format(category, event, text)


_SIZED_TYPES = {1: ("u8", "s8"), 2: ("u16", "s16"), 4: ("u32", "s32"), 8: ("u64", "s64")}


def c_struct(struct_name: str, fmt: TracepointFormat, wanted: list[str]) -> str:
    """A C struct with the `wanted` fields of `fmt` at their offsets.

    Scalars are typed by size and signedness; arrays become byte arrays of
    their size. The first 8 bytes (common fields) are padding: BPF programs
    cannot use them. Raises KeyError if a wanted field is missing.
    """
    chosen = sorted((fmt.fields[name] for name in wanted), key=lambda field: field.offset)
    lines = [f"struct {struct_name} {{"]
    position = 0
    for index, field in enumerate(chosen):
        if field.offset > position:
            lines.append(f"\tchar __pad{index}[{field.offset - position}];")
        if field.is_array or field.size not in _SIZED_TYPES:
            lines.append(f"\tu8 {field.name}[{field.size}];")
        else:
            unsigned, signed = _SIZED_TYPES[field.size]
            lines.append(f"\t{signed if field.signed else unsigned} {field.name};")
        position = field.offset + field.size
    lines.append("} __attribute__((packed));")
    return "\n".join(lines)
