"""Train the demo model: a 4-layer gpt-oss (8 experts, top-2) on synthetic harmony conversations,
then export it as moerun/data/demo (used vocabulary rows, experts packed MXFP4).

    TIKTOKEN_ENCODINGS_BASE=... .venv/bin/python scripts/train_demo.py [--steps 4800] [--seed 0]

The network is Hugging Face's GptOssForCausalLM in float32 (the oracle moerun is tested
against), so sinks, sliding windows, YaRN and the clamped SwiGLU are the real ones. The softmax
runs over the ~2k token ids the data uses plus one column standing for every other id at logit
0, which is exactly the full 201,088-way softmax of the exported model (unused rows are zero).
The last quarter of the steps trains through the export's rounding (experts MXFP4, the rest
bf16; straight-through gradients), so the shipped model is the one that was trained. One
thread and fixed seeds: the same arguments give the same bytes.
"""

import argparse
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from moerun.demo.conversations import END, sample_turns
from moerun.demo.weights import DEMO_CONFIG, ROW_TENSORS, packaged_dir, save_compact
from moerun.harmony.tokenizer import VOCAB_SIZE, load_tokenizer
from moerun.model.checkpoint import expected_tensors
from moerun.model.config import ModelConfig
from moerun.ops.mxfp4 import dequantize, quantize

Example = tuple[list[int], list[int]]  # (prompt ids, completion ids)
EXPERTS = ("gate_up_proj", "down_proj")  # HF expert weights [E, in, out]; MXFP4 along `in`


def build_examples(seed: int, n: int) -> list[Example]:
    rng = random.Random(seed)
    out: list[Example] = []
    while len(out) < n:
        out += [(t.prompt(), t.completion()) for t in sample_turns(rng, "train")]
    return out[:n]


def without_header(prompt: list[int]) -> list[int]:
    """The prompt less its system and developer messages: the conversation alone, a third of
    the length, so the warm-up learns to copy words into calls and answers three times faster."""
    end = prompt.index(END) + 1
    if prompt[end + 1 : end + 2] == load_tokenizer().encode_ordinary("developer"):
        end = prompt.index(END, end) + 1
    return prompt[end:]


def build_vocab(examples: list[Example]) -> torch.Tensor:
    """Every id the data uses, and every 1-3 digit number (tool results copy arbitrary ones)."""
    enc = load_tokenizer()
    used = {t for p, c in examples for t in p + c}
    for n in range(1000):
        used |= {*enc.encode_ordinary(str(n)), *enc.encode_ordinary(f"{n:02d}")}
        used |= set(enc.encode_ordinary(f"{n:03d}"))
    return torch.tensor(sorted(used))


def make_model(cfg: ModelConfig, vocab: int):
    """GptOssForCausalLM over `vocab` + 1 ids; id 0 is the padding / unknown token, its
    embedding fixed at zero like every unused row of the export."""
    from transformers import GptOssConfig, GptOssForCausalLM

    hf = cfg.to_hf()
    del hf["quantization_config"]
    hf.update(vocab_size=vocab + 1, pad_token_id=0, eos_token_id=None, router_aux_loss_coef=0.02)
    config = GptOssConfig(**hf)
    config._attn_implementation = "eager"  # the one with attention sinks
    return GptOssForCausalLM(config).float()


def batches(examples: list[Example], batch: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by length (little padding), in a shuffled order."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    out = []
    for start in range(0, len(order), 32 * batch):
        chunk = sorted(order[start : start + 32 * batch], key=lambda i: sum(map(len, examples[i])))
        out += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    rng.shuffle(out)
    return out


def tensors(
    group: list[Example], index: dict[int, int], rng: random.Random, drop: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [B, T], right-padded; targets -100 except on completions. A few prompt
    tokens the completion does not copy become unknown (zero embedding), as unseen words
    would be at run time."""
    T = max(len(p) + len(c) for p, c in group) - 1
    x = torch.zeros(len(group), T, dtype=torch.long)
    y = torch.full((len(group), T), -100, dtype=torch.long)
    for b, (prompt, completion) in enumerate(group):
        keep = set(completion)
        ids = [0 if t not in keep and rng.random() < drop else index[t] for t in prompt]
        ids += [index[t] for t in completion]
        x[b, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[b, len(prompt) - 1 : len(ids) - 1] = torch.tensor([index[t] for t in completion])
    return x, y


def loss_of(
    model, x: torch.Tensor, y: torch.Tensor, unused: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion NLL, the loss to minimize: NLL + router load balancing)."""
    out = model(input_ids=x, output_router_logits=True)
    logits = out.logits  # [B, T, U + 1]; column 0 stands for every unused id at logit 0
    background = torch.full_like(logits[..., :1], math.log(unused))
    logits = torch.cat([background, logits[..., 1:]], dim=-1)
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    return nll, nll + model.router_aux_loss_coef * out.aux_loss


def rounded(name: str, p: torch.Tensor) -> torch.Tensor:
    """What the export stores, back in float32: MXFP4 experts, bf16 otherwise."""
    if name.rsplit(".", 1)[-1] in EXPERTS:  # [E, in, out]: blocks run along `in`
        blocks, scales = quantize(p.transpose(1, 2))
        return dequantize(blocks, scales, torch.float32).transpose(1, 2)
    return p.to(torch.bfloat16).float()


@contextmanager
def export_precision(model):
    """Forward and backward through the rounded weights; the optimizer then updates the float
    masters (straight-through estimator)."""
    masters = {n: p.data for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.data = rounded(n, p.data)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.data = masters[n]


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def plan(args) -> list[list[Example]]:
    """The batches in training order: warm-up steps of headerless prompts (3x the batch), then
    full prompts as the server renders them; similar lengths batched together."""
    rng = random.Random(args.seed + 1)
    warm = int(args.steps * args.warmup_bare)
    bare = [(without_header(p), c) for p, c in build_examples(args.seed + 2, 3 * args.batch * warm)]
    full = build_examples(args.seed, args.batch * (args.steps - warm))
    return [[bare[i] for i in b] for b in batches(bare, 3 * args.batch, rng)] + [
        [full[i] for i in b] for b in batches(full, args.batch, rng)
    ]


def train(model, order: list[list[Example]], vocab: torch.Tensor, args) -> None:
    index = {int(t): i + 1 for i, t in enumerate(vocab)}
    unused = VOCAB_SIZE - len(vocab)
    rng = random.Random(args.seed + 3)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    qat_from = int(args.steps * (1 - args.qat))
    start, seen, total = time.monotonic(), 0, 0.0
    model.train()
    for step in range(args.steps):
        x, y = tensors(order[step], index, rng, args.drop)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        if step >= qat_from:
            with export_precision(model):
                nll, loss = loss_of(model, x, y, unused)
                loss.backward()
        else:
            nll, loss = loss_of(model, x, y, unused)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen, total = seen + x.numel(), total + nll.item()
        if (step + 1) % args.log_every == 0:
            elapsed = time.monotonic() - start
            print(f"step {step + 1}/{args.steps}  loss {total / args.log_every:.4f}  "
                  f"{'qat ' if step >= qat_from else ''}{seen / elapsed:.0f} tok/s  "
                  f"{elapsed / 60:.1f} min", flush=True)  # fmt: skip
            total = 0.0


@torch.no_grad()
def export(model, cfg: ModelConfig, vocab: torch.Tensor, out: Path) -> int:
    """The trained weights under our names, rounded as in training's last phase."""
    named = model.named_parameters(remove_duplicate=False)  # lm_head.weight is the embedding
    params = {n: rounded(n, p.data) for n, p in named}
    hf_names = {
        "embedding.weight": "model.embed_tokens.weight",
        "unembedding.weight": "lm_head.weight",
    }
    tensors: dict[str, torch.Tensor] = {}
    for ours, spec in expected_tensors(cfg, "hf").items():
        if ours in ROW_TENSORS:
            tensors[ours] = params[hf_names[ours]][1:].to(torch.bfloat16)  # row 0: unknown
        elif spec.name.endswith(("_blocks", "_scales")):
            base, part = spec.name.rsplit("_", 1)
            blocks, scales = quantize(params[base].transpose(1, 2))
            tensors[ours] = blocks if part == "blocks" else scales
        else:
            tensors[ours] = params[spec.name].to(torch.bfloat16)
    return save_compact(out, cfg, vocab, tensors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--qat", type=float, default=0.25, help="last fraction of steps at export precision"
    )
    p.add_argument(
        "--warmup-bare",
        type=float,
        default=0.4,
        help="first fraction of steps on prompts without system/developer messages",
    )
    p.add_argument("--drop", type=float, default=0.03, help="prompt tokens made unknown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-heads", type=int, default=DEMO_CONFIG.num_key_value_heads)
    p.add_argument("--layers", type=int, default=DEMO_CONFIG.num_hidden_layers)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=packaged_dir())
    args = p.parse_args()
    torch.set_num_threads(1)  # deterministic, and leaves the other cores free
    torch.manual_seed(args.seed)
    start = time.monotonic()
    order = plan(args)
    vocab = build_vocab([e for group in order for e in group])
    cfg = DEMO_CONFIG.replace(num_key_value_heads=args.kv_heads, num_hidden_layers=args.layers)
    model = make_model(cfg, len(vocab))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{sum(map(len, order))} turns, {len(vocab)} token ids, {n_params / 1e6:.2f}M "
          f"parameters ({time.monotonic() - start:.0f} s to build)", flush=True)  # fmt: skip
    train(model, order, vocab, args)
    size = export(model, cfg, vocab, args.out)
    print(
        f"wrote {args.out} ({size / 2**20:.2f} MiB) after {(time.monotonic() - start) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
