"""The installed package carries its BPF sources and its console script."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_bpf_sources_and_finds_them(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("tcptrace_ebpf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # The program and every header it includes.
    for source in [ROOT / "bpf" / "tcptrace.bpf.c", *sorted((ROOT / "bpf").glob("*.h"))]:
        assert f"tcptrace_ebpf/bpf/{source.name}" in names
    assert "tcptrace_ebpf/bpf/socket_state.h" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert (
        "tcptrace-ebpf = tcptrace_ebpf.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )
    # Installed elsewhere, the package uses the sources it carries, not the checkout's.
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, timeout=300)
    code = "from tcptrace_ebpf.kernel.probe import bpf_source_dir; print(bpf_source_dir())"
    found = subprocess.run(
        [sys.executable, "-c", code],
        check=True, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    ).stdout.strip()  # fmt: skip
    assert Path(found) == target / "tcptrace_ebpf" / "bpf"
