"""Progress bars on stderr for the benchmark CLI: tqdm when installed, else a tiny bar.

Both print the same text shape, `{desc}: {n}/{total} {unit} |{bar}| {postfix}`, so the
output does not depend on which one ran.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} |{bar:20}| {elapsed}{postfix}"


def progress_enabled(flag: bool | None, stream: TextIO | None = None) -> bool:
    """--progress forces it on, --no-progress off; by default only when stderr is a TTY."""
    if flag is not None:
        return flag
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _PlainBar:
    """The fallback: rewrites one stderr line with \\r, ends it on close."""

    def __init__(self, total: int, desc: str, unit: str, file: TextIO) -> None:
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n = 0
        self.postfix = ""
        self.started = time.perf_counter()
        self._draw()

    def _draw(self) -> None:
        width = 20
        filled = int(width * self.n / self.total) if self.total else width
        elapsed = time.perf_counter() - self.started
        postfix = f", {self.postfix}" if self.postfix else ""
        self.file.write(f"\r{self.desc}: {self.n}/{self.total} {self.unit} "
                        f"|{'#' * filled}{' ' * (width - filled)}| {elapsed:.1f}s{postfix}")
        self.file.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        self._draw()

    def close(self) -> None:
        self.file.write("\n")
        self.file.flush()


class Progress:
    """A bar of `total` units; a no-op when disabled. Use as a context manager."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", enabled: bool = True,
                 file: TextIO | None = None, use_tqdm: bool = True) -> None:
        self.enabled = enabled
        self.n = 0
        self._bar: Any = None
        if not enabled:
            return
        file = file if file is not None else sys.stderr  # resolved now: pytest swaps it
        if use_tqdm:
            try:
                from tqdm import tqdm
            except ImportError:
                use_tqdm = False
        if use_tqdm:
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=file,
                             bar_format=BAR_FORMAT, mininterval=0, leave=True)
        else:
            self._bar = _PlainBar(total, desc, unit, file)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
