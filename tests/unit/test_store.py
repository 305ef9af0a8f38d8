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


def test_delete_record_forgets_and_tolerates_a_missing_record(tmp_path):
    name = "job-" + "ab" * 16
    store = ImageStore(str(tmp_path))
    store.put_record(name, b"first")
    store.delete_record(name)
    store.delete_record(name)  # already gone: no error
    with pytest.raises(NotFound):
        store.get_record(name)


def test_a_record_being_rewritten_is_never_read_partly_written(tmp_path):
    """Records are replaced whole: a reader polling while a writer rewrites never sees an
    empty or truncated record (a job status poll once answered 500 on one)."""
    import threading

    name = "job-" + "cd" * 16
    store = ImageStore(str(tmp_path))
    versions = [bytes([65 + i]) * 200_000 for i in range(4)]
    store.put_record(name, versions[0])
    stop = threading.Event()
    seen: list[bytes] = []

    def read() -> None:
        while not stop.is_set():
            seen.append(store.get_record(name))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for i in range(300):
            store.put_record(name, versions[i % 4])
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert len(seen) > 100
    bad = [len(data) for data in seen if data not in versions]
    assert bad == []
    # No temporary files left behind by the writes.
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [f"{name}.json"]
