"""Streams: errors after the headers, client disconnects (streaming or not) cancelling the
generation under either aiohttp handler-cancellation setting, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time

import aiohttp
import openai
import pytest
from aiohttp import web

from mesh_node.serving.api import ApiServer, create_app
from tests.serving.backends import ScriptedBackend
from tests.serving.conftest import MODEL

CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "What is 348 + 276?"}]


def events(body: str) -> list[dict | str]:
    """The `data:` payloads of an event stream, decoded (`[DONE]` stays a string)."""
    assert body.endswith("\n\n")
    out: list[dict | str] = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


@contextlib.asynccontextmanager
async def serve(backend, *, handler_cancellation: bool, **options):
    """`create_app` under a plain aiohttp runner, handler cancellation on or off; yields the
    port."""
    runner = web.AppRunner(
        create_app(backend, **options),
        handler_cancellation=handler_cancellation,
        shutdown_timeout=0.5,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def send_request(port: int, path: str, body: dict):
    """A bare HTTP/1.1 request on its own connection: (reader, writer) to read or hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    writer.write(head.encode() + data)
    await writer.drain()
    return reader, writer


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(writer.wait_closed(), 2.0)


@pytest.fixture
async def scripted():
    backend = ScriptedBackend()
    async with ApiServer(backend, port=0, shutdown_timeout=1.0) as server:
        yield backend, server


@pytest.mark.parametrize(
    ("model", "code", "shown"),
    [
        ("fail-mid", "generation_failed", "the host went away"),
        ("crash-mid", "internal_error", "the server failed"),
        ("unfinished", "generation_failed", "without finishing"),
    ],
)
async def test_error_mid_stream_is_a_last_event(http, scripted, caplog, model, code, shown):
    _, server = scripted
    body = {"model": model, "messages": QUESTION, "stream": True}
    async with http.post(server.url + CHAT, json=body) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        got = events(await response.text())
    role, content, error, done = got
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content["choices"][0]["delta"] == {"content": "partial "}
    assert error["error"]["code"] == code and shown in error["error"]["message"]
    assert error["error"]["type"] == "server_error"
    assert done == "[DONE]"
    if model == "crash-mid":
        assert "secret" not in error["error"]["message"]
        assert "secret internal detail" in caplog.text
    async with http.post(server.url + CHAT, json=body | {"model": "echo"}) as response:
        assert [e["choices"] for e in events(await response.text())[:-1]][-1][0][
            "finish_reason"
        ] == "stop"


async def test_openai_client_raises_on_error_event(scripted):
    _, server = scripted
    async with openai.AsyncOpenAI(
        base_url=server.base_url, api_key="unused", max_retries=0, timeout=10
    ) as oai:
        stream = await oai.chat.completions.create(model="fail-mid", messages=QUESTION, stream=True)
        seen = []
        with pytest.raises(openai.APIError, match="the host went away"):
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content or "")
        assert "".join(seen) == "partial "
        reply = await oai.chat.completions.create(model="echo", messages=QUESTION)
        assert reply.choices[0].message.content == "ok"


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_disconnect_mid_stream_cancels_the_generation(handler_cancellation):
    backend = ScriptedBackend()
    async with serve(backend, handler_cancellation=handler_cancellation) as port:
        body = {"model": "stall", "messages": QUESTION, "stream": True}
        reader, writer = await send_request(port, CHAT, body)
        # the first delta reaches the client while the generation is still running (flushed)
        async with asyncio.timeout(5):
            seen = b""
            while b"first " not in seen:
                seen += await reader.read(4096)
        assert b"text/event-stream" in seen
        assert backend.active == 1
        started = time.monotonic()
        await hang_up(writer)
        await backend.wait_idle(timeout=2.0)
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_disconnect_while_waiting_for_a_whole_answer(handler_cancellation):
    backend = ScriptedBackend()
    async with serve(backend, handler_cancellation=handler_cancellation) as port:
        for model, stream in (("stall-before", False), ("stall", False), ("stall-before", True)):
            body = {"model": model, "messages": QUESTION, "stream": stream}
            _, writer = await send_request(port, CHAT, body)
            await backend.wait_active()
            await hang_up(writer)
            await backend.wait_idle(timeout=2.0)
        assert backend.opened == 3


async def test_without_the_watcher_aiohttp_would_not_cancel():
    """Why the API watches connections: the installed aiohttp, by default
    (handler_cancellation=False), lets a handler waiting on the backend run on after its
    client is gone, even past the runner's cleanup (it no longer tracks that connection)."""
    before = asyncio.all_tasks()
    backend = ScriptedBackend()
    async with serve(backend, handler_cancellation=False, disconnect_poll=3600) as port:
        _, writer = await send_request(port, CHAT, {"model": "stall-before", "messages": QUESTION})
        await backend.wait_active()
        await hang_up(writer)
        await asyncio.sleep(0.5)
        assert backend.active == 1
    assert backend.active == 1
    for task in asyncio.all_tasks() - before - {asyncio.current_task()}:
        task.cancel()  # the orphaned handler
    await backend.wait_idle()


async def test_disconnect_with_the_real_model(local_models, generator):
    async with ApiServer(local_models, port=0) as server:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Reverse the words: sun moon star"}],
            "stream": True,
            "temperature": 2.0,
            "seed": 7,
        }
        reader, writer = await send_request(server.port, CHAT, body)
        async with asyncio.timeout(5):
            seen = b""
            while seen.count(b"data: ") < 2:  # the role chunk and a first piece of text
                seen += await reader.read(4096)
        await hang_up(writer)
        async with asyncio.timeout(2.0):
            # the generator's counts live on its worker thread: polled, there is no event
            while generator.stats().active or generator.stats().queued:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="unused", max_retries=0, timeout=10
        ) as oai:
            reply = await oai.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
            assert reply.choices[0].message.content == "624"


async def test_stop_ends_open_streams():
    backend = ScriptedBackend()
    server = ApiServer(backend, port=0, shutdown_timeout=0.3)
    await server.start()
    _, writer = await send_request(server.port, CHAT, {"model": "stall", "messages": QUESTION})
    await backend.wait_active()
    started = time.monotonic()
    await server.stop()
    assert time.monotonic() - started < 2.5
    assert backend.active == 0
    await hang_up(writer)


async def test_answers_still_running_when_the_grace_ends_get_a_clear_503(caplog):
    """Stopping gives answers under way `shutdown_timeout` seconds; then each ends with a 503
    saying the node is shutting down (a last error event on a stream already started) and the
    server stops. aiohttp alone would wait twice the grace and then only cut the connections
    (a grace over 2 s outlasted `stop`'s bound: handlers went on running, unanswered)."""
    backend = ScriptedBackend()
    server = ApiServer(backend, port=0, shutdown_timeout=2.5)
    await server.start()

    async def ask(http: aiohttp.ClientSession, stream: bool) -> tuple[int, str]:
        body = {"model": "stall", "messages": QUESTION, "stream": stream}
        async with http.post(server.url + CHAT, json=body) as response:
            return response.status, await response.text()

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            streamed = asyncio.ensure_future(ask(http, True))
            whole = asyncio.ensure_future(ask(http, False))
            await backend.wait_active(count=2)
            with caplog.at_level(logging.WARNING, logger="mesh_node.http"):
                await server.stop()
            assert "did not stop" not in caplog.text
            assert backend.active == 0
            status, text = await asyncio.wait_for(streamed, 5.0)
            assert status == 200
            *_, last, done = events(text)
            assert done == "[DONE]"
            assert last["error"]["code"] == "no_host_available"
            assert "shutting down" in last["error"]["message"]
            status, text = await asyncio.wait_for(whole, 5.0)
            assert status == 503
            assert json.loads(text)["error"]["code"] == "no_host_available"
    finally:
        await server.stop()


async def test_a_client_that_stops_reading_is_dropped_and_frees_its_slot():
    """A streaming client that stays connected but reads nothing holds a request slot and
    its generation only until a write has waited `write_timeout`."""
    backend = ScriptedBackend()
    async with ApiServer(backend, port=0, max_in_flight=1, write_timeout=1.0) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.setblocking(False)
        body = json.dumps({"model": "flood", "prompt": "x", "stream": True}).encode()
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        try:
            await asyncio.get_running_loop().sock_sendall(sock, head + body)
            await backend.wait_active()  # then the client never reads
            await backend.wait_idle(timeout=10.0)  # dropped: the generation stopped
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                answer = {"model": "echo", "prompt": "y"}
                async with http.post(server.url + "/v1/completions", json=answer) as response:
                    assert response.status == 200  # the slot came back
        finally:
            sock.close()
