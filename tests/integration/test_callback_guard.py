"""Callbacks cannot reach inside (issue 21): through the real service with its default
config, a job whose callbackUrl names loopback in any spelling, a private address or the
metadata service is refused at submission with 422 on callbackUrl, and a real loopback
receiver gets nothing. Only loopback is ever sent anything; the other addresses are
literals, refused before any connection."""

import time

import pytest

from tests.integration.conftest import submit
from tests.unit.test_outbound import LOOPBACK_SPELLINGS, receiver  # noqa: F401 (fixture)


def test_loopback_callbacks_are_refused_at_submission(fake_app, receiver):  # noqa: F811
    port, hits = receiver
    for host in LOOPBACK_SPELLINGS:
        response = submit(fake_app, {"prompt": "p", "step": 1,
                                     "callbackUrl": f"http://{host}:{port}/hook"})
        error = response.json()["error"]
        assert (response.status_code, error["code"], error["field"]) == (
            422, "invalid_request", "callbackUrl"), host
        assert " is a loopback address" in error["message"], (host, error)
    time.sleep(0.5)  # nothing was queued, so nothing can call back later either
    assert hits == []


@pytest.mark.parametrize("url,reason", [
    ("http://100.100.100.200/latest/meta-data", "a carrier-grade NAT address"),
    ("http://169.254.169.254/latest/meta-data", "a link-local address"),
    ("http://10.0.0.8:8080/hook", "a private address"),
    ("http://[fd00::8]/hook", "a private address"),
])
def test_internal_callbacks_are_refused_at_submission(fake_app, url, reason):
    response = submit(fake_app, {"prompt": "p", "step": 1, "callbackUrl": url})
    error = response.json()["error"]
    assert (response.status_code, error["field"]) == (422, "callbackUrl")
    assert error["message"].startswith("callbackUrl cannot be called: ")
    assert f" is {reason}" in error["message"]
