from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from serve_app.bench.cli import main
from serve_app.bench.load import (
    RequestResult,
    parse_server_timing,
    percentile,
    run_load,
    summarize,
)


def test_bench_cli_end_to_end_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_model_dir), "--repeat", "1", "--step", "1",
                 "--height", "128", "--width", "128", "--compare", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "direct"
    assert {"config", "environment", "backends", "command"} <= set(data)
    assert {"torch", "diffusers", "cpu", "date", "threads"} <= set(data["environment"])
    assert list(data["backends"]) == ["eager", "optimized"]
    for entry in data["backends"].values():
        assert {"runs", "median", "images_per_s", "speedup_vs_eager"} <= set(entry)
        assert {"total_s", "unet_s", "vae_decode_s", "text_encoders_s",
                "unet_step_s"} <= set(entry["median"])
    optimized = data["backends"]["optimized"]
    assert "prepack_linear" in optimized["applied"]
    assert {"mean_abs", "max_abs"} <= set(optimized["image_diff_vs_eager"])
    assert optimized["image_diff_vs_eager"]["max_abs"] <= 8
    assert "speedup" in capsys.readouterr().out


def test_bench_cli_only_and_disable(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    main(["--model", str(tiny_model_dir), "--repeat", "1", "--step", "1", "--warmup", "0",
          "--height", "64", "--width", "64", "--only", "fuse_attention", "--json", str(out)])
    data = json.loads(out.read_text())
    assert list(data["backends"]) == ["optimized"]
    assert data["backends"]["optimized"]["applied"] == ["fuse_attention"]


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0, 2.0], list(range(1, 101)),
                                    [0.5, 0.1, 9.0, 2.5, 2.5, 7.25, 3.0]])
@pytest.mark.parametrize("q", [0, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_known_values_and_empty():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50.5
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert math.isnan(percentile([], 50))


def test_summary_counts_failures_and_overhead():
    results = [RequestResult(True, 2.0, 200, images=1, generation_s=1.5),
               RequestResult(True, 4.0, 200, images=2, generation_s=1.5),
               RequestResult(True, 3.0, 200, images=1, generation_s=2.5),
               RequestResult(False, 0.1, 503, error="HTTP 503"),
               RequestResult(False, 0.2, None, error="ConnectError: refused")]
    s = summarize(results, wall_s=8.0, concurrency=2)
    assert (s["requests"], s["succeeded"], s["failed"]) == (5, 3, 2)
    assert s["success_rate"] == pytest.approx(0.6)
    assert s["images"] == 4 and s["images_per_s"] == pytest.approx(0.5)
    assert s["latency_s"]["p50"] == 3.0  # failures are not in the latency percentiles
    assert s["latency_s"]["p90"] == pytest.approx(3.8)
    assert s["generation_s_p50"] == 1.5
    assert s["serve_overhead_p50_s"] == pytest.approx(1.5)
    assert s["status_codes"] == {"200": 3, "503": 1, "none": 1}
    assert "overhead_vs_pipeline_s" not in s  # no Server-Timing in these responses


def test_parse_server_timing():
    assert parse_server_timing("pipeline;dur=581.2, model;dur=590.4,store;dur=3") == {
        "pipeline": pytest.approx(0.5812), "model": pytest.approx(0.5904),
        "store": pytest.approx(0.003)}
    assert parse_server_timing('db;desc="x";dur=2.5, cache, bad;dur=x') == {
        "db": pytest.approx(0.0025)}
    assert parse_server_timing(None) == {} and parse_server_timing("") == {}


def test_overhead_is_taken_per_request_against_the_pipeline_time():
    results = [RequestResult(True, 1.020, 200, timings={"pipeline": 1.0, "store": 0.004}),
               RequestResult(True, 2.050, 200, timings={"pipeline": 2.0, "store": 0.006}),
               RequestResult(True, 0.530, 200, timings={"pipeline": 0.5, "store": 0.005}),
               RequestResult(False, 9.0, 500, error="HTTP 500",
                             timings={"pipeline": 0.1})]
    s = summarize(results, wall_s=4.0)
    assert s["pipeline_s_p50"] == 1.0
    # per request: 20, 50, 30 ms -> p50 30 ms (not p50 latency 1.02 - p50 pipeline 1.0)
    assert s["overhead_vs_pipeline_s"]["p50"] == pytest.approx(0.030)
    assert s["overhead_vs_pipeline_s"]["p90"] == pytest.approx(0.046)
    assert s["store_s_p50"] == pytest.approx(0.005)


class _FakeService(BaseHTTPRequestHandler):
    """Every 5th request it receives gets 503; use it through fake_service(), which gives
    each server its own count."""

    count = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.lock:
            type(self).count += 1
            fail = type(self).count % 5 == 0
        if fail:
            self.send_response(503)
            self.end_headers()
            return
        payload = json.dumps({"status": "success", "generationTimeSeconds": 0.01,
                              "output": [{"url": "x", "latencySeconds": 0.01}] * body["number"]})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("server-timing", "pipeline;dur=8, model;dur=9.5, store;dur=1")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@contextmanager
def fake_service() -> Iterator[str]:
    """A fresh _FakeService on loopback (its URL), counting from 0: the 5th, 10th, ...
    request it receives fails, whatever ran before."""
    handler = type("FakeService", (_FakeService,), {"count": 0, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_run_load_against_a_local_server():
    with fake_service() as url:
        load = run_load(url, requests=20, concurrency=4, body={"prompt": "p", "number": 2})
    summary = load.to_dict()
    assert summary["requests"] == 20
    assert summary["succeeded"] == 16 and summary["status_codes"]["503"] == 4
    assert summary["images"] == 32
    assert summary["generation_s_p50"] == 0.01
    assert summary["pipeline_s_p50"] == 0.008 and summary["store_s_p50"] == 0.001
    ok = [r for r in load.results if r.ok]
    assert summary["overhead_vs_pipeline_s"]["p50"] == pytest.approx(
        percentile([r.latency_s - 0.008 for r in ok], 50))


def test_bench_cli_interleaved(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    main(["--model", str(tiny_model_dir), "--repeat", "2", "--step", "1", "--warmup", "0",
          "--height", "64", "--width", "64", "--compare", "--interleave", "--json", str(out)])
    data = json.loads(out.read_text())
    optimized = data["backends"]["optimized"]
    assert data["config"]["interleaved"] is True
    assert len(optimized["pair_speedups"]) == 2 and "median_pair_speedup" in optimized
    assert len(data["backends"]["eager"]["runs"]) == 2
    assert "cpu_s" in data["backends"]["eager"]["median"]


def test_bench_cli_load_mode_writes_json(tmp_path, capsys):
    out = tmp_path / "load.json"
    with fake_service() as url:
        main(["--url", url, "-n", "6", "-c", "2",
              "--width", "512", "--height", "512", "--step", "4", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["mode"] == "load"
    assert data["body"] == {"prompt": data["body"]["prompt"], "size": "512x512", "step": 4,
                            "batch": 1, "number": 1}
    summary = data["summary"]
    assert summary["requests"] == 6
    # The server's 5th request failed: this run's own, whatever ran before it.
    assert (summary["succeeded"], summary["failed"]) == (5, 1)
    assert summary["status_codes"] == {"200": 5, "503": 1}
    assert summary["success_rate"] == 5 / 6
    assert {"p50", "p90", "p95", "p99"} <= set(summary["latency_s"])
    assert {"success_rate", "images_per_s", "serve_overhead_p50_s"} <= set(summary)
    assert "serve overhead" in capsys.readouterr().out


def test_compile_unet_bench_levers_variant(tiny_model_dir, tmp_path, capsys):
    from serve_app.bench import compile_unet

    out = tmp_path / "compile.json"
    assert compile_unet.main(["--variant", "levers", "--model", str(tiny_model_dir),
                              "--size", "64", "--repeat", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["variant"] == "levers" and data["size"] == 64
    assert data["speedup_vs_eager"] == pytest.approx(data["eager_step_s"] / data["step_s"])
    assert len(data["steps_s"]) == 1
    assert 0 <= data["max_abs_diff_vs_eager"] <= 0.1  # bf16 reordering only
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == data


def test_backends_side_by_side_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    """`--backends`: each backend in its own process, loaded as a replica loads it; the
    UNet step and VAE decode timed inside the same calls; diffs against the first."""
    pytest.importorskip("openvino")
    out = tmp_path / "backends.json"
    assert main(["--backends", "torch-eager,torch,openvino", "--model", str(tiny_model_dir),
                 "--cases", "128x128,128x128x2", "--repeat", "2", "--step", "2",
                 "--threads", "2", "--dtype", "float32", "--cache-dir", str(tmp_path / "ir"),
                 "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "backends"
    assert data["config"]["dtype"] == "float32"
    assert list(data["backends"]) == ["torch-eager", "torch", "openvino"]
    assert [len(rounds) for rounds in data["rounds"].values()] == [1, 1, 1]
    for label, entry in data["backends"].items():
        assert entry["dtype"] == "float32"
        assert entry["backend"] == ("openvino" if label == "openvino" else "torch")
        assert list(entry["cases"]) == ["128x128 b1", "128x128 b2"]
        for case in entry["cases"].values():
            assert case["calls"] == 2
            assert 0 < case["unet_step_s"] < case["total_s"]
            assert 0 < case["vae_decode_s"] < case["total_s"]
            assert entry["peak_rss_gb"] > 0
    eager = data["backends"]["torch-eager"]
    assert eager["applied"] == []
    assert eager["cases"]["128x128 b1"]["image_diff_vs_reference"]["max_abs"] == 0
    assert eager["cases"]["128x128 b1"]["speedup_vs_reference"] == 1.0
    assert "prepack_linear" in data["backends"]["torch"]["applied"]
    assert data["backends"]["openvino"]["applied"] == ["openvino_ir", "compiled_cache",
                                                      "prompt_cache"]
    # float32 OpenVINO matches torch eager float32 (tests/optimize/test_openvino.py).
    ov = data["backends"]["openvino"]["cases"]["128x128 b2"]["image_diff_vs_reference"]
    assert ov["mean_abs"] <= 0.01 and ov["max_abs"] <= 2
    table = capsys.readouterr().out
    assert "| openvino | float32 | 128x128 b2 |" in table


def test_backends_mode_refuses_the_in_memory_full_model_and_unknown_labels(tmp_path):
    with pytest.raises(SystemExit, match="save the full-size model first"):
        main(["--backends", "torch"])
    with pytest.raises(SystemExit, match=r"backends \['tensorrt'\]: choose from torch-eager"):
        main(["--backends", "torch,tensorrt", "--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="case '512': want WIDTHxHEIGHT"):
        main(["--backends", "torch", "--model", str(tmp_path), "--cases", "512"])
    with pytest.raises(SystemExit, match="case '512x512:0': want WIDTHxHEIGHT"):
        main(["--backends", "torch", "--model", str(tmp_path), "--cases", "512x512:0"])


def test_backends_fast_rows_on_tiny_model(tiny_model_dir, tmp_path):
    """The fast-profile rows: each runs its parts (on OpenVINO the UNet weights profile fast
    picks for this host's CPU class, int8 weights where asked for; the tiny VAE from
    --tiny-vae), per-case steps, and every row's image is compared with torch eager at the
    same dtype."""
    pytest.importorskip("openvino")
    from serve_app.config import ModelConfig
    from serve_app.model import cpu
    from serve_app.model.tiny_model import ensure_tiny_vae

    vae = ensure_tiny_vae(tmp_path / "vae")
    out = tmp_path / "fast.json"
    assert main(["--backends", "torch-eager,torch-fast,openvino-tiny-vae,openvino-fast,"
                               "openvino-int8-tiny-vae,torch-int8-tiny-vae",
                 "--model", str(tiny_model_dir), "--cases", "128x128:1,128x128:2",
                 "--repeat", "1", "--threads", "2", "--dtype", "float32",
                 "--tiny-vae", str(vae), "--cache-dir", str(tmp_path / "ir"),
                 "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    backends = data["backends"]
    assert list(backends) == ["torch-eager", "torch-fast", "openvino-tiny-vae",
                              "openvino-fast", "openvino-int8-tiny-vae", "torch-int8-tiny-vae"]
    assert "tiny_vae" not in backends["torch-eager"]["applied"]
    weights, _ = ModelConfig(profile="fast", backend="openvino").resolve_weights(
        cpu.host().cpu_class)
    assert backends["openvino-fast"]["applied"][0] == "openvino_ir"
    assert ("int8_weights" in backends["openvino-fast"]["applied"]) == (weights == "int8")
    assert backends["openvino-int8-tiny-vae"]["applied"][:2] == ["openvino_ir", "int8_weights"]
    assert "int8_weights" not in backends["openvino-tiny-vae"]["applied"]
    # torch's int8 layers: always in their own row, in torch-fast where the class picks them.
    int8, _ = ModelConfig(profile="fast").resolve_torch_int8(cpu.host().cpu_class)
    assert ("int8_unet" in backends["torch-fast"]["applied"]) == int8
    assert "int8_unet" in backends["torch-int8-tiny-vae"]["applied"]
    assert "int8_unet" not in backends["torch-eager"]["applied"]
    for label, entry in backends.items():
        assert list(entry["cases"]) == ["128x128 b1 s1", "128x128 b1 s2"], label
        for case in entry["cases"].values():
            assert case["calls"] == 1
            assert 0 < case["vae_decode_s"] < case["total_s"]
            diff = case["image_diff_vs_reference"]
            # The tiny VAE decodes other pixels than the full one (random weights: drift).
            assert (diff["max_abs"] == 0) == (label == "torch-eager"), (label, diff)
        # One step runs one UNet call, two steps two: the per-case steps were used.
        runs = data["rounds"][label][0]["cases"]
        assert [runs[name]["runs"][0]["unet_calls"] for name in entry["cases"]] == [1, 2]


def test_backends_run_one_at_a_time_then_summarized(tiny_model_dir, tmp_path, capsys):
    """Each backend as its own command in one work dir (a shared machine's lock held for
    one backend at a time), then `--summarize` builds the table from the saved results
    against the first label, without running anything."""
    pytest.importorskip("openvino")
    common = ["--model", str(tiny_model_dir), "--cases", "128x128:1,128x128:2",
              "--repeat", "1", "--threads", "2", "--dtype", "float32",
              "--cache-dir", str(tmp_path / "ir"), "--work-dir", str(tmp_path / "work")]
    with pytest.raises(SystemExit, match="no results for torch-eager, openvino"):
        main(["--backends", "torch-eager,openvino", "--summarize", *common])
    assert main(["--backends", "torch-eager", *common]) == 0
    assert main(["--backends", "openvino", *common]) == 0
    assert main(["--backends", "torch-eager", *common]) == 0
    capsys.readouterr()
    out = tmp_path / "summary.json"
    assert main(["--backends", "torch-eager,openvino", "--summarize", *common,
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [len(data["rounds"][label]) for label in ("torch-eager", "openvino")] == [2, 1]
    eager, ov = data["backends"]["torch-eager"], data["backends"]["openvino"]
    assert eager["backend"] == "torch" and ov["backend"] == "openvino"
    for name in ("128x128 b1 s1", "128x128 b1 s2"):
        assert eager["cases"][name]["calls"] == 2 and ov["cases"][name]["calls"] == 1
        assert eager["cases"][name]["image_diff_vs_reference"]["max_abs"] == 0
        diff = ov["cases"][name]["image_diff_vs_reference"]
        assert diff["mean_abs"] <= 0.01 and diff["max_abs"] <= 2  # float32 OV = torch
        assert ov["cases"][name]["speedup_vs_reference"] == pytest.approx(
            eager["cases"][name]["total_s"] / ov["cases"][name]["total_s"])
    assert "| openvino | float32 | 128x128 b1 s2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="pass --work-dir"):
        main(["--backends", "torch-eager", "--summarize", "--model", str(tiny_model_dir)])
