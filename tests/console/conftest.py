import aiohttp
import pytest

from mesh_node.console.server import ConsoleServer
from tests.console.scripted_source import ScriptedSource, make_peer


@pytest.fixture
def source() -> ScriptedSource:
    return ScriptedSource(
        [make_peer(0, is_self=True), make_peer(1), make_peer(2, status="suspect")]
    )


@pytest.fixture
async def console(source):
    server = ConsoleServer(source, "127.0.0.1", 0, max_event_clients=4, shutdown_timeout=2.0)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session
