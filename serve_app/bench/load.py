"""HTTP load against a running service (like `hey`): stdlib threads and httpx only."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


@dataclass
class RequestResult:
    ok: bool
    latency_s: float
    status: int | None = None
    images: int = 0
    generation_s: float | None = None
    error: str | None = None
    # From the response's Server-Timing header, seconds: pipeline, model, store.
    timings: dict[str, float] = field(default_factory=dict)


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`pipeline;dur=581.2, store;dur=3.1` -> {"pipeline": 0.5812, "store": 0.0031}."""
    timings: dict[str, float] = {}
    for entry in (header or "").split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if name and key == "dur":
                try:
                    timings[name] = float(value) / 1000.0
                except ValueError:
                    pass
    return timings


@dataclass
class LoadSummary:
    requests: int
    concurrency: int
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return summarize(self.results, self.wall_s, self.concurrency)


def summarize(results: Sequence[RequestResult], wall_s: float,
              concurrency: int = 1) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    latencies = [r.latency_s for r in ok]
    generation = [r.generation_s for r in ok if r.generation_s is not None]
    images = sum(r.images for r in ok)
    summary: dict[str, Any] = {
        "requests": len(results),
        "concurrency": concurrency,
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "success_rate": (len(ok) / len(results)) if results else math.nan,
        "wall_s": wall_s,
        "images": images,
        "images_per_s": images / wall_s if wall_s > 0 else math.nan,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else math.nan,
        "latency_s": {f"p{q}": percentile(latencies, q) for q in PERCENTILES},
        "latency_mean_s": sum(latencies) / len(latencies) if latencies else math.nan,
        "status_codes": {},
        "errors": sorted({r.error for r in results if r.error})[:10],
    }
    summary["latency_s"]["min"] = min(latencies) if latencies else math.nan
    summary["latency_s"]["max"] = max(latencies) if latencies else math.nan
    for r in results:
        key = str(r.status) if r.status is not None else "none"
        summary["status_codes"][key] = summary["status_codes"].get(key, 0) + 1
    if generation:
        gen_p50 = percentile(generation, 50)
        summary["generation_s_p50"] = gen_p50
        # What HTTP, queueing, batching, encoding and storage add on top of the model call.
        summary["serve_overhead_p50_s"] = summary["latency_s"]["p50"] - gen_p50
    timed = [r for r in ok if "pipeline" in r.timings]
    if timed:
        # Per request, so queueing and load drift cancel: what the service adds to the
        # pipeline's own time (HTTP, proxy, hops to the replica, batching, PNG, storage).
        summary["pipeline_s_p50"] = percentile([r.timings["pipeline"] for r in timed], 50)
        summary["overhead_vs_pipeline_s"] = {
            f"p{q}": percentile([r.latency_s - r.timings["pipeline"] for r in timed], q)
            for q in (50, 90)}
        if all("store" in r.timings for r in timed):
            summary["store_s_p50"] = percentile([r.timings["store"] for r in timed], 50)
    return summary


def _one_request(client: Any, url: str, body: dict[str, Any],
                 headers: dict[str, str]) -> RequestResult:
    started = time.perf_counter()
    try:
        response = client.post(url, json=body, headers=headers)
        latency = time.perf_counter() - started
        if response.status_code != 200:
            return RequestResult(False, latency, response.status_code,
                                 error=f"HTTP {response.status_code}")
        data = response.json()
        return RequestResult(data.get("status") == "success", latency, response.status_code,
                             images=len(data.get("output") or []),
                             generation_s=data.get("generationTimeSeconds"),
                             timings=parse_server_timing(response.headers.get("server-timing")))
    except Exception as exc:  # connection errors, timeouts: counted, not raised
        return RequestResult(False, time.perf_counter() - started,
                             error=f"{type(exc).__name__}: {exc}"[:200])


def run_load(base_url: str, *, requests: int, concurrency: int, body: dict[str, Any],
             api_key: str | None = None, timeout_s: float = 600.0,
             path: str = "/api/text2image",
             on_result: Callable[[RequestResult], None] | None = None) -> LoadSummary:
    """on_result: called (under a lock) as each request completes, e.g. a progress bar."""
    import httpx

    url = base_url.rstrip("/") + path
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[RequestResult] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        with httpx.Client(timeout=timeout_s) as client:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                result = _one_request(client, url, body, headers)
                with lock:
                    results.append(result)
                    if on_result is not None:
                        on_result(result)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return LoadSummary(requests, concurrency, time.perf_counter() - started, results)


def format_load(summary: dict[str, Any]) -> str:
    lat = summary["latency_s"]
    lines = [
        f"requests {summary['requests']}  concurrency {summary['concurrency']}  "
        f"success {summary['succeeded']}/{summary['requests']} "
        f"({100 * summary['success_rate']:.1f}%)",
        f"wall {summary['wall_s']:.2f}s  images/s {summary['images_per_s']:.3f}  "
        f"requests/s {summary['requests_per_s']:.3f}",
        "latency  " + "  ".join(f"{k} {v:.3f}s" for k, v in lat.items()),
        f"status codes {summary['status_codes']}",
    ]
    if "serve_overhead_p50_s" in summary:
        lines.append(f"generationTimeSeconds p50 {summary['generation_s_p50']:.3f}s  "
                     f"serve overhead (HTTP p50 - generation p50) "
                     f"{summary['serve_overhead_p50_s']:.3f}s")
    if "overhead_vs_pipeline_s" in summary:
        over = summary["overhead_vs_pipeline_s"]
        lines.append(f"pipeline p50 {summary['pipeline_s_p50']:.3f}s  serve overhead "
                     f"(HTTP - pipeline, per request) p50 {over['p50'] * 1000:.1f} ms  "
                     f"p90 {over['p90'] * 1000:.1f} ms"
                     + (f"  (PNG + store p50 {summary['store_s_p50'] * 1000:.1f} ms)"
                        if "store_s_p50" in summary else ""))
    if summary["errors"]:
        lines.append(f"errors {summary['errors']}")
    return "\n".join(lines)
