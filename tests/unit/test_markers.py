"""Every collected test carries exactly one folder marker (tests/conftest.py), so running
the five tiers with `-m` (as .ci/run does) runs every test once."""

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import FOLDER_MARKERS, TESTS, folder_marker

ROOT = TESTS.parent


def test_each_folder_gives_its_marker():
    assert FOLDER_MARKERS == ("unit", "integration", "kuberay", "optimize", "cluster")
    for folder in FOLDER_MARKERS:
        assert folder_marker(TESTS / folder / "test_x.py") == folder
    assert folder_marker(Path(__file__)) == "unit"
    assert folder_marker(TESTS / "test_at_the_top.py") is None
    assert folder_marker(TESTS / "other" / "test_x.py") is None
    assert folder_marker(ROOT / "serve_app" / "app.py") is None


def test_no_collected_test_has_no_folder_marker_or_two():
    none = f"not ({' or '.join(FOLDER_MARKERS)})"
    pairs = [f"({a} and {b})" for i, a in enumerate(FOLDER_MARKERS)
             for b in FOLDER_MARKERS[i + 1:]]
    expression = " or ".join([f"({none})", *pairs])
    everything = collect()
    assert everything.returncode == 0, everything.stdout + everything.stderr
    total = re.fullmatch(r"(?s).*\n\n(\d+) tests collected in \d+\.\d+s\n",
                         everything.stdout)
    assert total, everything.stdout
    selected = collect("-m", expression)
    # Exit 5: nothing selected; every collected test was deselected, so each has one.
    assert selected.returncode == 5, selected.stdout + selected.stderr
    assert re.sub(r"in \d+\.\d+s", "in Ts", selected.stdout) == (
        f"\nno tests collected ({total[1]} deselected) in Ts\n")


def collect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
