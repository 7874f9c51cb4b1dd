"""`mesh-node models --cache-dir C`, `mesh-node join --cache-dir C` and `mesh-node moe analyze
--cache-dir C`: a model listed from a Hugging Face cache C serves with the command `models`
prints, and join without it says which cache it looked in."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys

from mesh_node.cli.main import main
from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.identity import new_mesh_id
from mesh_node.placement.rankings import checkpoint_fingerprint
from tests.engine.test_catalog import fake_hf_cache
from tests.processes.nodes import NodeProcess
from tests.test_cli_arguments import CONFINED, MESH_ID


def offline(tmp_path) -> dict[str, str]:
    """An environment whose default Hugging Face cache is an empty folder of its own."""
    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    return {**environment, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}


def mesh_node(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mesh_node", *argv],
        env={"COLUMNS": "80", **env},
        capture_output=True,
        text=True,
        timeout=90,
    )


async def test_a_model_listed_from_a_cache_dir_serves_with_the_command_models_prints(tmp_path):
    cache = fake_hf_cache(tmp_path, BUILTIN_DIR)
    env = offline(tmp_path)
    listed = mesh_node("models", "--cache-dir", str(cache), env=env)
    assert listed.returncode == 0, listed.stderr
    hint = next(line for line in listed.stdout.splitlines() if line.startswith("To serve one"))
    command = shlex.split(hint.partition(": ")[2])
    assert command == [
        *("mesh-node", "join", "MESH_ID", "--model", "acme/tiny-moe"),
        *("--cache-dir", str(cache)),
    ]
    node = await NodeProcess.join(new_mesh_id(), *command[3:], env=env)
    try:
        async with asyncio.timeout(30):
            while True:  # (the model on disk, in the node's own status)
                models = [m.get("name") for m in (await node.status())["models"]]
                if "acme/tiny-moe" in models:
                    break
                await asyncio.sleep(0.2)  # polling another process's HTTP status (bounded)
    finally:
        await node.stop()


def test_models_given_a_hugging_face_home_lists_its_hub_cache(tmp_path):
    """`--cache-dir ~/.cache/huggingface` (HF_HOME, the hub cache in its hub/ folder) was an
    empty listing; it lists the hub cache, says so, and the join command names that cache."""
    home = tmp_path / "hf-home"
    hub = fake_hf_cache(home, BUILTIN_DIR)
    listed = mesh_node("models", "--cache-dir", str(home), env=offline(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert "acme/tiny-moe" in listed.stdout and "hf-cache" in listed.stdout, listed.stdout
    text = " ".join(listed.stdout.split())
    assert f"{home} is a Hugging Face home: listed its hub cache {hub}" in text, text
    assert text.endswith(f"--model acme/tiny-moe --cache-dir {hub}"), text


def test_join_without_the_cache_dir_says_which_cache_it_looked_in(tmp_path):
    fake_hf_cache(tmp_path, BUILTIN_DIR)
    result = mesh_node(
        "join", MESH_ID, "--ephemeral", *CONFINED, "--model", "acme/tiny-moe", env=offline(tmp_path)
    )
    assert result.returncode == 2, result.stderr[-600:]
    error = result.stderr.splitlines()[-1]
    assert f"not in the local Hugging Face cache at {tmp_path / 'hf-home' / 'hub'}" in error
    assert "HF_HUB_CACHE" in error and "--cache-dir" in error


def test_join_help_explains_the_cache_dir(tmp_path):
    result = mesh_node("join", "--help", env={**offline(tmp_path), "COLUMNS": "400"})
    text = " ".join(result.stdout.split())
    assert "--cache-dir DIR the Hugging Face cache" in text
    assert "the folder `mesh-node models --cache-dir` listed" in text


def test_moe_analyze_takes_a_repo_id_from_a_cache_dir(tmp_path, monkeypatch, capsys):
    """Was: no --cache-dir (`unrecognized arguments`), only the default cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = fake_hf_cache(tmp_path, BUILTIN_DIR)
    assert main(["moe", "analyze", "acme/tiny-moe", "--cache-dir", str(cache), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["fingerprint"] == checkpoint_fingerprint(BUILTIN_DIR)
    (tmp_path / "other").mkdir()
    argv = ["moe", "analyze", "acme/tiny-moe", "--cache-dir", str(tmp_path / "other")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("mesh-node moe analyze: ") and error.count("\n") == 1, error
    assert f"not in the local Hugging Face cache at {tmp_path / 'other'} (" in error
    assert "--cache-dir" in error


def test_moe_analyze_with_a_missing_cache_dir(tmp_path, capsys):
    assert main(["moe", "analyze", "acme/tiny-moe", "--cache-dir", str(tmp_path / "typo")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert error.startswith("mesh-node moe analyze: the Hugging Face cache ")
    assert f"{tmp_path / 'typo'} does not exist" in error


def test_moe_analyze_help_explains_the_cache_dir(tmp_path):
    result = mesh_node("moe", "analyze", "--help", env={**offline(tmp_path), "COLUMNS": "400"})
    text = " ".join(result.stdout.split())
    assert "--cache-dir DIR the Hugging Face cache" in text
    assert "the folder `mesh-node models --cache-dir` listed" in text


def test_models_refuses_a_cache_dir_with_no_hf_cache(tmp_path):
    """Was: the --cache-dir was silently not scanned."""
    result = mesh_node(
        "models", "--cache-dir", str(tmp_path), "--no-hf-cache", env=offline(tmp_path)
    )
    assert result.returncode == 2
    assert "--no-hf-cache: not allowed with argument --cache-dir" in result.stderr
