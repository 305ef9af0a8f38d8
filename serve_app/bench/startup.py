"""The quick start's timeline: `serve run CONFIG` until `/readyz` answers 200, with the
moments the log shows on the way (Ray started, the model replica's load and warm-up), and the
CPU seconds each of the processes it started had used by then.

`python -m serve_app.bench.startup configs/local.yaml --runs 3`: each run starts `serve
run` in a session of its own, polls `/readyz` on loopback every 0.1 s, then stops it with
SIGINT (its process group only: never `ray stop`). The first run may export or generate
caches; the runs after it start with warm caches. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

# Log lines (serve run's own and the replicas' forwarded to it) marking a stage.
MARKS = {
    "ray_started": re.compile(r"Started a local Ray instance"),
    "model_files": re.compile(r"model files at"),
    "model_ready": re.compile(r"model ready in ([0-9.]+)s total"),
    "replica_ready": re.compile(r"model replica ready in ([0-9.]+)s"),
    "app_running": re.compile(r"Application '[^']+' is ready|Deployed app"),
}


def stop_session(proc: subprocess.Popen[Any]) -> None:
    """Stops a `serve run` started in its own session: SIGINT to the whole group (Serve
    shuts the application and its Ray down), SIGKILL after 60 s."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def readyz_url(config_path: str) -> str:
    config = yaml.safe_load(Path(config_path).read_text())
    http = config.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"{config_path}: http_options.host {host!r} is not loopback")
    prefix = (config["applications"][0].get("route_prefix") or "/").rstrip("/")
    return f"http://{host}:{port}{prefix}/readyz"


def _label(pid: str) -> str:
    """A process by what it runs: Ray's process titles (`ray::ServeReplica:app:Ingress`,
    `ray::IDLE`) or its executable and first module argument."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    args = [a.decode(errors="replace") for a in raw if a]
    if not args:
        return "?"
    if args[0].startswith("ray::"):
        return args[0].split()[0]
    if "-c" in args[1:3]:
        return f"{Path(args[0]).name} -c"  # the code itself is no name
    names = [Path(a).name for a in args[:4] if not a.startswith("-")]
    scripts = [n for n in names if n.endswith(".py") or n in ("gcs_server", "raylet")]
    return scripts[0] if scripts else names[0] if names else args[0]


def cpu_seconds(session: int) -> dict[str, float]:
    """CPU seconds (user + system) of the live processes in `session` (the `serve run`
    started here, and Ray's processes under it), summed per label, biggest first."""
    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:
                continue
            label = _label(entry.name)
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / tick
        totals[label] = round(totals.get(label, 0.0) + seconds, 2)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def one_run(config: str, timeout_s: float, log: Path | None = None) -> dict[str, Any]:
    import httpx

    url = readyz_url(config)
    started = time.monotonic()
    # This interpreter, not the `serve` script beside it: a virtualenv copied from another
    # keeps that one's interpreter in its scripts' first line.
    proc = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", config],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    marks: dict[str, float] = {}
    values: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout or ():
            lines.append(f"{time.monotonic() - started:7.2f} {line}")
            for name, pattern in MARKS.items():
                match = pattern.search(line)
                if match and name not in marks:
                    marks[name] = round(time.monotonic() - started, 2)
                    if match.groups():
                        values[name] = float(match.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ready_s = None
    body = None
    cpu: dict[str, float] = {}
    try:
        while time.monotonic() - started < timeout_s and proc.poll() is None:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    ready_s = round(time.monotonic() - started, 2)
                    cpu = cpu_seconds(proc.pid)
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        body = httpx.get(url, timeout=5).json() if ready_s is not None else None
    finally:
        # Also when this process is stopped (SIGTERM is turned into SystemExit in main):
        # the `serve run` session and the Ray it started go with it.
        stop_session(proc)
    reader.join(timeout=5)
    if log is not None:
        log.write_text("".join(lines))
    return {"readyz_200_s": ready_s, "marks_s": marks, "logged_s": values,
            "cpu_s": cpu,
            "backend": body and body.get("backend"),
            "optimizations": body and body.get("optimizations"),
            "tail": None if ready_s is not None else lines[-20:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--log-prefix", type=Path, default=None,
                        help="write each run's output, every line with its seconds since "
                             "`serve run` started, to PREFIX-<run>.log")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    prefix = args.log_prefix
    runs = [one_run(args.config, args.timeout,
                    None if prefix is None else Path(f"{prefix}-{i + 1}.log"))
            for i in range(args.runs)]
    print(json.dumps({"config": args.config, "cwd": os.getcwd(),
                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
