"""pytest hooks for the whole suite."""

from __future__ import annotations

from support import slowdown_parts


def pytest_report_header() -> str:
    computing, starting = slowdown_parts()
    return (
        f"slowdown against the development machine: computing {computing:.1f}x, "
        f"starting a process {starting:.1f}x (deadlines scale by the larger, at least 1)"
    )
