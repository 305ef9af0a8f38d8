import os
import tempfile
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.app import (
    batcher_deployment_options,
    consumer_deployment_options,
    ingress_deployment_options,
    model_deployment_options,
)
from serve_app.config import AppConfig, BatchingConfig, parse_size

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_the_local_quick_start():
    config = AppConfig()
    assert config.model.source == "embedded:tiny-sdxl"
    assert config.model.dtype == "auto"
    assert config.store.url == f"{tempfile.gettempdir()}/sdxl-turbo-serve-{os.getuid()}/sdxl-turbo"
    assert config.batching.batch_wait_timeout_s == 0.0
    assert config.batching.max_batch_size == 4
    # A model replica takes one batch at a time: calls wait, and batch, in the batcher.
    assert config.replica.max_ongoing_requests == 1
    # Jobs: the application's own redis-server; no consumer replica until a job comes.
    assert (config.jobs.broker.url, config.jobs.broker.embedded_port) == ("embedded", 6390)
    assert config.jobs.consumer.min_replicas == 0


def test_the_quick_start_config_serves_jobs_on_the_embedded_broker():
    import yaml

    from serve_app.app import build_app

    local = yaml.safe_load((CONFIGS[0].parent / "local.yaml").read_text())
    args = local["applications"][0]["args"]
    assert AppConfig.model_validate(args).jobs.broker.url == "embedded"
    ingress = build_app(args)._bound_deployment
    bound = ingress.init_kwargs["job_deployments"]
    assert [app._bound_deployment.name for app in bound] == ["JobConsumer", "EmbeddedBroker"]


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate({"batching": {"max_batch": 8}})
    assert info.value.errors()[0]["loc"] == ("batching", "max_batch")


def test_the_batcher_holds_the_queue_and_the_batching_settings():
    config = AppConfig.model_validate({
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "replica": {"max_queued_requests": 10},
        "ingress": {"resources": {"ingress": 1}},
        "batcher": {"num_replicas": 2},
    })
    options = batcher_deployment_options(config)
    assert options["num_replicas"] == 2
    # On the ingress pods, beside the ingress.
    assert options["ray_actor_options"] == {"num_cpus": 0.1, "resources": {"ingress": 1}}
    # Every waiting call is an ongoing request there; the 503 limit is its own queue's.
    assert options["max_ongoing_requests"] == 100_000
    assert options["user_config"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.05,
                                      "max_images_per_call": 8, "max_batch_image_steps": 16.0,
                                      "job_max_wait_s": 30.0}
    assert model_deployment_options(config)["max_ongoing_requests"] == 1


def test_the_batcher_and_the_consumer_can_be_pinned_apart_from_the_ingress():
    beside = AppConfig.model_validate({"ingress": {"resources": {"ingress": 1}}})
    assert consumer_deployment_options(beside)["ray_actor_options"] == {
        "num_cpus": 0.1, "resources": {"ingress": 1}}
    apart = AppConfig.model_validate({
        "ingress": {"resources": {"ingress": 1}},
        "batcher": {"resources": {"batcher_node": 1}},
        "jobs": {"consumer": {"resources": {"consumer_node": 0.5}}},
    })
    assert batcher_deployment_options(apart)["ray_actor_options"] == {
        "num_cpus": 0.1, "resources": {"batcher_node": 1}}
    assert consumer_deployment_options(apart)["ray_actor_options"] == {
        "num_cpus": 0.1, "resources": {"consumer_node": 0.5}}
    # An empty mapping pins nothing, even where the ingress is pinned.
    free = AppConfig.model_validate({"ingress": {"resources": {"ingress": 1}},
                                     "batcher": {"resources": {}}})
    assert batcher_deployment_options(free)["ray_actor_options"] == {"num_cpus": 0.1}


def test_float16_without_gpu_is_rejected():
    with pytest.raises(ValidationError, match="float16 needs a GPU"):
        AppConfig.model_validate({"model": {"dtype": "float16"}})
    config = AppConfig.model_validate(
        {"model": {"dtype": "float16"}, "replica": {"num_gpus": 1}})
    assert config.model.dtype == "float16"


def test_warmup_sizes_must_be_allowed_sizes():
    with pytest.raises(ValidationError, match="not in limits.allowed_sizes"):
        AppConfig.model_validate({"model": {"warmup_sizes": ["768x768"]}})


@pytest.mark.parametrize("size,expected", [("512x512", (512, 512)), ("1024x768", (1024, 768))])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["512", "512x513", "ax512", "512X512"])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError):
        parse_size(size)


def test_model_options_follow_the_config():
    config = AppConfig.model_validate({
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "replica": {"num_cpus": 14, "memory_gib": 20, "max_queued_requests": 10,
                    "autoscaling": {"min_replicas": 0, "max_replicas": 3}},
    })
    options = model_deployment_options(config)
    assert options["ray_actor_options"] == {"num_cpus": 14, "memory": 20 * 1024**3}
    assert options["max_ongoing_requests"] == 1
    # At most one formed batch per batcher replica waits at the model's router.
    assert options["max_queued_requests"] == -1
    assert "user_config" not in options  # batching is the batcher's
    assert options["autoscaling_config"]["policy"] == {
        "policy_function": "serve_app.batching.autoscaling:backlog_policy"}
    assert options["autoscaling_config"]["min_replicas"] == 0
    assert options["autoscaling_config"]["initial_replicas"] == 1
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in options


def test_ingress_options():
    options = ingress_deployment_options(AppConfig.model_validate(
        {"ingress": {"num_replicas": 3, "num_cpus": 0.25}}))
    assert options["num_replicas"] == 3
    assert options["ray_actor_options"] == {"num_cpus": 0.25}
    # In-flight requests get as long to finish as the model's (the pod drain allows 140 s).
    assert options["graceful_shutdown_timeout_s"] == 120
    pinned = ingress_deployment_options(AppConfig.model_validate(
        {"ingress": {"resources": {"ingress": 1}}}))
    assert pinned["ray_actor_options"] == {"num_cpus": 0.5, "resources": {"ingress": 1}}


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "production.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_validates(path):
    document = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(document)
    for application in document["applications"]:
        assert application["import_path"] == "serve_app.app:build_app"
        # Deployment options are derived from args by build_app; a config that also sets
        # them in `deployments:` could silently disagree. The one override allowed is the
        # batcher's user_config: live batching changes, validated by reconfigure().
        for deployment in application.get("deployments", []):
            assert deployment["name"] == "Batcher"
            assert set(deployment) == {"name", "user_config"}
            BatchingConfig.model_validate(deployment["user_config"])
        AppConfig.model_validate(application["args"])


def test_the_default_image_store_is_per_application():
    """Two services on one machine must not share images or take over each other's jobs:
    the default directory is named by app_name (and the user)."""
    one = AppConfig.model_validate({"app_name": "svc-one"})
    two = AppConfig.model_validate({"app_name": "svc-two"})
    assert one.store.url == f"{tempfile.gettempdir()}/sdxl-turbo-serve-{os.getuid()}/svc-one"
    assert two.store.url == f"{tempfile.gettempdir()}/sdxl-turbo-serve-{os.getuid()}/svc-two"
    # What replicas receive is the resolved directory, so every replica agrees on it.
    assert AppConfig.model_validate(one.model_dump(mode="json")).store.url == one.store.url
    assert AppConfig.model_validate({"store": {"url": "s3://b/p"}}).store.url == "s3://b/p"


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 64])
def test_app_names_that_are_not_a_directory_name_are_refused(name):
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate({"app_name": name})
    assert info.value.errors()[0]["loc"] == ("app_name",)
