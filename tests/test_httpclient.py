"""streams.httpclient against a real aiohttp server: keep-alive reuse, time-outs, dropped
connections, Connection: close, chunked bodies, header lookup, request encoding."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from streams.httpclient import (
    ConnectionPool,
    HttpClient,
    InvalidURL,
    ServerDisconnected,
    encode_request,
)


@asynccontextmanager
async def server() -> AsyncIterator[str]:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(
            body=body, headers={"X-Method": request.method, "X-Key": request.headers.get("K", "")}
        )

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text="late")

    async def drop(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=500)

    async def close(request: web.Request) -> web.Response:
        return web.Response(text="bye", headers={"Connection": "close"})

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Retry-After": "7"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/slow", slow)
    app.router.add_get("/drop", drop)
    app.router.add_get("/close", close)
    app.router.add_get("/chunked", chunked)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def run(scenario: Callable[[str, HttpClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with server() as url:
            client = HttpClient(timeout_s=2.0)
            try:
                await scenario(url, client)
            finally:
                await client.close()

    asyncio.run(main())


def test_keep_alive_connections_are_reused() -> None:
    async def scenario(url: str, client: HttpClient) -> None:
        pool, _, _ = client.endpoint(url + "/echo")
        for i in range(20):
            resp = await client.request("POST", url + "/echo", b"x%d" % i, {"K": f"k{i}"})
            assert (resp.status, resp.body, resp.header("x-key")) == (200, b"x%d" % i, f"k{i}")
            assert resp.header("X-METHOD") == "POST" and resp.keep_alive
        assert pool.connects == 1
        # concurrent requests: one connection each, then reused
        for _ in range(3):
            got = await asyncio.gather(*(client.request("GET", url + "/echo") for _ in range(10)))
            assert {r.status for r in got} == {200}
        assert pool.connects == 10 and pool.open_connections == 10
        assert (await client.request("GET", url + "/nope")).status == 404

    run(scenario)


def test_a_time_out_closes_the_connection_and_the_next_request_works() -> None:
    async def scenario(url: str, client: HttpClient) -> None:
        pool, _, _ = client.endpoint(url + "/slow")
        with pytest.raises(TimeoutError):
            await client.request("GET", url + "/slow?s=1", timeout_s=0.1)
        assert pool.open_connections == 0  # the late answer must not reach a later request
        resp = await client.request("GET", url + "/slow?s=0.01")
        assert resp.body == b"late" and pool.connects == 2

    run(scenario)


def test_a_dropped_connection_and_connection_close() -> None:
    async def scenario(url: str, client: HttpClient) -> None:
        pool, _, _ = client.endpoint(url + "/drop")
        with pytest.raises(ServerDisconnected) as dropped:
            await client.request("GET", url + "/drop")
        assert isinstance(dropped.value, ConnectionError)
        resp = await client.request("GET", url + "/close")
        assert resp.body == b"bye" and not resp.keep_alive and pool.open_connections == 0
        assert (await client.request("GET", url + "/echo")).status == 200
        assert pool.connects == 3

    run(scenario)


def test_chunked_bodies_and_headers() -> None:
    async def scenario(url: str, client: HttpClient) -> None:
        resp = await client.request("GET", url + "/chunked")
        assert resp.body == b"one,two,three"
        assert resp.header("retry-after") == "7" and resp.headers["retry-after"] == "7"
        assert resp.header("x-missing") is None and resp.header("x-missing", "d") == "d"

    run(scenario)


def test_refused_connections_and_bad_urls() -> None:
    async def main() -> None:
        client = HttpClient(timeout_s=1.0)
        pool = ConnectionPool("127.0.0.1", 1)  # nothing listens on port 1
        with pytest.raises(ConnectionError):
            await pool.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1.0)
        for url in ("ftp://host/x", "http:///x", "http://host:99999/x", "http://h/a b"):
            with pytest.raises(InvalidURL):
                await client.request("GET", url)
        await client.close()

    asyncio.run(main())


def test_encode_request() -> None:
    assert encode_request("GET", "/a?b=1", "h:1") == b"GET /a?b=1 HTTP/1.1\r\nHost: h:1\r\n\r\n"
    assert encode_request("POST", "/p", "h", {"K": "v"}, b"{}") == (
        b"POST /p HTTP/1.1\r\nHost: h\r\nK: v\r\nContent-Length: 2\r\n\r\n{}"
    )
    for headers in ({"K": "v\r\nX: y"}, {"K\n": "v"}, {"K: x": "v"}):
        with pytest.raises(ValueError):
            encode_request("GET", "/", "h", headers)
    client = HttpClient()
    assert client.endpoint("http://[::1]:8080/x?y=1")[1:] == ("/x?y=1", "[::1]:8080")
    assert client.endpoint("https://example.com")[1:] == ("/", "example.com")
