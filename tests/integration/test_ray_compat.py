"""serve_app/ray_compat.py's private reaches on a running Ray Serve: a handle's router
knows the deployment's replicas, and a response resolves once assigned. A Ray upgrade that
moves either fails here (the unit tests check the same attributes statically)."""

import asyncio
import time

from ray import serve

from serve_app import ray_compat


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
class Echo:
    async def __call__(self, value: int) -> int:
        return value


def test_a_handle_knows_its_replicas_and_a_response_its_assignment(serve_url, caplog):
    handle = serve.run(Echo.bind(), name="ray-compat", route_prefix=None)
    try:
        assert ray_compat.known_replicas(handle) is None  # no call yet: no router
        assert handle.remote(1).result() == 1
        deadline = time.monotonic() + 30
        while ray_compat.known_replicas(handle) != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray_compat.known_replicas(handle) == 2

        async def assigned_then_result() -> int:
            response = handle.remote(7)
            await ray_compat.wait_assigned(response)
            return await response

        assert asyncio.run(assigned_then_result()) == 7
        assert [r for r in caplog.records if "ray_compat" in r.getMessage()] == []
        # Both reaches worked: their degraded gauge reads 0.
        assert ray_compat._state == {ray_compat.HANDLE_REPLICAS: 0,
                                     ray_compat.RESPONSE_ASSIGNED: 0}
    finally:
        serve.delete("ray-compat")
