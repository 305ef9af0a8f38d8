"""Metrics through Ray's Prometheus endpoint on the local node, after real requests.

Runs its own application ("metricsapp", fake generator) so every count is exact: the
series carry the `application` label. Ray exports metrics every few seconds, so the test
polls the endpoint until the expected values appear or a deadline passes.
"""

import time
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_app.testing import FAIL_PROMPT, SLOW_PROMPT
from tests.integration.conftest import deployed_app, fake_args, post
from tests.unit.test_dashboard import by_labels, expressions, load_dashboard, selectors

APP = "metricsapp"
DEADLINE_S = 60


@pytest.fixture(scope="module")
def metrics_app(serve_url, tmp_path_factory):
    # A second model and one model per replica: switching loads and evicts (the model
    # metrics, test_model_loads_and_evictions_are_counted).
    args = fake_args(tmp_path_factory.mktemp("metrics-images"))
    args["models"] = [{"id": "other", "source": "fake"}]
    args["replica"] = {**args["replica"], "max_models_per_replica": 1}
    with deployed_app(serve_url, APP, args) as url:
        yield url


@pytest.fixture(scope="module")
def metrics_url(serve_url):
    import ray

    node = ray._private.worker.global_worker.node
    assert node.metrics_export_port == ray.nodes()[0]["MetricsExportPort"]
    return f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(url, timeout=10).text
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples, name: str, **labels: str) -> float:
    return sum(value for n, lab, value in samples
               if n == name and all(lab.get(k) == v for k, v in labels.items()))


def observe(samples) -> dict[str, float]:
    images = "ray_sdxl_images_generated_total"
    pipeline = "ray_sdxl_pipeline_latency_seconds_count"
    return {
        "images 512 3 steps": total(samples, images, application=APP, size="512x512",
                                    steps="3"),
        "images 512 1 step": total(samples, images, application=APP, size="512x512",
                                   steps="1"),
        "images 1024 2 steps": total(samples, images, application=APP, size="1024x1024",
                                     steps="2"),
        "images all": total(samples, images, application=APP),
        "pipeline calls 512 3 steps": total(samples, pipeline, application=APP,
                                            size="512x512", steps="3"),
        "pipeline calls 1024 2 steps": total(samples, pipeline, application=APP,
                                             size="1024x1024", steps="2"),
        "batches": total(samples, "ray_sdxl_batch_size_count", application=APP),
        "calls in batches": total(samples, "ray_sdxl_batched_calls_total", application=APP),
        "queue waits": total(samples, "ray_sdxl_queue_wait_seconds_count", application=APP),
        "encoded images": total(samples, "ray_sdxl_png_encode_seconds_count",
                                application=APP, kind="image"),
        "encoded grids": total(samples, "ray_sdxl_png_encode_seconds_count",
                               application=APP, kind="grid"),
        "errors invalid_request": total(samples, "ray_sdxl_errors_total", application=APP,
                                        code="invalid_request"),
        "errors generation_failed": total(samples, "ray_sdxl_errors_total", application=APP,
                                          code="generation_failed"),
        "errors not_found": total(samples, "ray_sdxl_errors_total", application=APP,
                                  code="not_found"),
        "errors method_not_allowed": total(samples, "ray_sdxl_errors_total", application=APP,
                                           code="method_not_allowed"),
        "http 200": total(samples, "ray_serve_num_http_requests_total", application=APP,
                          status_code="200"),
        "http 422": total(samples, "ray_serve_num_http_requests_total", application=APP,
                          status_code="422"),
        "http 500": total(samples, "ray_serve_num_http_requests_total", application=APP,
                          status_code="500"),
        "http errors 422": total(samples, "ray_serve_num_http_error_requests_total",
                                 application=APP, error_code="422"),
        "http errors 500": total(samples, "ray_serve_num_http_error_requests_total",
                                 application=APP, error_code="500"),
        "http latency observations": total(samples, "ray_serve_http_request_latency_ms_count",
                                           application=APP),
        "healthy model replicas": total(samples, "ray_serve_deployment_replica_healthy",
                                        application=APP, deployment="Text2ImageModel"),
        "healthy ingress replicas": total(samples, "ray_serve_deployment_replica_healthy",
                                          application=APP, deployment="Ingress"),
    }


def poll(metrics_url: str, read, expected: dict[str, float]) -> dict[str, float]:
    """`read(samples)` of each scrape until it equals `expected` or DEADLINE_S passes
    (metrics reach the endpoint on Ray's export interval); the last reading."""
    deadline = time.monotonic() + DEADLINE_S
    observed: dict[str, float] = {}
    while time.monotonic() < deadline:
        observed = read(scrape(metrics_url))
        if observed == expected:
            break
        time.sleep(1)
    return observed


def test_counters_move_after_requests(metrics_app, metrics_url):
    from ray import serve

    # 3 sequential calls of 2 images (one batch and one pipeline call each).
    for _ in range(3):
        assert post(metrics_app, {"prompt": "m", "batch": 2, "step": 3}).status_code == 200
    # 2 calls of 1 image and a grid.
    body = post(metrics_app, {"prompt": "m", "number": 2, "step": 1}).json()
    assert body["gridUrl"] is not None
    assert post(metrics_app, {"prompt": "m", "size": "1024x1024", "step": 2}).status_code == 200
    for _ in range(2):
        assert post(metrics_app, {"prompt": ""}).status_code == 422
    assert post(metrics_app, {"prompt": FAIL_PROMPT}).status_code == 500
    # Routing errors raised by the framework itself are counted as ours are.
    assert httpx.get(f"{metrics_app}/api/no-such-endpoint").status_code == 404
    assert httpx.get(f"{metrics_app}/api/text2image").status_code == 405

    stats = serve.get_deployment_handle("Text2ImageModel", app_name=APP).stats.remote().result()
    # Sequential requests make one batch each; the 2 calls of one request make 1 or 2.
    assert len(stats["batch_sizes"]) in (6, 7)
    assert sum(stats["batch_sizes"]) == 7
    expected = {
        "images 512 3 steps": 6, "images 512 1 step": 2, "images 1024 2 steps": 1,
        "images all": 9,
        "pipeline calls 512 3 steps": 3, "pipeline calls 1024 2 steps": 1,
        "batches": len(stats["batch_sizes"]), "calls in batches": 7, "queue waits": 7,
        "encoded images": 9, "encoded grids": 1,
        "errors invalid_request": 2, "errors generation_failed": 1,
        "errors not_found": 1, "errors method_not_allowed": 1,
        "http 200": 5, "http 422": 2, "http 500": 1,
        "http errors 422": 2, "http errors 500": 1, "http latency observations": 10,
        "healthy model replicas": 1, "healthy ingress replicas": 1,
    }

    assert poll(metrics_url, observe, expected) == expected

    samples = scrape(metrics_url)
    latency = [(lab, v) for n, lab, v in samples
               if n == "ray_sdxl_pipeline_latency_seconds_sum" and lab.get("application") == APP]
    assert latency and all(v > 0 for _, v in latency)
    replicas = {lab["replica"] for n, lab, _ in samples
                if n == "ray_sdxl_images_generated_total" and lab.get("application") == APP}
    assert len(replicas) == 1


def test_a_call_whose_client_left_is_counted_as_dropped(metrics_app, metrics_url):
    """The batcher's drop counter and queue-depth gauge on the live endpoint: a call waits
    behind a busy replica, its client gives up, the call is dropped before it runs."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    batcher = serve.get_deployment_handle("Batcher", app_name=APP)
    batches = len(batcher.stats.remote().result()["batch_sizes"])
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, metrics_app, {"prompt": SLOW_PROMPT, "step": 1})
        deadline = time.monotonic() + 30
        while len(batcher.stats.remote().result()["batch_sizes"]) == batches:
            assert time.monotonic() < deadline, "the slow call never started"
            time.sleep(0.05)
        with pytest.raises(httpx.TimeoutException):
            post(metrics_app, {"prompt": "left", "step": 1}, timeout=0.5)
        assert busy.result().status_code == 200
    depth = "ray_sdxl_queue_depth"
    expected = {"dropped": 1.0, "waiting": 0.0}

    def read(samples) -> dict[str, float]:
        return {
            "dropped": total(samples, "ray_sdxl_dropped_calls_total", application=APP,
                             reason="client_left"),
            "waiting": total(samples, depth, application=APP, **{"class": "interactive"}),
        }
    assert poll(metrics_url, read, expected) == expected
    assert batcher.stats.remote().result()["dropped"] == 1


def test_model_loads_and_evictions_are_counted(metrics_app, metrics_url):
    """Switching to the other model and back, one model per replica: each switch loads one
    model and evicts the other; the calls wait per model in the batcher."""
    for model in ("other", "sdxl-turbo"):
        assert post(metrics_app, {"prompt": "m", "step": 1, "model": model}).status_code == 200
    expected = {"loads default": 2.0, "loads other": 1.0, "evictions default": 1.0,
                "evictions other": 1.0, "load times default": 2.0, "load times other": 1.0,
                "waiting other": 0.0}

    def read(samples) -> dict[str, float]:
        return {
            "loads default": total(samples, "ray_sdxl_model_loads_total", application=APP,
                                   model="sdxl-turbo"),
            "loads other": total(samples, "ray_sdxl_model_loads_total", application=APP,
                                 model="other"),
            "evictions default": total(samples, "ray_sdxl_model_evictions_total",
                                       application=APP, model="sdxl-turbo"),
            "evictions other": total(samples, "ray_sdxl_model_evictions_total",
                                     application=APP, model="other"),
            "load times default": total(samples, "ray_sdxl_model_load_seconds_count",
                                        application=APP, model="sdxl-turbo"),
            "load times other": total(samples, "ray_sdxl_model_load_seconds_count",
                                      application=APP, model="other"),
            "waiting other": total(samples, "ray_sdxl_model_queue_depth", application=APP,
                                   model="other", **{"class": "interactive"}),
        }
    assert poll(metrics_url, read, expected) == expected


def test_dashboard_names_and_labels_exist_on_the_live_endpoint(metrics_app, metrics_url):
    # Runs after the test above made every series appear (errors included).
    samples = scrape(metrics_url)
    labels_of: dict[str, set[str]] = defaultdict(set)
    for name, labels, _ in samples:
        if labels.get("application") == APP:
            labels_of[name].update(labels)
    for expr in expressions(load_dashboard()):
        grouped = by_labels(expr)
        for name, matched in selectors(expr):
            assert name in labels_of, f"{name} not exported"
            assert matched <= labels_of[name], (name, matched - labels_of[name])
            assert grouped <= labels_of[name], (expr, grouped - labels_of[name])
