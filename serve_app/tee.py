"""Trusted-execution detection for confidential mode (Intel TDX guests)."""

from __future__ import annotations

from pathlib import Path

TDX_DEVICE = Path("/dev/tdx_guest")
CPUINFO = Path("/proc/cpuinfo")


class TeeRequiredError(RuntimeError):
    pass


def detect_tee(device: Path = TDX_DEVICE, cpuinfo: Path = CPUINFO) -> str | None:
    """'tdx' inside a TDX guest (its attestation device, or the tdx_guest CPU flag)."""
    if device.exists():
        return "tdx"
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags") and "tdx_guest" in line.split(":", 1)[-1].split():
            return "tdx"
    return None


def check_tee(require: bool, probe_path: str) -> str | None:
    """Run the configured probe; refuse to go on without a TEE when one is required."""
    from serve_app.plugins import load_factory

    tee = load_factory(probe_path)()
    if require and tee is None:
        raise TeeRequiredError(
            "security.require_tee is set but this is not an Intel TDX guest "
            "(no /dev/tdx_guest, no tdx_guest CPU flag): refusing to start"
        )
    return tee
