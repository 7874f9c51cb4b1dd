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
    """Rankings and shard-quality caches go to a folder of this test session (node processes
    inherit it), never to the user's ~/.cache."""
    import os

    previous = os.environ.get("MESH_NODE_CACHE")
    os.environ["MESH_NODE_CACHE"] = str(tmp_path_factory.mktemp("mesh-node-cache"))
    yield
    if previous is None:
        os.environ.pop("MESH_NODE_CACHE", None)
    else:
        os.environ["MESH_NODE_CACHE"] = previous
