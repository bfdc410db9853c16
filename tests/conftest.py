"""Test-wide hooks: the `root` marker (support.requires_root) skips its tests,
with a reason, when not run as root."""

from __future__ import annotations

import os

import pytest
from support import ROOT_SKIP_REASON


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip(ROOT_SKIP_REASON)
