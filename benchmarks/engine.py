"""Engine throughput beside transformers' `generate()`, measured in the same run.

    nice -n 10 python benchmarks/engine.py [--record] [--skip-large]

Models: (a) the built-in tiny MoE model; (b) a random-weight MoE with OLMoE-like proportions
(64 experts, top-8, QK-norm, ~1.8 B parameters) in bfloat16, generated on the fly and saved as a
safetensors checkpoint that both runtimes load.

Figures (all through the public APIs: our `Generator`, transformers' `generate()`):
- prefill tokens/s: prompt tokens / time to produce the first token;
- decode tokens/s at batch 1: N / (time for N+1 tokens - time for 1 token);
- aggregate decode tokens/s with 8 concurrent streams: 8 N / (same difference with 8 streams;
  transformers gets one batched `generate()` of the 8 prompts).
For (b), decode is also given as a fraction of the memory-bandwidth roofline: active weight bytes
per token x tokens/s / copy bandwidth measured in this run (2 x bytes / time of a 1 GiB copy).
`--record` writes the figures into the `## Engine` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.engine.generator import GenerationRequest, Generator
from mesh_node.engine.loading import load_model
from mesh_node.engine.sampling import SamplingParams
from mesh_node.engine.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
STREAMS = 8


@dataclass
class Figures:
    prefill: float
    decode: float
    streams: float


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 1 GiB tensor copy, counting bytes read + written; best of 5."""
    source = torch.ones(1 << 29, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * source.element_size() / best / 1e9


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(10, vocab - 10, (length,), generator=generator).tolist() for _ in range(count)
    ]


def ours(
    generator: Generator, prefill_len: int, decode_len: int, new_tokens: int, repeats: int
) -> Figures:
    vocab = generator.model.args.vocab_size

    def run(batch: list[list[int]], tokens: int) -> None:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        streams = [
            generator.submit(GenerationRequest(prompt_ids=p, sampling=params)) for p in batch
        ]
        for stream in streams:
            assert len(stream.result().token_ids) == tokens

    long_prompt = prompts(1, prefill_len, vocab, 1)
    prefill = prefill_len / timed(lambda: run(long_prompt, 1), repeats)
    one = prompts(1, decode_len, vocab, 2)
    decode = new_tokens / (
        timed(lambda: run(one, new_tokens + 1), repeats) - timed(lambda: run(one, 1), repeats)
    )
    many = prompts(STREAMS, decode_len, vocab, 3)
    streams = (
        STREAMS
        * new_tokens
        / (timed(lambda: run(many, new_tokens + 1), repeats) - timed(lambda: run(many, 1), repeats))
    )
    return Figures(prefill, decode, streams)


def reference(
    model, vocab: int, prefill_len: int, decode_len: int, new_tokens: int, repeats: int
) -> Figures:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def run(batch: list[list[int]], tokens: int) -> None:
        with torch.inference_mode():
            out = model.generate(torch.tensor(batch), max_new_tokens=tokens, do_sample=False)
        assert out.shape[1] == len(batch[0]) + tokens

    long_prompt = prompts(1, prefill_len, vocab, 1)
    prefill = prefill_len / timed(lambda: run(long_prompt, 1), repeats)
    one = prompts(1, decode_len, vocab, 2)
    decode = new_tokens / (
        timed(lambda: run(one, new_tokens + 1), repeats) - timed(lambda: run(one, 1), repeats)
    )
    many = prompts(STREAMS, decode_len, vocab, 3)
    streams = (
        STREAMS
        * new_tokens
        / (timed(lambda: run(many, new_tokens + 1), repeats) - timed(lambda: run(many, 1), repeats))
    )
    return Figures(prefill, decode, streams)


def save_word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer covering every id of a random model (token i reads "<i>")."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<0>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<1>").save_pretrained(str(folder))


def build_olmoe_like(folder: Path, layers: int):
    """A random-weight OLMoE-shaped checkpoint in bfloat16 (OLMoE-1B-7B scaled to ~1.8 B)."""
    from transformers import AutoConfig, AutoModelForCausalLM

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
    model.save_pretrained(str(folder))
    save_word_tokenizer(folder, config.vocab_size)
    return model


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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip-large", action="store_true", help="only the built-in model")
    parser.add_argument("--layers", type=int, default=16, help="layers of the OLMoE-like model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="write benchmarks/RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    from transformers import AutoModelForCausalLM

    bandwidth = copy_bandwidth(device)
    threads = torch.get_num_threads()
    print(f"copy bandwidth: {bandwidth:.1f} GB/s; torch {torch.__version__}, {threads} threads")
    rows = []

    # (a) the built-in model, float32 (tiny models default to it on CPU)
    tiny = load_model(BUILTIN_DIR, device=device)
    with Generator(tiny, Tokenizer(BUILTIN_DIR), max_batch=STREAMS) as generator:
        mine = ours(generator, prefill_len=128, decode_len=16, new_tokens=128, repeats=args.repeats)
    hf = AutoModelForCausalLM.from_pretrained(str(BUILTIN_DIR), dtype=tiny.dtype).to(device).eval()
    theirs = reference(hf, tiny.args.vocab_size, 128, 16, 128, args.repeats)
    rows.append(("(a) built-in tiny MoE, fp32", mine, theirs))
    print(table(rows[-1:]), flush=True)
    notes = [f"(a) 8 streams vs 1 stream (mesh-node): {mine.streams / mine.decode:.2f}x"]
    del hf

    if not args.skip_large:
        with tempfile.TemporaryDirectory(prefix="olmoe-like-") as tmp:
            folder = Path(tmp)
            started = time.perf_counter()
            hf = build_olmoe_like(folder, args.layers).to(device)
            print(f"built the OLMoE-like checkpoint in {time.perf_counter() - started:.0f}s")
            large = load_model(folder, dtype=torch.bfloat16, device=device, max_seq_len=1024)
            counts = large.args.parameter_count()
            active_bytes = counts["active"] * 2
            with Generator(large, Tokenizer(folder), max_batch=STREAMS) as generator:
                mine = ours(
                    generator, prefill_len=256, decode_len=16, new_tokens=32, repeats=args.repeats
                )
            theirs = reference(hf, large.args.vocab_size, 256, 16, 32, args.repeats)
            roofline = bandwidth * 1e9 / active_bytes
            name = f"(b) OLMoE-like {counts['total'] / 1e9:.2f} B, bf16"
            rows.append((name, mine, theirs))
            print(table(rows[-1:]), flush=True)
            notes.append(
                f"(b) {counts['total'] / 1e9:.2f} B parameters, {counts['active'] / 1e6:.0f} M "
                f"active per token ({active_bytes / 1e6:.0f} MB of bf16 weights read per decoded "
                f"token); roofline at {bandwidth:.1f} GB/s: {roofline:.1f} tokens/s; batch-1 "
                f"decode reaches {mine.decode / roofline:.0%} of it (transformers: "
                f"{theirs.decode / roofline:.0%})"
            )
            del hf, large

    report = table(rows)
    for note in notes:
        print(note)
    if args.record:
        cpu = platform.processor() or platform.machine()
        section = (
            "## Engine\n\n"
            f"`nice -n 10 python benchmarks/engine.py --record` on {device.type} ({cpu}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}); copy bandwidth "
            f"measured in the same run: {bandwidth:.1f} GB/s.\n\n"
            f"{report}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        )
        record(section)
        print(f"recorded in {RESULTS}")
    print(json.dumps({"bandwidth_gbs": bandwidth}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
