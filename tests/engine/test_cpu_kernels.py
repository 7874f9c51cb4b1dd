"""Native bf16 CPU kernels (`mesh_node.engine.cpu_kernels`): against torch, and their fallbacks."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from mesh_node.engine import cpu_kernels
from mesh_node.engine.experts import ExpertBank, ExpertNotLoadedError
from mesh_node.engine.linear import WeightStack, choose_layout
from mesh_node.engine.loading import load_model
from mesh_node.engine.moe import MoELayer

ROOT = Path(__file__).resolve().parents[2]
BF16 = torch.bfloat16

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.cpu_supports_bf16(), reason="this CPU lacks AVX512-BF16 (no native kernels)"
)


@pytest.fixture(scope="module")
def kernels():
    if not cpu_kernels.cpu_supports_bf16():
        pytest.skip("this CPU lacks AVX512-BF16 (no native kernels)")
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler to build the native kernels")
    assert cpu_kernels.available(), "AVX512-BF16 CPU with a compiler: the kernels must load"
    return cpu_kernels


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(BF16)


def within_one_rounding(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """bf16 results of float32 sums: at most one bf16 rounding (plus float32 summation-order
    noise) from the exact values."""
    return bool(torch.allclose(got.float(), exact, rtol=2**-8, atol=1e-3))


@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 70, 1000, 1030])
@pytest.mark.parametrize("out", [1, 3, 63, 64, 65, 300])
def test_linear_matches_f_linear(kernels, n, out):
    weight, bias = randn(out, n, seed=1), randn(out, seed=2)
    for rows in (1, 2, 4, 5, 11, cpu_kernels.MAX_ROWS):
        x = randn(rows, n, seed=rows)
        exact = F.linear(x.float(), weight.float())
        got = kernels.linear(x, weight)
        assert got.dtype == BF16 and got.shape == (rows, out)
        assert within_one_rounding(got, exact), (got.float() - exact).abs().max()
        exact = F.linear(x.float(), weight.float(), bias.float())
        assert within_one_rounding(kernels.linear(x, weight, bias), exact)


def test_linear_keeps_leading_dimensions_and_reads_non_contiguous_rows(kernels):
    weight = randn(96, 130, seed=3)
    x = randn(2, 3, 260, seed=4)[..., ::2]  # [2, 3, 130], not contiguous
    got = kernels.linear(x, weight)
    assert got.shape == (2, 3, 96)
    assert within_one_rounding(got, F.linear(x.float(), weight.float()))


def test_results_do_not_depend_on_the_thread_count(kernels):
    weight, x = randn(700, 1024, seed=5), randn(4, 1024, seed=6)  # large enough to run parallel
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear(x, weight)
        torch.set_num_threads(2)
        two = kernels.linear(x, weight)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def reference_bank(bank: ExpertBank, x, chosen, weights) -> torch.Tensor:
    """The engine's torch path for one token: run_grouped on k rows, float32 weighted sum."""
    outputs = bank.run_grouped(x.expand(len(chosen), -1), chosen.tolist(), [1] * len(chosen))
    return torch.mm(weights[None].float(), outputs.float())


@pytest.mark.parametrize(
    ("hidden", "inter", "count", "k"), [(40, 24, 6, 3), (100, 50, 8, 8), (1024, 512, 64, 8)]
)
def test_moe_token_matches_the_expert_bank(kernels, hidden, inter, count, k):
    gate_up = randn(count, 2 * inter, hidden, seed=7) / 4
    down = randn(count, hidden, inter, seed=8) / 4
    native = ExpertBank(0, range(count), gate_up, down, layout="native")
    plain = ExpertBank(0, range(count), gate_up, down, layout="plain")
    assert native.runs_tokens_whole(count) and not plain.runs_tokens_whole(count)
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        x = randn(1, hidden, seed=seed + 10)
        chosen = torch.randperm(count, generator=generator)[:k]
        weights = torch.rand(k, generator=generator)
        expected = reference_bank(plain, x, chosen, weights)
        got = native.run_token(x, chosen, weights)
        assert got.dtype == BF16 and got.shape == (1, hidden)
        # same roundings as the torch ops; only float32 summation order differs
        error = (got.float() - expected).abs().max()
        assert error <= 2**-7 * expected.abs().max(), error


def test_one_token_weighted_call_is_fused_on_a_partial_bank(kernels, monkeypatch):
    """An expert peer's one-token call (run_weighted, float32 answer) on some of a layer's
    experts: one fused kernel call, the same values as the per-expert torch path."""
    hidden, inter = 64, 40
    ids = [9, 2, 30, 17, 5]
    gate_up = randn(len(ids), 2 * inter, hidden, seed=3) / 4
    down = randn(len(ids), hidden, inter, seed=4) / 4
    native = ExpertBank(1, ids, gate_up, down, "native")
    plain = ExpertBank(1, ids, gate_up, down, "plain")
    fused = mock.Mock(wraps=cpu_kernels.moe_token)
    monkeypatch.setattr(cpu_kernels, "moe_token", fused)
    x = randn(1, hidden, seed=11)
    for chosen in ([30, 2, 5], [17], [5, 9, 2, 30, 17]):
        weights = torch.rand(len(chosen), generator=torch.Generator().manual_seed(len(chosen)))
        token_of = torch.zeros(len(chosen), dtype=torch.long)
        counts = [1] * len(chosen)
        got = native.run_weighted(x, chosen, counts, token_of, weights)
        expected = plain.run_weighted(x, chosen, counts, token_of, weights)
        assert got.dtype == torch.float32 and got.shape == (1, hidden)
        assert (got - expected).abs().max() <= 2**-7 * expected.abs().max()
    assert fused.call_count == 3
    # several tokens, or an expert this bank lacks: the grouped path (which names the expert)
    rows = randn(2, hidden, seed=12)
    two = native.run_weighted(rows, [2, 9], [1, 1], torch.tensor([0, 1]), torch.ones(2))
    assert two.shape == (2, hidden) and fused.call_count == 3
    with pytest.raises(ExpertNotLoadedError, match="expert 4 of layer 1"):
        native.run_weighted(x, [2, 4], [1, 1], torch.zeros(2, dtype=torch.long), torch.ones(2))
    assert fused.call_count == 3


def test_a_partial_bank_keeps_the_grouped_path(kernels):
    gate_up, down = randn(3, 48, 40, seed=1), randn(3, 40, 24, seed=2)
    assert not ExpertBank(0, [0, 1, 2], gate_up, down, "native").runs_tokens_whole(4)
    assert not ExpertBank(0, [0, 2, 1], gate_up, down, "native").runs_tokens_whole(3)


@pytest.mark.parametrize("normalize", [False, True])
def test_moe_layer_native_matches_the_torch_layout(kernels, normalize):
    hidden, inter, count, k = 72, 40, 10, 4
    router, gate_up = randn(count, hidden, seed=1), randn(count, 2 * inter, hidden, seed=2)
    down = randn(count, hidden, inter, seed=3)

    def layer(layout: str) -> MoELayer:
        bank = ExpertBank(0, range(count), gate_up, down, layout=layout)
        return MoELayer(0, router, k, normalize, bank, layout=layout)

    native, plain = layer("native"), layer("plain")
    for rows in (1, 3, 20, 70):  # one token (fused), a few (native linears), prefill (torch)
        x = randn(rows, hidden, seed=rows)
        expected, got = plain(x).float(), native(x).float()
        assert (got - expected).abs().max() <= 2**-6 * expected.abs().max()


def test_weight_stack_native_layout(kernels):
    stack = WeightStack(randn(3, 50, 33, seed=1), "native")
    x = randn(2, 33, seed=2)
    assert within_one_rounding(stack.apply(1, x), F.linear(x.float(), stack.dense(1).float()))
    many = randn(cpu_kernels.MAX_ROWS + 1, 33, seed=3)  # above MAX_ROWS: torch's F.linear
    assert torch.equal(stack.apply(2, many), F.linear(many, stack.dense(2)))


def test_bf16_model_decodes_alike_with_and_without_kernels(kernels, references, monkeypatch):
    folder, _ = references.get("qwen3_moe")
    native = load_model(folder, dtype=BF16, device="cpu", max_seq_len=64)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    fallback = load_model(folder, dtype=BF16, device="cpu", max_seq_len=64)
    assert choose_layout(torch.device("cpu"), BF16) in ("mkldnn", "plain")
    got, expected = decode_logits(native), decode_logits(fallback)
    assert (got - expected).abs().max(dim=-1).values.max() <= 0.02 * expected.abs().max()


# -- fallbacks and building (child processes: fresh caches, environment, kernel cache) ----------


CHILD = """
import json, logging, sys, torch
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
torch.set_num_threads(2)
import mesh_node.engine.generator, mesh_node.engine.loading
from mesh_node.engine import cpu_kernels
from mesh_node.engine.linear import choose_layout
assert cpu_kernels._library.cache_info().currsize == 0  # nothing built or loaded at import
layout = choose_layout(torch.device("cpu"), torch.bfloat16)
if len(sys.argv) > 1:  # decode logits of a bf16 model, saved for the parent to compare
    model = mesh_node.engine.loading.load_model(
        sys.argv[1], dtype=torch.bfloat16, device="cpu", max_seq_len=64
    )
    torch.save(decode_logits(model), sys.argv[2])
print(json.dumps({"available": cpu_kernels.available(), "layout": layout}))
"""
PROMPT = [5, 17, 3, 99, 42, 8, 61]


def decode_logits(model) -> torch.Tensor:
    cache, steps = model.new_cache(1), []
    for position, token in enumerate(PROMPT):
        steps.append(model(torch.tensor([[token]]), torch.tensor([[position]]), cache))
    return torch.cat(steps)


def run_child(tmp_path: Path, *args: str, **env: str) -> tuple[dict, str]:
    environment = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    source = "import torch\n" + inspect.getsource(decode_logits) + f"PROMPT = {PROMPT}\n" + CHILD
    done = subprocess.run(
        [sys.executable, "-c", source, *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize(
    "env", [{"MESH_NODE_NATIVE_KERNELS": "0"}, {"CC": "/nonexistent/cc"}], ids=["disabled", "no-cc"]
)
def test_fallback_to_torch_layout(tmp_path, references, monkeypatch, env):
    """Disabled or unbuildable kernels: torch's layout, with results identical to it."""
    folder, _ = references.get("qwen3_moe")
    result, stderr = run_child(tmp_path, str(folder), str(tmp_path / "logits.pt"), **env)
    assert not result["available"] and result["layout"] in ("mkldnn", "plain")
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing was built
    if "CC" in env and cpu_kernels.cpu_supports_bf16():
        assert stderr.count("no C compiler") == 1  # one warning, then torch's kernels
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch_layout = load_model(folder, dtype=BF16, device="cpu", max_seq_len=64)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), decode_logits(torch_layout))


@needs_kernels
def test_a_broken_compiler_warns_once_and_falls_back(tmp_path):
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\necho 'fake-cc: internal error' >&2\nexit 1\n")
    fake.chmod(0o755)
    result, stderr = run_child(tmp_path, CC=str(fake))
    assert not result["available"] and result["layout"] in ("mkldnn", "plain")
    assert stderr.count("native CPU kernels unavailable") == 1 and "internal error" in stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "fake-cc"]


@needs_kernels
def test_concurrent_first_builds_all_load_one_library(tmp_path):
    """Three processes (say three test nodes) starting together with an empty kernel cache."""
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    environment = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for child in children:
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result == {"available": True, "layout": "native"}
        assert "unavailable" not in stderr
    built = [p.name for p in (tmp_path / "cache" / "mesh-node" / "kernels").iterdir()]
    assert len(built) == 1 and built[0].startswith("cpu_kernels-") and built[0].endswith(".so")


def build_folders(tmp_path: Path, monkeypatch) -> Path:
    """`_build`'s two folders under `tmp_path`: the cache one made unusable (a file where its
    parent should be), so the temp-dir fallback is the one tried. Returns that fallback."""
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    monkeypatch.setattr(cpu_kernels.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp" / f"mesh-node-kernels-{os.getuid()}"


@pytest.mark.skipif(os.getuid() != 0, reason="making files another user owns needs root")
def test_a_library_another_user_planted_is_never_loaded(tmp_path, monkeypatch):
    """Another local user who makes the temp-dir fallback first and plants a library under our
    library's name (computable from the public source, compiler, flags and CPU) would get code
    run in the node. Neither their folder nor their file in our folder is used."""
    folder = build_folders(tmp_path, monkeypatch)
    compiler = "/nonexistent/cc"  # nothing is compiled: the planted file is all there is
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    planted = folder / cpu_kernels._library_name(compiler)
    planted.write_text("")
    os.chown(planted, 4242, 4242)
    os.chown(folder, 4242, 4242)
    with pytest.raises(OSError, match=r"mesh-node-kernels-\d+ is not a folder of this user's"):
        cpu_kernels._build(compiler)
    os.chown(folder, os.getuid(), os.getgid())
    folder.chmod(0o700)
    with pytest.raises(OSError, match=r"cpu_kernels-\w+\.so is not a file of this user's"):
        cpu_kernels._build(compiler)


@pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C compiler")
def test_a_folder_of_ours_that_others_may_write_is_tightened_before_use(tmp_path, monkeypatch):
    folder = build_folders(tmp_path, monkeypatch)
    folder.mkdir()
    folder.chmod(0o777)  # a group-writable umask, or an old release's folder
    library = cpu_kernels._build(cpu_kernels._compiler())
    assert library.parent == folder and library.name.startswith("cpu_kernels-")
    assert folder.stat().st_mode & 0o777 == 0o755
    assert library.stat().st_mode & 0o777 == 0o700 and library.stat().st_uid == os.getuid()
    assert cpu_kernels._build(cpu_kernels._compiler()) == library  # found, not built again
