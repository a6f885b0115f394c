"""
The bigram language model: the simplest model that learns anything, and the learner's start.

    python prepare.py && python bigram.py                    # ~2.5 val loss in well under a minute

Each token looks up a row of a (vocab_size, vocab_size) table, and that row is read as the
logits of the next token: the model only ever sees one character of context. This file is
self-contained (no import from gpt.py) and has the same scaffolding as train.py and gpt.py:
settings, data, model with forward(idx, targets) -> (logits, loss) and generate(), loop.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# Settings


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the bigram baseline on data/<dataset>/.")
    p.add_argument("--dataset", default="shakespeare_char", help="folder under data/")
    p.add_argument("--data_dir", default=str(ROOT / "data"), help="where dataset folders live")
    p.add_argument("--batch_size", type=int, default=32,
                   help="how many independent sequences will we process in parallel?")
    p.add_argument("--block_size", type=int, default=8,
                   help="what is the maximum context length for predictions?")
    p.add_argument("--max_iters", type=int, default=3000, help="optimizer steps")
    p.add_argument("--eval_interval", type=int, default=300, help="evaluate every this many")
    p.add_argument("--eval_iters", type=int, default=200, help="batches per loss estimate")
    p.add_argument("--learning_rate", type=float, default=1e-2, help="AdamW learning rate")
    p.add_argument("--max_new_tokens", type=int, default=300, help="length of the sample")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same run")
    return p


# -----------------------------------------------------------------------------
# Data


def die(msg: str):
    print(f"bigram.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def load_split(data_dir: Path, dataset: str, split: str) -> torch.Tensor:
    path = data_dir / dataset / f"{split}.bin"
    if not path.exists():
        hint = "" if dataset == "shakespeare_char" else f" --dataset {dataset}"
        die(f"no {path}: run `python prepare.py{hint}` first")
    return torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, device):
    """Random windows: x (B, T) and the targets y (B, T), x shifted left by one."""
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + block_size + 1] for i in ix])
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Model


class BigramLanguageModel(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        # each token reads off the logits for the next token from a lookup table
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)  # (B, T) -> (B, T, V)
        if targets is None:
            return logits, None
        B, T, V = logits.shape
        loss = F.cross_entropy(logits.view(B * T, V), targets.view(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int):
        """Extend idx (B, T) one sampled token at a time."""
        self.eval()
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -1:])  # a bigram only needs the last token: (B, 1, V)
            probs = F.softmax(logits[:, -1, :], dim=-1)  # (B, V)
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
        self.train()
        return idx


@torch.no_grad()
def estimate_loss(model, data: dict, eval_iters: int, batch_size: int, block_size: int, device):
    """Mean loss over eval_iters random batches of each split, in eval mode."""
    out = {}
    model.eval()
    for split, d in data.items():
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = get_batch(d, batch_size, block_size, device)
            _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


# -----------------------------------------------------------------------------
# Training


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    data_dir = Path(args.data_dir)
    data = {s: load_split(data_dir, args.dataset, s) for s in ("train", "val")}
    with open(data_dir / args.dataset / "meta.json", encoding="utf-8") as f:
        meta = json.load(f)
    if min(len(d) for d in data.values()) <= args.block_size:
        die("the data is shorter than block_size: lower --block_size")

    model = BigramLanguageModel(meta["vocab_size"]).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    for it in range(args.max_iters + 1):
        if it % args.eval_interval == 0 or it == args.max_iters:
            losses = estimate_loss(model, data, args.eval_iters, args.batch_size,
                                   args.block_size, args.device)
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if it == args.max_iters:
            break
        x, y = get_batch(data["train"], args.batch_size, args.block_size, args.device)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    context = torch.zeros((1, 1), dtype=torch.long, device=args.device)  # token 0 (newline)
    ids = model.generate(context, args.max_new_tokens)[0].tolist()
    if meta["tokenizer"] == "char":
        print("".join(meta["chars"][i] for i in ids))
    return losses


if __name__ == "__main__":
    main()
