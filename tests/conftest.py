"""Every test is marked by its folder: `unit`, `integration`, `kuberay`, `optimize` or
`cluster`.

`.ci/run` runs the tiers one by one with `-m` (fast ones first); `python -m pytest` still
runs them all. tests/unit/test_markers.py checks that each test has exactly one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests send traffic to loopback only: Ray reports usage statistics to a public endpoint
# unless this is 0 (every Ray the tests start, `serve run` subprocesses included, inherits it).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

TESTS = Path(__file__).resolve().parent
FOLDER_MARKERS = ("unit", "integration", "kuberay", "optimize", "cluster")


def folder_marker(path: Path) -> str | None:
    """The marker of the tests/<folder> a test file lives in (None outside them)."""
    try:
        folder = Path(path).resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return folder if folder in FOLDER_MARKERS else None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = folder_marker(item.path)
        if marker is not None:
            item.add_marker(marker)
