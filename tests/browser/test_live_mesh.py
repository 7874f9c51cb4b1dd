"""Headless Chromium on the status page of a running 3-node mesh (OS processes): it shows all
three nodes, then shows one dead after it is killed, without a reload."""

from __future__ import annotations

from mesh_node.identity import new_mesh_id
from tests.processes.nodes import start_mesh, stop_all

ROWS = "document.querySelectorAll('tr[data-node-id]')"


def row(node_id: str) -> str:
    return f"document.querySelector('tr[data-node-id=\"{node_id}\"]')"


async def test_status_page_of_a_live_mesh_sees_a_node_die(browser):
    mesh_id = new_mesh_id()
    nodes = await start_mesh(mesh_id, 3)
    first = nodes[0]
    try:
        page = await browser.new_page(f"{first.console_url}/")
        alive_rows = f"[...{ROWS}].filter(r => r.dataset.status === 'alive').length"
        await page.wait_for(f"{alive_rows} === 3", timeout=20)
        shown = await page.evaluate(f"[...{ROWS}].map(r => r.dataset.nodeId)")
        assert sorted(shown) == sorted(str(n.node_id) for n in nodes)
        await page.evaluate("window.sameDocument = true")

        victim = nodes[2]
        await victim.kill()
        await page.wait_for(f"{row(str(victim.node_id))}?.dataset.status === 'dead'", timeout=15)
        assert await page.evaluate("window.sameDocument === true")  # updated live, no reload
        assert await page.evaluate(f"{alive_rows}") == 2
    finally:
        await stop_all(nodes)
