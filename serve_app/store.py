"""The image store: `<root>/<id>/<i>_<j>.png` and `<root>/<id>/image_grid.png`.

A local directory by default; any fsspec URL (s3://, oss:// through ossfs) in clusters,
so that every ingress replica serves every image.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import tempfile
import time
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from serve_app.errors import NotFound

logger = logging.getLogger(__name__)

# uuid4 hex. Anything else (.., encoded slashes, absolute paths) never reaches the store.
IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_NAME = re.compile(r"^(?:\d{1,3}_\d{1,3}|image_grid)\.png$")
GRID_NAME = "image_grid.png"
RECORDS_DIR = "jobs"
# Every record's name, and only those: the functions below make them.
RECORD_NAME = re.compile(
    r"^(?:job-[0-9a-f]{32}|key-[0-9a-f]{64}|step-[0-9a-f]{32}-\d{1,3}"
    r"|preview-[0-9a-f]{32}-\d{1,3}-\d{1,3})$")


def job_record_name(job_id: str) -> str:
    """An async job's record (serve_app.jobs.records.JobRecord)."""
    return f"job-{job_id}"


def step_record_name(key: str, call_index: int) -> str:
    """Where a model replica records the denoising steps done for one call of a job or a
    streamed request (its progress key)."""
    return f"step-{key}-{call_index}"


def preview_record_name(key: str, call_index: int, step: int) -> str:
    """Where a model replica writes the preview PNG of one call's denoising step (beside
    its step count), for clients that asked for previews. One record per step, not a
    latest value: a stream that polls after two fast steps still sends each step's own
    preview."""
    return f"preview-{key}-{call_index}-{step}"


def image_name(call_index: int, image_index: int) -> str:
    return f"{call_index}_{image_index}.png"


def is_valid_key(image_id: str, name: str) -> bool:
    return bool(IMAGE_ID.match(image_id)) and bool(IMAGE_NAME.match(name))


def _write_local_atomic(path: str, data: bytes) -> None:
    """Readers see the old bytes or the new ones, never a partly written file: the data goes
    to a temporary name in the same directory, then is renamed into place. A writer killed
    midway leaves only its temporary file, which TTL cleanup removes."""
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            return value.timestamp()
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


class ImageStore:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs: fsspec.AbstractFileSystem
        self.fs, self.root = url_to_fs(url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        # Object stores have no directories; a local disk needs them made.
        self._local = "file" in self.fs.protocol
        if self._local:
            self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, image_id: str, name: str) -> str:
        if not is_valid_key(image_id, name):
            raise NotFound("image not found")
        return f"{self.root}/{image_id}/{name}"

    def _write(self, path: str, data: bytes) -> None:
        """One atomic write. Local disk: temporary file and rename. Object stores: one PUT,
        which replaces the object whole."""
        if self._local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            _write_local_atomic(path, data)
        else:
            self.fs.pipe_file(path, data, mode="overwrite")

    def put(self, image_id: str, name: str, data: bytes) -> None:
        self._write(self._path(image_id, name), data)

    def get(self, image_id: str, name: str) -> bytes:
        path = self._path(image_id, name)
        try:
            return self.fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound("image not found") from None

    def _record_path(self, name: str) -> str:
        if not RECORD_NAME.match(name):
            raise NotFound("record not found")
        return f"{self.root}/{RECORDS_DIR}/{name}.json"

    def put_record(self, name: str, data: bytes) -> None:
        """Small JSON records (async jobs) beside the images, durable as the images are.
        Replaced whole: a concurrent reader gets the old record or the new one."""
        self._write(self._record_path(name), data)

    def _delete_file(self, path: str) -> None:
        """One object, one DeleteObject request. Not fsspec's `rm`: on s3fs that is a bulk
        DeleteObjects, which OSS refuses without a Content-MD5 header, and botocore 1.36+
        sends a CRC32 checksum there instead (kuberay/README.md, "Image bucket")."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass  # another ingress replica got there first

    def delete_record(self, name: str) -> None:
        self._delete_file(self._record_path(name))

    def get_record(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self._record_path(name))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound("record not found") from None

    def cleanup(self, ttl_s: float, now: float | None = None) -> int:
        """Delete every id whose newest file is older than ttl_s. Returns ids deleted."""
        now = time.time() if now is None else now
        self.fs.invalidate_cache()
        try:
            files = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return 0
        newest: dict[str, float] = {}
        expired_records: list[str] = []
        for path, info in files.items():
            rel = path[len(self.root):].lstrip("/") if path.startswith(self.root) else path
            image_id = rel.split("/", 1)[0]
            mtime = _mtime(info)
            if mtime is None:
                continue
            if image_id == RECORDS_DIR and now - mtime > ttl_s:
                expired_records.append(path)
            if not IMAGE_ID.match(image_id):
                continue
            newest[image_id] = max(newest.get(image_id, 0.0), mtime)
        expired = [image_id for image_id, mtime in newest.items() if now - mtime > ttl_s]
        if self._local:
            for path in [f"{self.root}/{image_id}" for image_id in expired] + expired_records:
                try:
                    self.fs.rm(path, recursive=True)
                except FileNotFoundError:
                    pass  # another ingress replica got there first
        else:
            # An object store has only the listed objects (no directories): delete each.
            prefixes = tuple(f"{self.root}/{image_id}/" for image_id in expired)
            for path in [p for p in files if p.startswith(prefixes)] + expired_records:
                self._delete_file(path)
        if expired:
            logger.info("image store cleanup: deleted %d expired ids", len(expired))
        return len(expired)
