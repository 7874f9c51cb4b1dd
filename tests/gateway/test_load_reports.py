"""A host's load reports survive the model being loaded again (a new generator, counting from 0)."""

from __future__ import annotations

import asyncio
import dataclasses

from mesh_node.engine.sampling import SamplingParams
from mesh_node.serving.hosting import HostingConfig
from tests.gateway.mesh import answer, chat


async def test_load_reports_go_on_after_a_host_loads_its_model_again(mesh):
    """A host that generated tokens, unloaded the model (it lost an election, or its engine
    died) and loaded it again has a new Generator whose token counter starts at 0. The load
    loop subtracts the old generator's count, reports a negative tokens/s, update_state
    raises ValueError and the loop task dies for good ("Task exception was never
    retrieved"): the node never again reports its load, nor notices a dead engine."""
    quick = HostingConfig(load_interval=0.2)
    host = await mesh.add(hosting=quick)
    caller = await mesh.add(hosting=quick, client=True)
    await mesh.wait(lambda: mesh.hosts_of("builtin") == [host])
    long = dataclasses.replace(
        chat("builtin", "What is 348 + 276?"),
        sampling=SamplingParams(max_tokens=150, ignore_eos=True),
    )
    await answer(caller, long)
    # a load report counted those tokens
    await mesh.wait(lambda: host.membership.self_state.current.load.tokens_per_s > 0)

    # the model is unloaded and loaded again (as when a node loses, then wins, an election)
    first = host.local.generators["builtin"]
    host.hosting._busy.add("builtin")
    await host.hosting._unload("builtin")
    await mesh.wait(lambda: host.local.generators.get("builtin") not in (None, first))
    # the case itself, not a stand-in for a condition: load intervals with the new generator
    # idle (its count, 0, below the old one's)
    await asyncio.sleep(5 * quick.load_interval)

    loop_tasks = [t for t in host.hosting._tasks if "_load_loop" in repr(t.get_coro())]
    assert loop_tasks, "the load loop task has ended"
    # and the load it reports still follows the work: a request in flight shows
    job = asyncio.ensure_future(answer(caller, long))
    try:
        await mesh.wait(
            lambda: any(
                m.node_id == host.node_id and m.state.load.inflight > 0
                for m in caller.membership.table
                if m.state
            ),
            timeout=5,
        )
    finally:
        job.cancel()
