"""Run `mesh-node` as OS processes for tests, and read what they print (bounded waits)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys

import aiohttp

from mesh_node.identity import NodeId


class NodeProcess:
    """A `python -m mesh_node join ...` child process."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.node_id: NodeId | None = None
        self.port: int | None = None
        self.console_url: str | None = None
        self.api_url: str | None = None
        self.stderr_lines: list[str] = []
        self._stderr_task = asyncio.create_task(self._collect_stderr())
        self._stderr_waiters: list[tuple[re.Pattern[str], asyncio.Future[str]]] = []

    @classmethod
    async def join(
        cls,
        mesh_id: str,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),  # e.g. ("taskset", "-c", "1") to pin the process
    ):
        proc = await asyncio.create_subprocess_exec(
            *prefix,
            sys.executable,
            "-m",
            "mesh_node",
            "join",
            mesh_id,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ephemeral",
            "--log-level",
            "debug",
            "--console-port",
            "0",
            "--api-port",
            "0",
            *(args if "--mdns-interface" in args else ("--no-mdns", *args)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        node = cls(proc)
        try:
            await node._read_banner()
        except BaseException:  # (timed out, exited, cancelled): no process is left behind
            await node.stop(signal.SIGKILL)
            raise
        return node

    async def _read_banner(self, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while self.port is None or self.console_url is None or self.api_url is None:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"node exited early: {''.join(self.stderr_lines)}")
                if m := re.match(r"node \w+\s+\((\w{52})\)", line):
                    self.node_id = NodeId.parse(m.group(1))
                if m := re.match(r"listening on udp \S+:(\d+)", line):
                    self.port = int(m.group(1))
                if m := re.match(r"console on (\S+)", line):
                    self.console_url = m.group(1)
                if m := re.match(r"api on (\S+)", line):
                    self.api_url = m.group(1)

    async def status(self) -> dict:
        """The node's console status document (GET /api/status)."""

        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.console_url}/api/status") as response,
        ):
            return await response.json()

    @property
    def address(self) -> tuple[str, int]:
        assert self.port is not None
        return ("127.0.0.1", self.port)

    async def _collect_stderr(self) -> None:
        while line := (await self.proc.stderr.readline()).decode():
            self.stderr_lines.append(line)
            for pattern, fut in list(self._stderr_waiters):
                if not fut.done() and pattern.search(line):
                    fut.set_result(line)

    async def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait for a stderr line matching `pattern` (already printed or still to come)."""
        regex = re.compile(pattern)
        for line in self.stderr_lines:
            if regex.search(line):
                return line
        fut = asyncio.get_running_loop().create_future()
        self._stderr_waiters.append((regex, fut))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise AssertionError(
                f"no log line like {pattern!r}; stderr:\n{''.join(self.stderr_lines[-30:])}"
            ) from None

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_task
        return code

    async def kill(self) -> None:
        await self.stop(signal.SIGKILL)


async def start_mesh(mesh_id: str, count: int, *args: str) -> list[NodeProcess]:
    """`count` node processes: the first, then the others joining through it (--peer)."""
    nodes = [await NodeProcess.join(mesh_id, *args)]
    seed = "{}:{}".format(*nodes[0].address)
    try:
        for _ in range(count - 1):
            nodes.append(await NodeProcess.join(mesh_id, "--peer", seed, *args))
    except BaseException:  # the ones started go too
        await stop_all(nodes)
        raise
    return nodes


async def stop_all(nodes: list[NodeProcess]) -> None:
    await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


def client_endpoint(mesh_id: str):
    """A bare endpoint in this (test) process, to talk to node processes directly."""
    from mesh_node.identity import MeshSecret, NodeIdentity
    from mesh_node.protocol import REGISTRY
    from mesh_node.transport.connection import Handlers
    from mesh_node.transport.quic import QuicEndpoint

    return QuicEndpoint(
        NodeIdentity.generate(),
        MeshSecret(mesh_id),
        registry=REGISTRY,
        handlers=Handlers(),
        host="127.0.0.1",
        port=0,
    )
