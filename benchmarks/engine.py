"""Engine throughput beside transformers' `generate()`, measured in the same run.

    nice -n 10 python benchmarks/engine.py [--record] [--skip-large | --skip-small]
                                            [--device cpu|cuda]

Models: (a) the built-in tiny MoE model (float32, the CPU default for tiny models); (b) a
random-weight MoE with OLMoE-like proportions (64 experts, top-8, QK-norm, ~1.8 B parameters) in
bfloat16, generated on the fly and saved as a safetensors checkpoint that both runtimes load.

Figures, all through the public APIs (our `Generator`, transformers' `generate()`):
- prefill tokens/s: prompt tokens / time to produce the first token;
- decode tokens/s at batch 1: N / (time for N+1 tokens - time for 1 token);
- aggregate decode tokens/s with 8 concurrent streams: 8 N / (the same difference with 8 requests
  submitted together; transformers gets one batched `generate()` of the 8 prompts).
Each time is the best of `--repeats` runs. Every measurement runs in a fresh child process, so
neither runtime inherits the other's thread pools or allocator state.
For (b), decode is also given as a fraction of the memory-bandwidth roofline: active weight bytes
per token x tokens/s / copy bandwidth measured in this run (2 x bytes / time of a 1 GiB copy).
`--record` writes the figures into the `## Engine` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
STREAMS = 8
sys.path.insert(0, str(ROOT))


@dataclass
class Figures:
    prefill: float
    decode: float
    streams: float


# -- measurements (each runs in a child process) --------------------------------------------------


def copy_bandwidth(device: str) -> dict:
    """GB/s of a 1 GiB tensor copy, counting bytes read + written; best of 6."""
    import torch

    source = torch.ones(1 << 29, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(6):
        if source.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        target.copy_(source)
        if source.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return {"bandwidth_gbs": 2 * source.numel() * source.element_size() / best / 1e9}


def gemv_ceiling(device: str) -> dict:
    """GB/s of weights streamed by the engine's bf16 matrix-vector kernel (the layout it picks: our
    native kernels on CPUs with AVX512-BF16, else oneDNN's packed linear): 512 MB of distinct
    1024 x 1024 matrices, one row vector, best of 5.
    Runs on a worker thread, as the engine does."""
    import threading

    import torch

    result = {}

    def measure() -> None:
        from mesh_node.engine.linear import Weight, choose_layout

        layout = choose_layout(torch.device(device), torch.bfloat16)
        count = 256
        weights = [
            Weight(torch.randn(1024, 1024, dtype=torch.bfloat16, device=device), layout)
            for _ in range(count)
        ]
        x = torch.randn(1, 1024, dtype=torch.bfloat16, device=device)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for weight in weights:
                weight(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        result["gemv_gbs"] = count * 1024 * 1024 * 2 / best / 1e9
        result["layout"] = layout

    thread = threading.Thread(target=measure)
    thread.start()
    thread.join()
    return result


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(count)]


def figures(run, vocab: int, spec: dict, repeats: int) -> dict:
    """run(batch of prompts, new tokens) -> None, timed into the three figures."""
    long_prompt = prompts(1, spec["prefill"], vocab, 1)
    prefill = spec["prefill"] / best_time(lambda: run(long_prompt, 1), repeats)
    new = spec["new_tokens"]
    one = prompts(1, spec["prompt"], vocab, 2)
    decode = new / (
        best_time(lambda: run(one, new + 1), repeats) - best_time(lambda: run(one, 1), repeats)
    )
    many = prompts(STREAMS, spec["prompt"], vocab, 3)
    streams = (
        STREAMS
        * new
        / (
            best_time(lambda: run(many, new + 1), repeats)
            - best_time(lambda: run(many, 1), repeats)
        )
    )
    return {"prefill": prefill, "decode": decode, "streams": streams}


def measure_ours(folder: str, dtype: str, device: str, spec: dict, repeats: int) -> dict:
    from mesh_node.engine.generator import GenerationRequest, Generator
    from mesh_node.engine.sampling import SamplingParams

    generator = Generator.from_pretrained(
        folder, device=device, dtype=dtype, max_seq_len=1024, max_batch=STREAMS
    )

    def run(batch: list[list[int]], tokens: int) -> None:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        streams = [
            generator.submit(GenerationRequest(prompt_ids=p, sampling=params)) for p in batch
        ]
        for stream in streams:
            assert len(stream.result().token_ids) == tokens

    try:
        result = figures(run, generator.model.args.vocab_size, spec, repeats)
        counts = generator.model.args.parameter_count()
        result.update(
            active_bytes=counts["active"] * generator.model.dtype.itemsize,
            parameters=counts["total"],
            active_parameters=counts["active"],
            threads=generator.threads,
        )
        return result
    finally:
        generator.close()


def measure_transformers(folder: str, dtype: str, device: str, spec: dict, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def run(batch: list[list[int]], tokens: int) -> None:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor(batch, device=device), max_new_tokens=tokens, do_sample=False
            )
        assert out.shape[1] == len(batch[0]) + tokens

    return figures(run, model.config.vocab_size, spec, repeats)


def build_olmoe_like(folder: str, layers: int) -> dict:
    """A random-weight OLMoE-shaped checkpoint in bfloat16 (OLMoE-1B-7B scaled to ~1.8 B)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    config = AutoConfig.for_model(
        "olmoe",
        vocab_size=50304,
        hidden_size=1024,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(folder)
    # a word-level tokenizer covering every id (token i reads "<i>")
    raw = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(50304)}, unk_token="<0>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<1>").save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def child(args: argparse.Namespace) -> int:
    spec = json.loads(args.spec) if args.spec else {}
    if args.child == "bandwidth":
        result = copy_bandwidth(args.device)
    elif args.child == "gemv":
        result = gemv_ceiling(args.device)
    elif args.child == "build":
        result = build_olmoe_like(args.model, args.layers)
    elif args.child == "ours":
        result = measure_ours(args.model, args.dtype, args.device, spec, args.repeats)
    else:
        result = measure_transformers(args.model, args.dtype, args.device, spec, args.repeats)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# -- orchestration ------------------------------------------------------------------------------


def in_child(kind: str, args: argparse.Namespace, **extra) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--layers",
        str(args.layers),
    ]
    for key, value in extra.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{kind} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def table(rows: list[tuple[str, Figures, Figures]]) -> str:
    lines = [
        "| model | figure | mesh-node | transformers generate() | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, mine, theirs in rows:
        for label, attr in (
            ("prefill tokens/s", "prefill"),
            ("decode tokens/s, batch 1", "decode"),
            (f"decode tokens/s, {STREAMS} streams (aggregate)", "streams"),
        ):
            a, b = getattr(mine, attr), getattr(theirs, attr)
            lines.append(f"| {name} | {label} | {a:,.1f} | {b:,.1f} | {a / b:.2f}x |")
    return "\n".join(lines)


def record(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find("## Engine")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end < 0 else text[end:])
    RESULTS.write_text(text.rstrip("\n") + "\n")


def figures_of(result: dict) -> Figures:
    return Figures(result["prefill"], result["decode"], result["streams"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip-large", action="store_true", help="only the built-in model")
    parser.add_argument("--skip-small", action="store_true", help="only the OLMoE-like model")
    parser.add_argument("--layers", type=int, default=16, help="layers of the OLMoE-like model")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing (best is kept)")
    parser.add_argument("--record", action="store_true", help="write benchmarks/RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from mesh_node.engine.catalog import BUILTIN_DIR

    bandwidth = in_child("bandwidth", args)["bandwidth_gbs"]
    gemv_result = in_child("gemv", args)
    gemv, layout = gemv_result["gemv_gbs"], gemv_result["layout"]
    print(
        f"copy bandwidth: {bandwidth:.1f} GB/s; bf16 GEMV kernel ({layout}): {gemv:.1f} GB/s",
        flush=True,
    )
    rows: list[tuple[str, Figures, Figures]] = []
    notes: list[str] = []

    if not args.skip_small:
        tiny = {"prefill": 128, "prompt": 16, "new_tokens": 128}
        mine = in_child("ours", args, model=str(BUILTIN_DIR), dtype="float32", spec=tiny)
        theirs = in_child("transformers", args, model=str(BUILTIN_DIR), dtype="float32", spec=tiny)
        rows.append(("(a) built-in tiny MoE, fp32", figures_of(mine), figures_of(theirs)))
        print(table(rows[-1:]), flush=True)
        notes.append(
            f"(a) {STREAMS} streams vs 1 stream (mesh-node): "
            f"{mine['streams'] / mine['decode']:.2f}x "
            f"(transformers: {theirs['streams'] / theirs['decode']:.2f}x)"
        )

    if not args.skip_large:
        with tempfile.TemporaryDirectory(prefix="olmoe-like-") as folder:
            started = time.perf_counter()
            in_child("build", args, model=folder)
            print(f"built the OLMoE-like checkpoint in {time.perf_counter() - started:.0f}s")
            large = {"prefill": 256, "prompt": 16, "new_tokens": 32}
            mine = in_child("ours", args, model=folder, dtype="bfloat16", spec=large)
            theirs = in_child("transformers", args, model=folder, dtype="bfloat16", spec=large)
        name = f"(b) OLMoE-like {mine['parameters'] / 1e9:.2f} B, bf16"
        rows.append((name, figures_of(mine), figures_of(theirs)))
        print(table(rows[-1:]), flush=True)
        roofline = bandwidth * 1e9 / mine["active_bytes"]
        notes.append(
            f"(b) {mine['parameters'] / 1e9:.2f} B parameters, "
            f"{mine['active_parameters'] / 1e6:.0f} M active per token "
            f"({mine['active_bytes'] / 1e6:.0f} MB of bf16 weights read per decoded token); "
            f"roofline at {bandwidth:.1f} GB/s: {roofline:.1f} tokens/s; batch-1 decode reaches "
            f"{mine['decode'] / roofline:.0%} of it "
            f"(transformers: {theirs['decode'] / roofline:.0%}). For scale, the engine's bf16 "
            f"matrix-vector kernel ({layout} layout) streams weights at {gemv:.1f} GB/s "
            f"({gemv / bandwidth:.0%} of the copy bandwidth; measured in this run): decode "
            f"reaches {mine['decode'] * mine['active_bytes'] / 1e9 / gemv:.0%} of that ceiling"
        )

    report = table(rows)
    for note in notes:
        print(note)
    if args.record:
        import torch

        section = (
            "## Engine\n\n"
            f"`nice -n 10 python benchmarks/engine.py --record` on {args.device} "
            f"({platform.machine()}, {torch.get_num_threads()} cores, torch {torch.__version__}); "
            f"copy bandwidth measured in the same run: {bandwidth:.1f} GB/s (bf16 GEMV kernel, "
            f"{layout} layout: {gemv:.1f} GB/s). Best of "
            f"{args.repeats} runs per timing; each runtime measured in its own process.\n\n"
            f"{report}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        )
        record(section)
        print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
