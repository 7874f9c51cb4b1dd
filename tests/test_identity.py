"""Node keys, node ids and the mesh secret."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mesh_node.identity import (
    KEY_FILE,
    IdentityError,
    MeshSecret,
    NodeId,
    NodeIdentity,
    default_home,
    new_mesh_id,
)


def test_key_is_created_once_with_private_permissions(tmp_path):
    home = tmp_path / "home"
    first = NodeIdentity.load_or_create(home)
    path = home / KEY_FILE
    assert path.exists()
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    again = NodeIdentity.load_or_create(home)
    assert again.node_id == first.node_id


def test_loose_permissions_and_corrupt_keys_are_refused(tmp_path):
    NodeIdentity.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        NodeIdentity.load_or_create(tmp_path)
    path.chmod(0o600)
    path.write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="not a valid node key"):
        NodeIdentity.load_or_create(tmp_path)


def test_mesh_node_home_moves_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_NODE_HOME", str(tmp_path / "elsewhere"))
    assert default_home() == tmp_path / "elsewhere"
    monkeypatch.delenv("MESH_NODE_HOME")
    assert default_home() == __import__("pathlib").Path.home() / ".mesh-node"


def test_node_id_text_forms():
    node = NodeIdentity.generate().node_id
    text = str(node)
    assert len(text) == 52 and text == text.lower()
    assert NodeId.parse(text) == node
    assert NodeId.parse(text.upper()) == node
    assert text.startswith(node.short) and len(node.short) == 10
    with pytest.raises(ValueError):
        NodeId.parse("not-an-id")
    with pytest.raises(ValueError):
        NodeId(b"short")


def test_signatures_verify_only_for_the_signer():
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    sig = a.sign(b"data")
    assert a.node_id.verify(sig, b"data")
    assert not a.node_id.verify(sig, b"other")
    assert not b.node_id.verify(sig, b"data")
    assert not a.node_id.verify(b"\x00" * 64, b"data")


def test_mesh_ids_are_fresh_and_high_entropy():
    ids = {new_mesh_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 32 and i.isalnum() for i in ids)


def test_mesh_secret_derivations_hide_the_mesh_id():
    mesh_id = new_mesh_id()
    secret = MeshSecret(mesh_id)
    same = MeshSecret(f"  {mesh_id}\n")
    other = MeshSecret(new_mesh_id())
    assert secret.discovery_tag == same.discovery_tag != other.discovery_tag
    assert secret.check(b"x", same.prove(b"x"))
    assert not secret.check(b"x", other.prove(b"x"))
    assert mesh_id not in repr(secret) and mesh_id not in secret.discovery_tag
    assert mesh_id.encode() not in secret.proof_key
    assert secret.proof_key != bytes.fromhex(secret.discovery_tag)  # separate keys


@pytest.mark.parametrize("bad", ["", "short", "has spaces in the middle!", "tab\there-long-enough"])
def test_weak_or_odd_mesh_ids_are_refused(bad):
    with pytest.raises(IdentityError):
        MeshSecret(bad)


def test_cli_prints_ids_and_never_the_mesh_id(tmp_path):
    env = {**os.environ, "MESH_NODE_HOME": str(tmp_path)}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "mesh_node", *a], env=env, capture_output=True, text=True, timeout=60
    )
    new = run("new")
    assert new.returncode == 0 and len(new.stdout.strip()) == 32
    shown = run("id")
    saved = NodeIdentity.load_or_create(tmp_path).node_id
    assert str(saved) in shown.stdout
    assert run("id", "--short").stdout.strip() == saved.short
    refused = run("join", "tooshort")
    assert refused.returncode == 2 and "mesh-node new" in refused.stderr
