"""Real Ray Serve on loopback: one local Ray instance for the session, apps per fixture."""

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from serve_app.jobs.redis_server import RedisProcess

REFERENCE_PROMPT = "A panda listening to music with headphones. highly detailed, 8k."
API_KEYS_ENV = "SDXL_TEST_API_KEYS"
API_KEYS = ("key-one-7f3a", "key-two-91bc")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator["RedisProcess"]:
    """A real redis-server on loopback for the session's job broker (append-only file on:
    a restart loses nothing acknowledged); stopped at teardown."""
    from serve_app.jobs.redis_server import RedisProcess

    server = RedisProcess(free_port(), str(tmp_path_factory.mktemp("redis")),
                          owned_by_parent=False,
                          prefer_system=True)
    server.start()
    TEST_BROKER["url"] = server.url
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory) -> Iterator["RedisProcess"]:
    """A second real redis-server, TLS only (--tls-port, --port 0), its certificate signed
    by a CA the test made; `.url` is the rediss:// form the README documents. The CA file
    is `.tls.ca_file`; `tls_folder` beside it holds room for other test CAs."""
    from serve_app.jobs.redis_server import RedisProcess, RedisTls
    from tests.tls_certs import make_server_tls, require_tls_redis_server

    require_tls_redis_server()
    folder = tmp_path_factory.mktemp("redis-tls")
    files = make_server_tls(folder / "tls")
    server = RedisProcess(free_port(), str(folder / "data"), owned_by_parent=False,
                          prefer_system=True,
                          tls=RedisTls(str(files.cert), str(files.key), str(files.ca)))
    server.start()
    yield server
    server.stop()


# The session's Redis URL: every application a test deploys queues its jobs there, each on
# a queue of its own.
TEST_BROKER: dict[str, str] = {}


def with_test_broker(args: dict) -> dict:
    jobs = dict(args.get("jobs", {}))
    broker = {"url": TEST_BROKER["url"], "queue_name": f"jobs-{uuid.uuid4().hex[:12]}",
              **jobs.get("broker", {})}
    return {**args, "jobs": {**jobs, "broker": broker}}


@pytest.fixture(scope="session")
def serve_url(redis_server):
    import ray
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The test cluster's environment, as a pod's env would carry it (never a config file).
    os.environ[API_KEYS_ENV] = ",".join(API_KEYS)
    # Logical CPUs: several apps share this small machine; replicas still set their threads.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(name: str, route_prefix: str, args: dict, *, blocking: bool = True) -> None:
    """blocking=False returns at once, before the replicas are up."""
    from ray import serve

    from serve_app.app import build_app

    args = with_test_broker(args)
    if blocking:
        serve.run(build_app(args), name=name, route_prefix=route_prefix)
    else:
        serve._run(build_app(args), _blocking=False, name=name, route_prefix=route_prefix)


@contextmanager
def deployed_app(serve_url: str, name: str, args: dict) -> Iterator[str]:
    """The application deployed at /<name> (its URL), deleted on leaving: also when the
    test or the deployment itself failed. For module-scoped fixtures."""
    from ray import serve

    try:
        deploy(name, f"/{name}", args)
        yield f"{serve_url}/{name}"
    finally:
        serve.delete(name)


@pytest.fixture
def deployed(serve_url) -> Iterator[Callable[..., str]]:
    """`deployed(name, args, blocking=True)` deploys an application at /<name> and returns
    its URL; every application it deployed, or tried to, is deleted at teardown, so a
    failing test still cleans up (and can still read the status of a failed deployment)."""
    from ray import serve

    names: list[str] = []

    def deploy_app(name: str, args: dict, *, blocking: bool = True) -> str:
        names.append(name)
        deploy(name, f"/{name}", args, blocking=blocking)
        return f"{serve_url}/{name}"

    yield deploy_app
    for name in reversed(names):
        serve.delete(name)


def ready_within(url: str, seconds: float = 60.0) -> httpx.Response:
    """/readyz as a probe sees it once the model replica answers (a probe never waits more
    than 0.5 s, so right after the deployment it can still say 503 on a loaded machine)."""
    deadline = time.monotonic() + seconds
    while True:
        response = httpx.get(f"{url}/readyz", timeout=10)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


# Async jobs: submit one, and poll its status URL until it ends.
def submit(url, body, **kwargs):
    return httpx.post(f"{url}/api/jobs", json=body, timeout=30, **kwargs)


def wait_done(status_url, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = httpx.get(status_url, timeout=30).json()
        if record["status"] in ("succeeded", "failed"):
            return record
        time.sleep(0.1)
    raise AssertionError(f"job did not finish in {timeout_s}s: {record}")


def fake_args(store_dir, **overrides) -> dict:
    args = {
        "model": {"source": "fake", "generator": "serve_app.testing:load_fake_generator",
                  "warmup_sizes": []},
        "replica": {"num_cpus": 1},
        # No imageUrl fetches (the schema-driven fuzzing would make up hosts and public
        # addresses); the tests that fetch allow their loopback image server.
        "ingress": {"num_cpus": 0.1, "image_url": {"hosts": []}},
        "store": {"url": str(store_dir)},
    }
    for key, value in overrides.items():
        args[key] = {**args.get(key, {}), **value}
    return args


@pytest.fixture(scope="session")
def tiny_app(serve_url, tmp_path_factory):
    """The real diffusers pipeline with the embedded tiny model."""
    cache = tmp_path_factory.mktemp("model-cache")
    store = tmp_path_factory.mktemp("images")
    deploy("tiny", "/", {
        "model": {"cache_dir": str(cache)},
        "replica": {"num_cpus": 2},
        # A batch waits up to 0.5 s for company: on a loaded 2-core CI machine requests can
        # reach the replica too far apart for the default 0 s to form batches reliably.
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.5},
        "ingress": {"num_cpus": 0.1},
        "store": {"url": str(store)},
    })
    return serve_url


@pytest.fixture(scope="session")
def fake_app(serve_url, tmp_path_factory):
    deploy("fake", "/fake", fake_args(tmp_path_factory.mktemp("fake-images")))
    return f"{serve_url}/fake"


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3-compatible server on loopback (moto's server mode)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


def post(url: str, body: dict, **kwargs) -> httpx.Response:
    import json

    # Exactly what `curl -d '{...}'` sends: a JSON body labelled as a form.
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               **kwargs.pop("headers", {})}
    return httpx.post(f"{url}/api/text2image", content=json.dumps(body), headers=headers,
                      timeout=kwargs.pop("timeout", 120), **kwargs)
