"""The quick start bench's CPU accounting: the processes of one session, by label."""

from __future__ import annotations

import subprocess
import sys

from serve_app.bench.startup import cpu_seconds


def test_cpu_seconds_counts_the_session_it_is_given_only():
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    script = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                              start_new_session=True)
    try:
        assert cpu_seconds(sleeper.pid) == {"sleep": 0.0}
        assert list(cpu_seconds(script.pid)) == [f"{sys.executable.rsplit('/', 1)[-1]} -c"]
    finally:
        for proc in (sleeper, script):
            proc.kill()
            proc.wait()
