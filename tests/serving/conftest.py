"""Fixtures: the built-in model behind `LocalModels` (loaded once), an `ApiServer` on
127.0.0.1:0, the official `openai` client, and a raw HTTP session."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from mesh_node.engine import Generator
from mesh_node.serving.api import ApiServer
from mesh_node.serving.local import LocalModels

MODEL = "builtin"


@pytest.fixture(scope="session")
def generator():
    with Generator.from_pretrained() as gen:
        yield gen


@pytest.fixture
def local_models(generator) -> LocalModels:
    models = LocalModels()
    models.generators[MODEL] = generator
    return models


@pytest.fixture
async def server(local_models):
    async with ApiServer(local_models, port=0, shutdown_timeout=2.0) as api:
        yield api


@pytest.fixture
async def client(server):
    async with openai.AsyncOpenAI(
        base_url=server.base_url, api_key="unused", max_retries=0, timeout=10.0
    ) as oai:
        yield oai


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session
