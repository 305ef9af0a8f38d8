"""Bounded load and a replica killed under load: nothing hangs, nothing leaks a 500 trace."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.integration.conftest import fake_args, post


def run_load(url: str, total: int, concurrency: int, timeout_s: float = 120) -> list[int]:
    def one(i: int) -> int:
        try:
            return post(url, {"prompt": f"load {i}", "step": 1, "seed": i},
                        timeout=timeout_s).status_code
        except httpx.TimeoutException:
            return -1  # hung
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(total)))


def test_100_requests_at_concurrency_20_on_one_small_replica(deployed, tmp_path):
    url = deployed("load", fake_args(
        tmp_path,
        model={"generator_options": {"delay_s": 0.1}},
        batching={"max_batch_size": 4},
        replica={"max_queued_requests": 8},
    ))
    started = time.monotonic()
    codes = run_load(url, total=100, concurrency=20)
    elapsed = time.monotonic() - started
    counts = {code: codes.count(code) for code in sorted(set(codes))}
    print(f"load: 100 requests, concurrency 20, {elapsed:.1f}s: {counts}")
    assert set(codes) <= {200, 503}
    assert len(codes) == 100
    assert counts.get(200, 0) >= 12  # at least the replica's ongoing + queued capacity


def replica_actor_names(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


def test_killed_replica_under_load_is_replaced_and_requests_are_retried(deployed, tmp_path):
    import ray

    url = deployed("chaos", fake_args(tmp_path, model={"generator_options": {"delay_s": 0.3}}))
    [victim] = replica_actor_names("chaos", "Text2ImageModel")
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(run_load, url, 30, 5)
        time.sleep(1.5)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        deadline = killed_at + 120
        while time.monotonic() < deadline:
            names = replica_actor_names("chaos", "Text2ImageModel")
            if names and names != [victim] and httpx.get(f"{url}/readyz").status_code == 200:
                break
            time.sleep(0.2)
        recovered_s = time.monotonic() - killed_at
        codes = load.result()
    print(f"replica killed under load: ready again after {recovered_s:.1f}s; codes {codes}")
    assert recovered_s < 120
    # In-flight calls on the dead replica were sent again: every request succeeded.
    assert codes == [200] * 30
    assert post(url, {"prompt": "after"}).status_code == 200


def test_a_request_past_its_timeout_gets_504_not_a_hang(deployed, tmp_path):
    url = deployed("timeout", fake_args(
        tmp_path, model={"generator_options": {"delay_s": 5.0}},
        ingress={"request_timeout_s": 1.0}))
    started = time.monotonic()
    response = post(url, {"prompt": "slow"}, timeout=30)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert response.headers["retry-after"] == "5"
    assert elapsed < 4.0
