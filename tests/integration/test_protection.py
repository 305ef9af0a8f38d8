"""API keys and confidential mode, through real Ray Serve."""

import httpx
import pytest

from tests.integration.conftest import API_KEYS, API_KEYS_ENV, deploy, fake_args, post

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secure_app(serve_url, tmp_path_factory):
    deploy("secure", "/secure", fake_args(
        tmp_path_factory.mktemp("secure"),
        security={"api_keys_env": API_KEYS_ENV, "protect_images": True,
                  "require_tee": True, "tee_probe": "serve_app.testing:tee_present"},
    ))
    yield f"{serve_url}/secure"
    from ray import serve

    serve.delete("secure")


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


def test_require_tee_outside_a_tee_refuses_to_start(serve_url, tmp_path):
    from ray import serve

    with pytest.raises(RuntimeError) as info:
        deploy("no-tee", "/no-tee", fake_args(
            tmp_path, security={"require_tee": True, "tee_probe": "serve_app.testing:tee_absent"}))
    assert "Failed to update the deployments" in str(info.value)
    status = serve.status().applications["no-tee"].deployments
    assert "not an Intel TDX guest" in status["Text2ImageModel"].message
    assert "not an Intel TDX guest" in status["Ingress"].message
    serve.delete("no-tee")
