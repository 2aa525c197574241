"""The API load generator (streams.testbed.loadgen) against a small aiohttp server that refuses
with 429 + Retry-After, drops connections and answers late: every request ends accepted
once, or given up and reported."""

from __future__ import annotations

import asyncio
from collections import Counter

from aiohttp import web

from streams.testbed.loadgen import run_load, signup_request


def test_run_load_retries_429s_drops_and_time_outs_until_accepted() -> None:
    seen: Counter[str] = Counter()
    connections: set[int] = set()

    async def handle(request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        seen[key] += 1
        connections.add(id(request.transport))
        body = await request.read()
        assert request.headers["Authorization"] == "Bearer k" and body == b'{"n":1}'
        n = seen[key]
        if key == "e-1" and n == 1:
            return web.Response(status=429, headers={"Retry-After": "0"})
        if key == "e-2" and n == 1:
            assert request.transport is not None
            request.transport.close()  # dropped: the client retries on a new connection
            return web.Response(status=500)
        if key == "e-3" and n == 1:
            await asyncio.sleep(1.0)  # later than the client's time-out
        if key == "e-4":
            return web.Response(status=400)  # final: not retried
        if key == "e-5":
            return web.Response(status=503, headers={"Retry-After": "0"})  # never accepted
        return web.Response(status=202)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/subscriptions", handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        try:
            requests = [
                (f"e-{i}", signup_request(f"127.0.0.1:{port}", "k", f"e-{i}", b'{"n":1}'))
                for i in range(40)
            ]
            stats = await run_load("127.0.0.1", port, requests, clients=4, timeout_s=0.3,
                                   max_attempts=3)  # fmt: skip
        finally:
            await runner.cleanup()
        assert sorted(stats.accepted) == sorted(f"e-{i}" for i in range(40) if i not in (4, 5))
        assert stats.gave_up == ["e-4", "e-5"]
        assert stats.timeouts == 1 and stats.connection_errors == 1
        assert stats.status[429] == 1 and stats.status[400] == 1 and stats.status[503] == 3
        assert stats.status[202] == 38 and len(stats.accepted_latencies_ms) == 38
        assert seen["e-0"] == 1 and seen["e-3"] == 2
        assert len(connections) <= 4 + 2  # keep-alive: new ones only after a drop/time-out

    asyncio.run(main())
