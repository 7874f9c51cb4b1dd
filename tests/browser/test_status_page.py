"""The status page in headless Chromium, against a console backed by a scripted source."""

import json

import pytest

from mesh_node.console.server import ConsoleServer
from tests.console.scripted_source import ScriptedSource, make_peer

ROWS = "document.querySelectorAll('tr[data-node-id]')"


def row(node_id: str) -> str:
    return f"document.querySelector('tr[data-node-id=\"{node_id}\"]')"


@pytest.fixture
def source() -> ScriptedSource:
    return ScriptedSource(
        [make_peer(0, is_self=True), make_peer(1), make_peer(2, status="suspect")],
        extra={"placements": [{"model": "tiny-moe", "host": make_peer(0)["id"][:10]}]},
    )


@pytest.fixture
async def console(source):
    async with ConsoleServer(source, "127.0.0.1", 0) as server:
        yield server


async def test_page_follows_peer_events_without_reloading(browser, console, source):
    page = await browser.new_page(f"{console.url}/")
    await page.wait_for(f"{ROWS}.length === 3 && document.body.dataset.connection === 'live'")
    statuses = await page.evaluate(f"[...{ROWS}].map(r => [r.dataset.nodeId, r.dataset.status])")
    assert dict(statuses) == {p["id"]: p["status"] for p in source.peers.values()}
    await page.evaluate("window.loadedOnce = true")

    victim = make_peer(1)["id"]
    source.set_status(victim, "dead")
    await page.wait_for(f"{row(victim)}?.dataset.status === 'dead'")
    assert await page.evaluate(f"{row(victim)}.classList.contains('gone')")
    assert await page.evaluate(f"{row(victim)}.querySelector('.status').textContent") == "dead"
    assert await page.evaluate(f"{ROWS}.length") == 3  # the dead node keeps its row
    assert await page.evaluate("document.querySelector('[data-count=dead]').textContent") == (
        "1 dead"
    )

    newcomer = make_peer(5, name="<img src=x onerror=window.injected=1>")
    source.upsert(newcomer)
    await page.wait_for(f"{row(newcomer['id'])}?.dataset.status === 'alive'")
    assert (
        await page.evaluate(f"{row(newcomer['id'])}.querySelector('.name').textContent")
        == (newcomer["name"])
    )

    source.remove(victim)
    await page.wait_for(f"{ROWS}.length === 3 && !{row(victim)}")
    # The models section is refreshed from /api/status after peer changes.
    models = "document.querySelector('tr[data-model=\"tiny-moe\"]')?.textContent"
    await page.wait_for(f"{models}.includes({json.dumps(newcomer['name'])})")
    assert await page.evaluate("window.loadedOnce === true && window.injected === undefined")


async def test_page_shows_every_field_and_unknown_sections(browser, console, source):
    page = await browser.new_page(f"{console.url}/")
    await page.wait_for(f"{ROWS}.length === 3")
    host = make_peer(0)
    text = await page.evaluate(f"{row(host['id'])}.innerText")
    for fragment in (
        host["short"],
        "node-0",
        "this node",
        "alive",
        "host",
        "127.0.0.1:7300",
        "8 cores",
        "Test GPU 24G",
        "serving tiny-moe",
        "0 in flight",
    ):
        assert fragment in text
    worker = await page.evaluate(f"{row(make_peer(1)['id'])}.innerText")
    for fragment in ("worker", "tiny-moe", "3.0 GiB on disk", "1 in flight", "ago", "1.4 ms"):
        assert fragment in worker
    sections = await page.evaluate(
        "[...document.querySelectorAll('section[data-section]')].map(s => s.dataset.section)"
    )
    assert sections == ["peers", "models", "placements"]
    placements = await page.evaluate(
        "document.querySelector('[data-section=placements]').innerText"
    )
    assert "tiny-moe" in placements and "host" in placements


async def test_page_resyncs_on_status_events_and_reconnects(browser, source):
    console = ConsoleServer(source, "127.0.0.1", 0)
    await console.start()
    port = console.port
    try:
        page = await browser.new_page(f"{console.url}/")
        await page.wait_for(f"{ROWS}.length === 3 && document.body.dataset.connection === 'live'")

        source.emit("status", ScriptedSource([make_peer(0, is_self=True)]).status())
        await page.wait_for(f"{ROWS}.length === 1")

        await console.stop()
        await page.wait_for("document.body.dataset.connection !== 'live'", timeout=5)
        source.peers = {p["id"]: p for p in (make_peer(0, is_self=True), make_peer(3))}
        console = ConsoleServer(source, "127.0.0.1", port)
        await console.start()
        await page.wait_for(
            f"document.body.dataset.connection === 'live' && {ROWS}.length === 2", timeout=15
        )
        assert await page.evaluate(f"!!{row(make_peer(3)['id'])}")
    finally:
        await console.stop()
