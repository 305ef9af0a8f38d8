"""Step progress writes: in order per name, latest value wins, failures don't escape."""

import random
import threading
import time

from serve_app.model.step_progress import LatestValueWriter


def test_writes_of_one_name_never_go_backwards_and_the_last_value_lands():
    rng = random.Random(0)
    written: dict[str, list[int]] = {"a": [], "b": []}
    lock = threading.Lock()

    def slow_write(name: str, data: bytes) -> None:
        time.sleep(rng.uniform(0, 0.004))  # object-store PUTs take uneven time
        with lock:
            written[name].append(int(data))

    writer = LatestValueWriter(slow_write)
    for step in range(1, 101):
        for name in written:
            writer.submit(name, str(step).encode())
        if step % 10 == 0:
            time.sleep(0.003)
    writer.drain()
    for values in written.values():
        assert values == sorted(values)
        assert values[-1] == 100
        assert 1 <= len(values) < 100  # coalesced while a write was in flight


def test_a_queued_name_takes_the_newer_value_without_a_second_write():
    release = threading.Event()
    written: list[tuple[str, bytes]] = []

    def write(name: str, data: bytes) -> None:
        release.wait(5)
        written.append((name, data))

    writer = LatestValueWriter(write)
    assert writer.submit("x", b"1") is not None  # running, blocked in write
    time.sleep(0.05)
    assert writer.submit("x", b"2") is not None  # queued behind it
    assert writer.submit("x", b"3") is None  # folded into the queued write
    release.set()
    writer.drain()
    assert written == [("x", b"1"), ("x", b"3")]


def test_a_failed_write_is_logged_and_later_writes_still_run(caplog):
    calls: list[bytes] = []

    def write(name: str, data: bytes) -> None:
        calls.append(data)
        if data == b"1":
            raise OSError("store down")

    writer = LatestValueWriter(write)
    writer.submit("x", b"1")
    writer.drain()
    writer.submit("x", b"2")
    writer.drain()
    assert calls == [b"1", b"2"]
    assert "progress write x failed: OSError" in caplog.text
