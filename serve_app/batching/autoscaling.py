"""Model replicas autoscale on the batcher's backlog, not only on their ongoing batches.

A model replica holds one batch at a time, so Serve's default signal (ongoing requests per
replica) tops out at 1 however many calls wait in the batcher. Each replica reports the
backlog it was handed with its batch, in batches (`record_autoscaling_stats`); this policy
adds the largest report to the ongoing count and lets Serve's default policy decide, with
its delays and bounds (`replica.autoscaling`).
"""

from __future__ import annotations

from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

from serve_app.protocol import BACKLOG_METRIC
from serve_app.ray_compat import with_more_requests


def backlog_batches(ctx: AutoscalingContext) -> float:
    # Every replica reports the same batcher's backlog: the largest, not the sum.
    reported = (ctx.aggregated_metrics or {}).get(BACKLOG_METRIC, {})
    return max(reported.values(), default=0.0)


def backlog_policy(ctx: AutoscalingContext) -> tuple[int | float, dict[str, Any]]:
    waiting = backlog_batches(ctx)
    if waiting <= 0:
        return replica_queue_length_autoscaling_policy(ctx)
    desired, state = replica_queue_length_autoscaling_policy(with_more_requests(ctx, waiting))
    # Within the deployment's bounds, whatever the backlog.
    bounded = min(max(desired, ctx.capacity_adjusted_min_replicas),
                  ctx.capacity_adjusted_max_replicas)
    return bounded, state
