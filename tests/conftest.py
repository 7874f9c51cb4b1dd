import logging

import pytest

from mesh_node.identity import MeshSecret, new_mesh_id


@pytest.fixture
def mesh() -> MeshSecret:
    return MeshSecret(new_mesh_id())


@pytest.fixture(autouse=True)
def _quiet_aioquic():
    logging.getLogger("quic").setLevel(logging.WARNING)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Rankings and shard-quality caches (MESH_NODE_CACHE) and everything else kept under the
    cache home (XDG_CACHE_HOME: the compiled native kernels, Hugging Face's cache) go to
    folders of this test session (node processes inherit them), never to the user's ~/.cache."""
    import os

    names = ("MESH_NODE_CACHE", "XDG_CACHE_HOME")
    previous = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = str(tmp_path_factory.mktemp(name.lower()))
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
