"""PNG charts of benchmark results (matplotlib, Agg backend, imported only when plotting).

Panels, drawn for whichever data the results hold:
  - latency by image size and denoising steps (in-process sweep, `latency` points)
  - throughput by batch size (in-process sweep, `batches` points)
  - throughput and latency by concurrency (HTTP load sweep, `sweep` points)

    python -m serve_app.bench.plot -o chart.png sweep.json load.json --title "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def collect(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The plottable points of several result dicts (the CLI's JSON), by panel."""
    data: dict[str, list[dict[str, Any]]] = {"latency": [], "batches": [], "concurrency": []}
    for result in results:
        data["latency"].extend(result.get("latency") or [])
        data["batches"].extend(result.get("batches") or [])
        if result.get("mode") == "load-sweep":
            data["concurrency"].extend(point["summary"] for point in result["sweep"])
        elif result.get("mode") == "load":
            data["concurrency"].append(result["summary"])
    data["concurrency"].sort(key=lambda s: s["concurrency"])
    return data


def _annotate(ax: Any, x: float, y: float, text: str) -> None:
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                fontsize=8)


def _latency_panel(ax: Any, points: list[dict[str, Any]]) -> None:
    sizes = list(dict.fromkeys((p["width"], p["height"]) for p in points))
    for width, height in sizes:
        rows = sorted((p for p in points if (p["width"], p["height"]) == (width, height)),
                      key=lambda p: p["steps"])
        xs = [p["steps"] for p in rows]
        ys = [p["median_total_s"] for p in rows]
        low = [y - p["min_total_s"] for y, p in zip(ys, rows)]
        high = [p["max_total_s"] - y for y, p in zip(ys, rows)]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3,
                    label=f"{width}x{height}")
        for x, y in zip(xs, ys):
            _annotate(ax, x, y, f"{y:.2f}")
    batches = sorted({p["batch"] for p in points})
    ax.set_title(f"Latency by size and steps (in-process, batch {batches[0]})"
                 if len(batches) == 1 else "Latency by size and steps (in-process)")
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("seconds per call (median; bars: min-max)")
    ax.set_xticks(sorted({p["steps"] for p in points}))
    ax.set_ylim(bottom=0)
    ax.legend(title="size")
    ax.grid(alpha=0.3)


def _batch_panel(ax: Any, points: list[dict[str, Any]]) -> None:
    rows = sorted(points, key=lambda p: p["batch"])
    labels = [str(p["batch"]) for p in rows]
    values = [p["images_per_s"] for p in rows]
    bars = ax.bar(labels, values, color="tab:green", alpha=0.8)
    for bar, p in zip(bars, rows):
        _annotate(ax, bar.get_x() + bar.get_width() / 2, bar.get_height(),
                  f"{p['images_per_s']:.2f} img/s\n{p['median_total_s']:.2f} s/call")
    first = rows[0]
    ax.set_title(f"Throughput by batch (in-process, {first['width']}x{first['height']}, "
                 f"{first['steps']} steps)")
    ax.set_xlabel("images per pipeline call (batch)")
    ax.set_ylabel("images / s (median run)")
    ax.set_ylim(0, max(values) * 1.3)
    ax.grid(axis="y", alpha=0.3)


def _concurrency_panel(ax: Any, summaries: list[dict[str, Any]]) -> None:
    xs = [s["concurrency"] for s in summaries]
    throughput = [s["images_per_s"] for s in summaries]
    p50 = [s["latency_s"]["p50"] for s in summaries]
    p90 = [s["latency_s"]["p90"] for s in summaries]
    ax.plot(xs, throughput, marker="o", color="tab:blue", label="images/s")
    for x, y in zip(xs, throughput):
        _annotate(ax, x, y, f"{y:.2f}")
    ax.set_xlabel("concurrent clients (HTTP)")
    ax.set_ylabel("images / s", color="tab:blue")
    ax.set_xticks(xs)
    ax.set_ylim(0, max(throughput) * 1.3)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(xs, p50, marker="s", linestyle="--", color="tab:red", label="latency p50")
    twin.plot(xs, p90, marker="^", linestyle=":", color="tab:orange", label="latency p90")
    twin.set_ylabel("request latency, s", color="tab:red")
    twin.set_ylim(0, max(p90) * 1.3)
    handles = ax.get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    ax.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], loc="upper left",
              fontsize=8)
    failed = sum(s.get("failed", 0) for s in summaries)
    requests = sum(s.get("requests", 0) for s in summaries)
    ax.set_title(f"HTTP load by concurrency ({requests - failed}/{requests} requests ok)")


def plot_results(results: list[dict[str, Any]], path: str | Path, *,
                 title: str | None = None, note: str | None = None) -> Path:
    """Write a PNG with one panel per kind of data present; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = collect(results)
    panels = [(name, points) for name, points in data.items() if points]
    if not panels:
        raise ValueError("nothing to plot: no latency, batch or concurrency sweep points")
    draw = {"latency": _latency_panel, "batches": _batch_panel,
            "concurrency": _concurrency_panel}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], panels):
        draw[name](ax, points)
    if title is None:
        labels = sorted({r["config"]["model_label"] for r in results
                         if "model_label" in r.get("config", {})})
        title = "; ".join(labels) or "sdxl-turbo-bench"
    fig.suptitle(title, fontsize=12)
    if note is None:
        envs = [r["environment"] for r in results if "environment" in r]
        if envs:
            env = envs[0]
            note = (f"{env.get('cpu', '?')}, {env.get('threads', '?')} torch threads, "
                    f"torch {env.get('torch', '?')}, diffusers {env.get('diffusers', '?')}, "
                    f"{env.get('date', '')}")
    if note:
        fig.text(0.5, 0.01, note, ha="center", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.bench.plot",
                                     description="Chart sdxl-turbo-bench JSON results.")
    parser.add_argument("results", nargs="+", help="JSON files written by --json")
    parser.add_argument("-o", "--output", required=True, help="PNG path")
    parser.add_argument("--title", default=None)
    parser.add_argument("--note", default=None, help="footnote (default: the environment)")
    args = parser.parse_args(argv)
    results = [json.loads(Path(p).read_text()) for p in args.results]
    print(f"wrote {plot_results(results, args.output, title=args.title, note=args.note)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
