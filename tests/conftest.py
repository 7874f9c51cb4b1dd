import logging

import pytest

from mesh_node.identity import MeshSecret, new_mesh_id


@pytest.fixture
def mesh() -> MeshSecret:
    return MeshSecret(new_mesh_id())


@pytest.fixture(autouse=True)
def _quiet_aioquic():
    logging.getLogger("quic").setLevel(logging.WARNING)
