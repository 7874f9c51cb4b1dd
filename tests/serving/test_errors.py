"""Every error the API answers: OpenAI's JSON shape, the exact status, the field it names;
and the node keeps serving after each."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import openai
import pytest

from mesh_node.serving.api import ApiServer
from tests.conditions import until
from tests.serving.backends import CRASH_ON_OPEN, OVERLOADED, ScriptedBackend
from tests.serving.conftest import MODEL

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
QUESTION = [{"role": "user", "content": "What is 348 + 276?"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": QUESTION, "temperature": 0} | fields


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "<|user|>\nWhat is 2 + 2?<|end|>\n<|assistant|>\n"} | fields


async def post(http, server, path, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(server.url + path, data=data, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


def assert_error(payload: dict, type_: str, param: str | None = None) -> dict:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    return error


async def assert_still_serving(http, server, headers=None) -> None:
    status, payload = await post(http, server, CHAT, chat(), headers)
    assert status == 200
    assert payload["choices"][0]["message"]["content"] == "624"


INVALID_CHAT = [
    (b"{not json", None),
    (b"\xff\xfe", None),
    (b"[" * 50000, None),
    (b"[1, 2]", None),
    (b'"a string"', None),
    ({"messages": QUESTION}, "model"),
    ({"model": 5, "messages": QUESTION}, "model"),
    ({"model": ""}, "model"),
    ({"model": MODEL}, "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages="hello"), "messages"),
    (chat(messages=["hello"]), "messages[0]"),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "t"}]), "messages[0].role"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        "messages[0].content[0].type",
    ),
    (
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
        "messages[0].content[0].text",
    ),
    (
        chat(messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}]),
        "messages[0].tool_calls",
    ),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=-5), "max_tokens"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(max_tokens="10"), "max_tokens"),
    (chat(max_tokens=True), "max_tokens"),
    (chat(max_tokens=32769), "max_tokens"),
    (chat(max_tokens=10**30), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(temperature=2.5), "temperature"),
    (chat(temperature=-0.1), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_p=1.01), "top_p"),
    (chat(top_k=-1), "top_k"),
    (chat(top_k=2.5), "top_k"),
    (chat(seed="x"), "seed"),
    (chat(seed=2**70), "seed"),
    (chat(stop=5), "stop"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(stop=[""]), "stop"),
    (chat(stream="yes"), "stream"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat(n=2), "n"),
    (chat(n=0), "n"),
    (chat(presence_penalty=0.5), "presence_penalty"),
    (chat(frequency_penalty=-1), "frequency_penalty"),
    (chat(logprobs=True), "logprobs"),
    (chat(top_logprobs=3), "top_logprobs"),
    (chat(logit_bias={"50256": -100}), "logit_bias"),
    (chat(logit_bias={"50256": 0.5}), "logit_bias"),
    (chat(logit_bias=[0]), "logit_bias"),
    (chat(web_search_options={"search_context_size": "high"}), "web_search_options"),
    (chat(web_search_options={}), "web_search_options"),
    (chat(reasoning_effort="high"), "reasoning_effort"),
    (chat(verbosity="high"), "verbosity"),
    (chat(store=True, metadata={"k": "v"}), "store"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (chat(tool_choice="required"), "tool_choice"),
    (chat(functions=[{"name": "f"}]), "functions"),
    (chat(response_format={"type": "json_object"}), "response_format"),
    (chat(modalities=["text", "audio"]), "modalities"),
    (chat(user=7), "user"),
]


@pytest.mark.parametrize(("body", "param"), INVALID_CHAT)
async def test_invalid_chat_requests(http, server, body, param):
    status, payload = await post(http, server, CHAT, body)
    assert status == 400
    error = assert_error(payload, "invalid_request_error", param)
    assert param is None or param in error["message"]


INVALID_COMPLETIONS = [
    ({"model": MODEL}, "prompt"),
    (completion(prompt=5), "prompt"),
    (completion(prompt=["one", "two"]), "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=[1, 2, 3]), "prompt"),
    (completion(prompt=[[1, 2]]), "prompt"),
    (completion(echo=True), "echo"),
    (completion(suffix="tail"), "suffix"),
    (completion(best_of=2), "best_of"),
    (completion(logprobs=2), "logprobs"),
    (completion(max_tokens=0), "max_tokens"),
    (completion(temperature=3), "temperature"),
    (completion(prompt=""), "prompt"),  # (refused by the engine: it names the field too)
]


@pytest.mark.parametrize(("body", "param"), INVALID_COMPLETIONS)
async def test_invalid_completion_requests(http, server, body, param):
    status, payload = await post(http, server, COMPLETIONS, body)
    assert status == 400
    assert_error(payload, "invalid_request_error", param)


async def test_errors_leave_the_node_serving(http, server):
    for body, _ in INVALID_CHAT[:12]:
        status, _payload = await post(http, server, CHAT, body)
        assert status == 400
    await assert_still_serving(http, server)


async def test_backend_decides_what_a_model_is(http, server):
    # neither hosted nor known: the backend's ModelNotFound, stream or not
    for stream in (False, True):
        status, payload = await post(http, server, CHAT, chat(model="gpt-4", stream=stream))
        assert status == 404
        assert assert_error(payload, "invalid_request_error", "model")["code"] == "model_not_found"
    # the engine refuses a prompt longer than the context: a 400 too
    long = [{"role": "user", "content": " ".join(["apple"] * 400)}]
    status, payload = await post(http, server, CHAT, chat(messages=long))
    assert status == 400
    error = assert_error(payload, "invalid_request_error", "messages")
    assert error["code"] == "context_length_exceeded"  # OpenAI's terms, as clients expect them
    assert "maximum context length is 256 tokens" in error["message"]
    status, payload = await post(http, server, COMPLETIONS, completion(prompt="apple " * 400))
    assert status == 400
    error = assert_error(payload, "invalid_request_error", "prompt")
    assert error["code"] == "context_length_exceeded"
    await assert_still_serving(http, server)


async def test_max_tokens_cap_is_configurable(http, local_models):
    async with ApiServer(local_models, port=0, max_tokens_limit=100) as server:
        status, payload = await post(http, server, CHAT, chat(max_tokens=101))
        assert status == 400
        assert "100" in assert_error(payload, "invalid_request_error", "max_tokens")["message"]
        status, _ = await post(http, server, CHAT, chat(max_tokens=100))
        assert status == 200


async def test_unknown_paths_and_methods(http, server):
    for method, path, status in [
        ("GET", "/v1/nothing-here", 404),
        ("POST", "/v2/chat/completions", 404),
        ("GET", "/", 404),
        ("GET", CHAT, 405),
        ("DELETE", "/v1/models", 405),
    ]:
        async with http.request(method, server.url + path) as response:
            assert response.status == status
            payload = await response.json()
            assert_error(payload, "invalid_request_error")
            if status == 405:
                assert "POST" in response.headers["Allow"] or "GET" in response.headers["Allow"]
    await assert_still_serving(http, server)


async def test_body_too_large(http, server):
    big = json.dumps(chat(padding="x" * (4 * 1024 * 1024))).encode()
    status, payload = await post(http, server, CHAT, big)
    assert status == 413
    assert_error(payload, "invalid_request_error")
    await assert_still_serving(http, server)


async def test_chunked_body_too_large(http, local_models):
    async def chunks():
        for _ in range(8):
            yield b" " * 512

    async with ApiServer(local_models, port=0, max_body_bytes=2048) as server:
        async with http.post(server.url + CHAT, data=chunks()) as response:
            assert response.status == 413
            assert_error(await response.json(), "invalid_request_error")
        await assert_still_serving(http, server)


async def test_api_key(http, local_models):
    async with ApiServer(local_models, port=0, api_key="sekret") as server:
        good = {"Authorization": "Bearer sekret"}
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("GET", "/v1/nope")):
                async with http.request(method, server.url + path, headers=headers) as response:
                    assert response.status == 401
                    assert response.headers["WWW-Authenticate"] == "Bearer"
                    error = assert_error(await response.json(), "authentication_error")
                    assert error["code"] == "invalid_api_key"
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="wrong", max_retries=0, timeout=10
        ) as wrong:
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="sekret", max_retries=0, timeout=10
        ) as right:
            assert [m.id for m in (await right.models.list()).data] == [MODEL]
        await assert_still_serving(http, server, good)


@pytest.fixture
async def scripted():
    backend = ScriptedBackend()
    async with ApiServer(backend, port=0, shutdown_timeout=2.0) as server:
        yield backend, server


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "status", "type_", "code"),
    [
        (OVERLOADED, 429, "rate_limit_error", "overloaded"),
        ("no-host", 503, "server_error", "no_host_available"),
        ("crash", 500, "server_error", "internal_error"),
        (CRASH_ON_OPEN, 500, "server_error", "internal_error"),
        ("empty", 502, "server_error", "generation_failed"),
    ],
)
async def test_backend_errors_before_the_first_delta(
    http, scripted, model, status, type_, code, stream, caplog
):
    """Before any delta, even a stream request gets a plain HTTP error (no event stream)."""
    _, server = scripted
    got, payload = await post(http, server, CHAT, chat(model=model, stream=stream))
    assert got == status
    error = assert_error(payload, type_)
    assert error["code"] == code
    assert "secret" not in error["message"]  # unexpected errors stay in the log
    if status == 500:
        assert "secret internal detail" in caplog.text
    status, payload = await post(http, server, CHAT, chat(model="echo"))
    assert status == 200 and payload["choices"][0]["message"]["content"] == "ok"


async def test_openai_client_sees_status_errors(scripted):
    _, server = scripted
    async with openai.AsyncOpenAI(
        base_url=server.base_url, api_key="unused", max_retries=0, timeout=10
    ) as oai:
        with pytest.raises(openai.RateLimitError):
            await oai.chat.completions.create(model=OVERLOADED, messages=QUESTION)
        with pytest.raises(openai.InternalServerError) as caught:
            await oai.chat.completions.create(model="no-host", messages=QUESTION, stream=True)
        assert caught.value.status_code == 503
        with pytest.raises(openai.BadRequestError) as bad:
            await oai.chat.completions.create(model="echo", messages=QUESTION, n=3)
        assert bad.value.body["param"] == "n"


async def test_unfinished_generation_is_a_bad_gateway(http, scripted):
    _, server = scripted
    status, payload = await post(http, server, CHAT, chat(model="unfinished"))
    assert status == 502
    assert assert_error(payload, "server_error")["code"] == "generation_failed"


async def test_request_ids_are_unique(http, scripted):
    backend, server = scripted
    ids = set()
    for path, body in ((CHAT, chat(model="echo")), (COMPLETIONS, completion(model="echo"))):
        for _ in range(5):
            status, payload = await post(http, server, path, body)
            assert status == 200
            ids.add(payload["id"])
    assert len(ids) == 10
    assert {r.request_id for r in backend.requests} == ids


async def test_head_and_get_with_a_body(http, server):
    async with http.head(server.url + "/v1/models") as response:
        assert response.status == 200
    async with http.get(server.url + "/v1/models", data=b"junk") as response:
        assert response.status == 200
    await assert_still_serving(http, server)


async def raw_status(server: ApiServer, request: bytes) -> bytes:
    """The status code the server answers these raw bytes with (what aiohttp's client would
    not send: header bytes that are not text, a body that stops short)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return status.split()[1]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
    ],
    ids=["bad-content-length", "line-too-long", "too-many-headers"],
)
async def test_http_that_does_not_parse_is_no_error_in_the_nodes_log(caplog, request_bytes):
    """aiohttp logs each request it cannot parse, a client's fault it answers 400, as an ERROR
    with a traceback: any client could fill the node's log with false alarms."""
    async with ApiServer(ScriptedBackend(), port=0) as server:
        with caplog.at_level(logging.DEBUG):
            # (aiohttp logs before it answers)
            assert await raw_status(server, request_bytes) == b"400"
        async with aiohttp.ClientSession() as http, http.get(server.base_url + "/models") as ok:
            assert ok.status == 200
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    assert "400" in caplog.text  # still said, quietly


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
async def test_a_compressed_body_that_does_not_decompress_is_answered_400(encoding):
    async with ApiServer(ScriptedBackend(), port=0) as server:
        body = b"0123456789"  # not gzip, not deflate
        status = await raw_status(
            server,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Encoding: " + encoding + b"\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body,
        )
        assert status == b"400"


async def test_a_body_that_does_not_decompress_closes_its_connection_and_no_other(server, caplog):
    """The 400 says `Connection: close` (the body's end is unknown), so a client's pool does
    not send its next request down that connection; the server logs no traceback."""
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(
            server.url + CHAT, data=b"not gzip", headers={"Content-Encoding": "gzip"}
        ) as response:
            assert response.status == 400
            assert response.headers.get("Connection") == "close"
        status, _ = await post(http, server, CHAT, chat())
        assert status == 200
    assert "Unhandled exception" not in caplog.text


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_not_json(http, server, constant):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": %s}'
    status, payload = await post(http, server, CHAT, body % (MODEL.encode(), constant.encode()))
    assert status == 400
    assert "not valid JSON" in assert_error(payload, "invalid_request_error")["message"]


@pytest.mark.parametrize("name", ["temperature", "top_p", "presence_penalty"])
async def test_a_number_too_large_for_a_double_is_refused_as_not_finite(http, server, name):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "%s": 1e400}'
    status, payload = await post(http, server, CHAT, body % (MODEL.encode(), name.encode()))
    assert status == 400
    error = assert_error(payload, "invalid_request_error", name)
    assert error["message"] == f"{name} must be a finite number, got inf"


async def test_fields_that_change_nothing_are_accepted(http, server):
    neutral = {
        "logit_bias": {"50256": 0, "7": 0.0},
        "verbosity": "medium",
        "store": False,
        "metadata": {"k": "v"},
        "service_tier": "auto",
        "parallel_tool_calls": True,
    }
    status, _ = await post(http, server, CHAT, chat(**neutral))
    assert status == 200


async def test_an_api_key_header_that_is_not_text_is_refused(local_models):
    async with ApiServer(local_models, port=0, api_key="sekret") as server:
        status = await raw_status(
            server,
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\r\n"
            b"Connection: close\r\n\r\n",
        )
        assert status == b"401"


async def test_a_body_that_does_not_arrive_in_time_is_answered_408(local_models):
    async with ApiServer(local_models, port=0, body_timeout=0.3) as server:
        status = await raw_status(  # headers promise 100 bytes; one comes
            server,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        assert status == b"408"


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connected, sends nothing
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ",  # stalls mid-header
    ],
)
async def test_a_connection_that_never_completes_its_headers_is_closed(sent):
    """Slowloris: headers trickled (up to 128 of 8 KB each are held in memory) or never sent
    keep a connection only `idle_timeout` seconds (aiohttp's own default: an hour)."""
    server = ApiServer(ScriptedBackend(), port=0)
    server.idle_timeout = 0.3
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(sent)
            await writer.drain()
            async with asyncio.timeout(5.0):
                while await reader.read(4096):  # (aiohttp may answer 4xx first: read to EOF)
                    pass
        finally:
            writer.close()


async def test_completions_beyond_the_in_flight_limit_are_answered_429(http):
    backend = ScriptedBackend()
    async with ApiServer(backend, port=0, max_in_flight=2) as server:
        body = {"model": "stall-before", "messages": [{"role": "user", "content": "hi"}]}
        held = [asyncio.ensure_future(http.post(server.url + CHAT, json=body)) for _ in range(2)]
        try:
            await backend.wait_active()
            await until(lambda: backend.active == 2, what="both requests held")
            async with http.post(server.url + CHAT, json={**body, "model": "echo"}) as refused:
                assert refused.status == 429 and refused.headers["Retry-After"] == "1"
                assert_error(await refused.json(), "rate_limit_error")
        finally:
            for request in held:
                request.cancel()
        await backend.wait_idle(timeout=5.0)
        async with http.post(server.url + CHAT, json={**body, "model": "echo"}) as answered:
            assert answered.status == 200  # the slots came back


async def test_a_loopback_api_refuses_a_foreign_host_in_openais_shape(http, server):
    async with http.get(
        server.url + "/v1/models", headers={"Host": "attacker.example"}
    ) as response:
        assert response.status == 403
        error = assert_error(await response.json(), "invalid_request_error")
        assert error["code"] == "forbidden_host" and "loopback host" in error["message"]


async def test_a_page_from_another_site_cannot_run_completions(http, scripted):
    """A web page may POST here from the user's browser without a preflight (text/plain, no
    CORS needed to send, only to read): it would burn the mesh's compute. Browsers name the
    page in Origin; only this site's own origin is accepted."""
    backend, server = scripted
    body = json.dumps(chat(model="echo"))  # sent as text/plain, as a page's no-cors fetch
    own = f"http://127.0.0.1:{server.port}"
    for origin in ("http://attacker.example", "null", f"http://localhost:{server.port}", "x"):
        headers = {"Origin": origin, "Content-Type": "text/plain"}
        async with http.post(server.url + CHAT, data=body, headers=headers) as response:
            assert response.status == 403, origin
            error = assert_error(await response.json(), "invalid_request_error")
            assert error["code"] == "forbidden_origin" and "another site" in error["message"]
    assert not backend.requests  # none reached the backend
    headers = {"Origin": own, "Content-Type": "application/json"}
    async with http.post(server.url + CHAT, data=body, headers=headers) as response:
        assert response.status == 200  # the site's own page, and clients that send no Origin
    assert len(backend.requests) == 1


async def test_a_name_given_with_allowed_hosts_is_answered(http, local_models):
    async with ApiServer(local_models, port=0, allowed_hosts=["proxy.example"]) as server:
        for host, status in (
            ("proxy.example", 200),
            ("proxy.example:443", 200),
            ("x.example", 403),
        ):
            async with http.get(server.url + "/v1/models", headers={"Host": host}) as response:
                assert response.status == status, host
        headers = {"Host": "proxy.example", "Origin": "https://proxy.example"}
        async with http.get(server.url + "/v1/models", headers=headers) as response:
            assert response.status == 200
