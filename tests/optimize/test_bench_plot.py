"""Benchmark CLI: sweeps, PNG charts and the stderr progress bar."""

from __future__ import annotations

import io
import json
import threading
from http.server import ThreadingHTTPServer

import pytest

from serve_app.bench.cli import main, parse_ints, parse_sizes
from serve_app.bench.plot import collect, plot_results
from serve_app.bench.progress import Progress, progress_enabled
from tests.optimize.test_bench import _FakeService

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _point(width, height, steps, batch, seconds):
    return {"width": width, "height": height, "steps": steps, "batch": batch,
            "median_total_s": seconds, "min_total_s": seconds * 0.9,
            "max_total_s": seconds * 1.2, "images_per_s": batch / seconds}


def _load_summary(concurrency, images_per_s, p50, p90):
    return {"concurrency": concurrency, "requests": 8, "failed": 0,
            "images_per_s": images_per_s, "latency_s": {"p50": p50, "p90": p90}}


FIXED_RESULTS = [
    {"mode": "sweep", "config": {"model_label": "fixed test data"},
     "environment": {"cpu": "test cpu", "threads": 2, "torch": "x", "diffusers": "y",
                     "date": "2026-01-01T00:00:00Z"},
     "latency": [_point(w, h, s, 1, 0.1 * s * w / 512) for w, h in ((512, 512), (1024, 1024))
                 for s in (1, 2, 4)],
     "batches": [_point(512, 512, 4, b, 0.4 * b ** 0.8) for b in (1, 2, 4)]},
    {"mode": "load-sweep",
     "sweep": [{"concurrency": c, "summary": _load_summary(c, 1.5 * c ** 0.5, 0.5 * c, 0.6 * c)}
               for c in (1, 2, 4)]},
]


def _png_size(path):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plot_results_writes_a_png_with_three_panels(tmp_path):
    out = plot_results(FIXED_RESULTS, tmp_path / "sub" / "chart.png", title="t")
    assert out == tmp_path / "sub" / "chart.png"
    width, height = _png_size(out)
    # 3 panels x 6.2 in, 5.2 in high, 110 dpi
    assert (width, height) == (2046, 572)


def test_plot_results_draws_only_the_panels_with_data(tmp_path):
    out = plot_results([FIXED_RESULTS[1]], tmp_path / "load.png")
    assert _png_size(out) == (682, 572)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_results([{"mode": "direct"}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_collect_sorts_concurrency_and_keeps_every_point():
    data = collect([FIXED_RESULTS[1], FIXED_RESULTS[0],
                    {"mode": "load", "summary": _load_summary(3, 2.0, 1.0, 1.1)}])
    assert [s["concurrency"] for s in data["concurrency"]] == [1, 2, 3, 4]
    assert len(data["latency"]) == 6 and len(data["batches"]) == 3


def test_parse_sweep_lists():
    assert parse_ints("1,2, 4") == [1, 2, 4]
    assert parse_sizes("512x512,1024X768") == [(512, 512), (1024, 768)]
    for bad in ("0,1", "a", ""):
        with pytest.raises(Exception, match="integers"):
            parse_ints(bad)
    with pytest.raises(Exception, match="multiples of 8"):
        parse_sizes("100x100")


def test_sweep_cli_writes_every_point_and_a_chart(tiny_model_dir, tmp_path, capsys):
    out, chart = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert main(["--model", str(tiny_model_dir), "--repeat", "1", "--warmup", "0",
                 "--width", "64", "--height", "64", "--step", "2",
                 "--sweep-sizes", "64x64,128x64", "--sweep-steps", "1,2",
                 "--sweep-batches", "1,2", "--no-progress",
                 "--json", str(out), "--plot", str(chart)]) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "sweep"
    assert data["config"]["base"] == {"width": 64, "height": 64, "steps": 2, "batch": 1}
    assert [(p["width"], p["height"], p["steps"], p["batch"]) for p in data["latency"]] == [
        (64, 64, 1, 1), (64, 64, 2, 1), (128, 64, 1, 1), (128, 64, 2, 1)]
    assert [(p["width"], p["height"], p["steps"], p["batch"]) for p in data["batches"]] == [
        (64, 64, 2, 1), (64, 64, 2, 2)]
    for point in data["latency"] + data["batches"]:
        assert len(point["runs"]) == 1
        assert point["median_total_s"] == point["runs"][0]["total_s"]
        assert point["images_per_s"] == pytest.approx(point["batch"] / point["median_total_s"])
    assert "prepack_linear" in data["applied"]
    assert _png_size(chart) == (1364, 572)  # latency and batch panels
    captured = capsys.readouterr()
    assert f"wrote {chart}" in captured.out
    assert "steps batch" not in captured.err  # --no-progress


def test_sweep_cli_only_batches_skips_the_latency_grid(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep.json"
    main(["--model", str(tiny_model_dir), "--repeat", "1", "--warmup", "0", "--width", "64",
          "--height", "64", "--step", "1", "--sweep-batches", "2", "--backend", "eager",
          "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["latency"] == []
    assert [p["batch"] for p in data["batches"]] == [2]
    assert "applied" not in data


def test_sweep_flags_in_the_wrong_mode_are_refused():
    with pytest.raises(SystemExit, match="needs --url"):
        main(["--sweep-concurrency", "1,2"])
    with pytest.raises(SystemExit, match="in-process sweeps"):
        main(["--url", "http://127.0.0.1:9", "--sweep-batches", "1,2"])
    with pytest.raises(SystemExit, match="one backend"):
        main(["--sweep-steps", "1", "--compare"])


def test_progress_bar_per_step_when_forced_on(tiny_model_dir, tmp_path, capsys):
    main(["--model", str(tiny_model_dir), "--repeat", "2", "--step", "3", "--warmup", "0",
          "--height", "64", "--width", "64", "--progress", "--json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    # one bar over 2 runs x 3 denoising steps, advanced by the pipeline's step callback
    assert "optimized 64x64 3 steps batch 1: 6/6 steps" in err
    assert "run 2/2" in err
    assert "optimized 64x64 3 steps batch 1: 3/6 steps" in err  # after the first run
    assert "4/6 steps" in err  # mid-run: per step, not only per run


def test_progress_bar_off_with_no_progress(tiny_model_dir, tmp_path, capsys):
    main(["--model", str(tiny_model_dir), "--repeat", "1", "--step", "1", "--warmup", "0",
          "--height", "64", "--width", "64", "--no-progress"])
    assert "steps batch" not in capsys.readouterr().err


def test_progress_bar_counts_http_requests(tmp_path, capsys):
    _FakeService.count = 0  # every 5th request fails: one in each point's 5
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "load.json"
    try:
        main(["--url", f"http://127.0.0.1:{server.server_address[1]}", "-n", "5",
              "--sweep-concurrency", "1,2", "--progress", "--json", str(out)])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    # one bar per concurrency point; the last frame of each line is the final state
    finals = [line.split("\r")[-1] for line in err.split("\n") if "HTTP -c" in line]
    assert [f.split(" |")[0] for f in finals] == ["HTTP -c 1: 5/5 requests",
                                                 "HTTP -c 2: 5/5 requests"]
    assert [f.rsplit("| ", 1)[1].split(", ", 1)[1] for f in finals] == [
        "ok 4, failed 1", "ok 4, failed 1"]
    data = json.loads(out.read_text())
    assert data["mode"] == "load-sweep" and data["requests_per_point"] == 5
    assert [p["concurrency"] for p in data["sweep"]] == [1, 2]
    assert [p["summary"]["concurrency"] for p in data["sweep"]] == [1, 2]
    assert [p["summary"]["failed"] for p in data["sweep"]] == [1, 1]


def test_progress_auto_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_enabled(None, io.StringIO()) is False
    assert progress_enabled(None, Tty()) is True
    assert progress_enabled(True, io.StringIO()) is True
    assert progress_enabled(False, Tty()) is False


@pytest.mark.parametrize("use_tqdm", [True, False])
def test_progress_text_is_the_same_with_or_without_tqdm(use_tqdm):
    stream = io.StringIO()
    with Progress(4, "demo", unit="steps", file=stream, use_tqdm=use_tqdm) as bar:
        bar.set_postfix("run 1/2")
        bar.update(2)
        bar.update(2)
    text = stream.getvalue()
    assert "demo: 2/4 steps |" in text and "demo: 4/4 steps |" in text
    assert text.rstrip("\n").endswith("run 1/2")
    assert text.endswith("\n")
    assert bar.n == 4


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    with Progress(4, "demo", enabled=False, file=stream) as bar:
        bar.update(4)
    assert stream.getvalue() == "" and bar.n == 4
