"""Expert rankings: fingerprint, measuring the built-in model, encoding, cache, agreement, CLI."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.placement import rankings as rk
from mesh_node.placement.rankings import (
    ExpertRankings,
    NoExpertsError,
    RankingsError,
    agreement,
    analyze,
    cached_or_analyze,
    checkpoint_fingerprint,
    load_cached,
    save,
    spearman,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def micro() -> ExpertRankings:
    return analyze("builtin", "micro")


@pytest.fixture
def counted_analyze(monkeypatch, micro) -> list:
    """Stands in for `analyze` (the real one is tested above): returns `micro`, logs calls."""
    calls = []

    def fake(model, kind="micro", device="cpu", dtype=None, **options):
        calls.append((model, kind))
        return micro

    monkeypatch.setattr(rk, "analyze", fake)
    return calls


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MESH_NODE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "mesh-node" / "rankings"


def small(**changes) -> ExpertRankings:
    fields = dict(
        fingerprint="ab" * 32,
        kind="micro",
        layers=(1, 3),
        num_experts=3,
        gate_mass=((0.5, 0.25, 0.25), (0.2, 0.2, 0.6)),
        selection=((1.0, 0.5, 0.5), (0.75, 0.5, 0.75)),
        coselection=(
            ((0.0, 0.5, 0.5), (0.5, 0.0, 0.0), (0.5, 0.0, 0.0)),
            ((0.0, 0.0, 0.75), (0.0, 0.0, 0.5), (0.75, 0.5, 0.0)),
        ),
        tokens=4,
        prompts=1,
    )
    fields.update(changes)
    return ExpertRankings(**fields)


# -- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_copies_and_sensitive_to_changes(tmp_path):
    original = checkpoint_fingerprint(BUILTIN_DIR)
    assert len(original) == 64 and int(original, 16) >= 0
    copy = tmp_path / "copy"
    shutil.copytree(BUILTIN_DIR, copy)
    assert checkpoint_fingerprint(copy) == original

    config = copy / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert checkpoint_fingerprint(copy) != original
    config.write_text(text)
    assert checkpoint_fingerprint(copy) == original

    template = copy / "chat_template.jinja"  # other calibration tokens: another fingerprint
    template.write_text("{{ messages[0]['content'] }}" + template.read_text())
    assert checkpoint_fingerprint(copy) != original
    shutil.copy(BUILTIN_DIR / "chat_template.jinja", template)
    assert checkpoint_fingerprint(copy) == original

    from safetensors.torch import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    renamed = dict(tensors)
    renamed["model.extra.weight"] = renamed.pop("model.norm.weight")
    save_file(renamed, copy / "model.safetensors")
    assert checkpoint_fingerprint(copy) != original
    retrained = {name: tensor * 1.01 for name, tensor in tensors.items()}
    save_file(retrained, copy / "model.safetensors")  # same header, other bytes
    assert checkpoint_fingerprint(copy) != original


# -- measurement ---------------------------------------------------------------------------------


def test_micro_analysis_of_the_builtin_model(micro):
    assert micro.fingerprint == checkpoint_fingerprint(BUILTIN_DIR)
    assert (micro.kind, micro.layers, micro.num_experts, micro.prompts) == (
        "micro",
        (0, 1, 2, 3),
        8,
        4,
    )
    assert 4 < micro.tokens <= 4 * 16
    for row, layer in enumerate(micro.layers):
        assert math.fsum(micro.gate_mass[row]) == pytest.approx(1.0, abs=1e-12)
        assert math.fsum(micro.selection[row]) == pytest.approx(2.0)  # top-2
        co = micro.coselection[row]
        for a in range(8):
            assert co[a][a] == 0.0
            assert all(co[a][b] == co[b][a] for b in range(8))
            # with top-2, an expert's partners account for all of its selections
            assert math.fsum(co[a]) == pytest.approx(micro.selection[row][a])
        ranking = micro.ranking(layer)
        assert sorted(ranking) == list(range(8))
        masses = [micro.gate_mass[row][e] for e in ranking]
        assert masses == sorted(masses, reverse=True)


def test_analysis_is_deterministic_and_by_layer_agrees(micro):
    assert analyze("builtin", "micro").to_bytes() == micro.to_bytes()
    streamed = analyze(BUILTIN_DIR, "micro", by_layer=True)
    assert agreement(streamed, micro)["spearman"] == pytest.approx(1.0)
    assert streamed.selection == micro.selection


def test_prompt_counts_are_parameters():
    rankings = analyze("builtin", "micro", prompts=2, max_tokens=5)
    assert (rankings.prompts, rankings.tokens) == (2, 10)


def test_shipped_prompts_are_varied_and_enough_for_a_full_run():
    prompts = rk.shipped_prompts()
    assert len(prompts) >= rk.KINDS["full"][0]
    assert len(set(prompts)) == len(prompts)
    assert any("def " in p for p in prompts) and any("=" in p for p in prompts)
    assert not any(p.startswith("# Calibration") for p in prompts)


def test_builtin_calibration_mixes_skills_and_held_out_prompts():
    from mesh_node.engine import builtin_skills

    chats = rk.builtin_conversations(16)
    questions = [chat[0]["content"] for chat in chats]
    held_out = [builtin_skills.is_held_out(q) for q in questions]
    assert 0 < sum(held_out) < len(held_out)
    assert {q.split()[0] for q in questions[:4]} == {"What", "Reverse", "Sort", "Count"}


def test_ranking_breaks_ties_by_selection_then_id():
    rankings = small()
    assert rankings.ranking(1) == [0, 1, 2]  # 1 and 2 tie on mass and selection: by id
    assert rankings.ranking(3) == [2, 0, 1]  # 0 and 1 tie on mass: 0 is chosen more
    with pytest.raises(ValueError, match="not one of the measured"):
        rankings.ranking(2)


# -- encoding ------------------------------------------------------------------------------------


def test_bytes_roundtrip_is_canonical(micro):
    data = micro.to_bytes()
    assert micro.to_bytes() == data
    decoded = ExpertRankings.from_bytes(data)
    assert decoded == micro
    assert decoded.to_bytes() == data
    assert decoded.digest() == micro.digest() and len(micro.digest()) == 16
    as_dict = micro.to_dict()
    assert json.loads(json.dumps(as_dict))["rankings"]["2"] == micro.ranking(2)


def test_unknown_fields_are_ignored_and_missing_ones_rejected():
    fields = msgpack.unpackb(small().to_bytes())
    assert ExpertRankings.from_bytes(msgpack.packb({**fields, "later": [1, 2]})) == small()
    for name in ("gate_mass", "tokens", "fingerprint", "coselection"):
        broken = {k: v for k, v in fields.items() if k != name}
        with pytest.raises(RankingsError):
            ExpertRankings.from_bytes(msgpack.packb(broken))


@pytest.mark.parametrize(
    "changes",
    [
        {"fingerprint": "../../etc"},
        {"kind": "medium"},
        {"layers": [3, 1]},
        {"layers": [1, True]},
        {"num_experts": 4},
        {"tokens": 0},
        {"tokens": 1.5},
        {"gate_mass": [[0.5, 0.5, 0.5], [0.2, 0.2, 0.6]]},
        {"selection": [[1.0, 0.5, float("nan")], [0.75, 0.5, 0.75]]},
        {"selection": [[1.0, 0.5, -0.1], [0.75, 0.5, 0.75]]},
        {"coselection": [[[0.0, 0.5, 0.5], [0.4, 0.0, 0.0], [0.5, 0.0, 0.0]], [[0.0] * 3] * 3]},
        {"coselection": [[[0.1, 0.5, 0.5], [0.5, 0.0, 0.0], [0.5, 0.0, 0.0]], [[0.0] * 3] * 3]},
        {"v": 2},
    ],
)
def test_malformed_fields_raise_rankings_error(changes):
    fields = {**msgpack.unpackb(small().to_bytes()), **changes}
    with pytest.raises(RankingsError):
        ExpertRankings.from_bytes(msgpack.packb(fields))


VALID = small().to_bytes()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_rankings_error(data):
    with contextlib.suppress(RankingsError):
        ExpertRankings.from_bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
    st.integers(0, len(VALID)),
)
def test_mutated_encodings_raise_only_rankings_error(flips, keep):
    data = bytearray(VALID)
    for index, value in flips:
        data[index] = value
    try:
        decoded = ExpertRankings.from_bytes(bytes(data[:keep]) if keep else bytes(data))
    except RankingsError:
        return
    assert ExpertRankings.from_bytes(decoded.to_bytes()) == decoded


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(msgpack.unpackb(VALID))), msgpack_values)
def test_replaced_fields_raise_only_rankings_error(name, value):
    fields = {**msgpack.unpackb(VALID), name: value}
    with contextlib.suppress(RankingsError):
        ExpertRankings.from_bytes(msgpack.packb(fields))


# -- cache ---------------------------------------------------------------------------------------


def test_cache_roundtrip(cache_home, micro, counted_analyze):
    rankings, from_cache = cached_or_analyze("builtin", "micro")
    assert not from_cache and rankings == micro and len(counted_analyze) == 1
    path = cache_home / f"{micro.fingerprint}-micro.msgpack"
    assert path.read_bytes() == micro.to_bytes()
    assert [p.name for p in cache_home.iterdir()] == [path.name]  # no temporary left behind
    again, from_cache = cached_or_analyze("builtin", "micro")
    assert from_cache and again == micro and len(counted_analyze) == 1
    _, from_cache = cached_or_analyze("builtin", "micro", refresh=True)
    assert not from_cache and len(counted_analyze) == 2
    assert load_cached(micro.fingerprint, "full") is None


def test_mesh_node_cache_overrides_xdg(cache_home, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path / "mine"))
    path = save(small())
    assert path == tmp_path / "mine" / "rankings" / f"{'ab' * 32}-micro.msgpack"
    assert load_cached("ab" * 32, "micro") == small()


def test_corrupt_cache_is_ignored_and_recomputed(cache_home, micro, counted_analyze, caplog):
    path = save(micro)
    path.write_bytes(b"\x93not rankings")
    with caplog.at_level(logging.WARNING, logger="mesh_node.placement.rankings"):
        assert load_cached(micro.fingerprint, "micro") is None
        rankings, from_cache = cached_or_analyze("builtin", "micro")
    assert "corrupt" in caplog.text
    assert not from_cache and rankings == micro and len(counted_analyze) == 1
    assert ExpertRankings.from_bytes(path.read_bytes()) == micro


def test_a_cache_that_cannot_be_written_keeps_the_measurement(
    tmp_path, monkeypatch, micro, counted_analyze, caplog
):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path / "a-file"))
    with caplog.at_level(logging.WARNING, logger="mesh_node.placement.rankings"):
        rankings, from_cache = cached_or_analyze("builtin", "micro")
    assert rankings == micro and not from_cache
    assert "could not cache the expert rankings" in caplog.text


def test_a_host_whose_cache_cannot_be_written_plans_with_its_measurement(
    tmp_path, monkeypatch, micro, counted_analyze
):
    from types import SimpleNamespace

    from mesh_node.expert_parallel.coordinator import ExpertParallel

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path / "a-file"))
    resolved = SimpleNamespace(path=BUILTIN_DIR, name="builtin")
    assert ExpertParallel._find_rankings(None, resolved, "micro", []) == micro


def test_usage_with_non_finite_gate_weights_is_refused_as_a_peer_would_refuse_it():
    from mesh_node.engine.expert_usage import ExpertUsage

    def usage(gate_mass, selected=(1, 1)) -> ExpertUsage:
        return ExpertUsage(
            layers=(0,),
            gate_mass=torch.tensor([gate_mass], dtype=torch.float64),
            selected=torch.tensor([selected]),
            tokens=2,
            coselected=torch.tensor([[[0, 0], [0, 0]]]),
        )

    with pytest.raises(RankingsError, match="not finite numbers"):
        ExpertRankings.from_usage(usage([math.nan, 1.0]), "ab", "micro", 1)
    with pytest.raises(RankingsError, match="not finite numbers"):
        ExpertRankings.from_usage(usage([0.0, 0.0]), "ab", "micro", 1)
    with pytest.raises(RankingsError, match="selection"):  # 5 choices of 2 tokens
        ExpertRankings.from_usage(usage([1.0, 1.0], (5, 1)), "ab", "micro", 1)
    good = ExpertRankings.from_usage(usage([1.0, 3.0]), "ab", "micro", 1)
    assert good.gate_mass == ((0.25, 0.75),)
    assert ExpertRankings.from_bytes(good.to_bytes()) == good


def test_too_many_layers_are_refused_before_any_table_is_read():
    document = dict(small()._fields(), layers=list(range(rk.MAX_LAYERS + 1)))
    document["gate_mass"] = document["selection"] = document["coselection"] = 0  # never read
    with pytest.raises(RankingsError, match="1 to 4096 indices"):
        ExpertRankings.from_bytes(msgpack.packb(document))


def test_cached_rankings_for_another_key_are_ignored(cache_home):
    path = save(small())
    path.rename(path.with_name(f"{'cd' * 32}-micro.msgpack"))
    assert load_cached("cd" * 32, "micro") is None


# -- agreement -----------------------------------------------------------------------------------


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: [1, 2.5, 2.5, 4] against [1, 2, 3, 4]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([0.1, 0.5, 0.2], [1, 3, 2]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 1, 1]) == 1.0
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def test_agreement_with_itself_and_with_the_reverse(micro):
    same = agreement(micro, micro)
    assert same["spearman"] == pytest.approx(1.0)
    assert same["top_quarter_overlap"] == 1.0 and same["top_quarter"] == 2
    flipped = small(
        gate_mass=((0.25, 0.25, 0.5), (0.6, 0.2, 0.2)),
        selection=((0.5, 0.5, 1.0), (0.75, 0.5, 0.75)),
    )
    result = agreement(small(), flipped)
    assert result["spearman"] < 0 and result["top_quarter_overlap"] == 0.0


# -- errors and CLI ------------------------------------------------------------------------------


def dense_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "dense"
    shutil.copytree(BUILTIN_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mlp_only_layers"] = [0, 1, 2, 3]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_dense_model_has_no_rankings(tmp_path):
    with pytest.raises(NoExpertsError, match="dense"):
        analyze(dense_copy(tmp_path))


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MESH_NODE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "mesh_node", "moe", "analyze", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_prints_json(tmp_path):
    result = run_cli("builtin", "--micro", "--json", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["kind"] == "micro" and document["from_cache"] is False
    assert document["layers"] == [0, 1, 2, 3] and len(document["rankings"]["0"]) == 8
    assert document["fingerprint"] == checkpoint_fingerprint(BUILTIN_DIR)
    assert (tmp_path / "rankings" / f"{document['fingerprint']}-micro.msgpack").is_file()


def test_cli_table_from_the_cache(cache_home, micro, capsys):
    from mesh_node.cli.main import main

    save(micro)
    assert main(["moe", "analyze", "builtin"]) == 0
    out = capsys.readouterr().out
    assert "from cache" in out and micro.fingerprint in out and micro.digest() in out
    assert out.count("layer ") == 4
    hottest = micro.ranking(0)[0]
    assert f"{hottest}:{100 * micro.gate_mass[0][hottest]:.1f}%" in out


def test_cli_errors_exit_2_without_a_traceback(tmp_path, cache_home, capsys):
    from mesh_node.cli.main import main

    for model in (str(tmp_path / "missing"), str(dense_copy(tmp_path))):
        assert main(["moe", "analyze", model, "--full"]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("mesh-node moe analyze: ") and not captured.out


def test_fingerprint_changes_when_a_tensor_is_reshaped_over_the_same_bytes(tmp_path):
    """The safetensors header is in the fingerprint: a checkpoint whose tensor has another
    shape is another model, though its file size and data bytes are identical."""
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text('{"model_type": "tiny"}')
    weight = torch.arange(32, dtype=torch.float32)
    save_file({"w": weight.reshape(4, 8)}, tmp_path / "model.safetensors")
    original = checkpoint_fingerprint(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    save_file({"w": weight.reshape(8, 4)}, tmp_path / "model.safetensors")
    reshaped = (tmp_path / "model.safetensors").read_bytes()
    assert len(reshaped) == len(raw) and reshaped[-128:] == raw[-128:]  # only the header differs
    assert checkpoint_fingerprint(tmp_path) != original
