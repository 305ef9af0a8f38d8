"""The Grafana dashboard: valid JSON, and every metric its PromQL uses exists.

A name is either defined in serve_app/metrics.py or a Ray Serve built-in whose definition is
found in the installed Ray source. tests/integration/test_metrics.py also checks each name
and label against a live metrics endpoint.
"""

import json
import re
from pathlib import Path

import ray.serve

from serve_app import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "grafana-sdxl-turbo.json"

# Ray Serve's own metrics used by the dashboard, as scraped -> as defined in Ray's source.
RAY_SERVE_BUILTINS = {
    "ray_serve_num_http_requests_total": "serve_num_http_requests",
    "ray_serve_num_http_error_requests_total": "serve_num_http_error_requests",
    "ray_serve_http_request_latency_ms_bucket": "serve_http_request_latency_ms",
    "ray_serve_deployment_replica_healthy": "serve_deployment_replica_healthy",
}

SELECTOR = re.compile(r"\b(ray_[A-Za-z0-9_]+)\s*(?:\{([^}]*)\})?")
LABEL_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
BY_CLAUSE = re.compile(r"\bby\s*\(([^)]*)\)")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label keys matched on it) for each metric in a PromQL expression."""
    return [(name, set(LABEL_MATCHER.findall(labels or "")))
            for name, labels in SELECTOR.findall(expr)]


def by_labels(expr: str) -> set[str]:
    return {label.strip() for group in BY_CLAUSE.findall(expr) for label in group.split(",")
            if label.strip()}


def metric_names(dashboard: dict) -> set[str]:
    return {name for expr in expressions(dashboard) for name, _ in selectors(expr)}


def ray_serve_source() -> str:
    root = Path(ray.serve.__file__).parent
    text = "\n".join(p.read_text(encoding="utf-8") for p in root.rglob("*.py")
                     if "tests" not in p.parts)
    # The HTTP request metrics are defined once per protocol: f"serve_num_{protocol_name}_...".
    return text.replace("{protocol_name}", "http")


def test_dashboard_is_valid_grafana_json():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "sdxl-turbo-serve"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    titles = [p["title"] for p in panels]
    assert titles == [
        "Request volume", "Success rate", "4xx / 5xx", "Latency P50 / P90 / P95 / P99",
        "Replicas", "Images generated", "Pipeline latency by size and steps", "Batch size",
        "Queue wait in the batcher", "Pipeline calls per replica", "PNG encode time",
        "Errors by code", "Queue depth by class and shape", "Calls dropped before running",
        "Model loads and evictions", "Model load time", "Queue depth by model",
    ]
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    latency = next(p for p in panels if p["title"].startswith("Latency"))
    assert [t["legendFormat"] for t in latency["targets"]] == ["P50", "P90", "P95", "P99"]


def test_every_metric_in_the_dashboard_exists():
    names = metric_names(load_dashboard())
    defined = metrics.exported_names()
    unknown = names - defined - set(RAY_SERVE_BUILTINS)
    assert unknown == set()
    # Every custom metric is on the dashboard, and the four Ray Serve built-ins are used.
    assert {n.rsplit("_", 1)[0] if n.endswith(("_bucket", "_sum", "_count", "_total")) else n
            for n in names & defined} == {f"ray_{name}" for name in metrics.METRICS}
    assert names & set(RAY_SERVE_BUILTINS) == set(RAY_SERVE_BUILTINS)


def test_ray_serve_builtins_are_defined_in_the_installed_ray():
    source = ray_serve_source()
    for scraped, defined in RAY_SERVE_BUILTINS.items():
        assert f'"{defined}"' in source, f"{defined} ({scraped}) is not in Ray's source"


def test_ray_serve_builtin_labels_match_ray_tag_keys():
    source = ray_serve_source()
    tag_keys = {
        "serve_num_http_requests": ("route", "method", "application", "status_code"),
        "serve_num_http_error_requests": ("route", "error_code", "method", "application"),
        "serve_http_request_latency_ms": ("method", "route", "application", "status_code"),
    }
    for name, keys in tag_keys.items():
        start = source.index(f'"{name}"')
        definition = source[start:start + 800]
        found = re.search(r"tag_keys=\(([^)]*)\)", definition)
        assert found is not None, name
        assert tuple(k.strip().strip('"') for k in found.group(1).split(",") if k.strip()) == keys
    dashboard = load_dashboard()
    for expr in expressions(dashboard):
        for name, labels in selectors(expr):
            if name in RAY_SERVE_BUILTINS and RAY_SERVE_BUILTINS[name] in tag_keys:
                assert labels <= set(tag_keys[RAY_SERVE_BUILTINS[name]]), (name, labels)
