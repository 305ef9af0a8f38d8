"""The batching deployment through real Ray Serve, with a fake generator of fixed timing:
priorities, clients that leave, a model replica lost with its batch, live reconfiguration."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.conftest import fake_args, post
from tests.integration.test_load_and_faults import replica_actor_names


@pytest.fixture
def app(deployed, tmp_path):
    """One fake-generator app per test, deleted at teardown (conftest's `deployed`)."""

    def make(name: str, **overrides) -> str:
        return deployed(name, fake_args(tmp_path, **overrides))
    return make


def ran_prompts(log) -> list[str]:
    """The prompts the fake generator ran, in order (its own log: the model replica keeps
    no prompts)."""
    return log.read_text().splitlines() if log.exists() else []


def handles(name):
    from ray import serve

    return (serve.get_deployment_handle("Batcher", app_name=name),
            serve.get_deployment_handle("Text2ImageModel", app_name=name))


def wait_until(predicate, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def occupy(pool, url, batcher, body, **kwargs):
    """Send `body` and return its future once its batch is on the (only) model replica."""
    future = pool.submit(post, url, body, **kwargs)
    wait_until(lambda: batcher.stats.remote().result()["batch_sizes"] == [1],
               what=f"{body['prompt']!r} to reach the model replica")
    return future


def test_a_waiting_interactive_call_goes_before_an_earlier_job_call(app, tmp_path):
    # A consumer replica is up (not scaled from zero), so the job's call reaches the
    # batcher while "first" runs.
    log = tmp_path / "prompts.log"
    url = app("prio", model={"generator_options": {"delay_s": 1.5, "prompts_log": str(log)}},
              batching={"max_batch_size": 1}, jobs={"consumer": {"min_replicas": 1}})
    batcher, _ = handles("prio")
    with ThreadPoolExecutor(2) as pool:
        first = occupy(pool, url, batcher, {"prompt": "first", "step": 1})
        job = httpx.post(f"{url}/api/jobs", json={"prompt": "job", "step": 1}, timeout=30)
        assert job.status_code == 202
        wait_until(lambda: batcher.stats.remote().result()["waiting"] == 1,
                   what="the job's call to wait")
        second = pool.submit(post, url, {"prompt": "second", "step": 1})
        assert first.result().status_code == 200
        assert second.result().status_code == 200
    wait_until(lambda: httpx.get(job.json()["statusUrl"]).json()["status"] == "succeeded",
               what="the job")
    # The job was waiting before "second" arrived, and still ran after it.
    assert ran_prompts(log) == ["first", "second", "job"]


def test_a_call_whose_client_left_is_dropped_before_it_runs(app, tmp_path):
    log = tmp_path / "prompts.log"
    url = app("gone", model={"generator_options": {"delay_s": 2.0, "prompts_log": str(log)}},
              batching={"max_batch_size": 1})
    batcher, _ = handles("gone")
    with ThreadPoolExecutor(1) as pool:
        busy = occupy(pool, url, batcher, {"prompt": "busy", "step": 1})
        with pytest.raises(httpx.TimeoutException):
            post(url, {"prompt": "left", "step": 1}, timeout=0.5)  # the client gives up
        wait_until(lambda: batcher.stats.remote().result()["dropped"] == 1,
                   what="the call to be dropped")
        assert busy.result().status_code == 200
    assert post(url, {"prompt": "after", "step": 1}).status_code == 200
    stats = batcher.stats.remote().result()
    assert (stats["dropped"], stats["waiting"]) == (1, 0)
    assert ran_prompts(log) == ["busy", "after"]


def test_a_batch_lost_with_its_model_replica_is_run_again(app):
    import ray

    url = app("lost", model={"generator_options": {"delay_s": 3.0}})
    batcher, _ = handles("lost")
    [victim] = replica_actor_names("lost", "Text2ImageModel")
    with ThreadPoolExecutor(1) as pool:
        pending = occupy(pool, url, batcher, {"prompt": "survivor", "step": 1, "seed": 7},
                         timeout=120)
        time.sleep(0.5)  # inside the pipeline call
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        response = pending.result()
    assert response.status_code == 200
    assert response.json()["meta"]["input"]["seed"] == 7
    stats = batcher.stats.remote().result()
    assert (stats["requeued"], stats["batch_sizes"]) == (1, [1, 1])
    assert replica_actor_names("lost", "Text2ImageModel") != [victim]


def test_backlog_waits_in_the_batcher_and_forms_full_batches(app):
    """12 calls against one busy replica: they wait in the batcher (not at the replica)
    and leave in batches of up to max_batch_size as the replica frees up."""
    url = app("backlog", model={"generator_options": {"delay_s": 0.6}},
              batching={"max_batch_size": 4})
    batcher, model = handles("backlog")
    barrier = threading.Barrier(12)

    def one(i):
        barrier.wait()
        return post(url, {"prompt": f"p{i}", "step": 1}).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(12)))
    assert codes == [200] * 12
    sizes = model.stats.remote().result()["batch_sizes"]
    assert sum(sizes) == 12 and max(sizes) == 4 and len(sizes) <= 6, sizes
