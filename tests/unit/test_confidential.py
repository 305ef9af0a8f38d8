"""Confidential mode's checks of what leaves the TEE (serve_app/confidential.py): the jobs'
Redis must be rediss:// with certificate verification, the store an https bucket with
server-side encryption, unless a risk is accepted by name. One-line errors that name the
setting, never the URL (it may hold a password)."""

import pytest
from pydantic import ValidationError

from serve_app import confidential
from serve_app.confidential import ConfidentialModeError, protections, redis_tls
from serve_app.config import AppConfig
from serve_app.jobs.broker import confidential_urls

CA = "/etc/redis-tls/ca.pem"
GOOD_REDIS = f"rediss://:pw-7f3a@redis.internal:6380/0?ssl_cert_reqs=required&ssl_ca_certs={CA}"
SSE_STORE = {"url": "s3://bucket/images",
             "storage_options": {"endpoint_url": "https://oss-cn-hangzhou-internal.aliyuncs.com",
                                 "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms"}}}


def config(broker=None, store=None, **security):
    return AppConfig.model_validate({
        "jobs": {"broker": broker or {"url": GOOD_REDIS}},
        "store": store or SSE_STORE,
        "security": {"require_tee": True, **security}})


def check(cfg):
    confidential.check(cfg, **confidential_urls(cfg))


@pytest.mark.parametrize("url,expected", [
    ("redis://h:6379/0", "none"),
    ("rediss://h:6380/0", "unverified"),  # kombu connects with CERT_NONE then
    ("rediss://h:6380/0?ssl_cert_reqs=none", "unverified"),
    ("rediss://h:6380/0?ssl_cert_reqs=optional", "unverified"),
    ("rediss://h:6380/0?ssl_cert_reqs=required&ssl_check_hostname=false", "unverified"),
    ("rediss://h:6380/0?ssl_cert_reqs=required", "verified"),
    ("rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem", "verified"),
    # kombu reads CERT_REQUIRED, redis-py (the idempotency keys) refuses it: one form only.
    ("rediss://h:6380/0?ssl_cert_reqs=CERT_REQUIRED", "unverified"),
])
def test_redis_tls(url, expected):
    assert redis_tls(url) == expected


def test_a_verified_broker_and_an_encrypted_store_start():
    cfg = config()
    check(cfg)
    assert protections(cfg, GOOD_REDIS) == {
        "confidential": True, "brokerTls": "verified", "storeEncryption": "aws:kms",
        "storeTls": True, "acceptedRisks": []}


@pytest.mark.parametrize("url,problem", [
    ("redis://:pw-7f3a@redis.internal:6379/0",
     "jobs.broker.url_env (JOBS_BROKER_URL) is not rediss:// (prompts would cross the "
     "network in clear)"),
    ("rediss://:pw-7f3a@redis.internal:6380/0?ssl_cert_reqs=none",
     "jobs.broker.url_env (JOBS_BROKER_URL) is rediss:// without certificate verification "
     "(needs ssl_cert_reqs=required, and no ssl_check_hostname=false)"),
])
def test_a_clear_or_unverified_broker_from_the_environment_is_refused(monkeypatch, url,
                                                                      problem):
    monkeypatch.setenv("JOBS_BROKER_URL", url)
    cfg = config(broker={"url_env": "JOBS_BROKER_URL"})
    with pytest.raises(ConfidentialModeError) as info:
        check(cfg)
    message = str(info.value)
    assert message == (
        f"confidential mode (security.require_tee) refuses to start: {problem}; use "
        f"{confidential.URL_FORM}, or accept the risk: security.accept_risks "
        "[broker_without_tls]")
    assert "\n" not in message and "pw-7f3a" not in message
    # The app builder cannot read the Secret's variable: it leaves this check to the
    # replicas, which resolve the URL.
    confidential.check(cfg, **confidential_urls(cfg, resolve_env=False))
    # Accepted by name: it starts, and /readyz says so.
    waived = config(broker={"url_env": "JOBS_BROKER_URL"}, accept_risks=["broker_without_tls"])
    check(waived)
    shown = protections(waived, url)
    assert (shown["brokerTls"], shown["acceptedRisks"]) == (
        redis_tls(url), ["broker_without_tls"])


def test_the_embedded_broker_and_a_clear_keys_redis_are_refused():
    with pytest.raises(ConfidentialModeError, match=r"jobs.broker.url \(embedded\) is not "
                                                    r"rediss://"):
        check(config(broker={"url": "embedded"}))
    with pytest.raises(ConfidentialModeError, match=r"jobs.broker.keys_url is not rediss://"):
        check(config(broker={"url": GOOD_REDIS, "keys_url": "redis://keys:6379/1"}))


@pytest.mark.parametrize("store,problem", [
    ({"url": "/var/lib/images"},
     "store.url is not an s3:// bucket (a local directory is not encrypted at rest)"),
    ({"url": "s3://bucket/images", "storage_options": {"endpoint_url": "https://oss"}},
     "store.storage_options.s3_additional_kwargs has no ServerSideEncryption (KMS, aws:kms "
     "or AES256)"),
    ({"url": "s3://bucket/images", "storage_options": {
        "endpoint_url": "http://oss-cn-hangzhou-internal.aliyuncs.com",
        "s3_additional_kwargs": {"ServerSideEncryption": "AES256"}}},
     "store.storage_options.endpoint_url is not https://"),
])
def test_an_unencrypted_store_is_refused(store, problem):
    with pytest.raises(ConfidentialModeError) as info:
        check(config(store=store))
    assert str(info.value) == (
        f"confidential mode (security.require_tee) refuses to start: {problem}; or accept "
        "the risk: security.accept_risks [store_without_encryption]")
    check(config(store=store, accept_risks=["store_without_encryption"]))


def test_both_problems_in_one_line():
    with pytest.raises(ConfidentialModeError) as info:
        check(config(broker={"url": "redis://h:6379/0"}, store={"url": "/tmp/x"}))
    assert "\n" not in str(info.value)
    assert "jobs.broker.url is not rediss://" in str(info.value)
    assert "store.url is not an s3:// bucket" in str(info.value)


def test_nothing_is_checked_outside_confidential_mode():
    cfg = AppConfig.model_validate({"jobs": {"broker": {"url": "redis://h:6379/0"}}})
    check(cfg)
    assert protections(cfg, "redis://h:6379/0") == {
        "confidential": False, "brokerTls": "none", "storeEncryption": "none",
        "storeTls": False, "acceptedRisks": []}


def test_accept_risks_is_typed_and_needs_confidential_mode():
    with pytest.raises(ValidationError, match="needs security.require_tee: true"):
        AppConfig.model_validate({"security": {"accept_risks": ["broker_without_tls"]}})
    with pytest.raises(ValidationError, match="accept_risks"):
        AppConfig.model_validate({"security": {"require_tee": True,
                                               "accept_risks": ["no_tee"]}})


def test_build_app_refuses_a_clear_broker_named_in_the_config():
    from serve_app.app import build_app

    with pytest.raises(ConfidentialModeError, match="jobs.broker.url is not rediss://"):
        build_app({"model": {"source": "fake", "warmup_sizes": []},
                   "jobs": {"broker": {"url": "redis://127.0.0.1:6390/0"}},
                   "store": SSE_STORE, "security": {"require_tee": True}})
