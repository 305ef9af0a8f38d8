"""Apply an overlay so that a KubeRay upgrade keeps the live capacity.

KubeRay 1.7's `NewCluster` upgrade (a change to rayClusterConfig: a new image, pod
resources, the node pool) starts a second RayCluster and moves all traffic to it as soon
as its Serve application is healthy. Serve calls a deployment healthy once its initial
replicas run, and those are `min_replicas` unless told otherwise: under load, capacity would
fall from the live N model replicas to min_replicas at the switch, for the upscale delay
plus a node, an image pull and a model load.

This script renders the overlay, sets the model deployment's
`args.replica.autoscaling.initial_replicas` and the model worker group's `replicas` to the
number of model pods the active cluster runs now (within min..max), and applies it. The new
cluster then starts N model pods and is healthy, and takes the traffic, only when N
replicas run. Serve's autoscaling takes over afterwards (it scales down only after
`downscale_delay_s` of low load).

    python kuberay/upgrade.py kuberay/overlays/g8i             # kubectl apply
    python kuberay/upgrade.py kuberay/overlays/g8i --dry-run   # print what it would apply

For an apply that changes only serveConfigV2 (an in-place Serve update, no new cluster)
it is harmless: initial_replicas only matters to a deployment that starts.

Needs kubectl with access to the cluster; PyYAML (installed with Ray).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import yaml

MODEL_GROUP = "model"
APPLICATION = "sdxl-turbo"
Kubectl = Callable[..., str]


def run_kubectl(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True,
                            check=False, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args[:2])} failed: {result.stderr.strip()}")
    return result.stdout


def live_model_replicas(service: str, kubectl: Kubectl = run_kubectl) -> int:
    """Ready model pods of the RayService's active cluster (0 before the first deploy)."""
    cluster = kubectl("get", "rayservice", service, "--ignore-not-found",
                      "-o", "jsonpath={.status.activeServiceStatus.rayClusterName}").strip()
    if not cluster:
        return 0
    pods = json.loads(kubectl("get", "pods", "-o", "json",
                              "-l", f"ray.io/cluster={cluster},ray.io/group={MODEL_GROUP}"))
    return sum(
        1 for pod in pods["items"]
        if pod.get("metadata", {}).get("deletionTimestamp") is None
        and any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in pod.get("status", {}).get("conditions", [])))


def size_new_cluster(objects: list[dict[str, Any]], live: int) -> int:
    """Sets the RayService's model replicas to start with `live` (clamped to the autoscaling
    bounds); returns the number set. Changes `objects` in place."""
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = [a for a in serve_config["applications"] if a["name"] == APPLICATION]
    autoscaling = app["args"]["replica"]["autoscaling"]
    replicas = min(max(live, autoscaling["min_replicas"], 1), autoscaling["max_replicas"])
    autoscaling["initial_replicas"] = replicas
    (group,) = [g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                if g["groupName"] == MODEL_GROUP]
    group["replicas"] = replicas
    service["spec"]["serveConfigV2"] = yaml.safe_dump(serve_config, sort_keys=False)
    return replicas


def main(argv: list[str] | None = None, kubectl: Kubectl = run_kubectl) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overlay", help="the kustomization to apply, e.g. kuberay/overlays/g8i")
    parser.add_argument("--dry-run", action="store_true", help="print, do not apply")
    args = parser.parse_args(argv)
    objects = [d for d in yaml.safe_load_all(kubectl("kustomize", args.overlay)) if d]
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    live = live_model_replicas(service["metadata"]["name"], kubectl)
    replicas = size_new_cluster(objects, live)
    manifests = yaml.safe_dump_all(objects, sort_keys=False)
    print(f"model replicas live: {live}; the new cluster starts with {replicas}",
          file=sys.stderr)
    if args.dry_run:
        print(manifests)
    else:
        print(kubectl("apply", "-f", "-", stdin=manifests), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
