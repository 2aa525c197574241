"""streams.testbed.httpserver over real sockets: routing (404/405, decoded parameters), keep-alive
and Connection: close, pipelined requests answered in order, chunked request bodies, the
body limit, garbage, a handler's exception, dropped connections, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from streams.httpclient import HttpClient, ServerDisconnected
from streams.testbed.httpserver import HttpServer, Reply, Request, Router


async def echo(request: Request) -> Reply:
    body = b"%s %s %s %s" % (
        request.method.encode(),
        repr(sorted(request.params.items())).encode(),
        repr(sorted(request.query.items())).encode(),
        request.body,
    )
    return Reply(body, 200, {"X-Key": request.header("idempotency-key") or "-"})


async def slow(request: Request) -> Reply:
    await asyncio.sleep(float(request.params["seconds"]))
    return Reply(request.params["seconds"].encode())


async def boom(request: Request) -> Reply:
    raise RuntimeError("boom")


async def drop(request: Request) -> Reply:
    request.drop()
    return Reply(status=500)


@asynccontextmanager
async def serving(max_body: int = 1024) -> AsyncIterator[tuple[HttpServer, str, int]]:
    router = Router()
    router.add("POST", "/v1/items/{item}/echo", echo)
    router.add("GET", "/v1/items/{item}/echo", echo)
    router.add("GET", "/v1/items/{item}/by-key/{key}", echo)
    router.add("GET", "/slow/{seconds}", slow)
    router.add("GET", "/boom", boom)
    router.add("GET", "/drop", drop)
    server = HttpServer(router, max_body=max_body)
    host, port = await server.start("127.0.0.1", 0)
    try:
        yield server, f"http://{host}:{port}", port
    finally:
        await server.close(timeout_s=0.2)


async def raw(port: int, data: bytes, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        if read_until_close:
            return await asyncio.wait_for(reader.read(), 2)
        return await asyncio.wait_for(reader.read(65536), 2)
    finally:
        writer.close()


def test_routes_parameters_keep_alive_and_errors() -> None:
    async def main() -> None:
        async with serving() as (_, url, _port):
            client = HttpClient(timeout_s=2)
            pool, _, _ = client.endpoint(url)
            resp = await client.request(
                "POST", url + "/v1/items/a%2Fb%20c/echo?x=1&y=", b"hi", {"Idempotency-Key": "k"}
            )
            assert resp.status == 200 and resp.header("x-key") == "k"
            assert resp.body == b"POST [('item', 'a/b c')] [('x', '1'), ('y', '')] hi"
            resp = await client.request("GET", url + "/v1/items/i/by-key/k%25")
            assert resp.body == b"GET [('item', 'i'), ('key', 'k%')] [] "
            assert (await client.request("GET", url + "/v1/nothing")).status == 404
            assert (await client.request("DELETE", url + "/v1/items/i/echo")).status == 405
            failed = await client.request("GET", url + "/boom")
            assert failed.status == 500 and not failed.keep_alive
            big = await client.request("POST", url + "/v1/items/i/echo", b"x" * 2000)
            assert big.status == 413 and not big.keep_alive
            assert (await client.request("GET", url + "/v1/items/i/echo")).status == 200
            assert pool.connects == 3  # reused, except after the 500 and the 413
            with pytest.raises(ServerDisconnected):
                await client.request("GET", url + "/drop")
            await client.close()

    asyncio.run(main())


def test_pipelined_requests_are_answered_in_order_and_close_is_honoured() -> None:
    async def main() -> None:
        async with serving() as (_, _url, port):
            requests = (
                b"GET /slow/0.2 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"GET /slow/0.0 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"POST /v1/items/z/echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked"
                b"\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                b"GET /v1/items/last/echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            )
            data = await raw(port, requests)
            assert data.count(b"HTTP/1.1 200 OK") == 4
            first, second = data.index(b"\r\n\r\n0.2"), data.index(b"\r\n\r\n0.0")
            assert first < second < data.index(b"abcde") < data.index(b"'last'")
            assert b"Connection: close" in data.split(b"'last'")[0].rsplit(b"HTTP/1.1", 1)[1]
            # HTTP/1.0 without keep-alive: one answer, then the server closes
            assert (await raw(port, b"GET /v1/items/i/echo HTTP/1.0\r\n\r\n")).startswith(
                b"HTTP/1.1 200 OK"
            )
            garbage = await raw(port, b"\x00\x01 not http\r\n\r\n")
            assert garbage.startswith(b"HTTP/1.1 400")

    asyncio.run(main())


def test_an_independent_client_and_shutdown_with_a_handler_still_running() -> None:
    async def main() -> None:
        async with serving() as (server, url, _port):
            async with (
                aiohttp.ClientSession() as session,
                session.post(url + "/v1/items/x/echo", data=b"body") as resp,
            ):
                assert resp.status == 200 and resp.headers["X-Key"] == "-"
                assert await resp.read() == b"POST [('item', 'x')] [] body"
            client = HttpClient(timeout_s=5)
            pending = asyncio.create_task(client.request("GET", url + "/slow/30"))
            await asyncio.sleep(0.1)
            await server.close(timeout_s=0.1)  # cancels the handler, closes the connection
            with pytest.raises(ServerDisconnected):
                await pending
            assert not server.tasks and not server.connections
            await client.close()

    asyncio.run(main())


def test_the_router_caches_a_bounded_number_of_resolved_paths() -> None:
    router = Router()
    router.add("GET", "/a/{x}/b", echo)
    router.add("POST", "/a/{x}/b", slow)
    for i in range(Router.CACHE_SIZE + 50):
        assert router.resolve("GET", f"/a/k{i}/b") == (echo, {"x": f"k{i}"}, 0)
    assert len(router._cache) == Router.CACHE_SIZE
    assert router.resolve("POST", "/a/k1/b") == (slow, {"x": "k1"}, 0)
    assert router.resolve("PUT", "/a/k1/b")[2] == 405
    assert router.resolve("GET", "/a/k1/c")[2] == 404
    router.add("GET", "/a/{x}/c", echo)  # a new route: what was cached may be wrong now
    assert router.resolve("GET", "/a/k1/c") == (echo, {"x": "k1"}, 0)
