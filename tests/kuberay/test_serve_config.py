"""serveConfigV2 == configs/production.yaml; Ray and AppConfig accept it; pod resources,
Ray resources and the replica config agree; node-pool placement per overlay."""

from __future__ import annotations

import copy
import json
import os
import shlex

import click
import pytest
import yaml
from ray.scripts.scripts import start as ray_start_command
from ray.serve.schema import ServeDeploySchema

from serve_app.app import model_deployment_options
from serve_app.config import AppConfig
from tests.kuberay.manifests import (
    G8I_LABEL,
    OVERLAYS,
    PRODUCTION,
    TDX_LABEL,
    app_args,
    generate_module,
    pod_templates,
    quantity_bytes,
    quantity_cpus,
    rayservice,
    serve_config,
    worker_group,
)

# Memory the model replica needs, in GiB (an estimate, not measured on g8i):
#   weights in bfloat16: UNet 2.6e9 + text encoders 0.82e9 + VAE 0.08e9 params x 2 B = 7.0 GB
#   (6.5 GiB); activations for a batch of 4 images at 1024x1024 (VAE decode dominates)
#   ~10 GiB; Python, torch, Ray worker ~1.5 GiB.
MODEL_WEIGHTS_GIB = 6.5
MODEL_PEAK_GIB = 18.0
OBJECT_STORE_BYTES = 2 * 1024**3


def production() -> dict:
    return yaml.safe_load(PRODUCTION.read_text())


# --- one source -----------------------------------------------------------------------------

def test_generated_files_are_up_to_date() -> None:
    assert generate_module().stale() == []


def test_generation_detects_drift(tmp_path, monkeypatch) -> None:
    generate = generate_module()
    changed = production()
    changed["applications"][0]["args"]["replica"]["num_cpus"] = 30
    source = tmp_path / "production.yaml"
    source.write_text(yaml.safe_dump(changed))
    monkeypatch.setattr(generate, "SOURCE", source)
    assert generate.stale() == [generate.BASE_RAYSERVICE, generate.TDX_PATCH]


def in_cluster(config: dict) -> dict:
    """configs/production.yaml plus the ingress resource only the ingress pods offer."""
    config["applications"][0]["args"]["ingress"]["resources"] = {"ingress": 1}
    return config


@pytest.mark.parametrize("name", ("base", "overlays/g8i", "overlays/g8i-lite"))
def test_serve_config_is_production_yaml(name: str) -> None:
    assert serve_config(rayservice(name)) == in_cluster(production())


def test_tdx_serve_config_is_production_yaml_plus_require_tee() -> None:
    expected = in_cluster(production())
    expected["applications"][0]["args"]["security"] = {"require_tee": True}
    # Confidential mode refuses an unencrypted store: every write asks OSS for SSE-KMS.
    expected["applications"][0]["args"]["store"]["storage_options"][
        "s3_additional_kwargs"] = {"ServerSideEncryption": "KMS"}
    assert serve_config(rayservice("overlays/tdx")) == expected


def test_the_tdx_config_passes_confidential_mode_with_a_verified_rediss_secret(monkeypatch):
    """What a TDX pod's replicas check at start: with the Secret's URL in the documented
    rediss:// form it starts; with a redis:// URL it refuses (one line, no password)."""
    from serve_app import confidential
    from serve_app.jobs.broker import confidential_urls

    [app] = serve_config(rayservice("overlays/tdx"))["applications"]
    config = AppConfig.model_validate(app["args"])
    monkeypatch.setenv("JOBS_BROKER_URL", "rediss://:pw@r-x.redis.rds.aliyuncs.com:6380/0"
                                          "?ssl_cert_reqs=required"
                                          "&ssl_ca_certs=/etc/redis-tls/ca.pem")
    confidential.check(config, **confidential_urls(config))
    assert confidential.protections(config, os.environ["JOBS_BROKER_URL"]) == {
        "confidential": True, "brokerTls": "verified", "storeEncryption": "KMS",
        "storeTls": True, "acceptedRisks": []}
    monkeypatch.setenv("JOBS_BROKER_URL", "redis://:pw@r-x.redis.rds.aliyuncs.com:6379/0")
    with pytest.raises(confidential.ConfidentialModeError,
                       match=r"jobs.broker.url_env \(JOBS_BROKER_URL\) is not rediss://"):
        confidential.check(config, **confidential_urls(config))


def kuberay_resources(value: str) -> dict:
    """KubeRay 1.7's reading of rayStartParams.resources (getResourcesMap, common/pod.go):
    strings.Trim(value, "'\"` ") then JSON. It runs for every worker pod it builds; a value
    it can't parse is logged as an error each time."""
    return json.loads(value.strip("'\"` "))


def ray_start_resources(value: str) -> dict:
    """Ray's reading: KubeRay writes `--resources=<value>` into the `ray start` line that bash
    runs; `ray start` parses the option with parse_resources_json (JSON)."""
    argv = shlex.split(f"ray start --resources={value} --block")
    context = ray_start_command.make_context("start", argv[2:])
    return json.loads(context.params["resources"])


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_only_ingress_pods_offer_the_ingress_resource(name: str) -> None:
    spec = rayservice(name)["spec"]["rayClusterConfig"]
    values = {group["groupName"]: group["rayStartParams"]["resources"]
              for group in spec["workerGroupSpecs"] if "resources" in group["rayStartParams"]}
    assert list(values) == ["ingress"]
    # Both the operator and Ray must parse it, to the same resources.
    assert kuberay_resources(values["ingress"]) == {"ingress": 1000}
    assert ray_start_resources(values["ingress"]) == {"ingress": 1000}
    assert "resources" not in spec["headGroupSpec"]["rayStartParams"]


def test_resource_parsers_reject_what_their_programs_reject() -> None:
    # The form this repo used before: Ray reads it, KubeRay does not.
    legacy = '"{\\"ingress\\": 1000}"'
    assert ray_start_resources(legacy) == {"ingress": 1000}
    with pytest.raises(json.JSONDecodeError):
        kuberay_resources(legacy)
    # Unquoted JSON: bash splits it at the space.
    with pytest.raises(click.UsageError, match="unexpected extra argument"):
        ray_start_resources('{"ingress": 1000}')


# --- Ray's schema and the app's own config ---------------------------------------------------

@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_serve_config_validates_with_ray(name: str) -> None:
    schema = ServeDeploySchema.model_validate(serve_config(rayservice(name)))
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app"
    assert app.name == "sdxl-turbo"
    assert app.route_prefix == "/"
    assert schema.http_options.port == 8000
    assert schema.http_options.host == "0.0.0.0"


def test_ray_schema_rejects_a_broken_config() -> None:
    broken = serve_config(rayservice("overlays/g8i"))
    broken["applications"][0]["import_pth"] = broken["applications"][0].pop("import_path")
    with pytest.raises(Exception, match="import_pth|import_path"):
        ServeDeploySchema.model_validate(broken)


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_args_validate_as_app_config(name: str) -> None:
    config = AppConfig.model_validate(app_args(rayservice(name)))
    assert config.model.source == "/models/sdxl-turbo"
    assert config.model.dtype == "bfloat16"
    assert config.store.url.startswith("s3://")
    # Issue 20: OSS refuses botocore 1.36+'s default aws-chunked uploads (checksums only
    # where required), and serves buckets as virtual hosts (tests/unit/test_s3_strict.py).
    # Issue 21: the tdx overlay encrypts every write at rest (SSE-KMS).
    sse = {"s3_additional_kwargs": {"ServerSideEncryption": "KMS"}}
    assert config.store.storage_options == {
        "endpoint_url": "https://oss-cn-hangzhou-internal.aliyuncs.com",
        "config_kwargs": {"request_checksum_calculation": "when_required",
                          "response_checksum_validation": "when_required",
                          "s3": {"addressing_style": "virtual"}},
        **(sse if name == "overlays/tdx" else {})}
    assert config.security.require_tee is (name == "overlays/tdx")


# --- resources agree ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_model_pod_matches_the_replica(name: str) -> None:
    service = rayservice(name)
    config = AppConfig.model_validate(app_args(service))
    group = worker_group(service, "model")
    container = group["template"]["spec"]["containers"][0]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    # The reference pod for ecs.g8i.4xlarge (16 vCPU / 64 GiB).
    assert requests == {"cpu": "14", "memory": "24Gi", "ephemeral-storage": "10Gi"}
    assert limits == {"cpu": "16", "memory": "32Gi", "ephemeral-storage": "20Gi"}
    ray_cpus = int(group["rayStartParams"]["num-cpus"])
    # Ray CPUs == replica CPUs == torch threads: exactly one replica per pod.
    assert ray_cpus == config.replica.num_cpus == 14
    assert config.replica.num_cpus <= quantity_cpus(limits["cpu"])
    assert config.replica.num_cpus <= quantity_cpus(requests["cpu"])
    assert ray_cpus // config.replica.num_cpus == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OMP_NUM_THREADS"] == str(config.replica.num_cpus)
    # What build_app passes to Ray.
    options = model_deployment_options(config)
    assert options["ray_actor_options"]["num_cpus"] == ray_cpus


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_model_pod_memory_fits_sdxl_turbo(name: str) -> None:
    service = rayservice(name)
    config = AppConfig.model_validate(app_args(service))
    group = worker_group(service, "model")
    resources = group["template"]["spec"]["containers"][0]["resources"]
    limit = quantity_bytes(resources["limits"]["memory"])
    request = quantity_bytes(resources["requests"]["memory"])
    reserved = int(config.replica.memory_gib * 1024**3)
    assert int(group["rayStartParams"]["object-store-memory"]) == OBJECT_STORE_BYTES
    assert MODEL_WEIGHTS_GIB < MODEL_PEAK_GIB <= config.replica.memory_gib == 20
    assert reserved <= request == 24 * 1024**3
    # Ray's memory resource on the node (limit minus object store) holds the reservation.
    assert reserved + OBJECT_STORE_BYTES <= limit == 32 * 1024**3
    assert model_deployment_options(config)["ray_actor_options"]["memory"] == reserved


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_head_runs_no_replica_and_ingress_fits(name: str) -> None:
    service = rayservice(name)
    config = AppConfig.model_validate(app_args(service))
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "1", "memory": "4Gi", "ephemeral-storage": "10Gi"},
        "limits": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "20Gi"}}
    ingress = worker_group(service, "ingress")
    per_pod = int(ingress["rayStartParams"]["num-cpus"])
    assert per_pod < config.replica.num_cpus   # a model replica never fits an ingress pod
    assert ingress["minReplicas"] * per_pod >= config.ingress.num_replicas * config.ingress.num_cpus
    limit = ingress["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    assert per_pod <= quantity_cpus(limit)


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_worker_pods_follow_serve_autoscaling(name: str) -> None:
    service = rayservice(name)
    auto = AppConfig.model_validate(app_args(service)).replica.autoscaling
    assert auto is not None
    # min_replicas 2 (issue 20): the model disruption budget keeps one of them in a drain.
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 8, 2.0)
    group = worker_group(service, "model")
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 2, 8)
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


# --- placement ------------------------------------------------------------------------------

def test_base_has_no_node_pool_pin() -> None:
    for template in pod_templates(rayservice("base")).values():
        assert "nodeSelector" not in template["spec"]
        assert "tolerations" not in template["spec"]


def test_tdx_overlay_pins_every_pod_to_the_tdx_pool() -> None:
    templates = pod_templates(rayservice("overlays/tdx"))
    assert sorted(templates) == ["head", "ingress", "model"]
    for template in templates.values():
        assert template["spec"]["nodeSelector"] == TDX_LABEL
        # Any value of the key: the hard nodeSelector keeps the pods on the TDX pool.
        assert template["spec"]["tolerations"] == [{
            "key": "nodepool-label", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.mark.parametrize("name", ("overlays/g8i", "overlays/g8i-lite"))
def test_g8i_overlays_pin_to_g8i_and_never_to_tdx(name: str) -> None:
    templates = pod_templates(rayservice(name))
    assert sorted(templates) == ["head", "ingress", "model"]
    for template in templates.values():
        assert template["spec"]["nodeSelector"] == G8I_LABEL
        assert "tdx-vm-pool" not in yaml.safe_dump(template)


def test_overlays_differ_from_base_only_where_intended() -> None:
    base = rayservice("base")
    for name, label in (("overlays/g8i", G8I_LABEL), ("overlays/tdx", TDX_LABEL)):
        service = copy.deepcopy(rayservice(name))
        for group, template in pod_templates(service).items():
            assert template["spec"].pop("nodeSelector") == label
            template["spec"].pop("tolerations", None)
            if name == "overlays/tdx" and group in ("head", "ingress"):
                # The job Redis's CA, where Redis is talked to (redis-tls.yaml).
                assert template["spec"].pop("volumes") == [
                    {"name": "redis-ca", "secret": {"secretName": "sdxl-turbo-jobs-redis-ca"}}]
                assert template["spec"]["containers"][0].pop("volumeMounts") == [
                    {"name": "redis-ca", "mountPath": "/etc/redis-tls", "readOnly": True}]
        service["spec"]["serveConfigV2"] = base["spec"]["serveConfigV2"]
        assert service == base


# --- async jobs -----------------------------------------------------------------------------

def _env(container: dict) -> dict[str, dict]:
    return {var["name"]: var for var in container.get("env", [])}


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_jobs_use_the_external_redis_from_a_secret_where_it_is_read(name: str) -> None:
    """The broker URL (with its password) is never in the config: jobs.broker.url_env
    names a variable that the head (the Serve controller's queue-length policy) and the
    ingress pods (ingress and JobConsumer replicas) get from the Secret; the model pods,
    which never talk to the broker, don't."""
    service = rayservice(name)
    broker = AppConfig.model_validate(app_args(service)).jobs.broker
    assert (broker.url_env, broker.queue_name) == ("JOBS_BROKER_URL", "sdxl-jobs")
    assert "redis://" not in json.dumps(app_args(service))
    wanted = {"valueFrom": {"secretKeyRef": {"name": "sdxl-turbo-jobs-redis", "key": "url"}},
              "name": "JOBS_BROKER_URL"}
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _env(head)["JOBS_BROKER_URL"] == wanted
    ingress = worker_group(service, "ingress")["template"]["spec"]["containers"][0]
    assert _env(ingress)["JOBS_BROKER_URL"] == wanted
    model = worker_group(service, "model")["template"]["spec"]["containers"][0]
    assert "JOBS_BROKER_URL" not in _env(model)


@pytest.mark.parametrize("name", ("base",) + OVERLAYS)
def test_job_consumers_scale_to_zero_on_ingress_pods_and_fit_there(name: str) -> None:
    from serve_app.app import consumer_deployment_options

    service = rayservice(name)
    config = AppConfig.model_validate(app_args(service))
    options = consumer_deployment_options(config)
    auto = options["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (0, 4)
    assert auto["policy"]["policy_function"] == "serve_app.jobs.broker:QueueDepthPolicy"
    # On ingress pods (their Ray resource), never on a model pod.
    assert options["ray_actor_options"]["resources"] == {"ingress": 1}
    ingress = worker_group(service, "ingress")
    per_pod = int(ingress["rayStartParams"]["num-cpus"])
    busiest = (config.ingress.num_replicas * config.ingress.num_cpus
               + config.batcher.num_replicas * config.batcher.num_cpus
               + auto["max_replicas"] * options["ray_actor_options"]["num_cpus"])
    assert busiest <= ingress["maxReplicas"] * per_pod
    # A job never outlives its delivery's visibility timeout (it would run twice).
    assert config.jobs.broker.visibility_timeout_s >= config.ingress.request_timeout_s + 10
