"""Where the OpenVINO IR lives, what it is keyed by, and who may write it.

One export per (model, versions, options). The IR of one key is a directory under the cache
root (default: `openvino/` inside the model's directory, beside the weights, which replicas
share): `<root>/<dtype>-<weights>-<hash>/` with one `.xml`/`.bin` pair per network,
`configs.json` (what the diffusers pipeline reads from the networks' configs) and
`export.json`, written last by the exporter, whose presence marks the entry complete. An
exporter writes a staging directory and renames it into place, so a replica never reads a
half-written entry; a lock file makes a second replica wait for the first one's export
instead of exporting again.

No openvino, torch or diffusers import here: versions are read from package metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Bump when what the exporter writes changes (network signatures, file names, configs.json).
EXPORT_FORMAT = 2
# The networks the backend runs, one IR each (the VAE's decoder only: text-to-image never
# encodes an image).
# vae_encoder: image-to-image encodes its input image (format 2 added it).
NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
# model.vae tiny: the AutoencoderTiny's decoder and encoder, an entry of their own (keyed by
# the tiny VAE's files), so switching the VAE never exports the UNet again.
TINY_VAE_NETWORKS = ("tiny_vae_decoder", "tiny_vae_encoder")
COMPONENT_NETWORKS = {"pipeline": NETWORKS, "tiny_vae": TINY_VAE_NETWORKS}
# Model files that decide what the IR holds: the components' configs and weights, the
# tokenizers and scheduler the runtime loads beside it.
MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
               "scheduler")
VERSIONED = ("openvino", "torch", "diffusers", "transformers", "sdxl-turbo-serve")
DEFAULT_SUBDIR = "openvino"
MARKER = "export.json"


class CacheNotWritableError(RuntimeError):
    """The IR is not in the cache and the cache directory cannot be written."""


@dataclass(frozen=True)
class ExportSpec:
    """What one IR is exported from and with: the model, the dtype the replica runs (the
    resolved one, `float32` or `bfloat16`, never `auto`) and the weight format."""

    source: str
    model_dir: str
    dtype: str
    revision: str | None = None
    weights: str | None = None  # "int8" or None (the dtype's weights)
    # "pipeline" (the model's networks) or "tiny_vae" (model_dir: the AutoencoderTiny's).
    component: str = "pipeline"

    @property
    def networks(self) -> tuple[str, ...]:
        return COMPONENT_NETWORKS[self.component]

    def __post_init__(self) -> None:
        if self.component not in COMPONENT_NETWORKS:
            raise ValueError(f"OpenVINO export component must be one of "
                             f"{sorted(COMPONENT_NETWORKS)}, got {self.component!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"OpenVINO export dtype must be float32 or bfloat16, "
                             f"got {self.dtype!r}")
        if self.weights not in (None, "int8"):
            raise ValueError(f"OpenVINO weights must be int8 or unset, got {self.weights!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExportSpec:
        return cls(**json.loads(text))


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions(weights: str | None) -> dict[str, str]:
    names = VERSIONED + (("nncf",) if weights == "int8" else ())
    return {name: package_version(name) for name in names}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """The model's files that the IR depends on: configs and tokenizer files by content,
    weights by size and modification time (hashing gigabytes at every start would cost
    minutes; replicas sharing a volume see the same times, a copied or replaced weight file
    gets a new one and so a new export)."""
    root = Path(model_dir)
    files: dict[str, Any] = {}
    # An AutoencoderTiny directory is one component: its config and weights at the top.
    candidates = [root / "model_index.json", root / "config.json",
                  *sorted(root.glob("*.safetensors"))]
    for part in MODEL_PARTS:
        if (root / part).is_dir():
            candidates.extend(sorted(p for p in (root / part).rglob("*") if p.is_file()))
    for path in candidates:
        if not path.is_file():
            continue
        name = path.relative_to(root).as_posix()
        if path.suffix in (".json", ".txt", ".model") and path.stat().st_size < (16 << 20):
            files[name] = _sha256(path)
        else:
            stat = path.stat()  # follows the hub cache's symlinks to the blobs
            files[name] = [stat.st_size, stat.st_mtime_ns]
    return files


def key_material(spec: ExportSpec, *, fingerprint: dict[str, Any] | None = None,
                 package_versions: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything the IR depends on; its hash names the cache entry."""
    options = {"dtype": spec.dtype, "weights": spec.weights or "dtype"}
    if spec.component != "pipeline":  # the pipeline's keys stay as they were before it
        options["component"] = spec.component
    return {
        "format": EXPORT_FORMAT,
        "model": {"source": spec.source, "revision": spec.revision,
                  "files": model_fingerprint(spec.model_dir) if fingerprint is None
                  else fingerprint},
        "versions": versions(spec.weights) if package_versions is None else package_versions,
        "options": options,
    }


def entry_name(material: dict[str, Any]) -> str:
    """`<dtype>-<weights>-<16 hex digits of the material's sha256>` (a tiny VAE's entry:
    `tiny_vae-<dtype>-<digits>`)."""
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    options = material["options"]
    if "component" in options:
        return f"{options['component']}-{options['dtype']}-{digest}"
    return f"{options['dtype']}-{options['weights']}-{digest}"


def cache_root(model_dir: str | Path, configured: str | None) -> Path:
    """model.openvino.cache_dir, or `openvino/` inside the model's directory."""
    if configured:
        return Path(configured).expanduser()
    return Path(model_dir) / DEFAULT_SUBDIR


def is_complete(entry: Path, networks: tuple[str, ...] = NETWORKS) -> bool:
    return (entry / MARKER).is_file() and all(
        (entry / f"{name}.xml").is_file() and (entry / f"{name}.bin").is_file()
        for name in networks)


def not_writable_reason(root: Path) -> str | None:
    """Why files cannot be created in `root` (created if missing), or None if they can.
    Tries for real: permission bits say nothing on read-only mounts or for root."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=root)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def require_writable(root: Path, entry: str) -> None:
    reason = not_writable_reason(root)
    if reason is not None:
        raise CacheNotWritableError(
            f"OpenVINO IR cache {root} is not writable ({reason}) and has no IR {entry} for "
            f"this model, versions and options: run `sdxl-turbo-export` with the same config "
            f"where it is writable, or set model.openvino.cache_dir to a writable directory "
            f"every replica shares")


@contextlib.contextmanager
def export_lock(root: Path, entry: str) -> Iterator[bool]:
    """Held while one process exports `entry`: others wait, then find it complete. Yields
    whether the lock is held: where the file system refuses locks (some network mounts),
    exports are not serialised; each writes its own staging directory and the first rename
    wins."""
    import fcntl

    path = root / f".{entry}.lock"
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            logger.warning("no lock on %s (%s): replicas starting together may each export",
                           path, exc.strerror)
            yield False
        else:
            yield True


def staging_prefix(entry: str) -> str:
    return f".staging-{entry}-"


def remove_stale_staging(root: Path, entry: str) -> list[Path]:
    """Staging directories of `entry` left by exports that died (killed for memory, say):
    gigabytes each at full size. Only call with the export lock held, when no other export
    of `entry` can be writing one."""
    stale = sorted(p for p in root.glob(f"{staging_prefix(entry)}*") if p.is_dir())
    for path in stale:
        logger.warning("removing %s, left by an export that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale
