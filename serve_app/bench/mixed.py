"""Mixed load against a running service: 512x512 and 1024x1024 interactive calls
interleaved, with a stream of async jobs beside them. Reports, per class and shape,
latency percentiles and images/s, and the serving overhead at concurrency 1.

    python -m serve_app.bench.mixed --url http://127.0.0.1:8000 --json out.json

Run it against each design with the same server config (bench/timed_fake.py generator).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from serve_app.bench.load import parse_server_timing, percentile


def _post(client: Any, url: str, body: dict[str, Any]) -> tuple[int, float, dict[str, float]]:
    started = time.perf_counter()
    response = client.post(f"{url}/api/text2image", json=body)
    elapsed = time.perf_counter() - started
    timing = parse_server_timing(response.headers.get("server-timing", ""))
    return response.status_code, elapsed, timing


def interactive_load(url: str, *, requests: int, concurrency: int, ratio_512: int,
                     steps: int) -> list[dict[str, Any]]:
    import httpx

    pattern = ["512x512"] * ratio_512 + ["1024x1024"]
    counter = iter(range(requests))
    lock = threading.Lock()
    out: list[dict[str, Any]] = []

    def worker() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                size = pattern[index % len(pattern)]
                status, latency, _ = _post(client, url, {"prompt": f"mixed {index}",
                                                         "size": size, "step": steps})
                with lock:
                    out.append({"class": "interactive", "shape": size, "status": status,
                                "latency_s": latency, "end": time.perf_counter()})

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return out


def job_stream(url: str, stop: threading.Event, every_s: float,
               steps: int) -> list[dict[str, Any]]:
    """Submits a 512x512 job every `every_s` until stopped, then waits for all of them."""
    import httpx

    submitted: list[str] = []
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            response = client.post(f"{url}/api/jobs",
                                   json={"prompt": "job", "size": "512x512", "step": steps})
            if response.status_code == 202:
                submitted.append(response.json()["statusUrl"])
            stop.wait(every_s)
        out = []
        for status_url in submitted:
            while True:
                record = client.get(status_url).json()
                if record["status"] in ("succeeded", "failed"):
                    break
                time.sleep(0.05)
            out.append({"class": "job", "shape": "512x512",
                        "status": 200 if record["status"] == "succeeded" else 500,
                        "latency_s": record["updatedAt"] - record["createdAt"],
                        "end": time.perf_counter()})
    return out


def summarize(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[f"{row['class']} {row['shape']}"].append(row)
    out: dict[str, Any] = {}
    for key, items in sorted(groups.items()):
        ok = [r["latency_s"] for r in items if r["status"] == 200]
        pixels = 4 if "1024" in key else 1
        out[key] = {"requests": len(items), "ok": len(ok),
                    "p50_s": percentile(ok, 50), "p90_s": percentile(ok, 90),
                    "p99_s": percentile(ok, 99), "images_per_s": len(ok) / wall_s,
                    "megapixel_images_per_s": len(ok) * pixels * 0.262 / wall_s}
    return out


def overhead(url: str, requests: int) -> dict[str, float]:
    """HTTP latency minus the replica's pipeline time (Server-Timing), concurrency 1."""
    import httpx

    values = []
    with httpx.Client(timeout=120) as client:
        for i in range(requests + 3):
            status, latency, timing = _post(client, url, {"prompt": f"o{i}", "step": 1})
            if i >= 3 and status == 200 and "pipeline" in timing:
                values.append(latency - timing["pipeline"])
    return {"requests": len(values), "p50_ms": percentile(values, 50) * 1000,
            "p90_ms": percentile(values, 90) * 1000}


def batch_counters(metrics_url: str) -> tuple[float, float]:
    """(calls handed over in batches, batches) summed over replicas, from Ray's Prometheus
    endpoint: both designs export ray_sdxl_batched_calls_total and ray_sdxl_batch_size."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    calls = batches = 0.0
    text = httpx.get(metrics_url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ray_sdxl_batched_calls_total":
                calls += sample.value
            elif sample.name == "ray_sdxl_batch_size_count":
                batches += sample.value
    return calls, batches


# Ray exports metrics every few seconds: wait this long before reading them back.
METRICS_SETTLE_S = 12.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--ratio-512", type=int, default=3, help="512 calls per 1024 call")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--job-every-s", type=float, default=0.5)
    parser.add_argument("--overhead-requests", type=int, default=40)
    parser.add_argument("--label", default="")
    parser.add_argument("--metrics-url", default=None,
                        help="Ray's Prometheus endpoint: report the mean batch size")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)

    result: dict[str, Any] = {"label": args.label, "config": vars(args)}
    result["overhead_c1"] = overhead(args.url, args.overhead_requests)
    if args.metrics_url:
        time.sleep(METRICS_SETTLE_S)
        counters_before = batch_counters(args.metrics_url)
    stop = threading.Event()
    jobs: list[dict[str, Any]] = []
    job_thread = threading.Thread(
        target=lambda: jobs.extend(job_stream(args.url, stop, args.job_every_s, args.steps)))
    started = time.perf_counter()
    job_thread.start()
    rows = interactive_load(args.url, requests=args.requests, concurrency=args.concurrency,
                            ratio_512=args.ratio_512, steps=args.steps)
    interactive_wall = time.perf_counter() - started
    stop.set()
    job_thread.join()
    result["interactive_wall_s"] = interactive_wall
    result["rows"] = summarize(rows + jobs, interactive_wall)
    if args.metrics_url:
        time.sleep(METRICS_SETTLE_S)
        calls, batches = (after - before for after, before in
                          zip(batch_counters(args.metrics_url), counters_before))
        result["batches"] = {"calls": calls, "batches": batches,
                             "mean_batch_size": calls / batches if batches else None}
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump(result, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
