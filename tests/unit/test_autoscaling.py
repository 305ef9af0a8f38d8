"""Model replicas scale on ongoing batches plus the batcher's backlog."""

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serve_app.batching.autoscaling import backlog_policy
from serve_app.protocol import BACKLOG_METRIC


def context(ongoing: float, backlog: list[float], replicas: int = 1) -> AutoscalingContext:
    deployment = DeploymentID(name="Text2ImageModel", app_name="app")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=deployment) for i in range(replicas)]
    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=1,
                               upscale_delay_s=0, downscale_delay_s=0)
    return AutoscalingContext(
        deployment_id=deployment, deployment_name="Text2ImageModel", app_name="app",
        current_num_replicas=replicas, target_num_replicas=replicas, running_replicas=ids,
        total_num_requests=ongoing, total_queued_requests=0,
        aggregated_metrics={BACKLOG_METRIC: dict(zip(ids, backlog))}, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=None, config=config)


def test_backlog_adds_replicas_beyond_what_ongoing_batches_ask():
    # One replica busy with one batch: the default signal is satisfied (1 per replica).
    assert backlog_policy(context(ongoing=1, backlog=[0]))[0] == 1
    # Three more batches' worth waiting in the batcher: four replicas wanted.
    assert backlog_policy(context(ongoing=1, backlog=[3]))[0] == 4


def test_every_replica_reports_the_same_backlog_so_the_largest_counts_not_the_sum():
    desired, _ = backlog_policy(context(ongoing=2, backlog=[2, 1], replicas=2))
    assert desired == 4  # 2 running + 2 waiting, at 1 batch per replica


def test_bounds_still_hold():
    assert backlog_policy(context(ongoing=1, backlog=[50]))[0] == 8
