"""A real multi-node Ray cluster on this one machine, as KubeRay runs one across pods.

`ray start --head` plus worker nodes started with `ray start --address=...`, each node in a
session (and process group) of its own, each advertising a custom resource of its own so a
deployment is pinned to it (as the KubeRay pods advertise theirs). A test kills a node
whole: SIGKILL to every process of its session (the raylet, its agents and every worker
the raylet forked), then starts it again with the same resources.

Every process started here is killed at teardown, by its session; `ray stop` is never run
(it would stop every Ray process on the machine). The application is deployed with
`serve deploy` of a config file written here, through the head's dashboard.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
# Ray's own defaults for node-failure detection are kept (the GCS health-checks each raylet
# every 3 s and declares it dead after 5 failed checks): KubeRay pods run with them too,
# so the recovery time measured here is the one a lost pod would see.
# Loopback, but not 127.0.0.1 (Ray swaps that for the host's routable address): every
# node's traffic stays on loopback.
NODE_IP = "127.0.0.2"
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid` (a node and everything it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state ppid pgrp session ...; zombies are already dead.
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


class RayNode:
    """One `ray start --block` in a session of its own; kill() ends all of it at once."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_dir / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([RAY, "start", "--block", *self.args], env=ENV,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def kill(self) -> None:
        """SIGKILL to the node's whole session, until none of it is left (bounded)."""
        if self.proc is None:
            return
        sid = self.proc.pid
        deadline = time.monotonic() + 20
        while True:
            pids = session_pids(sid)
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None
        assert not session_pids(sid), f"node {self.name}: processes left after SIGKILL"


class Cluster:
    def __init__(self, root: Path, node_resources: dict[str, dict[str, float]]) -> None:
        self.root = root
        self._ports: set[int] = set()
        self._worker_ports = random.randrange(20000, 30000, 100)
        self.gcs_port = self._port()
        self.dashboard_port = self._port()
        self.http_port = self._port()
        self.head = RayNode("head", self._node_args("head", {"head": 1}, head=True), root)
        self.nodes = {name: RayNode(name, self._node_args(name, res), root)
                      for name, res in node_resources.items()}

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _port(self) -> int:
        """A port free now that no other node of this cluster was given."""
        while (port := free_port()) in self._ports:
            pass
        self._ports.add(port)
        return port

    def _node_args(self, name: str, resources: dict[str, float], head: bool = False) -> list[str]:
        import json

        # Several raylets on one machine: every port of their own (free now), and a worker
        # port range of their own below the ephemeral range (where every free_port() lies),
        # so no two nodes reach for the same one.
        low = self._worker_ports
        self._worker_ports += 100
        free_port = self._port
        args = [
            f"--node-ip-address={NODE_IP}", "--num-cpus=4", "--object-store-memory=150000000",
            f"--resources={json.dumps(resources)}", "--disable-usage-stats",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
                f"--min-worker-port={low}", f"--max-worker-port={low + 99}",
        ]
        if head:
            return ["--head", f"--port={self.gcs_port}", f"--temp-dir={self.root / 'ray'}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}",
                    f"--ray-client-server-port={free_port()}", *args]
        return [f"--address={NODE_IP}:{self.gcs_port}", *args]

    def alive_nodes(self) -> int:
        """Nodes the GCS counts alive (the dashboard's view, as `ray status` shows it)."""
        try:
            response = httpx.get(f"{self.dashboard}/nodes?view=summary", timeout=5)
            summary = response.json()["data"]["summary"]
        except (httpx.HTTPError, KeyError, ValueError):
            return 0
        return sum(1 for node in summary if node["raylet"]["state"] == "ALIVE")

    def wait_nodes(self, count: int, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while self.alive_nodes() != count:
            assert time.monotonic() < deadline, f"{self.alive_nodes()} of {count} nodes alive"
            time.sleep(0.5)

    def start(self) -> None:
        self.head.start()
        self.wait_nodes(1)
        # One at a time: nodes on one machine share the session directory, and two raylets
        # starting together pick the same names for their sockets and log files.
        for count, node in enumerate(self.nodes.values(), start=2):
            node.start()
            self.wait_nodes(count)

    def restart(self, name: str) -> None:
        """The node back with the same resources (a new pod on a new Kubernetes node)."""
        self.nodes[name].start()
        self.wait_nodes(1 + len(self.nodes))

    def stop(self) -> None:
        for node in [*self.nodes.values(), self.head]:
            node.kill()

    def deploy(self, config: dict, timeout_s: float = 120) -> None:
        path = self.root / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run([SERVE, "deploy", str(path), "-a", self.dashboard], env=ENV,
                                capture_output=True, text=True, timeout=timeout_s)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: Ray's Unix sockets live under --temp-dir, and a socket
    path may hold ~107 characters."""
    root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(short_tmp) -> Iterator[object]:
    """A real redis-server on loopback for the jobs (append-only file on)."""
    from serve_app.jobs.redis_server import RedisProcess

    server = RedisProcess(free_port(), str(short_tmp / "redis"), owned_by_parent=False,
                          prefer_system=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cluster(short_tmp) -> Iterator[Cluster]:
    """Head (Serve's controller, HTTP proxy and ingress) and three worker nodes: one each
    for the model replica, the Batcher and the JobConsumer, pinned by custom resources."""
    cluster = Cluster(short_tmp, {"model": {"model_node": 1}, "batcher": {"batcher_node": 1},
                                  "consumer": {"consumer_node": 1}})

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # pytest then runs the teardowns below

    # A run stopped with SIGTERM (`timeout`, CI cancelling) still kills every node: the
    # nodes live in sessions of their own and would outlive this process.
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
