"""Async jobs through a real Redis broker: 202 + status URL, durable records, callbacks,
idempotency across ingress replicas, the dead-letter queue, replica loss."""

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import deployed_app, fake_args, free_port, submit, wait_done
from tests.integration.test_load_and_faults import replica_actor_names

# A consumer replica stays up (scaling from zero has its own test); a job whose consumer
# died is delivered again after 30 s (its runs end within the 20 s request timeout).
# The callback receiver is on loopback, which only callback_allow_private lets a callback
# reach (the allow-list still limits it to 127.0.0.1).
FAST_JOBS = {"callback_backoff_s": 0.1, "callback_hosts": ["127.0.0.1"],
             "callback_allow_private": True,
             "consumer": {"min_replicas": 1}, "broker": {"visibility_timeout_s": 30.0}}
FAST_INGRESS = {"request_timeout_s": 20.0}
QUEUE = "jobs-module-queue"


def redis_client():
    import redis

    from tests.integration.conftest import TEST_BROKER

    return redis.Redis.from_url(TEST_BROKER["url"])


@pytest.fixture(scope="module")
def jobs_app(serve_url, tmp_path_factory):
    store = tmp_path_factory.mktemp("jobs-store")
    # Two ingress replicas: idempotency keys must hold across them.
    with deployed_app(serve_url, "jobs", fake_args(
            store, model={"generator_options": {"delay_s": 0.2}},
            ingress={**FAST_INGRESS, "num_replicas": 2},
            jobs={**FAST_JOBS, "broker": {**FAST_JOBS["broker"], "queue_name": QUEUE}},
    )) as url:
        yield url, store


def test_job_lifecycle(jobs_app):
    url, _ = jobs_app
    response = submit(url, {"prompt": "async cat", "number": 2, "batch": 2, "seed": 5})
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["status"] in ("queued", "running")
    assert accepted["statusUrl"] == f"{url}/api/jobs/{accepted['id']}"
    assert response.headers["location"] == accepted["statusUrl"]
    record = wait_done(accepted["statusUrl"])
    assert record["status"] == "succeeded"
    assert record["progress"] == {"done": 4, "total": 4, "stepsDone": 8, "stepsTotal": 8}
    assert record["attempts"] == 1
    output = record["result"]["output"]
    assert [o["url"].rsplit("/", 1)[1] for o in output] == ["0_0.png", "0_1.png", "1_0.png",
                                                            "1_1.png"]
    assert all(httpx.get(o["url"]).status_code == 200 for o in output)
    assert httpx.get(record["result"]["gridUrl"]).status_code == 200


def test_job_errors(jobs_app):
    url, _ = jobs_app
    bad = submit(url, {"prompt": "p", "size": "1x1"})
    assert (bad.status_code, bad.json()["error"]["field"]) == (422, "size")
    bad_callback = submit(url, {"prompt": "p", "callbackUrl": "not a url"})
    assert (bad_callback.status_code, bad_callback.json()["error"]["field"]) == (
        422, "callbackUrl")
    # jobs.callback_hosts allows 127.0.0.1 only: the metadata service is refused up front.
    refused = submit(url, {"prompt": "p", "callbackUrl": "http://169.254.169.254/latest"})
    assert refused.status_code == 422
    assert refused.json()["error"] == {
        "code": "invalid_request", "field": "callbackUrl",
        "message": "callbackUrl names a host this service may not call (jobs.callback_hosts)"}
    assert httpx.get(f"{url}/api/jobs/{uuid.uuid4().hex}").status_code == 404
    assert httpx.get(f"{url}/api/jobs/..%2F..%2Fetc").status_code == 404


def test_failed_job_reports_the_error_and_goes_to_the_dead_letter_queue(jobs_app):
    url, _ = jobs_app
    dead_letters = redis_client().llen(f"{QUEUE}-failed")
    record = wait_done(submit(url, {"prompt": "__fail__"}).json()["statusUrl"])
    assert record["status"] == "failed"
    assert record["attempts"] == 3  # jobs.max_attempts
    assert record["error"]["code"] == "generation_failed"
    assert "internal detail" not in json.dumps(record)
    deadline = time.monotonic() + 10
    while redis_client().llen(f"{QUEUE}-failed") != dead_letters + 1:
        assert time.monotonic() < deadline, "the failed job never reached the DLQ"
        time.sleep(0.1)


def test_idempotency_key_returns_the_same_job(jobs_app):
    url, _ = jobs_app
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = submit(url, {"prompt": "once"}, headers=key)
    second = submit(url, {"prompt": "once"}, headers=key)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    other = submit(url, {"prompt": "once"}, headers={"Idempotency-Key": "another"})
    assert other.json()["id"] != first.json()["id"]


def test_concurrent_submissions_with_one_key_create_one_job(jobs_app):
    from concurrent.futures import ThreadPoolExecutor

    url, _ = jobs_app
    key = {"Idempotency-Key": f"race-{uuid.uuid4()}"}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(
            lambda _: submit(url, {"prompt": "only once"}, headers=key), range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
    assert len({r.json()["id"] for r in responses}) == 1


class CallbackSink(BaseHTTPRequestHandler):
    received: list = []
    failures_left = 2

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if CallbackSink.failures_left > 0:
            CallbackSink.failures_left -= 1
            self.send_response(500)
        else:
            CallbackSink.received.append(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_callback_is_retried_until_delivered(jobs_app):
    url, _ = jobs_app
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), CallbackSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        callback = f"http://127.0.0.1:{server.server_port}/hook"
        job = submit(url, {"prompt": "call me", "callbackUrl": callback}).json()
        deadline = time.monotonic() + 60
        while not CallbackSink.received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(CallbackSink.received) == 1
        assert CallbackSink.received[0]["id"] == job["id"]
        assert CallbackSink.received[0]["status"] == "succeeded"
        assert CallbackSink.failures_left == 0
        deadline = time.monotonic() + 10
        while httpx.get(job["statusUrl"]).json()["callbackDelivered"] is not True:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        server.shutdown()


def replica_lost_lines(app: str) -> list[str]:
    """Lines of this application's Serve replica logs that report a model replica lost
    with calls in flight (and those calls sent again)."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    return [line for path in sorted(logs.glob(f"replica_{app}_*.log"))
            for line in path.read_text(errors="replace").splitlines()
            if "model replica lost" in line]


def test_jobs_survive_a_replica_killed_under_async_load(deployed, tmp_path):
    """The model replica is killed while a batch of job calls is half-way through its
    denoising steps: those calls are sent again to the replica Serve starts in its place,
    and every job still succeeds, with all its images and steps."""
    import ray

    # 3 steps of 2 s per batch: once a step is reported, the batch runs 2-4 s more.
    url = deployed("jobs-chaos", fake_args(
        tmp_path, model={"generator_options": {"delay_s": 6.0}},
        jobs={**FAST_JOBS, "broker": {"visibility_timeout_s": 90.0}},
        ingress={"request_timeout_s": 60.0}))
    [victim] = replica_actor_names("jobs-chaos", "Text2ImageModel")
    jobs = [submit(url, {"prompt": f"job {i}", "seed": i, "step": 3}).json() for i in range(12)]
    deadline = time.monotonic() + 60
    while True:
        progress = [httpx.get(job["statusUrl"], timeout=30).json()["progress"]
                    for job in jobs]
        in_flight = [p for p in progress if 0 < p["stepsDone"] < 3]
        if in_flight:
            break
        assert time.monotonic() < deadline, f"no job call started: {progress}"
        time.sleep(0.1)
    # Read before the kill: afterwards the batcher may log the loss at once.
    lost_before = replica_lost_lines("jobs-chaos")
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    # Just before the kill, a call was part-way through its steps and no job had an image:
    # the kill hit calls in flight...
    assert [p["done"] for p in progress] == [0] * 12, progress
    assert lost_before == []

    records = [wait_done(job["statusUrl"], timeout_s=120) for job in jobs]
    assert [r["status"] for r in records] == ["succeeded"] * 12
    assert [r["progress"] for r in records] == [
        {"done": 1, "total": 1, "stepsDone": 3, "stepsTotal": 3}] * 12
    assert all(httpx.get(r["result"]["output"][0]["url"]).status_code == 200
               for r in records)
    # ...and were sent again: the application logged the lost replica.
    lost = replica_lost_lines("jobs-chaos")
    assert lost != [], "no call was in flight on the killed replica"
    print("attempts per job after the kill:", [r["attempts"] for r in records])
    print("replica lost:", *lost, sep="\n")


def test_running_jobs_report_denoising_steps(deployed, tmp_path):
    url = deployed("jobs-steps", fake_args(
        tmp_path, model={"generator_options": {"delay_s": 2.0}}, jobs=FAST_JOBS,
        ingress=FAST_INGRESS))
    job = submit(url, {"prompt": "slow steps", "number": 2, "step": 4}).json()
    assert job["progress"] == {"done": 0, "total": 2, "stepsDone": 0, "stepsTotal": 8}
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = httpx.get(job["statusUrl"]).json()
        seen.append(record["progress"]["stepsDone"])
        if record["status"] == "succeeded":
            break
        time.sleep(0.1)
    assert record["status"] == "succeeded"
    assert record["progress"] == {"done": 2, "total": 2, "stepsDone": 8, "stepsTotal": 8}
    assert seen == sorted(seen)
    assert any(0 < steps < 8 for steps in seen), seen


def test_polling_running_jobs_from_many_threads_never_gets_a_500(jobs_app):
    """Records are replaced whole: status polls racing the job's own writes (status,
    progress) always read a complete record. Polling 4 running jobs from 4 threads once
    gave 1 x 500 in about 2000 polls."""
    from concurrent.futures import ThreadPoolExecutor

    url, _ = jobs_app
    jobs = [submit(url, {"prompt": f"poll {i}", "number": 4, "step": 4}).json()
            for i in range(4)]

    def poll(job) -> list[int]:
        codes = []
        with httpx.Client(timeout=30) as client:
            for _ in range(150):
                response = client.get(job["statusUrl"])
                codes.append(response.status_code)
                assert "progress" in response.json(), response.text
        return codes

    with ThreadPoolExecutor(4) as pool:
        codes = [c for per_job in pool.map(poll, jobs) for c in per_job]
    assert codes == [200] * 600
    for job in jobs:
        assert wait_done(job["statusUrl"])["status"] == "succeeded"
