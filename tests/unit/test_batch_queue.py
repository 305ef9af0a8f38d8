"""The batching deployment's order rules, on its plain queue."""

import asyncio

import pytest

from serve_app.batching.queue import BatchQueue, QueueFull
from serve_app.config import BatchingConfig
from serve_app.protocol import GenerationItem


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def call(name, size=512, steps=4, count=1, priority="interactive"):
    return GenerationItem(name, size, size, steps, seed=1, count=count, priority=priority)


def make(max_batch_size=4, max_images=8, max_waiting=100, job_max_wait_s=30.0,
         max_work=16.0):
    clock = Clock()
    loop = asyncio.new_event_loop()
    queue = BatchQueue(BatchingConfig(max_batch_size=max_batch_size,
                                      max_images_per_call=max_images,
                                      max_batch_image_steps=max_work),
                       max_waiting=max_waiting, job_max_wait_s=job_max_wait_s, clock=clock)

    def add(item, at=None):
        if at is not None:
            clock.now = at
        return queue.add(item, loop.create_future())
    return queue, add, clock


def names(batch):
    return [p.call.prompt for p in batch]


def test_a_batch_never_mixes_shapes_and_follows_the_oldest_call():
    queue, add, _ = make()
    for name, size, steps in [("a", 512, 4), ("B", 1024, 4), ("c", 512, 4), ("d", 512, 1),
                              ("E", 1024, 4), ("f", 512, 4)]:
        add(call(name, size, steps))
    batches = []
    while batch := queue.next_batch():
        assert len({p.call.shape_key for p in batch}) == 1
        batches.append(names(batch))
    # Oldest first: a's shape (with c, f), then B's, then d's; E (oldest left) after.
    # B and E are 1024x1024 at 4 steps: 16 image-steps each, the default cap, so alone.
    assert batches == [["a", "c", "f"], ["B"], ["d"], ["E"]]


def test_interactive_calls_go_before_older_job_calls():
    queue, add, _ = make()
    add(call("job1", priority="job"), at=0.0)
    add(call("job2", priority="job"), at=1.0)
    add(call("live", size=1024), at=2.0)
    add(call("live2"), at=3.0)
    assert names(queue.next_batch()) == ["live"]
    assert names(queue.next_batch()) == ["live2"]  # not batched with the same-shape jobs
    assert names(queue.next_batch()) == ["job1", "job2"]
    assert queue.next_batch() == []


def test_a_job_waiting_past_its_limit_is_served_as_interactive():
    queue, add, clock = make(job_max_wait_s=10.0)
    add(call("old-job", size=1024, priority="job"), at=0.0)
    add(call("live"), at=5.0)
    clock.now = 9.0
    assert names(queue.next_batch()) == ["live"]
    add(call("live-later"), at=9.5)
    clock.now = 10.5  # old-job has waited 10.5 s: it is served first, being older
    assert names(queue.next_batch()) == ["old-job"]
    assert names(queue.next_batch()) == ["live-later"]


def test_batches_respect_the_call_and_image_caps():
    queue, add, _ = make(max_batch_size=3, max_images=4)
    for i, count in enumerate([2, 1, 2, 1, 1, 4]):
        add(call(f"c{i}", count=count))
    assert names(queue.next_batch()) == ["c0", "c1", "c3"]  # 2+1+1: c2 would make 5
    assert names(queue.next_batch()) == ["c2", "c4"]
    assert names(queue.next_batch()) == ["c5"]


def test_a_lost_batch_is_queued_again_in_its_place():
    queue, add, _ = make(max_batch_size=2)
    for name in "abcd":
        add(call(name))
    first = queue.next_batch()
    assert names(first) == ["a", "b"]
    add(call("e"))
    queue.requeue(first)
    assert [p.attempts for p in first] == [1, 1]
    assert names(queue.next_batch()) == ["a", "b"]
    assert names(queue.next_batch()) == ["c", "d"]


def test_removed_calls_never_run_and_full_queues_refuse():
    queue, add, _ = make(max_waiting=2)
    gone = add(call("gone"))
    add(call("kept"))
    with pytest.raises(QueueFull):
        add(call("third"))
    assert queue.remove(gone) is True
    assert queue.remove(gone) is False
    assert names(queue.next_batch()) == ["kept"]
    assert len(queue) == 0


def test_depth_by_class_and_shape():
    queue, add, _ = make()
    add(call("a"))
    add(call("b", priority="job"))
    add(call("c", size=1024, steps=1, priority="job"))
    add(call("d", priority="job"))
    assert queue.depth() == {("interactive", "512x512/4"): 1, ("job", "512x512/4"): 2,
                             ("job", "1024x1024/1"): 1}


def test_batches_are_capped_by_work_in_512_image_steps():
    """On CPU a batch costs the sum of its images: the work cap keeps expensive calls from
    piling into one long batch (1024x1024 at 4 steps is 16 image-steps)."""
    queue, add, _ = make(max_batch_size=8, max_work=16.0)
    for i in range(3):
        add(call(f"big{i}", size=1024, steps=4))
    for i in range(6):
        add(call(f"small{i}", steps=2))  # 2 image-steps each
    assert names(queue.next_batch()) == ["big0"]
    assert names(queue.next_batch()) == ["big1"]
    assert names(queue.next_batch()) == ["big2"]
    assert names(queue.next_batch()) == [f"small{i}" for i in range(6)]  # 12 <= 16
    queue, add, _ = make(max_batch_size=8, max_work=64.0)  # raised, as on a GPU replica
    for i in range(3):
        add(call(f"big{i}", size=1024, steps=4))
    assert names(queue.next_batch()) == ["big0", "big1", "big2"]


def edit(name, strength=0.5, steps=4):
    return GenerationItem(name, 512, 512, steps, seed=1, init_image=b"png", strength=strength)


def test_image_to_image_calls_are_batched_apart_from_text_to_image():
    queue, add, _ = make()
    for item in [call("t1"), edit("i1"), call("t2"), edit("i2"), edit("i3", strength=1.0),
                 call("t3")]:
        add(item)
    batches = []
    while batch := queue.next_batch():
        batches.append(names(batch))
    # Same 512x512/4 shape, but separate pipelines; a strength is per pipeline call.
    assert batches == [["t1", "t2", "t3"], ["i1", "i2"], ["i3"]]
    for item in [call("t"), edit("i")]:
        add(item)
    assert queue.depth() == {("interactive", "512x512/4"): 1,
                             ("interactive", "512x512/4/img2img"): 1}


def test_image_to_image_work_counts_its_denoising_steps_and_the_encode():
    queue, add, _ = make(max_work=6.0)
    # strength 0.5 at 4 steps: 2 denoising steps + 1 for the VAE encode = 3 image-steps
    for name in ("a", "b", "c"):
        add(edit(name))
    assert names(queue.next_batch()) == ["a", "b"]
    assert names(queue.next_batch()) == ["c"]


def of(name, model, priority="interactive", size=512):
    return GenerationItem(name, size, size, 4, seed=1, priority=priority, model=model)


def test_a_batch_never_mixes_models():
    queue, add, _ = make(max_batch_size=8)
    for i in range(4):
        add(of(f"a{i}", "a"))
        add(of(f"b{i}", "b"))
    batches = []
    while batch := queue.next_batch():
        batches.append((batch[0].call.model, names(batch)))
        assert len({p.call.model for p in batch}) == 1
    assert batches == [("a", ["a0", "a1", "a2", "a3"]), ("b", ["b0", "b1", "b2", "b3"])]


def test_models_take_turns_so_a_burst_for_one_does_not_starve_another():
    queue, add, _ = make(max_batch_size=1)
    for i in range(6):
        add(of(f"a{i}", "a"), at=float(i))
    add(of("b0", "b"), at=10.0)
    add(of("c0", "c"), at=11.0)
    order = []
    while batch := queue.next_batch():
        order.append(names(batch)[0])
        if order == ["a0", "b0"]:
            add(of("b1", "b"), at=12.0)  # b, just served, waits for c and a first
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4", "a5"]
    assert queue.depth_by_model() == {}
    add(of("x", "a"))
    add(of("y", "b", priority="job"))
    add(of("z", None, priority="job"))
    assert queue.depth_by_model() == {("interactive", "a"): 1, ("job", "b"): 1,
                                      ("job", "default"): 1}


def test_priority_classes_come_before_model_turns():
    queue, add, clock = make(max_batch_size=4, job_max_wait_s=10.0)
    add(of("job-b", "b", priority="job"), at=0.0)
    add(of("live-a1", "a"), at=1.0)
    add(of("live-a2", "a", size=1024), at=2.0)
    # Interactive calls of a go first, though it is b's turn among the models.
    assert names(queue.next_batch()) == ["live-a1"]
    assert names(queue.next_batch()) == ["live-a2"]
    assert names(queue.next_batch()) == ["job-b"]
    add(of("old-job-a", "a", priority="job"), at=3.0)
    add(of("live-b", "b"), at=4.0)
    clock.now = 13.5  # old-job-a has waited past job_max_wait_s: interactive now
    assert names(queue.next_batch()) == ["old-job-a"]  # a's turn (b was served last)
    assert names(queue.next_batch()) == ["live-b"]
