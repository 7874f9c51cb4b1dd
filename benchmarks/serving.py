#!/usr/bin/env python3
"""Serving through the mesh: tunneled (a client node forwards to the host over QUIC) versus
directly at the host, in the same run.

    python benchmarks/serving.py [--requests 60] [--tokens 64]

Two node processes on loopback: a host (a random-weight 27 M-parameter qwen3 that decodes
at a realistic pace, tens of tokens per second; never stops early) and a client node that
never hosts. Streaming 64-token completions alternate between the two entry points:
  * time to first token (TTFT), p50;
  * per-token latency: (last token - first token) / (tokens - 1), p50;
  * requests/s with 1, 8 and 32 concurrent clients, through the client node.
Target: the tunneled path adds at most 10% to TTFT and per-token latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.processes.nodes and tests.gateway.slow_model
from mesh_node.identity import new_mesh_id  # noqa: E402
from tests.gateway.slow_model import NAME, build_slow_model  # noqa: E402
from tests.processes.nodes import NodeProcess, stop_all  # noqa: E402


async def timed_stream(api: openai.AsyncOpenAI, tokens: int, prompt: str) -> tuple[float, float]:
    started = time.perf_counter()
    stream = await api.completions.create(
        model=NAME, prompt=prompt, max_tokens=tokens, temperature=0, stream=True
    )
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
    first, last = arrivals[0], arrivals[-1]
    # chunks may carry several tokens; per token over the whole answer
    return first - started, (last - first) / max(tokens - 1, 1)


async def throughput(api: openai.AsyncOpenAI, clients: int, tokens: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def one_client(i: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await api.completions.create(
                model=NAME, prompt=f"client {i} {done}", max_tokens=tokens, temperature=0
            )
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return done / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        model = build_slow_model(Path(folder))
        mesh_id = new_mesh_id()
        # as on two machines: the host alone on one core; the client node and this
        # benchmark (standing in for the user) on the other
        cores = sorted(os.sched_getaffinity(0))
        pin = len(cores) >= 2 and shutil.which("taskset")
        host_pin = ("taskset", "-c", str(cores[-1])) if pin else ()
        client_pin = ("taskset", "-c", str(cores[0])) if pin else ()
        if pin:
            os.sched_setaffinity(0, {cores[0]})
        host = await NodeProcess.join(
            mesh_id, "--model", str(model), "--device", "cpu", prefix=host_pin
        )
        seed = "{}:{}".format(*host.address)
        client = await NodeProcess.join(mesh_id, "--client", "--peer", seed, prefix=client_pin)
        nodes = [host, client]
        try:
            direct = openai.AsyncOpenAI(base_url=host.api_url, api_key="x", max_retries=0)
            tunneled = openai.AsyncOpenAI(base_url=client.api_url, api_key="x", max_retries=0)
            for api in (direct, tunneled):  # the host loads the model; both paths warm up
                for attempt in range(120):
                    try:
                        await timed_stream(api, 4, "warm up")
                        break
                    except openai.APIStatusError:
                        await asyncio.sleep(0.5)
                        if attempt == 119:
                            raise
            results: dict[str, list[tuple[float, float]]] = {"direct": [], "tunneled": []}
            for i in range(args.requests):
                order = ("direct", "tunneled") if i % 2 == 0 else ("tunneled", "direct")
                for which in order:
                    api = direct if which == "direct" else tunneled
                    results[which].append(await timed_stream(api, args.tokens, f"request {i}"))
            rates = {
                c: await throughput(tunneled, c, args.tokens, args.seconds) for c in (1, 8, 32)
            }
            await direct.close()
            await tunneled.close()
        finally:
            await stop_all(nodes)

    if args.verbose:
        for which, values in results.items():
            print(which, "TTFT ms", [round(v[0] * 1000, 1) for v in values])

    def p50(which: str, index: int) -> float:
        return statistics.median(r[index] for r in results[which]) * 1000

    ttft = (p50("direct", 0), p50("tunneled", 0))
    per_token = (p50("direct", 1), p50("tunneled", 1))
    print(f"{args.tokens}-token streaming completions, {args.requests} each, alternating")
    print(
        f"  time to first token  direct {ttft[0]:7.2f} ms  tunneled {ttft[1]:7.2f} ms  "
        f"ratio {ttft[1] / ttft[0]:.3f}  (target <= 1.10)"
    )
    print(
        f"  per-token latency    direct {per_token[0]:7.2f} ms  tunneled {per_token[1]:7.2f} ms  "
        f"ratio {per_token[1] / per_token[0]:.3f}  (target <= 1.10)"
    )
    for clients, rate in rates.items():
        print(f"  requests/s through the client node, {clients:2d} concurrent: {rate:6.2f}")
    ok = ttft[1] / ttft[0] <= 1.10 and per_token[1] / per_token[0] <= 1.10
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="streams per path")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per completion")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--verbose", action="store_true", help="print every TTFT sample")
    asyncio.run(main(parser.parse_args()))
