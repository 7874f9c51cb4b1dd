"""The console's JSON API and page files, against a real server on 127.0.0.1:0."""

import pytest

from mesh_node.console.server import ConsoleServer
from tests.console.scripted_source import ScriptedSource, make_peer


async def test_status_is_the_source_document(console, source, http):
    async with http.get(f"{console.url}/api/status") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert response.headers["Cache-Control"] == "no-store"
        document = await response.json()
    assert document == source.status()
    assert [p["id"] for p in document["peers"]] == list(source.peers)
    assert document["mesh"] == {"nodes": 3, "alive": 2, "suspect": 1, "dead": 0, "left": 0}


async def test_peers_lists_every_peer_record(console, source, http):
    source.set_status(make_peer(1)["id"], "dead")
    async with http.get(f"{console.url}/api/peers") as response:
        assert response.status == 200
        body = await response.json()
    assert set(body) == {"peers"}
    assert body["peers"] == source.status()["peers"]
    assert [p["status"] for p in body["peers"]] == ["alive", "dead", "suspect"]


async def test_unknown_top_level_keys_pass_through(http):
    placements = [{"model": "tiny-moe", "host": "abc", "experts": {"abc": [0, 1]}}]
    source = ScriptedSource([make_peer(0, is_self=True)], extra={"placements": placements})
    async with (
        ConsoleServer(source, port=0) as server,
        http.get(f"{server.url}/api/status") as response,
    ):
        assert (await response.json())["placements"] == placements


async def test_unknown_path_is_a_json_404(console, http):
    async with http.get(f"{console.url}/api/nope") as response:
        assert response.status == 404
        assert response.content_type == "application/json"
        assert "/api/nope" in (await response.json())["error"]


async def test_wrong_method_is_a_json_405(console, http):
    async with http.post(f"{console.url}/api/status", data=b"x") as response:
        assert response.status == 405
        assert "POST" in (await response.json())["error"]
        assert "GET" in response.headers["Allow"]


async def test_page_and_its_files_are_served(console, http):
    async with http.get(f"{console.url}/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    assert 'src="console.js"' in page
    assert 'href="console.css"' in page
    for path, kind in (("/console.js", "text/javascript"), ("/console.css", "text/css")):
        async with http.get(f"{console.url}{path}") as response:
            assert response.status == 200
            assert response.content_type == kind
            assert len(await response.read()) > 500


async def test_source_errors_are_json_500s(http):
    class Broken(ScriptedSource):
        def status(self):
            raise RuntimeError("peer table unavailable")

    async with (
        ConsoleServer(Broken([make_peer(0)]), port=0) as server,
        http.get(f"{server.url}/api/status") as response,
    ):
        assert response.status == 500
        assert "peer table unavailable" in (await response.json())["error"]


async def test_server_binds_a_free_port_and_stops_idempotently(source):
    server = ConsoleServer(source, port=0)
    assert server.port == 0
    await server.start()
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    await server.stop()
    await server.stop()


async def test_head_is_refused_on_the_event_stream(console, source, http):
    async with http.head(f"{console.url}/api/status") as response:
        assert response.status == 200
    async with http.head(f"{console.url}/api/events") as response:
        assert response.status == 405
    assert source.subscribed == 0


async def test_a_taken_port_is_an_os_error_and_leaves_nothing_running(console, source):
    second = ConsoleServer(source, "127.0.0.1", console.port)
    with pytest.raises(OSError):
        await second.start()
    await second.stop()  # nothing to stop: a no-op
    async with ConsoleServer(source, "127.0.0.1", 0) as third:  # a fresh one still starts
        assert third.port not in (0, console.port)


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:3131", "10.0.0.7"])
async def test_a_loopback_console_refuses_requests_naming_another_host(console, http, host):
    # a page whose name was rebound to 127.0.0.1 must not read the mesh from a browser here
    async with http.get(f"{console.url}/api/status", headers={"Host": host}) as response:
        assert response.status == 403  # in the console's error JSON, as its other errors
        assert "loopback host" in (await response.json())["error"]


async def test_a_console_refuses_a_page_from_another_site(console, http):
    headers = {"Origin": "http://attacker.example"}
    async with http.get(f"{console.url}/api/status", headers=headers) as response:
        assert response.status == 403  # the mesh's peers and addresses stay unread
        assert "another site" in (await response.json())["error"]
    async with http.get(f"{console.url}/api/status", headers={"Origin": console.url}) as response:
        assert response.status == 200  # its own page


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]:80", "node.localhost"])
async def test_a_loopback_console_answers_loopback_names(console, http, host):
    async with http.get(f"{console.url}/api/status", headers={"Host": host}) as response:
        assert response.status == 200
