"""The one typed configuration of the application.

`configs/*.yaml` carry it under `applications[].args`; `build_app` validates it before any
deployment starts, so a typo fails `serve run` at once instead of inside a replica.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

EMBEDDED_TINY = "embedded:tiny-sdxl"
# A second embedded tiny model: the same architecture, weights from another seed (the quick
# start serves both, so the same prompt and seed give different images per model).
EMBEDDED_TINY_B = "embedded:tiny-sdxl-b"
EMBEDDED_MODELS = (EMBEDDED_TINY, EMBEDDED_TINY_B)
# A random-weight AutoencoderTiny at toy size, generated offline (serve_app/model/tiny_model.py):
# the tiny VAE of the embedded model (tests, the quick start).
EMBEDDED_TINY_VAE = "embedded:tiny-taesd"
# The tiny autoencoder for SDXL latents (diffusers AutoencoderTiny, TAESDXL).
TAESDXL = "madebyollin/taesdxl"
SIZE_PATTERN = re.compile(r"^(\d{2,4})x(\d{2,4})$")
# A model's id: what requests name ("model"), a Ray Serve multiplexed model id, a metric tag.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$"
DEFAULT_MODEL_ID = "sdxl-turbo"
# LoRA adapter names become module keys inside the pipeline (PEFT): no dots.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$"
# replica.max_models_per_replica unset: every configured model, but no more than this.
MAX_MODELS_PER_REPLICA_DEFAULT_CAP = 3
# Resident size estimates (GiB) when a model names no memory_gib: SDXL holds about 3.5 G
# parameters (UNet 2.6 G, text encoders 0.8 G, VAE 0.08 G), plus the runtime's own buffers.
SDXL_MEMORY_GIB = {"float32": 14.0, "bfloat16": 7.0, "float16": 7.0, "int8": 4.0}
# model.profile fast's OpenVINO UNet weights by CPU class (serve_app.model.cpu), as measured:
# int8 weights pay only where the CPU computes in int8 (with dynamic activation quantization,
# serve_app.model.openvino.runtime.DYNAMIC_QUANTIZATION_MEASURED); without VNNI they were
# slower than the dtype's. Classes not listed get the dtype's weights until measured.
# BENCHMARKS.md, issue 24.
FAST_WEIGHTS_MEASURED: dict[str, tuple[Literal["int8", "dtype"], str]] = {
    "avx512_bf16": ("int8", "UNet step 512x512 2.9-3.3 s with int8 weights and dynamic "
                            "quantization against 3.9-4.5 s for the bfloat16 IR (AMD EPYC "
                            "Zen 4)"),
    "avx2": ("dtype", "512x512 with the tiny VAE, whole calls: 4 steps 41.0 s with float32 "
                      "weights against 43.4 s with int8, 1 step 11.0 s against 11.2 s (AMD "
                      "EPYC Zen 3, no VNNI, one run, 2026-12-06)"),
}
# model.profile fast on the torch backends: CPU classes where the UNet's int8 layers
# (model.torch_int8, serve_app/model/optimize/int8.py) made whole calls faster, and there
# `backend: auto` with profile fast runs torch rather than OpenVINO (serve_app.model.backend).
# Classes not listed keep the UNet in the dtype until measured. BENCHMARKS.md, issue 24.
FAST_TORCH_INT8_MEASURED: dict[str, str] = {
    "avx2": "512x512 with the tiny VAE, whole calls: 4 steps 24.8 s against 39.6 s for "
            "OpenVINO float32, 1 step 7.2 s against 10.6 s; 2.52x / 3.97x torch eager "
            "(AMD EPYC Zen 3, no VNNI, two rounds, 2026-12-06)",
}
EMBEDDED_MEMORY_GIB = 0.1


def parse_size(size: str) -> tuple[int, int]:
    """'512x768' -> (width, height)."""
    match = SIZE_PATTERN.match(size)
    if match is None:
        raise ValueError(f"size must look like '512x512', got {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width % 8 or height % 8:
        raise ValueError(f"size must be a multiple of 8 on both sides, got {size!r}")
    return width, height


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def check_host_patterns(hosts: list[str] | None, key: str) -> list[str] | None:
    """A host allow-list (serve_app.outbound.host_allowed): host names, IPs, '*.domain'."""
    for host in hosts or []:
        pattern = host[2:] if host.startswith("*.") else host.strip("[]")
        has_port = ":" in pattern and not _is_ipv6(pattern)
        if not pattern or has_port or any(c in pattern for c in "/*@ "):
            raise ValueError(f"{key}: {host!r} is not a host name, an IP, "
                             "or '*.domain' (no scheme, port or path)")
    return hosts


def default_store_dir(app_name: str) -> str:
    """`<tmp>/sdxl-turbo-serve-<uid>/<app_name>`: per user (a directory another user made in
    /tmp is not writable) and per application."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"sdxl-turbo-serve-{uid}", app_name)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizationConfig(StrictModel):
    """Speed levers for the CPU replica; each has an off switch (see BENCHMARKS.md)."""

    channels_last: bool = True
    # oneDNN-prepacked weights for nn.Linear / nn.Conv2d (serve_app/model/optimize/).
    prepack_linear: bool = True
    prepack_conv: bool = True
    # GEGLU as two GEMMs with GELU and multiply fused in; fused self-attention q/k/v.
    fuse_geglu: bool = True
    fuse_attention: bool = True
    # Cross-attention K/V of the prompt embeddings computed once per call, not every step.
    cross_attention_kv_cache: bool = True
    # LRU cache of prompt embeddings (entries); 0 turns it off.
    prompt_cache_size: int = Field(default=64, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tiny_vae" in data:
            raise ValueError("model.optimization.tiny_vae was replaced by model.vae: tiny "
                             "(and model.tiny_vae_source: <that directory>)")
        return data


class OpenVINOConfig(StrictModel):
    """model.backend openvino: the pipeline's networks run as OpenVINO IR
    (serve_app/model/openvino/), exported once per model, versions and options."""

    # Where the IR is cached, a directory every replica shares. Unset: `openvino/` inside
    # the model's directory (beside the weights). Must be writable unless the IR for this
    # model, versions and options is already there (exported with `sdxl-turbo-export`).
    cache_dir: str | None = None
    # int8: weights compressed to int8 with nncf.compress_weights at export; dtype: the
    # dtype's weights (f32 IR for float32, f16-stored weights for bfloat16). Unset: from
    # model.profile (fast: int8, quality: dtype).
    weights: Literal["int8", "dtype"] | None = None
    # int8 weights only: the CPU plugin quantizes activations to int8 on the fly in groups of
    # this many (DYNAMIC_QUANTIZATION_GROUP_SIZE), so the int8 GEMMs run int8 x int8. 0 turns
    # it off. Unset: the group measured fastest on this CPU class
    # (serve_app.model.openvino.runtime.DYNAMIC_QUANTIZATION_MEASURED), else off.
    dynamic_quantization_group_size: int | None = Field(default=None, ge=0, le=65536)
    # OpenVINO's compiled-model cache (CACHE_DIR): a restarted replica loads its compiled
    # networks from there instead of compiling again. Unset: `compiled/` beside the IR
    # (model.openvino.cache_dir); "" turns it off.
    compiled_cache_dir: str | None = None


class LoraConfig(StrictModel):
    """A LoRA adapter on a model (model.loras, models[].loras)."""

    # A hub id, a local directory or .safetensors file, or `embedded:tiny-lora-a` /
    # `embedded:tiny-lora-b` (random weights for the embedded tiny model; tests).
    source: str = Field(min_length=1)
    # The weights file inside a hub repo or directory (diffusers' weight_name).
    weight_name: str | None = None
    # How strongly the adapter applies (diffusers' adapter weight); 0 turns it off.
    scale: float = Field(default=1.0, ge=-4.0, le=4.0)
    # Its name inside the pipeline. Unset: derived from its position.
    adapter_name: str | None = Field(default=None, pattern=ADAPTER_NAME_PATTERN)


def _known_embedded(source: str) -> str:
    if source.startswith("embedded:") and source not in EMBEDDED_MODELS:
        raise ValueError(f"source {source!r}: the embedded models are {list(EMBEDDED_MODELS)}")
    return source


def _unique_adapters(loras: list[LoraConfig]) -> list[LoraConfig]:
    names = [lora.adapter_name for lora in loras if lora.adapter_name is not None]
    if len(set(names)) != len(names):
        raise ValueError(f"loras: adapter_name used twice in {names}")
    return loras


class ModelConfig(StrictModel):
    # The default model's id: what a request names in "model" (absent: this one).
    id: str = Field(default=DEFAULT_MODEL_ID, pattern=MODEL_ID_PATTERN)
    # `embedded:tiny-sdxl` (random weights, generated offline; `embedded:tiny-sdxl-b` is a
    # second one with other weights), a hub id such as `stabilityai/sdxl-turbo`, or a local
    # directory in diffusers format.
    source: str = EMBEDDED_TINY
    revision: str | None = None
    # quality: the weights as they are and the full VAE. fast: the tiny VAE (model.vae) and
    # the int8 UNet measured faster on the replica's CPU class: on torch, int8 layers
    # (model.torch_int8; FAST_TORCH_INT8_MEASURED: avx2, where `backend: auto` then runs
    # torch); on OpenVINO, int8 weights (model.openvino.weights; FAST_WEIGHTS_MEASURED:
    # avx512_bf16). Classes not measured keep the dtype. Each part can still be set alone.
    profile: Literal["quality", "fast"] = "quality"
    # What decodes latents to pixels (and encodes image-to-image inputs): full, the model's
    # own AutoencoderKL; tiny, an AutoencoderTiny from model.tiny_vae_source (much faster,
    # changes the images). Unset: from model.profile (fast: tiny, quality: full).
    vae: Literal["full", "tiny"] | None = None
    # The tiny VAE: a hub id, a local directory (an AutoencoderTiny in diffusers format), or
    # `embedded:tiny-taesd` (random weights, toy size). Unset: the embedded one for the
    # embedded model, else madebyollin/taesdxl.
    tiny_vae_source: str | None = None
    tiny_vae_revision: str | None = None
    # Where the embedded model is written; defaults to ~/.cache/sdxl-turbo-serve.
    cache_dir: str | None = None
    # auto: bfloat16 on CPUs with native bf16 (amx_bf16, avx512_bf16), float32 on others
    # (bf16 is emulated there, many times slower), float16 on a GPU (serve_app/model/cpu.py).
    # float16 is only valid with a GPU: on CPU it is ~1000x slower.
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    # auto: IPEX when it matches torch, else torch (serve_app/model/backend.py); openvino
    # runs exported OpenVINO IR (model.openvino).
    backend: Literal["auto", "ipex", "torch", "openvino"] = "auto"
    openvino: OpenVINOConfig = Field(default_factory=OpenVINOConfig)
    # The torch backend: dynamic runs the UNet's linear and convolution layers int8 x int8,
    # each call's inputs quantized from their own range (serve_app/model/optimize/int8.py;
    # the images change a little); off keeps them in the dtype. Unset: from model.profile
    # (quality: off; fast: dynamic on the CPU classes in FAST_TORCH_INT8_MEASURED).
    torch_int8: Literal["dynamic", "off"] | None = None
    # Where the converted int8 UNet is kept (serve_app/model/optimize/int8_cache.py), so a
    # restarted replica reads it instead of converting the float weights again. Unset:
    # `torch-int8/` inside the model's directory; "" turns it off. Not writable: the replica
    # converts at every start and /readyz lists int8_cache under skipped with the reason.
    torch_int8_cache_dir: str | None = None
    # Sizes compiled/warmed at start-up so the first real request pays no one-off cost.
    warmup_sizes: list[str] = Field(default_factory=lambda: ["512x512"])
    optimization: OptimizationConfig = Field(default_factory=OptimizationConfig)
    # Import path of the generator factory; tests inject a fake through it.
    generator: str = "serve_app.model.pipeline:load_generator"
    generator_options: dict[str, Any] = Field(default_factory=dict)
    # LoRA adapters applied to this model (serve_app/model/lora.py).
    loras: list[LoraConfig] = Field(default_factory=list)
    # Resident size (GiB) counted against replica.models_memory_gib. Unset: estimated
    # (estimated_memory_gib: by source and dtype).
    memory_gib: float | None = Field(default=None, gt=0)

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes_parse(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            parse_size(size)
        return sizes

    @field_validator("loras")
    @classmethod
    def _loras_unique(cls, loras: list[LoraConfig]) -> list[LoraConfig]:
        return _unique_adapters(loras)

    @field_validator("source")
    @classmethod
    def _embedded_exists(cls, source: str) -> str:
        return _known_embedded(source)

    @property
    def source_kind(self) -> Literal["embedded", "directory", "hub"]:
        """Where the weights come from (what /v1/models and /readyz show: not the path)."""
        if self.source.startswith("embedded:"):
            return "embedded"
        if self.source.startswith(("/", "./", "../", "~")):
            return "directory"
        return "hub"

    def estimated_memory_gib(self, dtype: str, unet: str | None = None) -> float:
        """memory_gib, or an estimate for `dtype` (the one the replica resolved `auto` to):
        the embedded models are tiny; an SDXL-class model by its weights' width (int8 on
        OpenVINO with int8 weights). `unet`: the weights a loaded replica reports (its
        parts' `unet`); without it only model.openvino.weights: int8 counts as int8, since
        profile fast picks the weights by the replica's CPU (resolve_weights) and a plan
        made elsewhere (manifests, before a load) must fit the larger pick."""
        if self.memory_gib is not None:
            return self.memory_gib
        if self.source in EMBEDDED_MODELS:
            return EMBEDDED_MEMORY_GIB
        int8 = (unet == "int8") if unet is not None else self.openvino.weights == "int8"
        if self.backend == "openvino" and int8:
            return SDXL_MEMORY_GIB["int8"]
        return SDXL_MEMORY_GIB.get(dtype, SDXL_MEMORY_GIB["float32"])

    @property
    def resolved_vae(self) -> Literal["full", "tiny"]:
        if self.vae is not None:
            return self.vae
        return "tiny" if self.profile == "fast" else "full"

    def resolve_weights(self, cpu_class: str | None) -> tuple[Literal["int8", "dtype"], str]:
        """The OpenVINO IR's UNet weights on a CPU of `cpu_class` (serve_app.model.cpu), and
        why: model.openvino.weights if set, else the profile's (quality: the dtype's; fast:
        FAST_WEIGHTS_MEASURED). The torch backends always run the dtype's weights. cpu_class
        None (no replica's CPU to ask): profile fast gives the dtype's, the larger."""
        if self.openvino.weights is not None:
            return self.openvino.weights, "configured (model.openvino.weights)"
        if self.profile != "fast":
            return "dtype", "profile quality"
        if cpu_class is None:
            return "dtype", "profile fast: picked by the replica's CPU class, none known here"
        if cpu_class in FAST_WEIGHTS_MEASURED:
            weights, evidence = FAST_WEIGHTS_MEASURED[cpu_class]
            which = "int8 weights" if weights == "int8" else "the dtype's weights"
            return weights, f"profile fast: {which} measured faster on {cpu_class} CPUs " \
                            f"({evidence})"
        return "dtype", f"profile fast: int8 weights not measured faster on {cpu_class} CPUs"

    def resolve_torch_int8(self, cpu_class: str | None) -> tuple[bool, str]:
        """Whether the torch backends run the UNet's layers in int8 on a CPU of `cpu_class`,
        and why: model.torch_int8 if set, else the profile's (quality: no; fast:
        FAST_TORCH_INT8_MEASURED)."""
        if self.torch_int8 is not None:
            return self.torch_int8 == "dynamic", "configured (model.torch_int8)"
        if self.profile != "fast":
            return False, "profile quality"
        if cpu_class is None:
            return False, "profile fast: picked by the replica's CPU class, none known here"
        if cpu_class in FAST_TORCH_INT8_MEASURED:
            return True, (f"profile fast: int8 layers measured faster on {cpu_class} CPUs "
                          f"({FAST_TORCH_INT8_MEASURED[cpu_class]})")
        return False, f"profile fast: int8 layers not measured faster on {cpu_class} CPUs"

    @property
    def resolved_tiny_vae_source(self) -> str:
        if self.tiny_vae_source is not None:
            return self.tiny_vae_source
        return EMBEDDED_TINY_VAE if self.source in EMBEDDED_MODELS else TAESDXL


# ModelEntry keys that, unset, take the value of `model:` (the default model).
MODEL_OVERRIDES = ("dtype", "backend", "profile", "vae", "tiny_vae_source", "openvino",
                   "torch_int8")


class ModelEntry(StrictModel):
    """A further model (`models:`): its own weights and adapters; the keys in
    MODEL_OVERRIDES, unset, are the default model's (`model:`), as are warmup_sizes,
    optimization, cache_dir and the generator."""

    id: str = Field(pattern=MODEL_ID_PATTERN)
    source: str = Field(min_length=1)
    revision: str | None = None
    loras: list[LoraConfig] = Field(default_factory=list)
    dtype: Literal["auto", "bfloat16", "float32", "float16"] | None = None
    backend: Literal["auto", "ipex", "torch", "openvino"] | None = None
    profile: Literal["quality", "fast"] | None = None
    vae: Literal["full", "tiny"] | None = None
    tiny_vae_source: str | None = None
    # Replaces model.openvino as a whole when set.
    openvino: OpenVINOConfig | None = None
    torch_int8: Literal["dynamic", "off"] | None = None
    memory_gib: float | None = Field(default=None, gt=0)

    @field_validator("loras")
    @classmethod
    def _loras_unique(cls, loras: list[LoraConfig]) -> list[LoraConfig]:
        return _unique_adapters(loras)

    @field_validator("source")
    @classmethod
    def _embedded_exists(cls, source: str) -> str:
        return _known_embedded(source)


class BatchingConfig(StrictModel):
    # Counts model calls; one call is one prompt with `batch` images.
    max_batch_size: int = Field(default=4, ge=1, le=64)
    # How long the oldest waiting call may wait for company before its batch is formed.
    # 0 means: form it now. Under load calls pile up while every model replica is busy, so
    # batches still form, and a lone request never waits.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=10.0)
    # Images in one pipeline call: bounds the activations (the VAE decodes a call in one
    # pass), so a batch of large requests can't run the replica out of memory.
    max_images_per_call: int = Field(default=8, ge=1, le=64)
    # Work in one batch, in 512x512 image-steps (a 1024x1024 image at 4 steps is 16). On
    # CPU a batch costs the sum of its images (batching gained 1.05x images/s at batch 4,
    # BENCHMARKS.md), so a bigger batch only makes each of its calls wait longer: the
    # default lets four 512x512 4-step images share a batch, and a 1024x1024 4-step call
    # go alone. Raise it where batching pays (GPU replicas). A call over it runs alone.
    max_batch_image_steps: float = Field(default=16.0, gt=0)
    # Async-job calls wait behind interactive ones, but no longer than this: then they are
    # served in arrival order with the interactive calls (no starvation).
    job_max_wait_s: float = Field(default=30.0, gt=0)


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    # Replicas a new deployment starts with (default: min_replicas, at least 1). Set by
    # kuberay/upgrade.py to the live count, so a new cluster of an upgrade takes traffic
    # with the capacity the old one had.
    initial_replicas: int | None = Field(default=None, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= max_replicas")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("autoscaling.initial_replicas must be within min..max_replicas")
        return self


class ReplicaConfig(StrictModel):
    """The model replica: one pipeline per Ray actor."""

    # Becomes ray_actor_options.num_cpus, and the replica sets torch threads to it.
    num_cpus: int = Field(default=2, ge=1, le=512)
    # >0 moves the replica to CUDA in float16.
    num_gpus: float = Field(default=0, ge=0)
    memory_gib: float | None = Field(default=None, gt=0)
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    # Batches a model replica holds at once. 1: it takes a batch only when it can start it,
    # so calls wait, and batches grow, in the batching deployment.
    max_ongoing_requests: int = Field(default=1, ge=1)
    # Calls waiting in a batcher replica for a model replica; past it, 503 + Retry-After.
    max_queued_requests: int = Field(default=32, ge=1)
    # Node labels for Ray's (soft) placement; Kubernetes pins pods with nodeSelector.
    resources: dict[str, float] = Field(default_factory=dict)
    # Models (pipelines) one replica holds at once (Ray Serve model multiplexing); loading
    # another evicts the least recently used. Unset: every configured model, at most
    # MAX_MODELS_PER_REPLICA_DEFAULT_CAP (AppConfig.max_models_per_replica).
    max_models_per_replica: int | None = Field(default=None, ge=1, le=64)
    # Memory budget (GiB) for the models a replica holds (each model's memory_gib or its
    # estimate): loading one past it evicts the least recently used first. Unset: no budget,
    # only max_models_per_replica.
    models_memory_gib: float | None = Field(default=None, gt=0)


class ImageUrlConfig(StrictModel):
    """Image-to-image inputs given as `imageUrl`: the ingress fetches them through the same
    outbound guard as job callbacks (serve_app/outbound.py), within
    limits.max_input_image_bytes."""

    # The whole fetch, redirects included; past it the request gets 422 image_url_failed.
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Redirects followed, each target checked again (scheme, host, addresses).
    max_redirects: int = Field(default=3, ge=0, le=10)
    # Hosts an imageUrl (and its redirects) may name: as jobs.callback_hosts. null: any host
    # that resolves to public addresses only; []: none (imageUrl turned off).
    hosts: list[str] | None = None
    # As jobs.callback_allow_private: true lets fetches reach loopback, private, link-local,
    # carrier-grade NAT (metadata) addresses; then any client can make the ingress GET
    # from your network, so pair it with `hosts`.
    allow_private: bool = False

    @field_validator("hosts")
    @classmethod
    def _hosts_are_names(cls, hosts: list[str] | None) -> list[str] | None:
        return check_host_patterns(hosts, "ingress.image_url.hosts")


class IngressConfig(StrictModel):
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, ge=0)
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=256, ge=1)
    # Ray custom resources the ingress needs: pins ingress replicas to pods/nodes that
    # advertise them (e.g. {"ingress": 1}), so they never take room on a model pod.
    resources: dict[str, float] = Field(default_factory=dict)
    # Overrides the scheme://host in image URLs (behind a proxy or a load balancer).
    public_base_url: str | None = None
    # A request that takes longer gets 504, never a hang.
    request_timeout_s: float = Field(default=300.0, gt=0)
    retry_after_s: int = Field(default=5, ge=1)
    image_url: ImageUrlConfig = Field(default_factory=ImageUrlConfig)


class BatcherConfig(StrictModel):
    """The batching deployment (between ingress and model). It runs where the ingress runs
    (ingress.resources): it is light, and every call passes through it."""

    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.1, ge=0)
    # Ray custom resources that pin batcher replicas to pods/nodes advertising them.
    # Unset: ingress.resources (it runs beside the ingress).
    resources: dict[str, float] | None = None


class StoreConfig(StrictModel):
    # A local directory, or an fsspec URL (s3://bucket/prefix; oss:// through ossfs) that
    # every ingress replica reaches, so image URLs work whichever replica serves them.
    # Unset: a directory of this application's own, default_store_dir(app_name), so two
    # services on one machine never serve each other's images or take over their jobs.
    url: str | None = None
    # Passed to fsspec (endpoint_url, region...). Credentials come from the environment.
    storage_options: dict[str, Any] = Field(default_factory=dict)
    ttl_s: float = Field(default=24 * 3600.0, gt=0)
    cleanup_interval_s: float = Field(default=600.0, gt=0)


class LimitsConfig(StrictModel):
    allowed_sizes: list[str] = Field(default_factory=lambda: ["512x512", "1024x1024"])
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_steps: int = Field(default=50, ge=1)
    # number x batch
    max_images_per_request: int = Field(default=16, ge=1)
    # Image-to-image input images (untrusted): encoded size, and each side in pixels. An
    # image within these is resized to the requested size; one outside is refused (4xx).
    max_input_image_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_input_image_side_px: int = Field(default=4096, ge=64, le=16384)
    min_input_image_side_px: int = Field(default=64, ge=1)

    @field_validator("allowed_sizes")
    @classmethod
    def _sizes_parse(cls, sizes: list[str]) -> list[str]:
        if not sizes:
            raise ValueError("allowed_sizes must not be empty")
        for size in sizes:
            parse_size(size)
        return sizes


class BrokerConfig(StrictModel):
    """Where async jobs are queued (Ray Serve's task consumer, Celery adapter)."""

    # "embedded": a redis-server process the application starts and owns on loopback
    # (one node: the quick start). Otherwise the broker's URL: redis:// or rediss://
    # (ApsaraDB for Redis/Tair, any Redis), or amqp:// (RabbitMQ, with keys_url set).
    url: str = "embedded"
    # Name of an environment variable holding the URL (from a Kubernetes Secret: a URL
    # with a password never goes in a config file). Set, it wins over `url`.
    url_env: str | None = None
    # Redis for idempotency keys and Celery's task results. Unset: the broker's own URL
    # (so it must be set when the broker is not Redis). Same `_env` rule as above.
    keys_url: str | None = None
    keys_url_env: str | None = None
    # RabbitMQ only: its management API (http://user:pass@host:15672/api/), where the
    # consumer's autoscaling policy reads the queue's length.
    management_url: str | None = None
    # Two services on one broker need two names: each consumer takes every job of its
    # queue, and finds only its own service's records.
    queue_name: str = Field(default="sdxl-jobs", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # embedded: the loopback port and the directory of its append-only file (unset: a
    # directory of this application's own beside the default image store).
    embedded_port: int = Field(default=6390, ge=1, le=65535)
    embedded_dir: str | None = None
    # A job taken by a consumer that dies is delivered again once it has been unacknowledged
    # this long; it must exceed a job's longest run (a live job is never taken twice).
    visibility_timeout_s: float = Field(default=900.0, gt=0)

    @model_validator(mode="after")
    def _keys_on_redis(self) -> BrokerConfig:
        if self.url.startswith("amqp") and self.keys_url is None and self.keys_url_env is None:
            raise ValueError("jobs.broker.keys_url (or keys_url_env) must name a Redis when "
                             "the broker is RabbitMQ: idempotency keys live in Redis")
        if self.url.startswith("amqp") and self.management_url is None:
            raise ValueError("jobs.broker.management_url must name RabbitMQ's management API "
                             "(the consumer scales on the queue's length read there)")
        return self


class ConsumerConfig(StrictModel):
    """The JobConsumer deployment: takes jobs off the queue and sends their calls to the
    batcher at job priority. Scales on the queue's length (Serve's async-inference policy)."""

    # Jobs one consumer replica runs at once (its Celery worker threads).
    max_ongoing_requests: int = Field(default=8, ge=1, le=256)
    num_cpus: float = Field(default=0.1, ge=0)
    # 0: no consumer replica while the queue and HTTP traffic are empty.
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    # Queued + running jobs per replica the policy aims at.
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    upscale_delay_s: float = Field(default=0.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)
    # How often the policy reads the queue's length from the broker.
    queue_poll_interval_s: float = Field(default=2.0, gt=0)
    # Ray custom resources that pin consumer replicas to pods/nodes advertising them.
    # Unset: ingress.resources (it runs beside the ingress).
    resources: dict[str, float] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ConsumerConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("jobs.consumer.min_replicas must be <= max_replicas")
        return self


class JobsConfig(StrictModel):
    """Async jobs (POST /api/jobs): queued on a broker, records in the image store."""

    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    consumer: ConsumerConfig = Field(default_factory=ConsumerConfig)
    # Runs of one job before it is marked failed and sent to the dead-letter queue (a lost
    # replica costs one run).
    max_attempts: int = Field(default=3, ge=1)
    callback_attempts: int = Field(default=5, ge=1)
    callback_backoff_s: float = Field(default=1.0, ge=0)
    # Hosts a job's callbackUrl may name: exact host names or IPs, or "*.example.com" for
    # its subdomains. null allows any host that resolves to public addresses only.
    # Callbacks never follow redirects.
    callback_hosts: list[str] | None = None
    # false (default): a callback host that resolves to loopback, private (RFC 1918,
    # unique-local), link-local, carrier-grade NAT (100.64.0.0/10, where Alibaba Cloud's
    # metadata service is), multicast or reserved addresses is refused, at submission and
    # again when the callback is sent (serve_app/outbound.py). true lets callbacks reach
    # such addresses (on-premises receivers): then any client that may submit jobs can make
    # the service POST into your network, so pair it with callback_hosts.
    callback_allow_private: bool = False

    @field_validator("callback_hosts")
    @classmethod
    def _hosts_are_names(cls, hosts: list[str] | None) -> list[str] | None:
        return check_host_patterns(hosts, "callback_hosts")


class SecurityConfig(StrictModel):
    # Name of the environment variable holding comma-separated API keys (bearer tokens).
    # Keys never go in config files; unset means no authentication.
    api_keys_env: str | None = None
    # Image URLs are unguessable (uuid4) capability URLs; set this to require the key there too.
    protect_images: bool = False
    # Confidential mode: refuse to start outside an Intel TDX guest, or when data leaves the
    # TEE in clear: the job broker must be rediss:// with certificate verification, the
    # store an s3:// bucket over https with server-side encryption (serve_app/confidential.py).
    require_tee: bool = False
    # Confidential mode's protections waived by name, for users who accept the risk:
    # broker_without_tls (prompts in job payloads cross the network to Redis in clear),
    # store_without_encryption (job records with their prompts, and images, stored
    # unencrypted or sent in clear). /readyz lists them.
    accept_risks: list[Literal["broker_without_tls", "store_without_encryption"]] = Field(
        default_factory=list)
    # Import path of the TEE probe (a function returning "tdx" or None); tests replace it.
    tee_probe: str = "serve_app.tee:detect_tee"

    @model_validator(mode="after")
    def _risks_in_confidential_mode(self) -> SecurityConfig:
        if self.accept_risks and not self.require_tee:
            raise ValueError("security.accept_risks waives confidential-mode checks: it needs "
                             "security.require_tee: true")
        if len(set(self.accept_risks)) != len(self.accept_risks):
            raise ValueError("security.accept_risks lists a risk twice")
        return self


class AppConfig(StrictModel):
    # Names this service's default image store (store.url) and embedded broker directory:
    # two services on one machine with one app_name share them.
    app_name: str = Field(default="sdxl-turbo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    # The default model (requests that name no model).
    model: ModelConfig = Field(default_factory=ModelConfig)
    # Further models a request may name by id ("model"); see resolved_models().
    models: list[ModelEntry] = Field(default_factory=list)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    batcher: BatcherConfig = Field(default_factory=BatcherConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)

    @field_validator("models", mode="before")
    @classmethod
    def _entries_name_their_id(cls, entries: Any) -> Any:
        """Each entry validated on its own, so an error names the model's id, not only
        its position in the list."""
        if not isinstance(entries, list):
            return entries
        out: list[Any] = []
        for index, entry in enumerate(entries):
            if isinstance(entry, ModelEntry):
                out.append(entry)
                continue
            name = entry.get("id") if isinstance(entry, dict) else None
            try:
                out.append(ModelEntry.model_validate(entry))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"]) or "entry"
                raise ValueError(f"models[{index}] (id {name!r}): {where}: {first['msg']}"
                                 ) from None
        return out

    @model_validator(mode="after")
    def _consistent(self) -> AppConfig:
        ids = [self.model.id, *(entry.id for entry in self.models)]
        for model_id in ids:
            if ids.count(model_id) > 1:
                raise ValueError(f"model id {model_id!r} is used twice (model.id and "
                                 f"models[].id must be unique)")
        for model_id, model in self.resolved_models().items():
            if model.loras and model.backend == "openvino":
                where = "model" if model_id == self.model.id else f"models[id {model_id!r}]"
                # The wording of serve_app.model.lora.lora_backend_reason (no torch here).
                raise ValueError(
                    f"{where}.loras: LoRA adapters run on the torch backends (torch, ipex), "
                    f"not on backend 'openvino': an exported OpenVINO IR holds the base "
                    f"model's weights only; set backend: auto or torch")
            if model.dtype == "float16" and self.replica.num_gpus == 0:
                where = "model.dtype" if model_id == self.model.id else \
                    f"models[id {model_id!r}].dtype"
                raise ValueError(
                    f"{where} float16 needs a GPU (replica.num_gpus > 0); "
                    "on CPU use auto (bfloat16 or float32 by the CPU's bf16 support)"
                )
            budget = self.replica.models_memory_gib
            if budget is not None and model.memory_gib is not None and \
                    model.memory_gib > budget:
                raise ValueError(f"model {model_id!r}: memory_gib {model.memory_gib} is over "
                                 f"replica.models_memory_gib {budget}: it could never load")
        if self.store.url is None:
            self.store.url = default_store_dir(self.app_name)
        for size in self.model.warmup_sizes:
            if size not in self.limits.allowed_sizes:
                raise ValueError(f"model.warmup_sizes has {size!r}, not in limits.allowed_sizes")
        if self.jobs.broker.embedded_dir is None:
            self.jobs.broker.embedded_dir = default_store_dir(self.app_name) + "-broker"
        # A job's run is bounded by the request timeout (plus its PNGs and its callback's
        # retries); a shorter visibility timeout would hand a live job to a second consumer.
        if self.jobs.broker.visibility_timeout_s < self.ingress.request_timeout_s + 10:
            raise ValueError("jobs.broker.visibility_timeout_s must exceed "
                             "ingress.request_timeout_s by 10 s or more")
        return self

    @property
    def batching_user_config(self) -> dict[str, Any]:
        return self.batching.model_dump()

    @property
    def default_model_id(self) -> str:
        return self.model.id

    def resolved_models(self) -> dict[str, ModelConfig]:
        """Every served model as a full ModelConfig, by id, the default (`model:`) first.
        A `models:` entry takes its own id, source, revision, loras and memory_gib, its
        overrides (MODEL_OVERRIDES) where set, and everything else from `model:`."""
        models = {self.model.id: self.model}
        inherited = self.model.model_dump(
            exclude={"id", "source", "revision", "loras", "memory_gib", *MODEL_OVERRIDES})
        for entry in self.models:
            fields: dict[str, Any] = {
                **inherited, "id": entry.id, "source": entry.source,
                "revision": entry.revision, "loras": entry.loras,
                "memory_gib": entry.memory_gib}
            for name in MODEL_OVERRIDES:
                value = getattr(entry, name)
                fields[name] = getattr(self.model, name) if value is None else value
            models[entry.id] = ModelConfig.model_validate(fields)
        return models

    @property
    def max_models_per_replica(self) -> int:
        """replica.max_models_per_replica, or every configured model up to the cap."""
        if self.replica.max_models_per_replica is not None:
            return self.replica.max_models_per_replica
        return min(1 + len(self.models), MAX_MODELS_PER_REPLICA_DEFAULT_CAP)

    def for_model(self, model_id: str) -> AppConfig:
        """This config with `model` set to that model (resolved): what a generator factory
        (model.generator) is given to load it."""
        return self.model_copy(update={"model": self.resolved_models()[model_id],
                                       "models": []})


def load_config(args: dict[str, Any] | None) -> AppConfig:
    return AppConfig.model_validate(args or {})
