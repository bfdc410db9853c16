"""pytest hooks for the whole suite: the slowdown in the report header, the
per-test timeout scaled by it, and the `root` marker (support.requires_root),
which skips its tests, with a reason, when not run as root."""

from __future__ import annotations

import os

import pytest
from support import ROOT_SKIP_REASON, slowdown, slowdown_parts


def pytest_report_header() -> str:
    computing, starting = slowdown_parts()
    return (
        f"slowdown against the development machine: computing {computing:.1f}x, "
        f"starting a process {starting:.1f}x (deadlines scale by the larger, at least 1)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """pytest-timeout's limit (pyproject's 300 s) is a guard against a hung
    test, set for the development machine. Inside the kernel matrix's
    emulated guests, or on a loaded host, a test that needs a minute here
    needs ten: scale the limit by the measured slowdown, as every deadline in
    the tests is, so only a hang trips it. A test's own timeout marker, or a
    limit given with --timeout or PYTEST_TIMEOUT, is left as given."""
    if config.getoption("timeout", None) is not None or os.environ.get("PYTEST_TIMEOUT"):
        return
    base = float(config.getini("timeout") or 0)
    factor = slowdown()
    if base <= 0 or factor <= 1.0:
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(base * factor))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip(ROOT_SKIP_REASON)
