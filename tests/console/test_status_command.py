"""`mesh-node status`: a subprocess against a running console, and its errors."""

import asyncio
import io
import json
import os
import socket
import sys

import pytest
from aiohttp import web
from rich.console import Console

from mesh_node.console.client import status_document_problem
from mesh_node.console.report import render_status
from tests.console.scripted_source import ScriptedSource, make_peer


async def mesh_node(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh_node",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, stdout.decode(), stderr.decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def serve(handler) -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/api/status", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_status_prints_nodes_and_models(console, source):
    source.set_status(make_peer(1)["id"], "dead")
    code, out, err = await mesh_node("status", "--console", console.url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    for peer in source.peers.values():
        row = next(line for line in lines if line.strip().startswith(peer["short"]))
        assert peer["status"] in row
        assert peer["name"] in row
        assert peer["role"] in row
    assert "mesh: 3 nodes, 1 alive, 1 suspect, 1 dead, 0 left" in out
    assert "(this node)" in out
    assert "8 cores" in out and "Test GPU 24G" in out
    assert "1 in flight, 12.5 tok/s" in out
    assert "1.4 ms" in out
    models = out[out.index("Models") :]
    assert "tiny-moe" in models and "node-0" in models


async def test_status_json_is_the_document(console, source):
    code, out, _ = await mesh_node("status", "--console", console.url + "/", "--json")
    assert code == 0
    assert json.loads(out) == source.status()


async def test_status_when_nothing_listens():
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await mesh_node("status", "--console", url)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith(f"mesh-node: cannot reach the console at {url}")
    assert "connection refused" in err


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (lambda r: web.Response(text="<html>hello</html>"), "did not answer JSON"),
        (lambda r: web.json_response({"node": "x"}), "'peers' is missing"),
        (lambda r: web.json_response([1, 2]), "expected a JSON object"),
        (lambda r: web.json_response({"error": "boom"}, status=500), "HTTP 500: boom"),
    ],
)
async def test_status_when_the_answer_is_garbage(answer, expected):
    async def handler(request):
        return answer(request)

    runner = await serve(handler)
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        code, out, err = await mesh_node("status", "--console", url)
    finally:
        await runner.cleanup()
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert expected in err


async def test_status_when_the_answer_is_not_http():
    async def babble(reader, writer):
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(babble, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        code, _, err = await mesh_node("status", "--console", url)
    assert code == 1
    assert err.count("\n") == 1
    assert "did not answer HTTP properly" in err


async def test_status_help_and_bad_flags():
    code, out, _ = await mesh_node("status", "--help")
    assert code == 0
    for flag in ("--console", "--timeout", "--json", "http://127.0.0.1:3131"):
        assert flag in out
    code, _, err = await mesh_node("status", "--console", "localhost:3131")
    assert code == 2
    assert "must be an http:// or https:// URL" in err


def test_report_renders_hostile_and_partial_records_literally():
    peers = [
        make_peer(0, is_self=True, name="[red]not markup[/red]"),
        make_peer(1, hardware=None, load=None, last_seen=None, rtt_ms=None, status="left"),
    ]
    document = ScriptedSource(peers, extra={"placements": []}).status()
    assert status_document_problem(document) is None
    out = io.StringIO()
    render_status(
        document, Console(file=out, width=200, color_system=None), now=peers[0]["status_since"] + 30
    )
    text = out.getvalue()
    assert "[red]not markup[/red]" in text
    assert "not known yet" in text and "never" in text
    assert "Also in the status document: placements" in text


def test_report_shows_control_characters_instead_of_sending_them():
    hostile = "n\x1b]0;owned\x07\x1b[2J\rmodel"
    document = ScriptedSource([make_peer(0, is_self=True, name=hostile)]).status()
    document["models"] = [{"model": hostile}]
    out = io.StringIO()
    render_status(document, Console(file=out, width=200, force_terminal=True), now=0)
    text = out.getvalue()
    assert "\x1b[2J" not in text and "\x1b]0;" not in text and "\x07" not in text
    assert "\\x1b]0;owned" in text  # shown, escaped, so the user sees what was sent


def test_report_shows_oddly_typed_fields_without_failing():
    """A document that passes the check but holds fields of other types than a node writes
    (a broken or hostile console given with --console) is shown, not a traceback."""
    source = ScriptedSource([make_peer(0, is_self=True, name=7, hardware={"gpus": ["x", 5]})])
    document = source.status()
    document["models"] = [
        {"name": "m", "served_by": 3, "on_disk": [make_peer(0)["id"], 9]},
        {"name": "n", "served_by": [None], "on_disk": "all"},
    ]
    assert status_document_problem(document) is None
    out = io.StringIO()
    render_status(document, Console(file=out, width=200, color_system=None), now=0)
    assert "7" in out.getvalue()


def test_status_of_a_document_that_cannot_be_shown_is_one_line(monkeypatch, capsys):
    """Should the renderer meet a field it cannot show, the command still ends in one line."""
    import argparse

    from mesh_node.cli import status as status_cmd

    document = ScriptedSource([make_peer(0, is_self=True)]).status()
    monkeypatch.setattr(status_cmd, "fetch_status", lambda url, timeout: document)

    def unshowable(document, console):
        raise TypeError("'int' object is not iterable")

    monkeypatch.setattr(status_cmd, "render_status", unshowable)
    args = argparse.Namespace(console="http://127.0.0.1:3131", timeout=1.0, json=False)
    assert status_cmd.run(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be shown (TypeError" in err
