"""API keys and confidential mode, through real Ray Serve."""

import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import (
    API_KEYS,
    API_KEYS_ENV,
    deployed_app,
    fake_args,
    post,
    submit,
    wait_done,
)


@pytest.fixture(scope="module")
def secure_app(serve_url, tls_redis, tmp_path_factory):
    """Confidential mode with its jobs on a TLS-only Redis (rediss://, certificate
    verified). The store is a local directory: that risk is accepted by name."""
    with deployed_app(serve_url, "secure", fake_args(
        tmp_path_factory.mktemp("secure"),
        security={"api_keys_env": API_KEYS_ENV, "protect_images": True,
                  "require_tee": True, "tee_probe": "serve_app.testing:tee_present",
                  "accept_risks": ["store_without_encryption"]},
        # No consumer replica until a job is queued: the autoscaling policy must read the
        # queue's length over TLS too.
        jobs={"broker": {"url": tls_redis.url, "queue_name": "secure-jobs"}},
    )) as url:
        yield url


def test_api_needs_a_key(secure_app):
    missing = post(secure_app, {"prompt": "p"})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = post(secure_app, {"prompt": "p"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = post(secure_app, {"prompt": "p"}, headers={"Authorization": f"Bearer {API_KEYS[1]}"})
    assert ok.status_code == 200
    url = ok.json()["output"][0]["url"]
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEYS[0]}"}).status_code == 200
    # Probes stay open for the orchestrator.
    assert httpx.get(f"{secure_app}/healthz").status_code == 200


def test_ready_reports_the_tee(secure_app):
    body = httpx.get(f"{secure_app}/readyz", timeout=30).json()
    assert (body["status"], body["tee"]) == ("ready", "tdx")
    assert body["protections"] == {"confidential": True, "brokerTls": "verified",
                                   "storeEncryption": "none", "storeTls": False,
                                   "acceptedRisks": ["store_without_encryption"]}


def test_jobs_run_end_to_end_over_rediss(secure_app, tls_redis):
    """Submission (idempotency key in Redis), the queue (kombu), the consumer's scaling
    from zero (the policy reads the queue's length) and the consumer (Celery) all over TLS
    to a server that has no plain port."""
    import redis

    auth = {"Authorization": f"Bearer {API_KEYS[0]}"}
    first = submit(secure_app, {"prompt": "over tls", "step": 1},
                   headers={**auth, "Idempotency-Key": "tls-order-1"})
    again = submit(secure_app, {"prompt": "over tls", "step": 1},
                   headers={**auth, "Idempotency-Key": "tls-order-1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    deadline = time.monotonic() + 60
    while (record := httpx.get(first.json()["statusUrl"], headers=auth,
                               timeout=30).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, record
        time.sleep(0.2)
    assert (record["status"], record["attempts"]) == ("succeeded", 1)
    keys = redis.Redis.from_url(tls_redis.url).keys("secure-jobs:idempotency:*")
    assert len(keys) == 1


def test_a_wrong_ca_refuses_to_start(deployed, tls_redis, tmp_path):
    from ray import serve

    from tests.tls_certs import make_ca

    other_ca, _ = make_ca(tmp_path / "other-ca", name="other-ca")
    url = tls_redis.url.replace(tls_redis.tls.ca_file, str(other_ca))
    with pytest.raises(RuntimeError) as info:
        deployed("wrong-ca", fake_args(
            tmp_path / "store",
            security={"require_tee": True, "tee_probe": "serve_app.testing:tee_present",
                      "accept_risks": ["store_without_encryption"]},
            jobs={"broker": {"url": url}}))
    assert "Failed to update the deployments" in str(info.value)
    status = serve.status().applications["wrong-ca"].deployments
    # The ingress checks at start-up (the consumer, scaled to zero here, checks the same).
    assert ("jobs.broker.url: the Redis server's TLS certificate is not trusted"
            in status["Ingress"].message), status["Ingress"].message
    assert tls_redis.url.split("?")[0] not in status["Ingress"].message


def test_a_clear_broker_in_confidential_mode_refuses_to_start(deployed, tmp_path):
    from serve_app.confidential import ConfidentialModeError

    # The test broker (redis://) and a local store, named in the config: the app builder
    # refuses before any replica starts.
    with pytest.raises(ConfidentialModeError) as info:
        deployed("clear-broker", fake_args(
            tmp_path, security={"require_tee": True,
                                "tee_probe": "serve_app.testing:tee_present"}))
    assert str(info.value).startswith(
        "confidential mode (security.require_tee) refuses to start: jobs.broker.url is not "
        "rediss:// (prompts would cross the network in clear); use rediss://")
    assert "store.url is not an s3:// bucket" in str(info.value)


def test_require_tee_outside_a_tee_refuses_to_start(deployed, tmp_path):
    from ray import serve

    with pytest.raises(RuntimeError) as info:
        deployed("no-tee", fake_args(
            tmp_path, security={"require_tee": True, "tee_probe": "serve_app.testing:tee_absent",
                                # The TEE check is the one under test here.
                                "accept_risks": ["broker_without_tls",
                                                 "store_without_encryption"]}))
    assert "Failed to update the deployments" in str(info.value)
    status = serve.status().applications["no-tee"].deployments
    assert "not an Intel TDX guest" in status["Text2ImageModel"].message
    assert "not an Intel TDX guest" in status["Ingress"].message


def test_images_are_deleted_after_their_ttl(deployed, tmp_path):
    url = deployed("ttl", fake_args(tmp_path, store={"ttl_s": 1.0, "cleanup_interval_s": 0.5}))
    body = post(url, {"prompt": "ephemeral"}).json()
    url = body["output"][0]["url"]
    assert httpx.get(url).status_code == 200
    deadline = time.monotonic() + 15
    while httpx.get(url).status_code == 200:
        assert time.monotonic() < deadline, "image outlived its TTL by 14 s"
        time.sleep(0.25)
    assert httpx.get(url).status_code == 404
    assert not (tmp_path / body["id"]).exists()


def ray_log_files() -> list[Path]:
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return [p for p in logs.rglob("*") if p.is_file()]


def logs_with(text: str, timeout_s: float = 30.0) -> list[Path]:
    """Ray's log files once one of them holds `text` (Ray flushes worker logs now and
    then): proof that the logs read were written after the line that holds it."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = ray_log_files()
        if any(text.encode() in p.read_bytes() for p in files):
            return files
        assert time.monotonic() < deadline, f"{text!r} did not reach Ray's logs"
        time.sleep(0.25)


def test_prompts_never_reach_the_logs(fake_app):
    marker = f"confidential-prompt-{uuid.uuid4().hex}"
    ok = post(fake_app, {"prompt": marker})
    assert ok.status_code == 200
    assert post(fake_app, {"prompt": marker, "size": "9x9"}).status_code == 422
    # The ingress logs each request's id (generation.py): read until this one's is there.
    files = logs_with(f"request {ok.json()['id']}:")
    assert len(files) > 5
    leaked = [p.name for p in files if marker.encode() in p.read_bytes()]
    assert leaked == []


def test_no_prompt_is_kept_after_a_call(deployed, tmp_path):
    """After an interactive call, an async job and a refused request, the prompts are in no
    Ray log line, no metric (name, label or value) and no result of any replica method
    (model, batcher, job consumer) nor /readyz."""
    from ray import serve

    app = "noprompts"
    url = deployed(app, fake_args(tmp_path, jobs={"consumer": {"min_replicas": 1}}))
    marker = f"kept-prompt-{uuid.uuid4().hex}"
    ok = post(url, {"prompt": f"{marker} interactive", "step": 2})
    assert ok.status_code == 200
    job = submit(url, {"prompt": f"{marker} job", "step": 2})
    assert job.status_code == 202
    assert wait_done(job.json()["statusUrl"])["status"] == "succeeded"
    assert post(url, {"prompt": f"{marker} refused", "size": "9x9"}).status_code == 422

    files = logs_with(f"job {job.json()['id']} succeeded")
    assert logs_with(f"request {ok.json()['id']}:") and len(files) > 5
    assert [p.name for p in ray_log_files() if marker.encode() in p.read_bytes()] == []

    metrics = metrics_text(app)
    assert "ray_sdxl_images_generated_total" in metrics
    assert marker not in metrics

    results = {"readyz": httpx.get(f"{url}/readyz", timeout=30).json()}
    for deployment, methods in {
            "Text2ImageModel": ("info", "stats", "record_autoscaling_stats"),
            "Batcher": ("stats",),
            "JobConsumer": ("record_autoscaling_stats",)}.items():
        handle = serve.get_deployment_handle(deployment, app_name=app)
        for method in methods:
            results[f"{deployment}.{method}"] = getattr(handle, method).remote().result()
    assert results["Text2ImageModel.stats"]["pipeline_calls"] == 2
    assert results["readyz"]["status"] == "ready"
    assert [name for name, result in results.items() if marker in repr(result)] == []


def metrics_text(app: str, timeout_s: float = 60.0) -> str:
    """The node's Prometheus text once it counts this application's images (Ray exports
    every few seconds)."""
    import ray

    node = ray._private.worker.global_worker.node
    endpoint = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(endpoint, timeout=10).text
        if any(line.startswith("ray_sdxl_images_generated_total{")
               and f'application="{app}"' in line for line in text.splitlines()):
            return text
        assert time.monotonic() < deadline, "the application's metrics did not appear"
        time.sleep(1.0)
