"""The readiness probe never makes /readyz wait on a loading model."""

import asyncio
import time

from serve_app.ingress.readiness import ReadinessProbe


class Saturated(Exception):
    pass


def test_loading_answers_at_once_after_the_first_probe_and_ready_when_the_replica_answers():
    loaded = asyncio.Event()
    asks = 0

    async def ask():
        nonlocal asks
        asks += 1
        await loaded.wait()  # the replica is still loading the model
        return {"model": "m"}

    async def main():
        probe = ReadinessProbe(ask, wait_s=0.2)
        started = time.perf_counter()
        first = await probe.check()
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        second = await probe.check()
        second_s = time.perf_counter() - started
        loaded.set()
        await asyncio.sleep(0)
        third = await probe.check()
        return first, first_s, second, second_s, third

    first, first_s, second, second_s, third = asyncio.run(main())
    assert first.state == second.state == "loading"
    assert 0.15 <= first_s < 1.0  # the probe that asked waited at most wait_s
    assert second_s < 0.05  # the next one did not wait at all
    assert (third.state, third.info) == ("ready", {"model": "m"})
    assert asks == 1  # one ask, shared by the three probes


def test_busy_after_ready_keeps_the_last_info_and_errors_make_it_unavailable():
    answers = [{"model": "m"}, Saturated(), "hang", RuntimeError("replica died")]

    async def ask():
        answer = answers.pop(0)
        if answer == "hang":
            await asyncio.sleep(10)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def main():
        probe = ReadinessProbe(ask, busy_errors=(Saturated,), wait_s=0.05, give_up_s=0.1)
        states = [await probe.check()]  # ready
        states.append(await probe.check())  # back-pressure: busy
        states.append(await probe.check())  # the ask hangs: busy after wait_s
        await asyncio.sleep(0.15)  # past give_up_s: the hung ask is abandoned
        states.append(await probe.check())  # asked again: the replica died
        return states

    states = asyncio.run(main())
    assert [s.state for s in states] == ["ready", "busy", "busy", "unavailable"]
    assert states[1].info == states[2].info == {"model": "m"}
    assert states[3].detail == "RuntimeError"


def test_an_unanswered_ask_with_no_model_replica_running_is_unavailable_not_busy():
    """Its node lost, the replica answers nothing: with no replica left, not ready."""
    answers = [{"model": "m"}, "hang", "hang"]
    running = [1]

    async def ask():
        if answers.pop(0) == "hang":
            await asyncio.sleep(10)
        return {"model": "m"}

    async def main():
        probe = ReadinessProbe(ask, wait_s=0.05, give_up_s=0.1, replicas=lambda: running[0])
        states = [await probe.check()]  # ready
        states.append(await probe.check())  # unanswered, a replica runs: busy
        running[0] = 0  # the controller saw it die
        await asyncio.sleep(0.15)
        states.append(await probe.check())  # asked again, unanswered, no replica
        return states

    states = asyncio.run(main())
    assert [s.state for s in states] == ["ready", "busy", "unavailable"]
    assert states[2].detail == "no model replica running"


def test_the_replica_count_unknown_keeps_the_busy_answer():
    async def ask():
        await asyncio.sleep(10)

    async def main():
        probe = ReadinessProbe(ask, wait_s=0.05, replicas=lambda: None)
        probe.info = {"model": "m"}  # answered before
        return await probe.check()

    assert (asyncio.run(main()).state) == "busy"


def test_never_answered_and_saturated_is_loading():
    async def ask():
        raise Saturated()

    async def main():
        return await ReadinessProbe(ask, busy_errors=(Saturated,), wait_s=0.05).check()

    result = asyncio.run(main())
    assert (result.state, result.info) == ("loading", None)
