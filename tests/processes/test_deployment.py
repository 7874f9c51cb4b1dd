"""Deployment: docker-compose.yml's commands are valid, and scripts/local-mesh starts the
same topology as processes (on loopback, and in network namespaces when root)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import openai
import pytest
import yaml

from mesh_node.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_every_compose_service_command_is_accepted_by_the_cli():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name, service in services.items():  # no authentication: not on the host's network
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert set(services) == {"node-a", "node-b", "node-c"}
    parser = build_parser()
    roles = {}
    for name, service in services.items():
        command = [
            re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1), m.group(2)), a)
            for a in service["command"]
        ]
        args = parser.parse_args(command)  # exits (a test failure) on anything it rejects
        assert args.command == "join" and args.name == name
        roles[name] = "client" if args.client else "can host"
        assert args.console_host == args.api_host == "0.0.0.0"
        if name != "node-a":
            assert args.peer == [("node-a", 7300)]
    assert roles == {"node-a": "can host", "node-b": "can host", "node-c": "client"}
    assert "torch==2.13.0" in (ROOT / "Dockerfile").read_text()


async def run_local_mesh(*args: str) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "scripts" / "local-mesh"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    apis: dict[str, str] = {}
    async with asyncio.timeout(120):
        while True:
            line = (await proc.stdout.readline()).decode()
            assert line, (await proc.stderr.read()).decode()
            if m := re.match(r"(node-\w)\s+.*api (\S+)", line):
                apis[m.group(1)] = m.group(2)
            if line.startswith("ready"):
                return proc, apis


async def ask_client_node(api_url: str) -> str:
    async with openai.AsyncOpenAI(base_url=api_url, api_key="none", max_retries=0) as api:
        for _ in range(60):  # the host may still be loading the model (bounded)
            try:
                answer = await api.chat.completions.create(
                    model="builtin",
                    messages=[{"role": "user", "content": "Reverse the words: blue green red"}],
                    temperature=0,
                )
                return answer.choices[0].message.content
            except openai.APIStatusError as exc:
                if exc.status_code != 503:
                    raise
                await asyncio.sleep(1)
    raise AssertionError("no answer")


async def stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        out = (await proc.stdout.read()).decode()
        assert await proc.wait() == 0
    return out


async def test_local_mesh_on_loopback():
    proc, apis = await run_local_mesh("--any-ports", "--duration", "120")
    try:
        assert set(apis) == {"node-a", "node-b", "node-c"}
        assert await ask_client_node(apis["node-c"]) == "red green blue"
    finally:
        out = await stop(proc)
    assert "stopped" in out


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip"), reason="network namespaces need root and ip"
)
async def test_local_mesh_in_network_namespaces():
    before = set((await _netns()).split())
    proc, apis = await run_local_mesh("--netns", "--duration", "120")
    try:
        hosts = {re.match(r"http://([\d.]+):", url).group(1) for url in apis.values()}
        assert len(hosts) == 3  # three hosts, one address each
        assert await ask_client_node(apis["node-c"]) == "red green blue"
    finally:
        await stop(proc)
    assert set((await _netns()).split()) == before  # namespaces removed


async def _netns() -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "list", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return out.decode()
