"""Partial loading (layers, experts, trunk), resident bytes, sharded checkpoints, and the errors
promised for unsupported, incomplete and corrupt checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mesh_node.engine.checkpoint import Checkpoint
from mesh_node.engine.config import ModelArgs
from mesh_node.engine.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingTensorError,
    TensorShapeError,
    UnsupportedArchitectureError,
)
from mesh_node.engine.experts import ExpertNotLoadedError
from mesh_node.engine.loading import LoadPlan, load_model, resolve_dtype
from mesh_node.engine.moe import MoELayer


def read_all(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def expert_tensor_names(layer: int, expert: int) -> list[str]:
    prefix = f"model.layers.{layer}.mlp.experts.{expert}."
    return [f"{prefix}{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_subset_of_layers_and_experts_loads_exactly_those_tensors(references, fused):
    folder, _ = references.get("qwen3_moe", fused)
    tensors = read_all(folder)
    plan = LoadPlan(layers=(0, 2), experts={0: [1, 4], 2: [5]}, embeddings=False, head=True)
    model = load_model(folder, plan=plan, dtype=torch.float32, device="cpu")
    read = model.load_report.tensors_read

    expected: list[tuple[str, int | None]] = []
    for layer, experts in ((0, [1, 4]), (2, [5])):
        trunk = [
            n for n in tensors if n.startswith(f"model.layers.{layer}.") and "experts" not in n
        ]
        expected += [(n, None) for n in trunk]
        for e in experts:
            if fused:
                expected += [
                    (f"model.layers.{layer}.mlp.experts.{p}", e)
                    for p in ("gate_up_proj", "down_proj")
                ]
            else:
                expected += [(n, None) for n in expert_tensor_names(layer, e)]
    expected += [("model.norm.weight", None), ("lm_head.weight", None)]
    assert sorted(read) == sorted(expected)
    assert len(read) == len(set(read))  # each read once

    def nbytes(name, index):
        tensor = tensors[name] if index is None else tensors[name][index]
        return tensor.numel() * 4

    assert model.load_report.weight_bytes == sum(nbytes(n, i) for n, i in expected)
    assert model.weight_bytes() == model.load_report.weight_bytes

    # the bank holds exactly the chosen experts' weights
    bank = model.layers["0"].mlp.experts
    assert bank.expert_ids == (1, 4)
    for j, e in enumerate((1, 4)):
        if fused:
            gate_up = tensors["model.layers.0.mlp.experts.gate_up_proj"][e]
            down = tensors["model.layers.0.mlp.experts.down_proj"][e]
        else:
            gate, up, down = (tensors[n] for n in expert_tensor_names(0, e))
            gate_up = torch.cat([gate, up])
        assert torch.equal(bank.gate_up.dense(j), gate_up)
        assert torch.equal(bank.down.dense(j), down)
    assert model.embed_tokens is None
    assert sorted(model.layers) == ["0", "2"]


def test_trunk_holds_everything_but_routed_experts(references):
    folder, _ = references.get("qwen2_moe")  # shared experts and a dense layer are trunk
    checkpoint = Checkpoint.open(folder)
    model = load_model(folder, plan=LoadPlan.trunk(), dtype=torch.float32, device="cpu")
    names = {name for name, _ in model.load_report.tensors_read}
    routed = {n for n in checkpoint.tensors if ".experts." in n}
    assert names == set(checkpoint.tensors) - routed
    assert model.weight_bytes() == sum(checkpoint.tensors[n].nbytes for n in names)
    counts = checkpoint.args.parameter_count()
    assert model.weight_bytes() == counts["trunk"] * 4
    full = load_model(folder, dtype=torch.float32, device="cpu")
    assert full.weight_bytes() == checkpoint.nbytes == counts["total"] * 4


def test_missing_expert_is_reported_when_a_token_routes_to_it(references):
    folder, _ = references.get("olmoe")
    model = load_model(folder, plan=LoadPlan(experts=[0]), dtype=torch.float32, device="cpu")
    cache = model.new_cache(1, 32)
    with pytest.raises(ExpertNotLoadedError, match=r"expert \d+ of layer \d+ is not loaded here"):
        model(torch.tensor([list(range(20))]), torch.arange(20)[None], cache)


def test_layer_ranges_compose_into_the_full_model(references):
    folder, _ = references.get("mixtral")
    full = load_model(folder, dtype=torch.float32, device="cpu", max_seq_len=32)
    first = load_model(
        folder,
        plan=LoadPlan(layers=(0,), head=False),
        dtype=torch.float32,
        device="cpu",
        max_seq_len=32,
    )
    rest = load_model(
        folder,
        plan=LoadPlan(layers=(1, 2), embeddings=False),
        dtype=torch.float32,
        device="cpu",
        max_seq_len=32,
    )
    tokens = torch.tensor([[5, 9, 200, 31, 7]])
    positions = torch.arange(5)[None]
    expected = full(tokens, positions, full.new_cache(1))
    with torch.inference_mode():
        hidden = first.run_layers(first.embed(tokens), positions, first.new_cache(1), 0, 5)
        got = rest.head(rest.run_layers(hidden, positions, rest.new_cache(1), 0, 5))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert first.weight_bytes() + rest.weight_bytes() == full.weight_bytes()


def test_sharded_checkpoint_loads_and_matches(references, tmp_path):
    _, reference = references.get("qwen3")
    folder = tmp_path / "sharded"
    reference.save_pretrained(str(folder), max_shard_size="60KB")
    shutil.copy(references.get("qwen3")[0] / "tokenizer.json", folder)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    model = load_model(folder, dtype=torch.float32, device="cpu", max_seq_len=16)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
    got = model(tokens, torch.arange(4)[None], model.new_cache(1))
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


# -- errors -------------------------------------------------------------------------------------


@pytest.fixture
def llama_copy(references, tmp_path):
    source, _ = references.get("llama")
    folder = tmp_path / "llama"
    shutil.copytree(source, folder)
    return folder


def test_unsupported_architecture_names_the_supported_ones(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported") as info:
        load_model(llama_copy, device="cpu")
    for name in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
    ):
        assert name in str(info.value)


def test_unsupported_rope_type_is_named(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="rope type 'longrope'"):
        load_model(llama_copy, device="cpu")


def test_missing_tensor_names_tensor_and_file(llama_copy):
    tensors = read_all(llama_copy)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(llama_copy / "model.safetensors"))
    with pytest.raises(
        MissingTensorError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*model\.safetensors"
    ):
        load_model(llama_copy, device="cpu")


def test_wrong_shape_says_expected_and_got(llama_copy):
    tensors = read_all(llama_copy)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(tensors, str(llama_copy / "model.safetensors"))
    with pytest.raises(
        TensorShapeError, match=r"down_proj\.weight.*shape \[64, 95\], expected \[64, 96\]"
    ):
        load_model(llama_copy, device="cpu")


def test_truncated_safetensors_names_the_file(llama_copy):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        CorruptCheckpointError, match=r"corrupt safetensors file .*model\.safetensors.*truncated"
    ):
        load_model(llama_copy, device="cpu")


def test_garbage_safetensors_names_the_file(llama_copy):
    path = llama_copy / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(
        CorruptCheckpointError, match=r"model\.safetensors: header is not valid JSON"
    ):
        Checkpoint.open(llama_copy)
    path.write_bytes(b"abc")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        Checkpoint.open(llama_copy)


def test_missing_files_are_named(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        Checkpoint.open(llama_copy)
    (llama_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        Checkpoint.open(llama_copy)


def test_incomplete_sharded_checkpoint(references, tmp_path):
    _, reference = references.get("qwen3")
    folder = tmp_path / "sharded"
    reference.save_pretrained(str(folder), max_shard_size="60KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(
        CheckpointError, match=rf"lists shard '{shards[-1].name}', which is missing"
    ):
        Checkpoint.open(folder)
    (folder / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(CorruptCheckpointError, match="corrupt shard index"):
        Checkpoint.open(folder)


def test_moe_layers_use_expert_banks(references):
    folder, _ = references.get("qwen2_moe")
    model = load_model(folder, dtype=torch.float32, device="cpu")
    layers = list(model.moe_layers())
    assert [layer.layer for layer in layers] == [0, 2]  # layer 1 is in mlp_only_layers
    assert all(isinstance(layer, MoELayer) and layer.shared_expert is not None for layer in layers)


def test_expert_usage_counts_every_routing_decision(references):
    from mesh_node.engine.expert_usage import measure_expert_usage

    folder, _ = references.get("qwen3_moe")
    model = load_model(folder, dtype=torch.float32, device="cpu", max_seq_len=32)
    sequences = [[1, 2, 3, 4, 5], list(range(40, 60))]
    usage = measure_expert_usage(model, sequences)
    assert usage.layers == (0, 1, 2)
    assert usage.tokens == 25
    top_k = model.args.moe.top_k
    assert usage.selected.sum(1).tolist() == [25 * top_k] * 3
    assert torch.allclose(usage.gate_mass.sum(1), torch.full((3,), 25.0, dtype=torch.float64))
    ranking = usage.ranking(1)
    assert sorted(ranking) == list(range(model.args.moe.num_experts))
    masses = usage.gate_mass[1][ranking]
    assert all(masses[i] >= masses[i + 1] for i in range(len(ranking) - 1))


def test_expert_usage_counts_co_selections(references):
    from mesh_node.engine.expert_usage import measure_expert_usage

    folder, _ = references.get("qwen3_moe")
    model = load_model(folder, dtype=torch.float32, device="cpu", max_seq_len=32)
    usage = measure_expert_usage(model, [[1, 2, 3, 4, 5], list(range(40, 60))])
    top_k = model.args.moe.top_k
    co = usage.coselected
    assert co.shape == (3, usage.num_experts, usage.num_experts)
    assert torch.equal(co, co.transpose(1, 2))
    assert torch.diagonal(co, dim1=1, dim2=2).eq(0).all()
    # every token contributes k * (k - 1) ordered pairs; an expert pairs with k - 1 others
    assert co.sum((1, 2)).tolist() == [25 * top_k * (top_k - 1)] * 3
    assert torch.equal(co.sum(2), usage.selected * (top_k - 1))


def test_expert_usage_by_layer_matches_the_whole_model(references):
    from mesh_node.engine.expert_usage import measure_expert_usage, measure_expert_usage_by_layer

    folder, _ = references.get("qwen2_moe")  # with a dense layer and shared experts
    sequences = [[1, 2, 3, 4, 5], list(range(40, 60)), [9]]
    model = load_model(folder, dtype=torch.float32, device="cpu", max_seq_len=32)
    whole = measure_expert_usage(model, sequences)
    streamed = measure_expert_usage_by_layer(folder, sequences, dtype=torch.float32, device="cpu")
    assert streamed.layers == whole.layers == (0, 2)
    assert streamed.tokens == whole.tokens == 26
    assert torch.equal(streamed.selected, whole.selected)
    assert torch.equal(streamed.coselected, whole.coselected)
    assert torch.allclose(streamed.gate_mass, whole.gate_mass, atol=1e-9)


@pytest.mark.parametrize(
    ("hidden", "saved", "device", "expected"),
    [
        (64, "float32", "cpu", torch.float32),
        (64, "bfloat16", "cuda", torch.float32),  # tiny: float32 everywhere, as on every node
        (4096, "bfloat16", "cpu", torch.bfloat16),
        (4096, "float16", "cpu", torch.bfloat16),  # fp16 matmul crawls on CPUs
        (4096, "float16", "cuda", torch.float16),
        (4096, "float32", "cuda", torch.bfloat16),
    ],
)
def test_default_dtype_by_size_and_device(references, hidden, saved, device, expected):
    folder, _ = references.get("llama")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=8)
    config.update(vocab_size=32000, dtype=saved)
    args = ModelArgs.from_config(config)
    assert resolve_dtype(None, args, torch.device(device)) == expected
    assert resolve_dtype("float32", args, torch.device(device)) == torch.float32


def _raw_safetensors(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "header is not valid JSON"),  # nested past recursion
        (b'{"a": {"dtype": ["F32"], "shape": [3], "data_offsets": [0, 12]}}', "unsupported dtype"),
        (b'{"a": {"dtype": "F32", "shape": "12", "data_offsets": [0, 12]}}', "bad header entry"),
        (b'{"a": {"dtype": "F32", "shape": [-1, -3], "data_offsets": [0, 12]}}', "bad header"),
    ],
    ids=["nested", "dtype-list", "shape-string", "negative-dims"],
)
def test_a_hostile_safetensors_header_is_a_corrupt_checkpoint(llama_copy, header, why):
    _raw_safetensors(llama_copy / "model.safetensors", header, b"\0" * 12)
    with pytest.raises(CorruptCheckpointError, match=why):
        Checkpoint.open(llama_copy)


@pytest.mark.parametrize(
    "value",
    [5, ["model.safetensors"], ".", "../elsewhere/model.safetensors", None],
)
def test_a_shard_index_mapping_to_no_file_name_is_a_corrupt_checkpoint(llama_copy, value):
    index = {"weight_map": {"model.norm.weight": value}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="not a file name"):
        Checkpoint.open(llama_copy)
    (llama_copy / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptCheckpointError, match="corrupt shard index"):
        Checkpoint.open(llama_copy)


def test_a_config_nested_past_the_recursion_limit_is_a_checkpoint_error(llama_copy):
    (llama_copy / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ModelArgs.from_folder(llama_copy)


def test_quantized_checkpoints_are_refused_not_read_as_floats(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    with_quantization = {**config, "quantization_config": {"quant_method": "bitsandbytes"}}
    (llama_copy / "config.json").write_text(json.dumps(with_quantization))
    with pytest.raises(UnsupportedArchitectureError, match=r"quantized checkpoints \(bitsandbytes"):
        load_model(llama_copy, device="cpu")
    # int8 weights without a quantization_config (the codes would be read as the weights)
    (llama_copy / "config.json").write_text(json.dumps(config))
    tensors = read_all(llama_copy)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = (tensors[name] * 100).to(torch.int8)
    save_file(tensors, str(llama_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight' is stored as I8"):
        load_model(llama_copy, device="cpu")


def test_mistral_format_weights_beside_the_shards_are_not_counted_twice(llama_copy):
    size = Checkpoint.open(llama_copy).nbytes
    (llama_copy / "model.safetensors").rename(llama_copy / "model-00001-of-00001.safetensors")
    shutil.copy(
        llama_copy / "model-00001-of-00001.safetensors", llama_copy / "consolidated.safetensors"
    )
    assert Checkpoint.open(llama_copy).nbytes == size
    load_model(llama_copy, device="cpu")  # (the shards' tensor names, not Mistral's)


@pytest.mark.parametrize("eos", ['"</s>"', "[null]", "2.5", "[1, true]"])
def test_a_generation_config_with_an_unusable_eos_names_the_file(tmp_path, eos):
    from mesh_node.engine.tokenizer import _generation_config_eos

    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": {eos}}}')
    with pytest.raises(CheckpointError, match=r"generation_config\.json: eos_token_id"):
        _generation_config_eos(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")  # not an object: no eos in it
    assert _generation_config_eos(tmp_path) == set()
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    assert _generation_config_eos(tmp_path) == {2, 7}
