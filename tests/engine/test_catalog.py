"""Resolving `--model` (built-in, folder, HF cache, offline errors) and `mesh-node models`."""

from __future__ import annotations

import argparse
import shutil

import pytest

from mesh_node.cli import models as models_cmd
from mesh_node.engine.catalog import (
    BUILTIN_DIR,
    check_cache_folder,
    list_local_models,
    resolve_model,
)
from mesh_node.engine.config import ModelArgs
from mesh_node.engine.errors import CheckpointError, ModelNotFoundError


def fake_hf_cache(tmp_path, source, repo_id="acme/tiny-moe"):
    """A Hugging Face hub cache laid out as huggingface_hub writes it, holding `source`."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return cache


def test_default_is_the_builtin_model():
    resolved = resolve_model(None)
    assert resolved.source == "builtin" and resolved.path == BUILTIN_DIR
    assert (resolved.path / "config.json").is_file()
    assert resolve_model("builtin").path == BUILTIN_DIR


def test_local_folder(references):
    folder, _ = references.get("mixtral")
    resolved = resolve_model(str(folder))
    assert resolved.source == "local" and resolved.path == folder.resolve()


def test_a_folder_given_as_dot_or_through_dot_dot_is_named_by_the_folder(
    references, tmp_path, monkeypatch
):
    """`--model .` in a model's folder (or `model/sub/..`) names the model by that folder, as
    `--model /path/to/model` would (and `mesh-node models --path .` lists it so): a model named
    "" (or "..") could not be asked for (the API requires a non-empty model) and would list as
    such in /v1/models. A link keeps its own name (the name the user gave it)."""
    folder, _ = references.get("mixtral")
    monkeypatch.chdir(folder)
    assert resolve_model(".").name == folder.name
    assert resolve_model("./").name == folder.name
    listed = list_local_models(["."], include_hf_cache=False)
    assert [m.name for m in listed if m.source == "local"] == [folder.name]
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    (tmp_path / "tiny").symlink_to(folder)
    assert resolve_model("../tiny").name == "tiny"
    assert resolve_model("../tiny/.").name == "tiny"
    assert resolve_model(str(tmp_path / "sub" / ".." / "tiny")).name == "tiny"


def test_folder_without_config_and_nonsense(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        resolve_model(tmp_path)
    with pytest.raises(
        ModelNotFoundError, match="neither an existing folder nor a Hugging Face repo id"
    ):
        resolve_model("./no/such/folder")


def test_repo_id_from_the_hf_cache(references, tmp_path):
    folder, _ = references.get("olmoe")
    cache = fake_hf_cache(tmp_path, folder)
    resolved = resolve_model("acme/tiny-moe", cache_dir=cache, allow_download=False)
    assert resolved.source == "hf-cache"
    assert (resolved.path / "model.safetensors").is_file()


def test_repo_id_offline_says_so_and_how_to_use_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("acme/not-cached", cache_dir=tmp_path / "empty-cache")
    message = str(info.value)
    cache = tmp_path / "empty-cache"
    assert f"'acme/not-cached' is not in the local Hugging Face cache at {cache}" in message
    assert "HF_HUB_CACHE" in message
    assert "not downloaded (HF_HUB_OFFLINE is set)" in message
    assert "--model /path/to/folder" in message


def test_a_repo_id_a_command_only_looks_up_says_it_was_not_downloaded(tmp_path, monkeypatch):
    """moe analyze reads the cache only: not "offline" on a machine that is online."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("acme/not-cached", cache_dir=tmp_path, allow_download=False)
    assert "not downloaded (this command only reads the cache)" in str(info.value)
    assert "offline" not in str(info.value)


def test_a_hugging_face_home_given_as_the_cache_stands_for_its_hub_folder(tmp_path):
    """HF_HOME (~/.cache/huggingface) keeps the hub cache in hub/: given for a cache, with no
    models of its own, it is taken as that hub cache (by models, join and moe analyze)."""
    home = tmp_path / "hf-home"
    hub = fake_hf_cache(home, BUILTIN_DIR)
    assert check_cache_folder(home) == hub and check_cache_folder(hub) == hub
    found = list_local_models(cache_dir=home)
    assert [m.name for m in found if m.source == "hf-cache"] == ["acme/tiny-moe"]
    resolved = resolve_model("acme/tiny-moe", cache_dir=check_cache_folder(home))
    assert resolved.source == "hf-cache"
    fake_hf_cache(hub, BUILTIN_DIR, "acme/other")  # (a cache in hub/hub: hub has its own)
    assert check_cache_folder(hub) == hub
    (tmp_path / "empty" / "hub").mkdir(parents=True)
    assert check_cache_folder(tmp_path / "empty") == tmp_path / "empty"


def test_list_local_models_and_cli(references, tmp_path, capsys):
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    for name in ("qwen2_moe", "llama"):
        shutil.copytree(references.get(name)[0], shelf / name)
    cache = fake_hf_cache(tmp_path, references.get("olmoe")[0])
    found = {m.name: m for m in list_local_models([shelf], cache_dir=cache)}
    assert set(found) == {"builtin", "qwen2_moe", "llama", "acme/tiny-moe"}
    assert found["builtin"].architecture == "qwen3_moe" and found["builtin"].experts > 1
    assert found["qwen2_moe"].experts == 6 and found["qwen2_moe"].experts_per_token == 2
    assert found["llama"].experts == 0
    assert found["acme/tiny-moe"].source == "hf-cache"
    assert found["llama"].parameters == found["llama"].size_bytes // 4  # float32 checkpoint

    parser = argparse.ArgumentParser()
    models_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["models", "--path", str(shelf), "--cache-dir", str(cache)])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    for text in ("builtin", "qwen3_moe", "qwen2_moe", "llama", "acme/tiny-moe", "dense"):
        assert text in out
    assert f"mesh-node join MESH_ID --model acme/tiny-moe --cache-dir {cache}" in out
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path / 'typo'} does not exist"):
        list_local_models(cache_dir=tmp_path / "typo")


def test_models_on_an_80_column_terminal_folds_a_long_name_and_keeps_numbers_whole(
    tmp_path, capsys, monkeypatch
):
    """Was: every column cut short (`archit…`, `s…`, `…`) beside a long repo id."""
    repo_id = "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct"
    cache = fake_hf_cache(tmp_path, BUILTIN_DIR, repo_id)
    (info,) = [m for m in list_local_models(cache_dir=cache) if m.name == repo_id]
    parser = argparse.ArgumentParser()
    models_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["models", "--cache-dir", str(cache)])
    numbers = [models_cmd._size(info.size_bytes), models_cmd._count(info.parameters)]
    numbers.append(models_cmd._count(info.active_parameters))

    monkeypatch.setenv("COLUMNS", "80")
    assert args.run(args) == 0
    out = capsys.readouterr().out
    table = out[: out.index("builtin:")]
    assert "…" not in table, table
    assert max(map(len, table.splitlines())) <= 80, table
    names = "".join(line.split("│")[1].strip() for line in table.splitlines() if "│" in line)
    assert repo_id in names and "qwen3_moe" in names, table
    row = next(line for line in table.splitlines() if line.startswith("│ deepseek"))
    for text in (*numbers, f"{info.experts} top-{info.experts_per_token}", "hf-cache"):
        assert text in row, table

    monkeypatch.setenv("COLUMNS", "160")  # (room enough: a line per model)
    assert args.run(args) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if repo_id in line)
    for text in (info.architecture, *numbers, "hf-cache"):
        assert text in row, row


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ("[]", "not a JSON object"),
        ('{"model_type": "llama", "hidden_size": "x"}', "unusable value"),
        (
            '{"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 2,'
            ' "num_attention_heads": 0, "vocab_size": 10}',
            "unusable value",
        ),
    ],
)
def test_a_malformed_config_is_a_checkpoint_error(tmp_path, config, why):
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=why):
        ModelArgs.from_folder(tmp_path)


def test_a_folder_no_check_foresaw_is_listed_as_unusable(references, tmp_path, monkeypatch):
    shelf = tmp_path / "shelf"
    shutil.copytree(references.get("llama")[0], shelf / "llama")
    shutil.copytree(references.get("llama")[0], shelf / "odd")
    from mesh_node.engine import checkpoint

    opened = checkpoint.Checkpoint.open.__func__

    def surprising(cls, path):
        if path.name == "odd":
            raise LookupError("nobody expected this")
        return opened(cls, path)

    monkeypatch.setattr(checkpoint.Checkpoint, "open", classmethod(surprising))
    found = {m.name: m for m in list_local_models([shelf], include_hf_cache=False)}
    assert found["llama"].error is None
    assert "LookupError: nobody expected this" in found["odd"].error
