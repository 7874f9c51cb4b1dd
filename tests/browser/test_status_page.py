"""The status page in headless Chromium, against a console backed by a scripted source."""

import json

import pytest

from mesh_node.console.server import ConsoleServer
from mesh_node.expert_parallel.coordinator import ExpertParallelConfig
from mesh_node.identity import new_mesh_id
from mesh_node.transport.memory import MemoryNetwork
from tests.console.scripted_source import ScriptedSource, make_peer, shard_entry
from tests.console.split_mesh import split_mesh
from tests.gateway.mesh import Mesh, answer, chat

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
        "machine 3a7bd3e2",  # the first two nodes share a machine
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


EXPERTS = "document.querySelector('section[data-section=experts]')"


async def test_page_shows_the_expert_plan_of_a_split_mesh(browser):
    """The Experts panel with real data: a 3-node in-process mesh splitting the built-in
    model; the page of the host shows the plan, its nodes, the grid and the dispatch."""
    async with split_mesh() as mesh:
        host = mesh.hosts_of("builtin")[0]
        await answer(host, chat("builtin", "What is 2 + 2?", max_tokens=4))
        plan = host.view.status()["experts"][0]
        page = await browser.new_page(f"{host.console.url}/")
        block = f"{EXPERTS}?.querySelector('[data-experts-model=\"builtin\"]')"
        await page.wait_for(f"{block}?.querySelectorAll('tr[data-expert-node]').length === 3")
        shown = await page.evaluate(
            f"[...{block}.querySelectorAll('tr[data-expert-node]')].map(r => r.dataset.expertNode)"
        )
        assert shown == [n["node_id"] for n in plan["nodes"]]  # in plan order, host first
        assert (
            await page.evaluate(f"{block}.querySelector('[data-fingerprint]').textContent")
            == (plan["fingerprint"])
        )
        assert await page.evaluate(f"{block}.querySelector('[data-agreed]').dataset.agreed") == (
            "true"
        )
        text = await page.evaluate(f"{block}.innerText")
        for fragment in (plan["rankings"], "host", "remote calls", "0 failovers"):
            assert fragment in text
        first = plan["nodes"][0]
        row = await page.evaluate(
            f"{block}.querySelector('tr[data-expert-node=\"{first['node_id']}\"]').innerText"
        )
        assert str(first["count"]) in row and "this plan" in row
        # the grid: 4 layers x 8 experts, each cell naming its holders, replicas striped
        cells = await page.evaluate(
            f"[...{block}.querySelectorAll('td[data-expert]')].map(c => "
            "[c.parentElement.dataset.layer, c.dataset.expert, c.dataset.holders])"
        )
        assert len(cells) == 32
        for layer, expert, holders in cells:
            want = [
                n["node_id"] for n in plan["nodes"] if int(expert) in n["experts"].get(layer, [])
            ]
            assert holders.split() == want
        assert await page.evaluate(f"{block}.querySelectorAll('td.missing').length") == 0


async def test_experts_panel_escapes_names_and_collapses_big_grids(browser):
    """Synthetic sections: a 58-layer x 256-expert plan (one row per layer instead of a
    cell per expert), a model with an error and no plan, and hostile node names."""
    evil = make_peer(1, name="<img src=x onerror=window.injected=1>")
    nodes = [make_peer(0, is_self=True)["id"], evil["id"]]
    layers = list(range(58))
    halves = [{str(layer): list(range(i * 128, i * 128 + 128)) for layer in layers} for i in (0, 1)]
    big = {
        "model": "<b>big-moe</b>",
        "error": None,
        "host": nodes[0],
        "fingerprint": "0123456789abcdef",
        "demand_digest": "feedfacefeedface",
        "layers": layers,
        "num_experts": 256,
        "expert_bytes": 1 << 20,
        "total_bytes": 58 * 256 << 20,
        "nodes": [
            {
                "node_id": node,
                "short": node[:10],
                "host": i == 0,
                "experts": halves[i],
                "count": 58 * 128,
                "bytes": 58 * 128 << 20,
                "budget": 60 * 128 << 20,
                "budget_share": 0.5,
                "bytes_share": 0.5,
            }
            for i, node in enumerate(nodes)
        ],
        "replicas": [],
        "unreplicated": [[0, 3]],
        "rankings": "uniform",
        "held": {nodes[0]: 58 * 128 << 20},
        "following": {nodes[0]: "0123456789abcdef", evil["id"]: ""},
        "agreed": False,
    }
    broken = {"model": "other-moe", "error": "<script>window.injected=2</script> failed"}
    source = ScriptedSource(
        [make_peer(0, is_self=True), evil], extra={"experts": [big, broken], "hosting": []}
    )
    async with ConsoleServer(source, "127.0.0.1", 0) as console:
        page = await browser.new_page(f"{console.url}/")
        await page.wait_for(f"{EXPERTS}?.querySelectorAll('[data-experts-model]').length === 2")
        block = f"{EXPERTS}.querySelector('[data-experts-model=\"<b>big-moe</b>\"]')"
        assert await page.evaluate(f"{block}.querySelector('h3').textContent") == "<b>big-moe</b>"
        assert await page.evaluate(f"{block}.querySelector('[data-grid]').dataset.grid") == (
            "per-layer"
        )
        assert await page.evaluate(f"{block}.querySelectorAll('tr[data-layer]').length") == 58
        assert await page.evaluate(f"{block}.querySelectorAll('td[data-expert]').length") == 0
        agreed = await page.evaluate(f"{block}.querySelector('[data-agreed]').innerText")
        assert "1 of 2" in agreed and evil["name"] in agreed
        hot = f"{block}.querySelector('[data-unreplicated]')"
        assert await page.evaluate(f"{hot}.dataset.unreplicated") == "1"
        row = await page.evaluate(
            f"{block}.querySelector('tr[data-expert-node=\"{evil['id']}\"]').innerText"
        )
        assert evil["name"] in row and "none yet" in row
        error = f"{EXPERTS}.querySelector('[data-experts-model=\"other-moe\"] [data-error]')"
        assert await page.evaluate(f"{error}.textContent") == broken["error"]
        assert await page.evaluate("window.injected === undefined")
        assert not await page.evaluate(f"!!{EXPERTS}.querySelector('img, script, b')")

        source.extra["experts"] = []
        source.emit("status", source.status())
        await page.wait_for(f"{EXPERTS}.innerText.includes('No split MoE models')")


SHARDS = "document.querySelector('section[data-section=shards]')"


def shard_block(model: str) -> str:
    return f"{SHARDS}?.querySelector('[data-shards-model=\"{model}\"]')"


async def test_page_shows_independent_shards_as_a_panel(browser):
    """`--moe-shards`: a Shards panel per model, with which node serves which shard (names,
    not raw ids), the experts per shard and the shared core, the plan and rankings, and the
    measured quality line; an entry from an older node (fewer fields) and one whose shard
    nodes changed since its split are shown too."""
    me, other, evil = make_peer(0, is_self=True), make_peer(1), make_peer(2, name="<i>x</i>")
    nodes = [other["id"], me["id"], evil["id"]]
    full = shard_entry(nodes)
    quality = full["quality"]
    older = {  # no num_experts, core or experts_per_shard; split before the third node came
        "model": "old-moe",
        "shard": 0,
        "shards": 2,
        "nodes": [me["id"], other["id"], evil["id"]],
        "experts": {"0": [1, 2, 3]},
        "quality": "measuring",
    }
    source = ScriptedSource(
        [me, other, evil],
        extra={"hosting": [], "experts": [], "shards": [full, older, {"model": "bare"}]},
    )
    async with ConsoleServer(source, "127.0.0.1", 0) as console:
        page = await browser.new_page(f"{console.url}/")
        await page.wait_for(f"{SHARDS}?.querySelectorAll('[data-shards-model]').length === 3")
        sections = await page.evaluate(
            "[...document.querySelectorAll('section[data-section]')].map(s => s.dataset.section)"
        )
        assert sections == ["peers", "models", "hosting", "experts", "shards"]
        text = await page.evaluate(f"{SHARDS}.innerText")
        assert text.startswith("Shards")
        for peer in (me, other, evil):
            assert peer["id"] not in text  # short ids and names, never the 52 characters
        block = shard_block("tiny-moe")
        rows = await page.evaluate(
            f"[...{block}.querySelectorAll('tr[data-shard-node]')]"
            ".map(r => [r.dataset.shard, r.dataset.shardNode, r.innerText])"
        )
        assert [(shard, node) for shard, node, _ in rows] == [
            ("0", nodes[0]),
            ("1", nodes[1]),
            ("2", nodes[2]),
        ]
        assert "shard 1" in rows[0][2] and "node-1" in rows[0][2] and "4 of 8" in rows[0][2]
        assert "node-0" in rows[1][2] and "this node" in rows[1][2]
        assert "4 of 8 (2 core + 2 own)" in rows[1][2]
        assert "<i>x</i>" in rows[2][2] and "3 of 8 (2 core + 1 own)" in rows[2][2]
        chips = await page.evaluate(
            f"[...{block}.querySelectorAll('.chip[data-ref-node]')].map(c => c.dataset.refNode)"
        )
        assert chips == nodes
        facts = await page.evaluate(f"{block}.querySelector('table.facts').innerText")
        for fragment in (
            "3 shard(s) · this node serves shard 2",
            "8 experts per layer",
            "2 expert(s) per layer, the hottest, on every shard",
            "b9bb8d29ef029a3e",
            "973479b277642ce3",
        ):
            assert fragment in facts
        assert await page.evaluate(f"{block}.querySelector('[data-quality]').innerText") == (
            quality
        )
        assert (
            await page.evaluate(f"{block}.querySelector('[data-plan]').dataset.plan")
            == (full["plan"])
        )
        assert not await page.evaluate(f"!!{block}.querySelector('[data-resplit]')")
        # this node's experts, layer by layer, the shared core in bold
        held = await page.evaluate(
            f"[...{block}.querySelectorAll('[data-held] tr[data-layer]')].map(r => "
            "[r.dataset.layer, [...r.querySelectorAll('.expert-ids span')].map(s => "
            "[s.textContent, s.classList.contains('core')])])"
        )
        assert held == [
            ["0", [["0", True], ["1", True], ["3", False], ["4", False]]],
            ["1", [["0", True], ["2", True], ["5", False], ["6", False]]],
        ]

        old = shard_block("old-moe")
        assert await page.evaluate(f"{old}.querySelector('[data-quality]').innerText") == (
            "measuring… (each shard against the whole model)"
        )
        assert await page.evaluate(f"!!{old}.querySelector('[data-resplit]')")
        counts = await page.evaluate(
            f"[...{old}.querySelectorAll('tr[data-shard-node] td.num')].map(c => c.innerText)"
        )
        assert counts == ["3", "–", "–"]  # this node's share; the others' unknown while resplit
        assert "uniform" in await page.evaluate(f"{old}.innerText")
        assert "No shard nodes known" in await page.evaluate(f"{shard_block('bare')}.innerText")
        assert not await page.evaluate(f"!!{SHARDS}.querySelector('i, img, script')")

        source.extra["shards"] = []
        source.emit("status", source.status())
        await page.wait_for(f"{SHARDS}.innerText.includes('No model served as independent shards')")


async def test_page_shows_the_shards_of_a_sharded_mesh(browser, tmp_path, monkeypatch):
    """The Shards panel with real data: two in-process nodes serving the built-in model as
    independent shards; each node's page shows both shard nodes in shard order, its own
    share of experts, the plan, and the quality line once measured."""
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path))
    mesh = Mesh(MemoryNetwork(latency=0.0002), new_mesh_id())
    try:
        for _ in range(2):
            await mesh.add(experts=ExpertParallelConfig(shards=True), console_port=0)
        await mesh.wait(
            lambda: all(
                n.shards.loaded("builtin") is not None
                and n.shards.loaded("builtin") == n.shards.wanted("builtin")
                and n.shards.loaded("builtin").count == 2
                and n.shards.status()[0]["quality"] != "measuring"
                for n in mesh.nodes
            ),
            timeout=120,
        )
        for node in mesh.nodes:
            (section,) = node.view.status()["shards"]
            page = await browser.new_page(f"{node.console.url}/")
            block = shard_block("builtin")
            await page.wait_for(f"{block}?.querySelectorAll('tr[data-shard-node]').length === 2")
            rows = await page.evaluate(
                f"[...{block}.querySelectorAll('tr[data-shard-node]')]"
                ".map(r => r.dataset.shardNode)"
            )
            assert rows == section["nodes"]
            me = f"{block}.querySelector('tr[data-shard-node=\"{node.node_id}\"]')"
            assert await page.evaluate(f"{me}.dataset.shard") == str(section["shard"])
            held = len(next(iter(section["experts"].values())))
            core = len(next(iter(section["core"].values())))
            assert f"{held} of 8 ({core} core + {held - core} own)" in await page.evaluate(
                f"{me}.innerText"
            )
            assert (
                await page.evaluate(f"{block}.querySelector('[data-plan]').dataset.plan")
                == (section["plan"])
            )
            shown = await page.evaluate(f"{block}.querySelector('[data-quality]').innerText")
            assert shown == section["quality"] and "2 shards" in shown
            assert not await page.evaluate(f"!!{block}.querySelector('[data-resplit]')")
            await page.close()
    finally:
        await mesh.stop()
