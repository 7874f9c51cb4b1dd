"""`mesh-node status`: a subprocess against a running console, and its errors."""

import asyncio
import fcntl
import io
import json
import os
import re
import socket
import struct
import sys
import termios
import time

import pytest
from aiohttp import web
from rich.console import Console

from mesh_node.console.client import status_document_problem
from mesh_node.console.report import render_status
from mesh_node.terminal import terminal_console
from tests.console.scripted_source import ScriptedSource, make_peer, shard_entry


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


@pytest.mark.parametrize(
    ("columns", "width"),
    [("100", 100), ("80", 80), *[(c, 200) for c in (None, "", "wide", "0", "-5", "²", "٣")]],
)
def test_status_into_a_pipe_is_as_wide_as_columns_says(monkeypatch, columns, width):
    """Was: always 200 columns, COLUMNS ignored; without a usable COLUMNS, still 200."""
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert terminal_console(io.StringIO()).width == width


@pytest.mark.parametrize("columns", [None, "²", "٣", "0", "90"])
def test_status_on_a_terminal_is_as_wide_as_it_and_never_trips_on_columns(monkeypatch, columns):
    """Was: rich read COLUMNS and LINES itself, and `mesh-node status` or `models` ended in a
    traceback when one held "²" (a character that says it is a digit)."""
    monkeypatch.setenv("LINES", "²")
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 72, 0, 0))
    with os.fdopen(leader, "rb") as _, os.fdopen(follower, "w") as terminal:
        console = terminal_console(terminal)
        assert console.width == (90 if columns == "90" else 72) and console.height == 30
        console.print("a line")  # (a short one: nobody reads the terminal's other end)


def rendered(document: dict, width: int) -> str:
    out = io.StringIO()
    render_status(document, Console(file=out, width=width, color_system=None), now=time.time())
    return out.getvalue()


def column(text: str, title: str, heading: str) -> str:
    """What the column `heading` of the table `title` in `text` holds, whitespace left out (so
    that words wrapped or folded across lines join up again)."""
    lines = text[text.index(title) :].splitlines()[1:]
    header = next(i for i, line in enumerate(lines) if f" {heading} " in line)
    start = lines[header].index(f" {heading} ") + 1
    after = lines[header][start + len(heading) :]
    end = len(lines[header]) - len(after.lstrip()) if after.strip() else None
    cells = []
    for line in lines[header + 2 :]:
        if line[:1].strip():  # the next table's title
            break
        cells.append(line[start:end])
    return squashed("".join(cells))


def squashed(text: str) -> str:
    return "".join(text.split())


def three_nodes() -> dict:
    peers = [make_peer(0, is_self=True), make_peer(1), make_peer(2, role="client")]
    document = ScriptedSource(peers).status()
    document["models"] = [
        {"name": "tiny-moe", "served_by": [peers[0]["id"]], "on_disk": [p["id"] for p in peers]}
    ]
    return document


def test_report_on_an_80_column_terminal_cuts_no_word_short():
    """Was: `client` shown as `cli…` and the hardware as `8 / cor… / RAM / 20.… / GiB / free`."""
    text = rendered(three_nodes(), 80)
    assert "…" not in text, text
    assert max(map(len, text.splitlines())) <= 80
    for role in ("host", "worker", "client"):
        assert re.search(rf"\b{role}\b", text), text
    assert text.count("8 cores") == 3, text
    for fact in ("node-2", "(this node)", "RAM 20/32 GiB free", "Test GPU 24G", "25.0 tok/s"):
        assert fact in text, text
    assert "2.4 ms" in text and "ago" in text, text
    models = text[text.index("Models") :]
    assert re.search(r"tiny-moe\s+node-0\s+node-0, node-1, node-2", models), models


def test_report_on_a_wide_terminal_puts_each_node_on_one_line():
    text = rendered(three_nodes(), 160)
    row = next(line for line in text.splitlines() if "node-2" in line)
    for fact in ("alive", "client", "8 cores, RAM 20.0/32.0 GiB free", "2 in flight", "2.4 ms"):
        assert fact in row, text
    assert "Test GPU 24G 20.0/24.0 GiB free" in text


def test_report_on_an_80_column_terminal_folds_long_names_rather_than_cutting_them():
    name, gpu = "build-server-17.lab.example.org", "NVIDIA H100 80GB HBM3"
    model = "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct"
    big = {"cpu_cores": 128, "ram_total": 1 << 40, "ram_free": 900 << 30}
    peers = [
        make_peer(0, is_self=True, name=name),
        make_peer(1, status="dead", hardware={**big, "gpus": [{"name": gpu}] * 2}),
    ]
    document = ScriptedSource(peers).status()
    document["models"] = [
        {"name": model, "served_by": [peers[0]["id"]], "on_disk": [p["id"] for p in peers]}
    ]
    text = rendered(document, 80)
    assert "…" not in text, text
    assert max(map(len, text.splitlines())) <= 80
    assert squashed(name) in column(text, "Nodes", "node"), text
    hardware = column(text, "Nodes", "hardware")
    assert "128cores" in hardware and squashed(f"{gpu} VRAM") in hardware, text
    assert model in column(text, "Models", "model"), text
    assert squashed(name) in column(text, "Models", "served by"), text
    assert squashed(f"{name} node-1 (dead)") in column(text, "Models", "on disk at"), text


async def test_status_prints_independent_shards(console, source):
    """`--moe-shards`: which node serves which shard (names, not raw ids), the experts per
    layer of each shard and the shared core, the quality line and the split's digests."""
    nodes = [make_peer(1)["id"], make_peer(0)["id"], make_peer(2)["id"]]
    source.extra["shards"] = [shard_entry(nodes)]
    code, out, err = await mesh_node("status", "--console", console.url)
    assert (code, err) == (0, "")
    shards = out[out.index("Shards") :]
    rows = [line for line in shards.splitlines() if " of 3 " in line]
    assert len(rows) == 3
    for row, name, experts in zip(
        rows,
        ("node-1", "node-0 (this node)", "node-2"),
        ("4 of 8 (2 core + 2 own)", "4 of 8 (2 core + 2 own)", "3 of 8 (2 core + 1 own)"),
        strict=True,
    ):
        assert name in row and experts in row, row
    assert rows[0].split()[:3] == ["tiny-moe", "1", "of"]
    assert "tiny-moe: independent-shard mode: 3 shards, exact-match 71.5% vs 98.5% full" in out
    assert "plan b9bb8d29ef029a3e, rankings 973479b277642ce3" in out
    assert not any(node in out for node in nodes)
    assert "Also in the status document" not in out  # shards is no longer left out


def test_report_shows_partial_and_resplit_shards_in_80_columns():
    """Entries with fewer fields (an older node), odd types, and shard nodes that changed
    since the split this node loaded are shown, not a traceback; 80 columns are enough."""
    me, other = make_peer(0, is_self=True), make_peer(1)
    older = {"model": "old-moe", "shard": 0, "shards": 1, "nodes": [me["id"], other["id"]]}
    older["experts"] = {"0": [1, 2, 3], "1": "x"}
    older["quality"] = "measuring"
    odd = {"model": "odd-moe", "nodes": 5, "experts_per_shard": "x", "core": [], "quality": 3}
    document = ScriptedSource(
        [me, other], extra={"shards": [older, odd, "not an entry"], "experts": []}
    ).status()
    assert status_document_problem(document) is None
    out = io.StringIO()
    render_status(document, Console(file=out, width=80, color_system=None), now=0)
    text = out.getvalue()
    shards = text[text.index("Shards") :]
    assert "…" not in shards
    mine = next(line for line in shards.splitlines() if "old-moe" in line and "1 of 2" in line)
    assert "node-0 (this node)" in mine and mine.rstrip().endswith("3")
    assert "quality being measured" in shards
    assert "the shard nodes changed (2 now, 1 in the split loaded here)" in " ".join(shards.split())
    assert "no shard nodes known" in shards and "odd-moe: 3" in shards


def test_report_names_suspect_nodes_as_it_names_dead_and_left_ones():
    """Was: "(dead)" and "(left)" beside a node's name in the models and shards tables, but
    nothing for a node suspected of having failed."""
    peers = [make_peer(0, is_self=True), make_peer(1, status="suspect"), make_peer(2)]
    peers.append(make_peer(3, status="left"))
    ids = [p["id"] for p in peers]
    document = ScriptedSource(peers, extra={"shards": [shard_entry(ids[:3])]}).status()
    document["models"] = [{"name": "tiny-moe", "served_by": ids[1:2], "on_disk": ids}]
    text = rendered(document, 160)
    models = text[text.index("Models") : text.index("Shards")]
    assert re.search(
        r"tiny-moe\s+node-1 \(suspect\)\s+node-0, node-1 \(suspect\), node-2, ", models
    ), models
    assert "node-3 (left)" in models, models
    shards = text[text.index("Shards") :]
    assert "node-1 (suspect)" in shards and "node-2 (" not in shards, shards
