"""
The bigram language model: the simplest model that learns anything, and the learner's start.

    python prepare.py && python bigram.py                    # ~2.5 val loss in well under a minute

Each token looks up a row of a (vocab_size, vocab_size) table, and that row is read as the
logits of the next token: the model only ever sees one character of context. The model and
its training are all here (nothing of gpt.py or train.py is used); from the other scripts this
file takes only the one tokenizer (tokenizer.py's get_tokenizer: ids to text for every
tokenizer, a chat dataset's markers by name), devices.py's check_fits (a table too big for the
free memory is refused before it is made), corpus.py's prepare_command (the command a missing
dataset's hint names) and the error they raise, errors.UserError. It has
the same scaffolding as train.py and gpt.py, so the diff between them is the model. Where each
piece of the lecture grows up:

    bigram.py                      ->  gpt.py / train.py
    get_batch(path, ix, ...)       ->  train.py get_batch (same arguments; + task batches)
    estimate_loss(model, ...)      ->  train.py estimate_loss (same arguments; + autocast)
    BigramLanguageModel            ->  gpt.py GPT: embeddings, attention, MLP, Block
    F.cross_entropy                ->  gpt.py cross_entropy, written out
    generate (multinomial)         ->  gpt.py generate_plain + sample_next_token (temperature,
                                       top_k_filter, top_p_filter); inference.py: a KV cache
    torch.optim.AdamW              ->  train.py AdamW, written out, plus get_lr (warmup +
                                       cosine) and clip_grad_norm
    the loop in main()             ->  train.py train_loop (+ accumulation, checkpoints, logs)
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from corpus import prepare_command
from devices import check_fits
from errors import UserError, readable_output
from tokenizer import get_tokenizer, with_merges

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# Settings


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the bigram baseline on data/<dataset>/.")
    p.add_argument("--batch_size", type=int, default=32,
                   help="how many independent sequences will we process in parallel?")
    p.add_argument("--block_size", type=int, default=8,
                   help="what is the maximum context length for predictions?")
    p.add_argument("--dataset", default="shakespeare_char", help="folder under data/")
    p.add_argument("--data_dir", default=str(ROOT / "data"), help="where dataset folders live")
    p.add_argument("--max_iters", type=int, default=3000, help="optimizer steps")
    p.add_argument("--eval_interval", type=int, default=300, help="evaluate every this many")
    p.add_argument("--eval_iters", type=int, default=200, help="batches per loss estimate")
    p.add_argument("--learning_rate", type=float, default=1e-2, help="AdamW learning rate")
    p.add_argument("--max_new_tokens", type=int, default=300, help="length of the sample")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same run")
    return p


def die(msg: str):
    print(f"bigram.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_args(a) -> None:
    for name in ("batch_size", "block_size", "eval_interval", "eval_iters"):
        if getattr(a, name) <= 0:
            die(f"--{name} must be positive")
    if a.max_iters < 0 or a.max_new_tokens < 0 or not a.learning_rate > 0:
        die("--max_iters and --max_new_tokens cannot be negative, --learning_rate must be > 0")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(a.device):
        die(f"--device {a.device} is not available here: use "
            + " or ".join(d for d, ok in available.items() if ok))


# -----------------------------------------------------------------------------
# Data


def load_meta(data_dir: Path, dataset: str) -> dict:
    path = data_dir / dataset / "meta.json"
    if not path.exists():
        die(f"no prepared data in {path.parent}: run `{prepare_command(dataset, data_dir)}` "
            "first")
    try:  # a trained BPE's merges are in their own file beside meta.json
        return with_merges(json.loads(path.read_text(encoding="utf-8")), path.parent)
    except UserError as e:
        die(str(e))


def check_table_fits(vocab_size: int, batch_size: int, block_size: int, device: str) -> None:
    """Refuse, before anything is allocated, a table that cannot fit in the device's free
    memory: 16 bytes an entry to train (fp32 weights, gradients, AdamW's two moments), plus a
    batch's logits, their softmax and gradient. GPT-2's 50,257 tokens make a 38 GiB run."""
    need = vocab_size * vocab_size * 16 + batch_size * block_size * vocab_size * 4 * 3
    try:
        check_fits(need, torch.device(device), f"training a bigram table of {vocab_size:,} "
                   "tokens", "train it on characters (python prepare.py), or on a BPE with "
                   "fewer tokens")
    except UserError as e:
        die(str(e))


def get_batch(path: Path, ix: torch.Tensor, block_size: int, device):
    """Windows of the token file at offsets ix (B,): x (B, T), and the targets y (B, T),
    x shifted left by one: the token that follows each position."""
    data = np.memmap(path, dtype=np.uint16, mode="r")  # the file, read only where indexed
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64))
                     for i in ix])
    return x.to(device), y.to(device)


@torch.no_grad()
def estimate_loss(model, get_split_batch, n_windows: dict, eval_iters: int, batch_size: int,
                  seed: int = 0) -> dict:
    """Mean loss over eval_iters batches of each split (the same seeded ones every time), in
    eval mode; the model's mode comes back after, even on an exception."""
    out, was_training = {}, model.training
    model.eval()
    try:
        for split, high in n_windows.items():
            g = torch.Generator().manual_seed(seed)
            losses = [model(*get_split_batch(split, torch.randint(high, (batch_size,),
                                                                    generator=g)))[1].item()
                      for _ in range(eval_iters)]
            out[split] = sum(losses) / eval_iters
    finally:  # the mode it found, even when a batch could not be read
        model.train(was_training)
    return out


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
        """Extend idx (B, T) one sampled token at a time, then restore the mode it found."""
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -1:])  # a bigram only needs the last token: (B, 1, V)
                probs = F.softmax(logits[:, -1, :], dim=-1)  # (B, V)
                idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
                idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
        finally:  # even when Ctrl-C stops it
            self.train(was_training)
        return idx


# -----------------------------------------------------------------------------
# Training


def main(argv=None) -> dict:
    readable_output()  # a path that is not UTF-8 prints, never a traceback
    args = get_parser().parse_args(argv)
    check_args(args)
    torch.manual_seed(args.seed)
    data_dir = Path(args.data_dir)
    meta = load_meta(data_dir, args.dataset)
    splits = {s: data_dir / args.dataset / f"{s}.bin" for s in ("train", "val")}
    n_windows = {s: p.stat().st_size // 2 - args.block_size for s, p in splits.items()}
    if min(n_windows.values()) <= 0:
        die("the data is shorter than block_size: lower --block_size")

    def get_split_batch(split, ix):
        return get_batch(splits[split], ix, args.block_size, args.device)

    check_table_fits(meta["vocab_size"], args.batch_size, args.block_size, args.device)
    try:  # GPT-2's BPE, offline, needs its packaged files: known now, not after training
        _, decode = get_tokenizer(meta)
    except UserError as e:
        die(str(e))
    model = BigramLanguageModel(meta["vocab_size"]).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    for it in range(args.max_iters + 1):
        if it % args.eval_interval == 0 or it == args.max_iters:
            losses = estimate_loss(model, get_split_batch, n_windows, args.eval_iters,
                                   args.batch_size, seed=args.seed)
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if it == args.max_iters:
            break
        ix = torch.randint(n_windows["train"], (args.batch_size,))
        x, y = get_split_batch("train", ix)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # token 0 to start from: a newline in Shakespeare's characters
    context = torch.zeros((1, 1), dtype=torch.long, device=args.device)
    ids = model.generate(context, args.max_new_tokens)[0].tolist()
    print(decode(ids))  # any tokenizer's ids, a chat marker's (past the characters) by name
    return losses


if __name__ == "__main__":
    main()
