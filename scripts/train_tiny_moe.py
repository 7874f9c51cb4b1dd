"""Train the built-in tiny MoE model from scratch on a synthetic chat corpus (CPU, minutes).

    nice -n 10 python scripts/train_tiny_moe.py --out mesh_node/engine/builtin

What it does, deterministically for a seed:
1. draws a synthetic chat corpus from `mesh_node.engine.builtin_skills` (addition, word reversal,
   letter sorting, letter counting), never using a held-out prompt;
2. trains a byte-level BPE tokenizer (`tokenizers`) with single-digit tokens and a chat template;
3. trains a small qwen3_moe model (transformers' reference implementation) with the loss on the
   assistant answers only, plus the router load-balancing loss so that all experts are used;
4. saves a Hugging Face folder (config.json, model.safetensors, tokenizer files, chat template)
   and prints the wall time and the teacher-forced exact match on held-out prompts (which equals
   greedy exact match: greedy decoding reproduces the answer iff every answer token is the argmax).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh_node.engine import builtin_skills

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_text(prompt: str, answer: str | None = None) -> str:
    text = f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n"
    return text if answer is None else f"{text}{answer}<|end|>\n"


def train_tokenizer(seed: int, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    skills = list(builtin_skills.SKILLS)
    texts = []
    for i in range(40_000):
        example = builtin_skills.sample(skills[i % len(skills)], rng, held_out=False)
        texts.append(chat_text(example.prompt, example.answer))
    texts.append("You are a helpful assistant. The system says hello.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )
    fast.save_pretrained(str(out))
    # A class name every transformers release knows (v5 writes its own backend name).
    config_path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return fast


def make_batch(
    tokenizer, rng: random.Random, batch_size: int, held_out: bool, addition_weight: float
):
    """A batch of chat examples; addition (the skill that takes longest to learn: carries) is
    drawn `addition_weight` times as often as each other skill."""
    skills = list(builtin_skills.SKILLS)
    weights = [addition_weight if skill == "addition" else 1.0 for skill in skills]
    rows, labels = [], []
    for _ in range(batch_size):
        skill = rng.choices(skills, weights)[0]
        example = builtin_skills.sample(skill, rng, held_out=held_out)
        prompt_ids = tokenizer.encode(chat_text(example.prompt), add_special_tokens=False)
        answer_ids = tokenizer.encode(f"{example.answer}<|end|>", add_special_tokens=False)
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return input_ids, label_ids


@torch.no_grad()
def held_out_accuracy(model, tokenizer, per_skill: int) -> dict[str, float]:
    """Teacher-forced exact match: every answer token (and the end token) must be the argmax."""
    model.eval()
    by_skill: dict[str, list[bool]] = {}
    examples = builtin_skills.held_out_set(per_skill)
    for start in range(0, len(examples), 256):
        chunk = examples[start : start + 256]
        rows, spans = [], []
        for example in chunk:
            prompt_ids = tokenizer.encode(chat_text(example.prompt), add_special_tokens=False)
            answer_ids = tokenizer.encode(f"{example.answer}<|end|>", add_special_tokens=False)
            rows.append(prompt_ids + answer_ids)
            spans.append((len(prompt_ids), answer_ids))
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        predicted = model(input_ids=input_ids).logits.argmax(-1)
        for row, (example, (offset, answer_ids)) in enumerate(zip(chunk, spans, strict=True)):
            got = predicted[row, offset - 1 : offset - 1 + len(answer_ids)].tolist()
            by_skill.setdefault(example.skill, []).append(got == answer_ids)
    model.train()
    return {skill: sum(v) / len(v) for skill, v in by_skill.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("mesh_node/engine/builtin"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=640)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=256)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1 stays fast beside other work on a small shared CPU)",
    )
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--addition-weight", type=float, default=2.0)
    args = parser.parse_args()

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix="tiny-moe-"))
    tokenizer = train_tokenizer(args.seed, args.vocab_size, staging)
    print(f"tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - started:.0f}s)", flush=True)

    head_dim = 32
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden_size // head_dim,
        num_key_value_heads=max(1, args.hidden_size // head_dim // 2),
        head_dim=head_dim,
        moe_intermediate_size=args.expert_size,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3MoeForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, args.steps // 30)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(args.seed + 1)
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        input_ids, labels = make_batch(
            tokenizer, rng, args.batch_size, held_out=False, addition_weight=args.addition_weight
        )
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step:5d}  loss {loss.item():.4f}  {elapsed:6.0f}s", flush=True)
        if args.eval_every and step and step % args.eval_every == 0:
            print(f"  held-out exact match: {held_out_accuracy(model, tokenizer, 100)}", flush=True)

    accuracy = held_out_accuracy(model, tokenizer, 250)
    elapsed = time.perf_counter() - started
    overall = sum(accuracy.values()) / len(accuracy)
    print(f"held-out exact match (teacher-forced = greedy): {accuracy} overall {overall:.3f}")
    print(f"training wall time: {elapsed / 60:.1f} min")

    model.config.output_router_logits = False
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(staging))
    # transformers v5 writes the expert count as `num_local_experts`; older releases read
    # `num_experts` (the name in Qwen's own checkpoints): write both
    config_path = staging / "config.json"
    saved = json.loads(config_path.read_text())
    saved["num_experts"] = args.experts
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in staging.iterdir():
        shutil.copy2(path, args.out / path.name)
    training = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "addition_weight": args.addition_weight,
        "parameters": params,
        "wall_time_s": round(elapsed, 1),
        "teacher_forced_held_out_exact_match": accuracy,
    }
    (args.out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    shutil.rmtree(staging)
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
