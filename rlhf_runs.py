"""
What rlhf.py's stages run on: the SFT model they start from and its prompts, the loop they share
(train.py's AdamW, get_lr and clip_grad_norm), their checkpoints, stops and evaluation.

rlhf.py holds the lesson, the formulas and each stage's step; a stage hands run_stage a Stage
(its model, step, evaluation and weights) and the loop does the rest as train.py's does:
evaluate and save every --eval_interval, a stop finishes the step, saves and prints the
command that resumes, and out_dir/rlhf_log.json keeps the flags and every evaluation.
"""

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bookkeeping import last_replies, replies_right
from chat import marker_id, parse, render_prompt
from checkpoints import load_checkpoint, model_from_checkpoint, run_checkpoint, save_checkpoint
from errors import UserError
from gpt import GPT
from preferences import read_prompts
from stop_signals import StopNow, StopSignals
from tasks import INSTRUCT, fresh_instructions, instruct_answer
from tokenizer import get_tokenizer
from train import clip_grad_norm, get_lr

# -----------------------------------------------------------------------------
# What every stage starts from: the SFT checkpoint, its tokenizer, the prompts


@dataclass
class Context:
    """The SFT model a stage starts from, and what is read with it."""
    args: argparse.Namespace
    sft: dict  # its checkpoint
    meta: dict  # its dataset's meta (tokenizer, chat template)
    tmpl: dict
    encode: object
    decode: object
    device: torch.device
    block_size: int

    def model(self) -> GPT:
        """A fresh copy of the SFT model, in eval mode (dropout off: see token_logprobs)."""
        model, _ = model_from_checkpoint(self.sft, Path(self.args.init_from))
        return model.to(self.device).eval()


def context(a) -> Context:
    sft_path = Path(getattr(a, "resume_from", a.init_from))
    path = run_checkpoint(sft_path)
    if path is None:
        raise UserError(f"no checkpoint at {sft_path}: train an SFT model with train.py")
    sft = load_checkpoint(path)
    a.sft_path = str(sft_path)
    a.dataset = a.dataset or sft.get("config", {}).get("dataset")
    meta = sft["meta"]
    if not meta.get("chat"):
        raise UserError(f"{path} was not trained on conversations: the third stage starts "
                        "from an SFT model (train.py on a chat dataset)")
    encode, decode = get_tokenizer(meta)
    a.init_from = str(sft_path)
    return Context(a, sft, meta, meta["chat"], encode, decode, torch.device(a.device),
                   sft["model_args"]["block_size"])


def prompts_for(c: Context, n: int, seed: int) -> list[tuple[list[dict], list[int]]]:
    """(messages, rendered ids) of the stage's prompts: --prompts's file, or n fresh
    instructions (none of them a train or val problem of the dataset) for instruct data."""
    if c.args.prompts:
        ids = read_prompts(Path(c.args.prompts), c.encode, c.tmpl, c.block_size)
        return [(messages_of(c, p), p) for p in ids][:n]
    if c.meta.get("kinds") != list(INSTRUCT):
        raise UserError("this dataset makes no fresh prompts of its own: give --prompts="
                        'FILE.jsonl ({"prompt": ...} a line)')
    folder = Path(c.args.data_dir) / c.args.dataset
    counts = [np.fromfile(folder / f"{s}_index.bin", dtype="<i8").size - 1
              for s in ("train", "val")]
    out = []
    for messages in fresh_instructions(c.meta, *counts, n, seed):
        try:
            ids = render_prompt(messages, c.encode, c.tmpl)
        except KeyError:  # a character the dataset's vocabulary lacks: not one to ask
            continue
        if len(ids) < c.block_size:  # room for a reply
            out.append((messages, ids))
    return out


def messages_of(c: Context, prompt: list[int]) -> list[dict]:
    """A rendered prompt's messages, the empty assistant turn it ends with left off."""
    return parse(prompt, c.decode, c.tmpl)[:-1]


def kind_of(c: Context, prompt: list[int]) -> str:
    """An instruct prompt's kind (reverse, add, ...), from its last question; "other" if none."""
    found = instruct_answer(messages_of(c, prompt)[-1]["content"])
    return found[0] if found else "other"


def reply_text(c: Context, reply: list[int]) -> str:
    return c.decode([t for t in reply if t != marker_id(c.tmpl, "end")])


def eval_prompts(c: Context) -> list:
    """--eval_prompts held-out prompts for the KL and scores: the val split's, for instruct."""
    folder = Path(c.args.data_dir) / c.args.dataset
    if not (folder / "val_index.bin").is_file() or not c.args.eval_prompts:
        return []
    prompts = [p.tolist() for p, _ in last_replies(folder / "val.bin", c.tmpl,
                                                  c.args.eval_prompts)]
    return [(messages_of(c, p), p) for p in prompts]


# -----------------------------------------------------------------------------
# The loop every stage shares: train.py's AdamW, schedule and clipping


class Batches:
    """Which items each step takes: a fresh permutation of n items per pass, batch_size a
    step, a pure function of (seed, step): a resumed run draws what it would have drawn."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.it = n, min(batch_size, n), seed, 0

    def next(self) -> list[int]:
        per_pass = self.n // self.batch_size
        epoch, k = divmod(self.it, per_pass)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        self.it += 1
        return order[k * self.batch_size:(k + 1) * self.batch_size].tolist()


@dataclass
class Stage:
    """What the loop trains: the model, a step (an iteration's updates, through update()),
    an evaluation, the weights to save, and the step's draws."""
    c: Context
    model: nn.Module
    step: object  # (Stage) -> stats
    evaluate: object  # (Stage) -> stats
    weights: object  # () -> the state dicts to save
    batches: Batches
    optimizer: torch.optim.Optimizer = None
    iter_num: int = 0
    lr: float = 0.0
    history: list = field(default_factory=list)

    def update(self, loss: torch.Tensor) -> float:
        """One optimizer step on loss: backward, clip the global gradient norm, AdamW."""
        loss.backward()
        norm = clip_grad_norm(self.model.parameters(), self.c.args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()


def checkpoint(s: Stage) -> dict:
    """An ordinary checkpoint (sample.py --chat talks to a policy's), with what resumes it."""
    a = s.c.args
    return {**{k: v for k, v in s.c.sft.items() if k in ("model_args", "meta", "vocab_grown")},
            **s.weights(), "optimizer": s.optimizer.state_dict(), "iter_num": s.iter_num,
            "best_val_loss": float("nan"), "history": s.history,
            "config": {**s.c.sft.get("config", {}), "dataset": a.dataset},
            "rlhf": {k: v for k, v in vars(a).items() if k != "init_from"},
            "started_from": {"path": str(a.init_from), "iter_num": s.c.sft.get("iter_num")}}


def log_line(s: Stage, stats: dict, t0: float) -> str:
    shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in stats.items())
    return f"iter {s.iter_num}: {shown}, lr {s.lr:.2e}, {time.perf_counter() - t0:.0f}s"


def run_stage(s: Stage) -> dict:
    """Evaluate, save, step, max_iters times: train.py's loop for a stage's own step. A stop
    signal finishes the step, saves and prints the command that resumes."""
    a = s.c.args
    out_dir = Path(a.out_dir)
    t0, stats, stopped = time.perf_counter(), {}, False
    with StopSignals() as signals:
        try:
            while True:
                s.lr = get_lr(s.iter_num, a.learning_rate, a.warmup_iters, a.max_iters,
                              a.min_lr)
                for group in s.optimizer.param_groups:
                    group["lr"] = s.lr * group["lr_scale"]
                if s.iter_num % a.eval_interval == 0 or s.iter_num >= a.max_iters:
                    with signals.interruptible():
                        stats = evaluate(s)
                    print(log_line(s, stats, t0), flush=True)
                    s.history.append({"iter": s.iter_num, **stats,
                                      "time": time.perf_counter() - t0})
                    save_checkpoint(checkpoint(s), out_dir / "ckpt.pt")
                if s.iter_num >= a.max_iters or signals.asked:
                    stopped = signals.asked
                    break
                with signals.critical():
                    step_stats = s.step(s)
                    s.iter_num += 1
                if s.iter_num % a.log_interval == 0:
                    print(log_line(s, step_stats, t0), flush=True)
        except StopNow:
            stopped = True
    if stopped:
        save_checkpoint(checkpoint(s), out_dir / "ckpt.pt")
        print(f"stopped at iteration {s.iter_num}; resume with: python rlhf.py "
              f"--init_from=resume --out_dir={a.out_dir}")
    log = {"rlhf": checkpoint(s)["rlhf"], "history": s.history}  # how it was run, what it did
    (out_dir / "rlhf_log.json").write_text(json.dumps(log, indent=1))
    return {"iter_num": s.iter_num, "stopped": stopped, "history": s.history,
            "elapsed": time.perf_counter() - t0}


def evaluate(s: Stage) -> dict:
    """The stage's own evaluation, and for a policy on checkable data, held-out exact match
    (greedy, as train.py reports it) by kind."""
    stats = s.evaluate(s)
    if isinstance(s.model, GPT) and s.c.meta.get("chat"):
        stats |= exact_match_by_kind(s.c, s.model)
    return stats


def exact_match_by_kind(c: Context, model: GPT) -> dict:
    val = Path(c.args.data_dir) / c.args.dataset / "val.bin"
    if c.meta.get("kinds") is None or not val.is_file():
        return {}
    right = replies_right(model, val, c.tmpl, c.device, c.args.eval_limit)
    out = {"exact_match": sum(ok for _, ok in right) / max(len(right), 1)}
    by_kind: dict[str, list[bool]] = {}
    for prompt, ok in right:
        by_kind.setdefault(kind_of(c, prompt.tolist()), []).append(ok)
    return out | {f"em_{k}": sum(v) / len(v) for k, v in by_kind.items()}
