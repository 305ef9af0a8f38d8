"""The job consumer scales with the queue, from and to zero replicas; the quick start's
embedded broker is a real redis-server that the application owns."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from serve_app.jobs.redis_server import ping
from tests.integration.conftest import deployed_app, fake_args, free_port, submit, wait_done


def running_consumers(app: str) -> int:
    from ray import serve

    deployment = serve.status().applications[app].deployments["JobConsumer"]
    return deployment.replica_states.get("RUNNING", 0)


def test_a_job_scales_the_consumer_up_from_zero_and_back(deployed, tmp_path):
    """Tiny real model; the interactive path keeps its one model replica."""
    url = deployed("jobs-zero", {
        "model": {"cache_dir": str(tmp_path / "model")},
        "replica": {"num_cpus": 1},
        "ingress": {"num_cpus": 0.1},
        "store": {"url": str(tmp_path / "store")},
        "jobs": {"consumer": {"min_replicas": 0, "downscale_delay_s": 5.0,
                              "queue_poll_interval_s": 1.0}},
    })
    assert running_consumers("jobs-zero") == 0
    started = time.monotonic()
    job = submit(url, {"prompt": "from zero", "seed": 3, "step": 1})
    assert job.status_code == 202
    record = wait_done(job.json()["statusUrl"], timeout_s=120)
    first_result_s = time.monotonic() - started
    assert (record["status"], record["attempts"]) == ("succeeded", 1)
    assert httpx.get(record["result"]["output"][0]["url"]).status_code == 200
    done = time.monotonic()
    while running_consumers("jobs-zero") > 0:
        assert time.monotonic() - done < 90, "the consumer never scaled down"
        time.sleep(0.5)
    scaled_down_s = time.monotonic() - done
    print(f"JOBS-ZERO first job from zero consumers: {first_result_s:.1f} s; "
          f"back to zero {scaled_down_s:.1f} s after it ended (downscale_delay_s 5)")


def test_the_embedded_broker_is_a_redis_server_the_application_owns(serve_url, tmp_path):
    port = free_port()
    broker_dir = tmp_path / "broker"
    args = fake_args(tmp_path / "store", jobs={
        "consumer": {"min_replicas": 1},
        "broker": {"url": "embedded", "embedded_port": port,
                   "embedded_dir": str(broker_dir)}})
    with deployed_app(serve_url, "jobs-embedded", args) as url:
        assert ping(port)
        record = wait_done(submit(url, {"prompt": "embedded"}).json()["statusUrl"])
        assert (record["status"], record["attempts"]) == ("succeeded", 1)
        # Redis persists the queue in its append-only file there.
        assert any(Path(broker_dir).glob("appendonly*"))
    deadline = time.monotonic() + 30
    while ping(port):  # the server went with the application
        assert time.monotonic() < deadline, "the embedded redis-server outlived its app"
        time.sleep(0.2)


def running(app: str, deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


def test_with_model_replicas_at_zero_too_a_job_brings_both_up_and_both_go_back(deployed,
                                                                              tmp_path):
    """replica.autoscaling.min_replicas 0 (no interactive minimum): nothing runs while the
    queue is empty; a job scales the consumer, and its call the model, from zero."""
    url = deployed("jobs-all-zero", fake_args(
        tmp_path, model={"generator_options": {"delay_s": 0.2}},
        replica={"autoscaling": {"min_replicas": 0, "max_replicas": 1,
                                 "upscale_delay_s": 0, "downscale_delay_s": 3}},
        jobs={"consumer": {"min_replicas": 0, "downscale_delay_s": 3,
                           "queue_poll_interval_s": 1.0}}))
    # The model starts with one replica (initial_replicas), idle: it goes.
    deadline = time.monotonic() + 60
    while (running("jobs-all-zero", "JobConsumer"),
           running("jobs-all-zero", "Text2ImageModel")) != (0, 0):
        assert time.monotonic() < deadline, "the idle model replica never went"
        time.sleep(0.5)
    started = time.monotonic()
    record = wait_done(submit(url, {"prompt": "cold", "step": 1}).json()["statusUrl"],
                       timeout_s=120)
    first_result_s = time.monotonic() - started
    assert (record["status"], record["attempts"]) == ("succeeded", 1)
    done = time.monotonic()
    while (running("jobs-all-zero", "JobConsumer"),
           running("jobs-all-zero", "Text2ImageModel")) != (0, 0):
        assert time.monotonic() - done < 90, "not back to zero"
        time.sleep(0.5)
    print(f"JOBS-ZERO all at zero: first job {first_result_s:.1f} s; both back to zero "
          f"{time.monotonic() - done:.1f} s after it ended (downscale_delay_s 3)")
