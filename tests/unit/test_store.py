import os
import time
import uuid

import pytest

from serve_app.errors import NotFound
from serve_app.store import ImageStore, is_valid_key


def test_put_get_round_trip(tmp_path):
    store = ImageStore(str(tmp_path / "sd"))
    image_id = uuid.uuid4().hex
    store.put(image_id, "0_0.png", b"png-bytes")
    assert store.get(image_id, "0_0.png") == b"png-bytes"
    assert (tmp_path / "sd" / image_id / "0_0.png").read_bytes() == b"png-bytes"


def test_file_url_works(tmp_path):
    store = ImageStore(f"file://{tmp_path}/sd")
    image_id = uuid.uuid4().hex
    store.put(image_id, "image_grid.png", b"grid")
    assert store.get(image_id, "image_grid.png") == b"grid"


def test_unknown_image_is_not_found(tmp_path):
    store = ImageStore(str(tmp_path))
    with pytest.raises(NotFound):
        store.get(uuid.uuid4().hex, "0_0.png")


@pytest.mark.parametrize("image_id,name", [
    ("..", "passwd"),
    ("../../etc", "passwd"),
    ("a" * 32, "../0_0.png"),
    ("a" * 32, "/etc/passwd"),
    ("a" * 32, "0_0.txt"),
    ("A" * 32, "0_0.png"),
    ("a" * 31, "0_0.png"),
    ("a" * 32, "..%2F0_0.png"),
])
def test_keys_outside_the_layout_are_refused(tmp_path, image_id, name):
    assert not is_valid_key(image_id, name)
    store = ImageStore(str(tmp_path))
    with pytest.raises(NotFound):
        store.get(image_id, name)
    with pytest.raises(NotFound):
        store.put(image_id, name, b"x")


def test_cleanup_deletes_only_expired_ids(tmp_path):
    store = ImageStore(str(tmp_path))
    old, fresh = uuid.uuid4().hex, uuid.uuid4().hex
    store.put(old, "0_0.png", b"old")
    store.put(fresh, "0_0.png", b"fresh")
    stale = time.time() - 7200
    os.utime(tmp_path / old / "0_0.png", (stale, stale))
    (tmp_path / "not-an-id").mkdir()
    assert store.cleanup(ttl_s=3600) == 1
    assert not (tmp_path / old).exists()
    assert store.get(fresh, "0_0.png") == b"fresh"
    assert (tmp_path / "not-an-id").exists()
    assert store.cleanup(ttl_s=3600) == 0


def test_create_record_writes_only_if_absent_and_delete_forgets(tmp_path):
    KEY = "key-" + "ab" * 32  # noqa: N806
    store = ImageStore(str(tmp_path))
    assert store.create_record(KEY, b"first") is True
    assert store.create_record(KEY, b"second") is False
    assert store.get_record(KEY) == b"first"
    store.delete_record(KEY)
    store.delete_record(KEY)  # already gone: no error
    with pytest.raises(NotFound):
        store.get_record(KEY)
    assert store.create_record(KEY, b"third") is True
