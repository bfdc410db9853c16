"""pytest hooks for the whole suite: the slowdown in the report header, and the
`root` marker (support.requires_root), which skips its tests, with a reason,
when not run as root."""

from __future__ import annotations

import os

import pytest
from support import ROOT_SKIP_REASON, slowdown_parts


def pytest_report_header() -> str:
    computing, starting = slowdown_parts()
    return (
        f"slowdown against the development machine: computing {computing:.1f}x, "
        f"starting a process {starting:.1f}x (deadlines scale by the larger, at least 1)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip(ROOT_SKIP_REASON)
