"""Redis over TLS for real (no Ray): Debian's redis-server with --tls-port and --port 0,
a CA and server certificate made by the test, on 127.0.0.1. The URL form the README
documents works for redis-py (idempotency keys), kombu/Celery (the job queue), and the
start-up certificate check; a wrong CA is refused with a clear start-up error."""

from __future__ import annotations

import asyncio
import re
import socket

import pytest

from serve_app.confidential import UntrustedCertificate, check_certificate, redis_tls
from serve_app.config import AppConfig
from tests.tls_certs import make_ca, make_server_tls, require_tls_redis_server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    from serve_app.jobs.redis_server import RedisProcess, RedisTls

    require_tls_redis_server()
    folder = tmp_path_factory.mktemp("redis-tls")
    files = make_server_tls(folder / "tls")
    server = RedisProcess(_free_port(), str(folder / "data"), owned_by_parent=False,
                          prefer_system=True,
                          tls=RedisTls(str(files.cert), str(files.key), str(files.ca)))
    server.start()
    yield server, folder
    server.stop()


def test_the_server_speaks_tls_only(tls_redis):
    server, _ = tls_redis
    assert server.url.startswith(f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required"
                                 "&ssl_ca_certs=")
    assert redis_tls(server.url) == "verified"
    # A clear-text client gets no answer from the TLS port.
    import redis

    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=server.port, socket_timeout=2).ping()


def test_idempotency_keys_and_the_job_queue_work_over_rediss(tls_redis):
    import redis

    from serve_app.jobs.broker import JobQueue, RedisKeys

    server, _ = tls_redis
    check_certificate(server.url, "jobs.broker.url")
    keys = RedisKeys(server.url, 60, "tls-test")

    async def claim():
        try:
            return [await keys.claim("k", "job-a"), await keys.claim("k", "job-b")]
        finally:
            await keys.client.aclose()
    assert asyncio.run(claim()) == [None, "job-a"]
    config = AppConfig.model_validate({"jobs": {"broker": {"url": server.url,
                                                           "queue_name": "tls-q"}}})
    JobQueue(config).enqueue("0" * 32, "http://h")
    client = redis.Redis.from_url(server.url)
    assert client.llen("tls-q") == 1


def test_a_wrong_ca_is_refused_at_start_up(tls_redis):
    server, folder = tls_redis
    other_ca, _ = make_ca(folder / "other", name="other-ca")
    url = server.url.split("&ssl_ca_certs=")[0] + f"&ssl_ca_certs={other_ca}"
    with pytest.raises(UntrustedCertificate) as info:
        check_certificate(url, "jobs.broker.url_env (JOBS_BROKER_URL)")
    # OpenSSL's reason depends on whether the server sends its CA in the chain.
    assert re.fullmatch(
        r"jobs\.broker\.url_env \(JOBS_BROKER_URL\): the Redis server's TLS certificate is "
        r"not trusted \((self-signed certificate in certificate chain|unable to get local "
        r"issuer certificate); ssl_ca_certs must name the CA that signed it\): refusing to "
        r"start", str(info.value)), str(info.value)
    # What the clients would meet otherwise: redis-py refuses the handshake too.
    import redis

    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(url, socket_timeout=5).ping()


def test_the_consumer_policy_reads_the_queue_length_over_rediss(tls_redis):
    """The JobConsumer's autoscaling policy (on the Serve controller) reads the queue's
    length with Ray's broker reader, which refuses rediss:// unless given Celery's
    broker_use_ssl: QueueDepthPolicy hands it the URL's TLS settings."""
    from serve_app.config import BrokerConfig
    from serve_app.jobs.broker import JobQueue, QueueDepthPolicy

    server, _ = tls_redis
    broker = {"url": server.url, "queue_name": "tls-policy-q"}
    queue = JobQueue(AppConfig.model_validate({"jobs": {"broker": broker}}))
    queue.enqueue("1" * 32, "http://h")
    queue.enqueue("2" * 32, "http://h")
    policy = QueueDepthPolicy(BrokerConfig.model_validate(broker).model_dump(mode="json"),
                              poll_interval_s=1.0, running_metric="jobs_running")
    policy._ensure_broker()
    try:
        kwargs = policy._broker.redis.connection_pool.connection_kwargs
        assert (kwargs["ssl_cert_reqs"], kwargs["ssl_ca_certs"]) == ("required",
                                                                     server.tls.ca_file)
        assert asyncio.run(policy._broker.queues(["tls-policy-q"])) == [
            {"name": "tls-policy-q", "messages": 2}]
    finally:
        policy._broker.close()
