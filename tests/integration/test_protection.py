"""API keys and confidential mode, through real Ray Serve."""

import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import API_KEYS, API_KEYS_ENV, deployed_app, fake_args, post


@pytest.fixture(scope="module")
def secure_app(serve_url, tmp_path_factory):
    with deployed_app(serve_url, "secure", fake_args(
        tmp_path_factory.mktemp("secure"),
        security={"api_keys_env": API_KEYS_ENV, "protect_images": True,
                  "require_tee": True, "tee_probe": "serve_app.testing:tee_present"},
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


def test_require_tee_outside_a_tee_refuses_to_start(deployed, tmp_path):
    from ray import serve

    with pytest.raises(RuntimeError) as info:
        deployed("no-tee", fake_args(
            tmp_path, security={"require_tee": True, "tee_probe": "serve_app.testing:tee_absent"}))
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


def test_prompts_never_reach_the_logs(fake_app):
    import ray

    marker = f"confidential-prompt-{uuid.uuid4().hex}"
    assert post(fake_app, {"prompt": marker}).status_code == 200
    assert post(fake_app, {"prompt": marker, "size": "9x9"}).status_code == 422
    time.sleep(2)  # let Ray flush worker logs
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert len(files) > 5
    leaked = [p.name for p in files if marker.encode() in p.read_bytes()]
    assert leaked == []
