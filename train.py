"""
Train a GPT on a prepared dataset.

    python prepare.py && python train.py --preset=cpu       # a small model on the CPU, ~30 s
    python prepare.py && python train.py                    # baby GPT on Tiny Shakespeare (GPU)
    python train.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 \\
        --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \\
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0   # nanoGPT's CPU recipe
    python train.py --init_from=resume                      # continue from out_dir/ckpt.pt

Read it top to bottom: the data (get_batch, get_chat_batch for conversations, estimate_loss,
the training batches), the three formulas (AdamW, get_lr, clip_grad_norm) and the training
loop; that is the lesson. Below a fence come the settings and presets, exact match on
conversations, Muon, evaluation and checkpoints, the set-up and main(). The model lives in
gpt.py; checkpoint files, devices, several processes, logs and signals live in plumbing.py;
the chat template in chat.py.
"""

import argparse
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from chat import marker_id
from errors import UserError, first_line
from gpt import GPT, MLPS, NORMS, POS_EMBS, GPTConfig
from gpt2_weights import GPT2_NAMES, crop_block_size, from_pretrained, grow_vocab
from inference import generate
from plumbing import (
    RESUME_KEYS,
    CompiledOrEager,
    Meter,
    OutDirLock,
    StopNow,
    StopSignals,
    all_ranks_any,
    append_log,
    autocast_ctx,
    bf16_speedup,
    cpu_has_native_bf16,
    device_peak_flops,
    flops_per_token,
    free_memory,
    hms,
    keep_earlier_run,
    load_checkpoint,
    mean_over_ranks,
    model_from_checkpoint,
    out_of_memory,
    pick_device,
    pick_dtype,
    plot_losses,
    rng_state,
    run_checkpoint,
    save_checkpoint,
    set_rng_state,
    setup_ddp,
    step_rng_state,
    truncate_log,
)
from settings import flags_given, str2bool
from tokenizer import (
    bits_per_byte,
    bpe_vocabulary,
    get_tokenizer,
    with_merges,
)

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# Data: windows of tokens, and the loss on them


def get_batch(path: Path, ix: torch.Tensor, block_size: int, device: torch.device):
    """Token windows starting at offsets ix (B,): x (B, T) and y = x shifted by one (B, T).

    The file is memory-mapped afresh for each batch: a long-lived np.memmap keeps growing
    in memory as pages are touched.
    """
    data = np.memmap(path, dtype=np.uint16, mode="r")
    rows = data[ix.numpy()[:, None] + np.arange(block_size + 1)]  # (B, T+1) in one gather
    xy = torch.from_numpy(rows.astype(np.int64))
    return to_device(xy[:, :-1].contiguous(), xy[:, 1:].contiguous(), device)


def get_chat_batch(path: Path, ix: torch.Tensor, block_size: int, device: torch.device):
    """Whole conversations number ix (B,) of a chat split: x (B, T) and y (B, T), T = block_size.

    Conversation c (L <= T + 1 tokens) gives x = c[:-1] and y = c[1:], as a window does, but
    y is -1 where the target is not the assistant's (its mask, in path's _mask.bin, is 0):
    cross_entropy skips -1, so the model learns to answer, never to write the user's part.
    Rows are padded, x with 0 and y with -1 (no loss either), to the batch's longest: T is
    that less one, at most block_size. Padding at the end changes nothing before it (attention
    is causal), so a shorter T gives the same loss with less work.
    """
    ids = np.memmap(path, dtype=np.uint16, mode="r")
    mask = np.memmap(chat_file(path, "mask"), dtype=np.uint8, mode="r")
    index = np.memmap(chat_file(path, "index"), dtype="<i8", mode="r")  # c k: [index[k], k+1)
    k = ix.numpy()
    start, length = index[k], index[k + 1] - index[k]  # (B,) each
    T = min(block_size, int(length.max()) - 1)
    inside = np.arange(T + 1) < length[:, None]  # (B, T+1): within the conversation
    pos = np.where(inside, start[:, None] + np.arange(T + 1), 0)  # (B, T+1) offsets
    c, answer = ids[pos].astype(np.int64), mask[pos].astype(bool) & inside
    x = np.where(inside[:, 1:], c[:, :-1], 0)  # x[j] is a token with a target after it
    y = np.where(answer[:, 1:], c[:, 1:], -1)  # is each target an answer?
    return to_device(torch.from_numpy(x), torch.from_numpy(y), device)


def chat_file(path: Path, kind: str) -> Path:
    """A chat split's other files: train.bin -> train_mask.bin, train_index.bin."""
    return path.with_name(f"{path.stem}_{kind}.bin")


def to_device(x, y, device):
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def num_tokens(path: Path) -> int:
    return path.stat().st_size // 2


@torch.no_grad()
def estimate_loss(model, get_split_batch, n_windows: dict, eval_iters: int, batch_size: int,
                  seed: int = 0, ctx=None) -> dict:
    """Mean loss over eval_iters batches of each split, in eval mode (no dropout): the mean
    over every target of them all (for conversations, every answer token: batches with more
    answer tokens weigh more, as in training; for text windows, the mean of the batches').

    The batches come from their own generator, seeded the same each time: every evaluation
    scores the same windows, so successive numbers compare, and training's random stream
    is left untouched (which keeps resumed runs exact).
    """
    out, ctx = {}, ctx or nullcontext()  # ctx: autocast to the training dtype, if any
    model.eval()
    for split, high in n_windows.items():
        g = torch.Generator().manual_seed(seed)
        total, targets = 0.0, 0
        for _ in range(eval_iters):
            ix = torch.randint(high, (batch_size,), generator=g)
            x, y = get_split_batch(split, ix)
            with ctx:
                _, loss = model(x, y)  # the mean over this batch's n targets (not -1)
            n = (y != -1).sum().item()
            total, targets = total + loss.item() * n, targets + n
        out[split] = total / max(targets, 1)
    model.train()
    return out


def loss_sizes(meta: dict) -> dict | None:
    """split -> (tokens, UTF-8 bytes) of the text that carries loss, from meta.json: a text
    split's, or a chat split's answers (their <|end|> markers carry loss but have no bytes).
    None for data prepared before prepare.py counted bytes: then there is no bits per byte."""
    counts, infix = (meta["chat"], "_answer") if meta.get("chat") else (meta, "")
    sizes = {s: (counts.get(f"{s}{infix}_tokens"), counts.get(f"{s}{infix}_bytes"))
             for s in ("train", "val")}
    return sizes if all(n and b for n, b in sizes.values()) else None


class Batches:
    """The training batches, step after step: each step draws gradient_accumulation_steps x
    batch_size window offsets (or conversation numbers), from a generator of its own
    (evaluations never disturb it, and a resume restores it). Under DDP every rank draws the
    whole global batch and keeps its own share of micro-batches, so N processes train on
    exactly what one process would.
    get_batch(ix) turns offsets ix (B,) into x, y (B, T); weigh_by_targets, below, gives each
    micro-batch its weight in the step's loss.

    lengths (conversations only): each one's length. A step's conversations are then sorted by
    it before they are dealt into micro-batches, so that each micro-batch pads to a longest
    close to its others (get_chat_batch): the step's loss is the mean over all of its answer
    tokens however they are grouped, so this changes the work, not the step."""

    def __init__(self, get_batch: Callable, n_windows: int, accumulation_steps: int,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 fixed: bool = False, lengths: np.ndarray | None = None):
        self.get_batch, self.n_windows, self.lengths = get_batch, n_windows, lengths
        self.shape = (accumulation_steps, batch_size)
        self.micro_steps = accumulation_steps // world_size  # this rank's share
        self.first = rank * self.micro_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.fixed_ix = self.draw() if fixed else None  # --overfit_batch: one batch, always

    def draw(self) -> torch.Tensor:
        ix = torch.randint(self.n_windows, self.shape, generator=self.generator)  # (gas, B)
        if self.lengths is None:
            return ix
        flat = ix.flatten()  # shortest first: micro-batch i gets the i-th B of them
        order = np.argsort(self.lengths[flat.numpy()], kind="stable")
        return flat[torch.from_numpy(order)].view(self.shape)

    def __call__(self):
        """This step's micro-batches for this rank: (x, y) pairs, each (B, T)."""
        ix = self.fixed_ix if self.fixed_ix is not None else self.draw()
        return (self.get_batch(row) for row in ix[self.first:self.first + self.micro_steps])


def weigh_by_targets(micro_batches, world_size: int = 1) -> list:
    """This step's micro-batches, each (x, y) with its loss's weight: n_i * world_size / N, for
    n_i targets (not -1) in it and N in the whole step, every micro-batch of every rank.

    The model's loss is its micro-batch's mean over its n_i targets; so weighted, the losses
    add up to the mean over all N of the step's targets (DDP averages the ranks' gradients,
    hence the world_size), exactly one big batch's. A plain mean of micro-batch means would
    count an answer token of a micro-batch with few answers more than one with many. For text
    windows every n_i is the same and each weight is 1 / micro-batches per rank."""
    micro_batches = list(micro_batches)
    counts = [(y != -1).sum().float() for _, y in micro_batches]
    per_rank = mean_over_ranks(torch.stack(counts).sum(), world_size)  # N / world_size
    return [(x, y, n / per_rank.clamp(min=1)) for (x, y), n in zip(micro_batches, counts,
                                                                      strict=True)]


# -----------------------------------------------------------------------------
# Optimizer: AdamW, by hand


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW computes it.

    For each parameter p with gradient g, at step t (1-based):
        p <- p * (1 - lr * weight_decay)            decay, separate from the gradient
        m <- beta1 * m + (1 - beta1) * g            running mean of gradients
        v <- beta2 * v + (1 - beta2) * g^2          running mean of squared gradients
        m_hat = m / (1 - beta1^t)                   bias correction: m, v start at 0
        v_hat = v / (1 - beta2^t)
        p <- p - lr * m_hat / (sqrt(v_hat) + eps)
    The work is done on all of a group's tensors at once (torch._foreach_*), which is what
    makes torch's own implementation fast; the math is the same line by line.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.group_step(group)
        return loss

    def group_step(self, group):  # Muon, below, decides per group
        self.adamw_step(group)

    def adamw_step(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        lr, (beta1, beta2), eps, wd = (group["lr"], group["betas"], group["eps"],
                                       group["weight_decay"])
        for p in params:  # state is created lazily, in fp32 whatever the param dtype
            if not self.state[p]:
                self.state[p] = {"step": torch.tensor(0.0),
                                 "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                                 "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
        states = [self.state[p] for p in params]
        grads = [p.grad.float() for p in params]
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        for s in states:  # each parameter counts its own steps, as torch's does
            s["step"] += 1
        steps = [s["step"].item() for s in states]
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - beta1)  # m + (1-beta1)(g - m)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
        # p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), with bc = 1 - beta^t per parameter
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1 ** t) for t in steps])


# -----------------------------------------------------------------------------
# Learning-rate schedule


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int,
           min_lr: float) -> float:
    """The learning rate for step `it` (0-based), a pure function of the schedule."""
    # 1) linear warmup, as nanoGPT does it: step 0 already gets lr/(warmup_iters+1), never 0
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) after the decay, stay at min_lr
    if it >= lr_decay_iters:
        return min_lr
    # 3) in between, cosine from learning_rate down to min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# Gradient clipping


def grad_norm(parameters) -> torch.Tensor:
    """The global L2 norm: sqrt(sum over every gradient entry of g^2)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                 for g in grads]))


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale all gradients by one factor so their global L2 norm is at most max_norm.
    Returns the norm before clipping."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = grad_norm(parameters)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # 1 when already small enough
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm


# -----------------------------------------------------------------------------
# The training loop



@dataclass
class Training:
    """What the loop trains, with what, and from where; setup(), at the bottom, builds it."""
    model: torch.nn.Module  # what the loop calls: maybe compiled, maybe wrapped in DDP
    raw_model: torch.nn.Module  # the plain GPT: its parameters are clipped and saved
    optimizer: AdamW
    batches: Batches  # () -> this step's micro-batches
    ctx: object  # autocast to the training dtype, or nothing for float32
    scaler: torch.amp.GradScaler  # float16's loss scaling; a no-op for other dtypes
    iter_num: int  # where training starts: 0, or a resumed checkpoint's step
    best_val_loss: float
    history: list  # (iteration, training loss) at each log line
    run: "Run"  # the plumbing: evaluation, checkpoints, logs, signals, DDP (below)


def train_loop(args, t: Training) -> dict:
    """Steps 1-5, max_iters times: what every training script does."""
    model, optimizer, run = t.model, t.optimizer, t.run
    iter_num, best_val_loss, history = t.iter_num, t.best_val_loss, t.history
    meter = make_meter(args, run, iter_num)  # ms/iter, tokens/s, MFU, time left
    losses, stop, rng = {}, False, None
    # Ctrl-C, SIGTERM: finish the step, save, stop (a second one: at once, without DDP)
    with StopSignals(run.log, at_once=run.world_size == 1) as signals:
        try:
            while not stop:
                rng = step_rng_state(t.batches.generator)  # a stop before the step is whole
                # resumes from here; after it, from the state as it is then (rng = None)
                # 1) set this step's learning rate
                lr = (get_lr(iter_num, args.learning_rate, args.warmup_iters,
                             args.lr_decay_iters, args.min_lr) if args.decay_lr
                      else args.learning_rate)
                for group in optimizer.param_groups:  # Muon's groups scale it to muon_lr
                    group["lr"] = lr * group["lr_scale"]

                # 2) evaluate now and then, and at the very end; save the latest state
                last = iter_num >= args.max_iters
                if iter_num % args.eval_interval == 0 or last or args.eval_only:
                    losses, best_val_loss, stop = evaluate_and_save(
                        args, run, iter_num, best_val_loss, history, meter, signals, losses)
                if last or args.eval_only or stop:  # a stop there: every rank, before the step
                    break

                # 3) forward, backward over this step's micro-batches; gradients add up. Each
                # loss is its micro-batch's mean, weighted by the micro-batch's share of the
                # step's targets: the sum is the mean over all of them (text: 1/micro_steps)
                loss_sum = 0.0
                micro_batches = weigh_by_targets(t.batches(), run.world_size)
                for micro_step, (x, y, weight) in enumerate(micro_batches):
                    sync_gradients(model, micro_step == t.batches.micro_steps - 1)  # DDP
                    with t.ctx:
                        _, loss = model(x, y)
                        loss = loss * weight  # the mean over the step's targets, not the sum
                    t.scaler.scale(loss).backward()
                    loss_sum = loss_sum + loss.detach()

                # 4) clip the global gradient norm (of the unscaled gradients), check, step
                t.scaler.unscale_(optimizer)
                params = t.raw_model.parameters()
                norm = (clip_grad_norm(params, args.grad_clip) if args.grad_clip
                        else grad_norm(params))
                stop = check_finite(loss_sum, norm, iter_num, run, signals.asked, args.grad_clip)
                with signals.critical():  # a second Ctrl-C waits until the step is whole
                    t.scaler.step(optimizer)
                    t.scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    iter_num += 1
                    rng = None  # the step is whole: a stop from here on saves the state as is
                stop = stop or signals.now
                meter.step()

                # 5) log now and then: formatting, CSV and timing need the host
                if iter_num % args.log_interval == 0:
                    log_step(run, meter, iter_num, lr, loss_sum, norm, history)
        except StopNow:  # stopped at once: rng says which random state goes with the weights
            stop = True
    if stop:
        save_and_say_how_to_resume(args, run, iter_num, best_val_loss, history, rng)
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "history": history,
            "final_losses": losses, "ckpt_path": str(run.ckpt_path), "stopped": stop,
            "elapsed": time.perf_counter() - meter.t_start}


# =============================================================================
# Everything below builds what the loop above uses: settings and presets, exact match, Muon,
# evaluation and checkpoints, the set-up and main(). The lesson ends here.


# -----------------------------------------------------------------------------
# Settings


# Named sets of defaults; flags given on the command line still win over them. The CPU presets
# log every step to log.csv (cheap), print every 50 or 100, and evaluate 6 times, so loss.png
# has curves with a shape: evaluation has its own generator, so training is the same as with
# one evaluation at the end (the same final val loss), and it costs ~6% more time.
PRESETS = {
    # The fast CPU recipe: nanoGPT's CPU recipe's val loss in under a quarter of its time, with
    # the modern switches and Muon (the searches that found it are in RESULTS.md).
    "cpu": {"device": "cpu", "compile": False, "n_layer": 2, "n_head": 4, "n_embd": 128,
            "block_size": 64, "batch_size": 24, "max_iters": 250, "learning_rate": 4e-3,
            "warmup_iters": 30, "min_lr": 1e-4, "dropout": 0.0, "eval_interval": 50,
            "eval_iters": 20, "log_interval": 1, "print_interval": 50, "sample_every": 0,
            "pos_emb": "rope",
            "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True, "optimizer": "muon"},
    # The same model, longer: 0.15 and more below nanoGPT's CPU recipe in its time
    "cpu_best": {"device": "cpu", "compile": False, "n_layer": 2, "n_head": 4, "n_embd": 128,
                 "block_size": 64, "batch_size": 24, "max_iters": 1100, "learning_rate": 4e-3,
                 "warmup_iters": 30, "min_lr": 1e-4, "dropout": 0.0, "eval_interval": 220,
                 "eval_iters": 20, "log_interval": 1, "print_interval": 100, "sample_every": 0,
                 "pos_emb": "rope",
                 "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True, "optimizer": "muon"},
    # nanoGPT's config files, so its documented command lines run unchanged, e.g.
    # `python train.py config/train_shakespeare_char.py --device=cpu ...`
    "train_shakespeare_char": {"out_dir": "out-shakespeare-char"},  # our defaults otherwise
    "finetune_shakespeare": {"out_dir": "out-shakespeare", "init_from": "gpt2-xl",
                             "dataset": "shakespeare", "eval_interval": 5, "eval_iters": 40,
                             "batch_size": 1, "gradient_accumulation_steps": 32,
                             "max_iters": 20, "learning_rate": 3e-5, "decay_lr": False,
                             "dropout": 0.0, "bias": True},
    # GPT-2 (124M) on OpenWebText: ~0.5M tokens per step (12 x 1024 x 40), 600k steps
    "train_gpt2": {"dataset": "openwebtext", "n_layer": 12, "n_head": 12, "n_embd": 768,
                   "block_size": 1024, "batch_size": 12, "gradient_accumulation_steps": 40,
                   "max_iters": 600000, "lr_decay_iters": 600000, "learning_rate": 6e-4,
                   "min_lr": 6e-5, "warmup_iters": 2000, "weight_decay": 0.1, "beta2": 0.95,
                   "dropout": 0.0, "bias": False, "eval_interval": 1000, "eval_iters": 200,
                   "log_interval": 10},
    # OpenAI's weights scored on OpenWebText's val split, nothing written
    **{f"eval_{name.replace('-', '_')}": {
        "init_from": name, "eval_only": True, "dataset": "openwebtext", "block_size": 1024,
        "batch_size": 8, "eval_iters": 500, "dropout": 0.0, "sample_every": 0}
       for name in GPT2_NAMES},
}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a GPT on data/<dataset>/.")

    def flag(name, default, help):  # a boolean that works as --x, --x=True and --x=False
        p.add_argument(name, type=str2bool, nargs="?", const=True, default=default, help=help)

    p.add_argument("config", nargs="?", default=None,
                   help="a nanoGPT config file name, e.g. config/train_shakespeare_char.py. "
                        "Only its name is used (the file is never opened or run): it picks "
                        "the preset of that name")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a named set of settings (cpu: the fast CPU recipe)")
    g = p.add_argument_group("I/O")
    g.add_argument("--out_dir", default="out", help="where checkpoints and logs go")
    g.add_argument("--eval_interval", type=int, default=250, help="evaluate every this many steps")
    g.add_argument("--log_interval", type=int, default=10,
                   help="a log.csv row (loss, lr, grad norm) every this many steps")
    g.add_argument("--print_interval", type=int, default=None,
                   help="print a line every this many steps, a multiple of log_interval "
                        "(default: log_interval)")
    g.add_argument("--eval_iters", type=int, default=200, help="batches per loss estimate")
    flag("--eval_only", False, "evaluate once and exit")
    flag("--always_save_checkpoint", False, "accepted for nanoGPT's command lines: the latest "
         "state (ckpt.pt) is saved at every evaluation anyway, the best weights to best.pt")
    g.add_argument("--init_from", default="scratch",
                   help="scratch, resume (from out_dir/ckpt.pt, with that run's settings), "
                        "a checkpoint of ours or its run folder (a new run from its weights), "
                        "gpt2[-medium|-large|-xl] or a folder of GPT-2 weights; onto "
                        "conversations, a model without the chat markers gets them added")
    flag("--overwrite", False, "start afresh in an out_dir that holds another run, replacing "
         "its files (without this, they are moved to out_dir/runs/<its time>/)")
    g.add_argument("--keep_runs", type=int, default=5,
                   help="how many earlier runs out_dir/runs/ keeps: the oldest beyond this "
                        "many are deleted")
    g.add_argument("--sample_every", type=int, default=None,
                   help="print a short sample every this many steps, at an eval (default: "
                        "eval_interval; 0 = never)")
    g.add_argument("--plot", metavar="OUT_DIR", default=None,
                   help="only draw OUT_DIR/log.csv to OUT_DIR/loss.png, then exit")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="shakespeare_char", help="folder under data/")
    g.add_argument("--data_dir", default=str(ROOT / "data"), help="where dataset folders live")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches summed into one update (a bigger batch in less memory)")
    g.add_argument("--batch_size", type=int, default=64,
                   help="how many independent sequences are processed in parallel?")
    g.add_argument("--block_size", type=int, default=256,
                   help="what is the maximum context length for predictions? (conversations "
                        "are trained whole: for them the default is the longest, and less is "
                        "refused)")
    flag("--overfit_batch", False, "train on one fixed batch, dropout off: a debugging check")
    g = p.add_argument_group("model")
    g.add_argument("--n_layer", type=int, default=6, help="how many transformer blocks")
    g.add_argument("--n_head", type=int, default=6, help="attention heads per block")
    g.add_argument("--n_embd", type=int, default=384, help="width of the residual stream")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout rate (0 to turn off)")
    flag("--bias", False, "biases in Linear and LayerNorm layers (GPT-2 has them)")
    g.add_argument("--pos_emb", choices=POS_EMBS, default="learned",
                   help="positions: GPT-2's learned table, or rotary embeddings (rope)")
    g.add_argument("--norm", choices=NORMS, default="layernorm", help="LayerNorm or RMSNorm")
    g.add_argument("--mlp", choices=MLPS, default="gelu",
                   help="the MLP's nonlinearity: GELU (GPT-2), ReLU^2 or SwiGLU")
    flag("--qk_norm", False, "normalise each head's queries and keys before attention")
    g = p.add_argument_group("optimizer (AdamW) and schedule")
    g.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--max_iters", type=int, default=5000, help="optimizer steps in all")
    g.add_argument("--weight_decay", type=float, default=1e-1, help="decoupled weight decay")
    g.add_argument("--beta1", type=float, default=0.9, help="momentum of the gradient mean")
    g.add_argument("--beta2", type=float, default=0.99, help="momentum of the squared gradient")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global norm; 0 = off")
    g.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: Muon for the matrices inside the blocks, AdamW for the rest")
    g.add_argument("--muon_lr", type=float, default=0.02, help="Muon's peak learning rate")
    g.add_argument("--muon_momentum", type=float, default=0.95, help="Muon's momentum")
    flag("--decay_lr", True, "warm up then decay the learning rate (else keep it flat)")
    g.add_argument("--warmup_iters", type=int, default=100, help="linear warmup steps")
    g.add_argument("--lr_decay_iters", type=int, default=None,
                   help="step where cosine decay reaches min_lr (default: max_iters)")
    g.add_argument("--min_lr", type=float, default=1e-4, help="learning rate after decay")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPUs that run it natively, else float32")
    flag("--compile", None, "torch.compile the model (default: on for CUDA, off elsewhere)")
    g.add_argument("--seed", type=int, default=1337, help="seed for init, batches and dropout")
    g.add_argument("--backend", default="auto",
                   help="distributed backend under torchrun: auto (nccl on CUDA, else gloo)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = get_parser()
    args = p.parse_args(argv)
    if args.config:  # nanoGPT's config files are never read (no code runs from a config)
        name = Path(args.config).stem
        if name not in PRESETS:
            p.error(f"{args.config} is not a config this code knows; known: "
                    f"{', '.join(sorted(PRESETS))} (or pass flags)")
        args.preset = args.preset or name
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)  # again, so the command line's flags override the preset
    # which settings were given (on the command line or by a preset): a resumed run takes
    # the others from its checkpoint, not from the defaults
    args.given = flags_given(p, argv) | set(PRESETS.get(args.preset) or {})
    return args


def check_args(a) -> None:
    """Refuse settings that cannot work, with a message that says what to change."""
    for name in ("learning_rate", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip",
                 "dropout", "muon_lr", "muon_momentum"):
        if not math.isfinite(getattr(a, name)):
            raise UserError(f"--{name} must be a finite number, not {getattr(a, name)}")
    if not (0 <= a.beta1 < 1 and 0 <= a.beta2 < 1 and 0 <= a.muon_momentum < 1):
        raise UserError(f"--beta1, --beta2 and --muon_momentum must be in [0, 1), got "
                        f"{a.beta1}, {a.beta2} and {a.muon_momentum}")
    if a.muon_lr <= 0:
        raise UserError(f"--muon_lr must be positive, got {a.muon_lr}")
    if not 0 <= a.seed < 2 ** 32:
        raise UserError(f"--seed must be from 0 to 2**32 - 1, got {a.seed}")
    if a.weight_decay < 0:
        raise UserError(f"--weight_decay cannot be negative, got {a.weight_decay}")
    for name in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_iters",
                 "eval_interval", "log_interval", "gradient_accumulation_steps"):
        if getattr(a, name) <= 0:
            raise UserError(f"--{name} must be positive")
    if a.print_interval is not None and (a.print_interval <= 0
                                         or a.print_interval % a.log_interval):
        raise UserError(f"--print_interval ({a.print_interval}) must be a positive multiple of "
                        f"--log_interval ({a.log_interval})")
    if a.keep_runs < 0:
        raise UserError(f"--keep_runs cannot be negative, got {a.keep_runs}")
    if a.learning_rate <= 0 or a.min_lr < 0 or (a.decay_lr and a.min_lr > a.learning_rate):
        raise UserError("need learning_rate > 0 and 0 <= min_lr <= learning_rate")
    if a.max_iters < 0 or a.warmup_iters < 0 or a.grad_clip < 0 or (a.sample_every or 0) < 0:
        raise UserError("max_iters, warmup_iters, grad_clip and sample_every cannot be negative")
    if not 0 <= a.dropout < 1:
        raise UserError("dropout must be in [0, 1)")
    if a.decay_lr and a.lr_decay_iters is not None and a.warmup_iters > a.lr_decay_iters:
        raise UserError(f"warmup_iters ({a.warmup_iters}) is longer than lr_decay_iters "
                        f"({a.lr_decay_iters}): lower --warmup_iters")
    if a.init_from not in ("scratch", "resume", *GPT2_NAMES) and not Path(a.init_from).exists():
        raise UserError(f"--init_from {a.init_from}: no such file or folder (it takes scratch, "
                        f"resume, {', '.join(GPT2_NAMES)}, a checkpoint of ours or its run "
                        "folder, or a folder of GPT-2 weights)")


# A resumed run takes the settings it was started with, except these (about this invocation),
# and refuses a different shape: its weights have the checkpoint's.
NOT_INHERITED = {"config", "preset", "init_from", "out_dir", "eval_only", "plot", "overwrite",
                 "keep_runs"}
SWITCHES = ("pos_emb", "norm", "mlp", "qk_norm")  # beyond GPT-2: gpt.py's GPTConfig
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias", *SWITCHES)


# Which flags take effect in which mode; every flag not named here takes effect in all four
# (a resumed run takes those not given from its checkpoint, and names the ones that change).
#   mode (--init_from)                     n_layer n_head n_embd   block_size   dropout
#                                          bias pos_emb norm mlp
#                                          qk_norm
#   scratch                                set                     set          set
#   resume (out_dir/ckpt.pt)               kept                    kept         set
#   checkpoint (PATH: ours, or its folder) kept                    may shrink   set
#   gpt2 (gpt2* or a GPT-2 weights folder) kept                    may shrink   set
# kept: not given, it is the loaded model's; given and different, the run is refused in one line
# naming the flag and the mode (the weights could not take it). may shrink: a shorter context
# keeps the first position embeddings; a longer one is refused. n_embd % n_head is checked on
# the shape the model will have, after these rules.
SHAPE_RULES = {"scratch": dict.fromkeys(SHAPE, "set"), "resume": dict.fromkeys(SHAPE, "kept"),
               "checkpoint": {**dict.fromkeys(SHAPE, "kept"), "block_size": "shrink"},
               "gpt2": {**dict.fromkeys(SHAPE, "kept"), "block_size": "shrink"}}
MODE_NAMES = {"resume": "a resumed run keeps its checkpoint's architecture",
              "checkpoint": "a run started from a checkpoint keeps its architecture",
              "gpt2": "a run from GPT-2 weights keeps GPT-2's architecture"}
GPT2_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
               "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}  # n_layer, n_head, n_embd


def gpt2_shape(init_from: str) -> dict | None:
    """The shape of OpenAI's GPT-2 (by name) or of a folder of its weights (its config.json),
    read without loading any weights; None when the folder has no readable config (then
    loading it says why)."""
    if init_from in GPT2_SHAPES:
        n_layer, n_head, n_embd = GPT2_SHAPES[init_from]
        block_size = 1024
    else:
        try:
            c = json.loads((Path(init_from) / "config.json").read_text(encoding="utf-8"))
            n_layer, n_head, n_embd, block_size = (int(c["n_layer"]), int(c["n_head"]),
                                                   int(c["n_embd"]), int(c["n_positions"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size,
            "bias": True, **{k: getattr(GPTConfig, k) for k in SWITCHES}}


def model_args_of(a, vocab_size: int) -> dict:
    """GPTConfig's fields, as these settings give them."""
    return {k: getattr(a, k) for k in SHAPE} | {"vocab_size": vocab_size, "dropout": a.dropout}


def resolve_args(a, ckpt: dict | None, local_rank: int, world_size: int, log=print,
                 start: tuple[dict, Path] | None = None):
    """Every setting derived from the checkpoint, the data or other settings, in this one
    place; nothing else rewrites them. Returns the dataset's meta, and the settings as given
    (before anything was derived from them), which the checkpoints keep. ckpt is the state
    a resume continues; start, the (checkpoint, path) a new run starts from."""
    if ckpt is not None:
        inherit_settings(a, ckpt, log)
    settings = {k: v for k, v in vars(a).items() if k != "given"}
    meta = load_meta(Path(a.data_dir), a.dataset)
    if ckpt is not None and not same_data(ckpt["meta"], meta):
        raise UserError(f"{a.out_dir}/ckpt.pt was trained on other data than "
                        f"{Path(a.data_dir) / a.dataset} (another tokenizer, vocabulary or text)")
    if start is not None:
        take_shape(a, meta, *start)
    elif a.init_from not in ("scratch", "resume") and (shape := gpt2_shape(a.init_from)):
        keep_shape(a, shape, a.init_from, "gpt2")
    if a.lr_decay_iters is None:  # a short run (a smoke test) may end inside the warmup
        a.lr_decay_iters = max(a.max_iters, a.warmup_iters)
    if a.sample_every is None:
        a.sample_every = a.eval_interval
    if a.overfit_batch:
        a.dropout = 0.0  # one batch, memorised: dropout would only fight it
    if meta.get("chat"):
        chat_block_size(a, meta)
    if start is not None and a.block_size > start[0]["model_args"]["block_size"]:
        raise UserError(f"block_size {a.block_size} is longer than {start[1]}'s context of "
                        f"{start[0]['model_args']['block_size']}: it can shrink, not grow")
    if ckpt is not None:  # the architecture is the checkpoint's
        for k in SHAPE:
            setattr(a, k, ckpt["model_args"].get(k, getattr(GPTConfig, k)))
    if a.n_embd % a.n_head != 0:  # on the shape the model will have, not on replaced flags
        raise UserError(f"n_embd ({a.n_embd}) must be divisible by n_head ({a.n_head})")
    if world_size > 1:  # torchrun: one process per GPU, or gloo processes on the CPU
        a.device = f"cuda:{local_rank}" if a.device != "cpu" and torch.cuda.is_available() \
            else "cpu"
        if a.gradient_accumulation_steps % world_size:
            raise UserError(f"--gradient_accumulation_steps ({a.gradient_accumulation_steps}) "
                            f"must be a multiple of the number of processes ({world_size})")
    device = pick_device(a.device)
    shape = model_args_of(a, meta["vocab_size"])
    check_memory(a, shape, device, world_size)  # before anything is allocated
    cpu_speedup = ((lambda: bf16_speedup(shape, a.batch_size, log)) if world_size == 1
                   and (a.init_from in ("scratch", "resume") or start) else None)  # (ranks agree)
    a.device, a.dtype = str(device), pick_dtype(a.dtype, device, cpu_speedup)
    if a.compile is None:
        a.compile = device.type == "cuda"
    return meta, settings


def chat_block_size(a, meta: dict) -> None:
    """Conversations are trained whole: block_size is, unless given, the longest less one
    token (x = c[:-1]); a given one may be longer (more padding, a longer chat history in
    sample.py), not shorter: the longest conversation would not fit."""
    longest = meta["chat"]["max_len"]
    if "block_size" not in a.given:
        a.block_size = longest - 1
    elif a.block_size < longest - 1:
        raise UserError(f"--block_size {a.block_size} is shorter than {a.dataset}'s longest "
                        f"conversation ({longest} tokens, so block_size {longest - 1}): drop "
                        "the flag, or prepare the data with a smaller --block_size")


def inherit_settings(a, ckpt: dict, log=print) -> None:
    """Settings not given now come from the checkpoint; given ones that differ are named in
    one line; a different shape is refused (the weights could not take it)."""
    saved, changed = ckpt.get("config", {}), []
    for k, old in saved.items():
        if k in NOT_INHERITED or k not in vars(a):
            continue
        if k not in a.given:
            setattr(a, k, old)
        elif getattr(a, k) != old:
            if k in SHAPE and ckpt["model_args"].get(k) != getattr(a, k):
                raise UserError(f"--{k} {getattr(a, k)}, but {a.out_dir}/ckpt.pt was trained "
                                f"with {k} {ckpt['model_args'].get(k)}: drop the flag to resume")
            changed.append(f"{k} {old} -> {getattr(a, k)}")
    if changed:
        log("overriding: " + ", ".join(changed))


def same_data(a: dict, b: dict) -> bool:
    """Whether two datasets' metas describe the same tokens: tokenizer, vocabulary, text, task
    and conversations (not where the text was read from)."""
    keys = ("tokenizer", "vocab_size", "chars", "bpe", "sha256", "task", "digits")
    # a conversation's answer counts (for bits per byte) are newer than some checkpoints
    chat = lambda m: {k: v for k, v in (m.get("chat") or {}).items() if "_answer_" not in k}
    return all(a.get(k) == b.get(k) for k in keys) and chat(a) == chat(b)


def take_shape(a, meta: dict, ckpt: dict, path: Path) -> None:
    """A new run from our checkpoint (--init_from=PATH) has its architecture: shape flags not
    given come from it, given ones must match (block_size may shrink: checked in
    resolve_args, after chat data has set it). The data must have its vocabulary, or be
    conversations in it (build_model then adds the chat markers to the model)."""
    if ckpt["meta"].get("chat") and not meta.get("chat") and same_base(ckpt["meta"], meta):
        raise UserError(f"{path} was fine-tuned on conversations, and "
                        f"{Path(a.data_dir) / a.dataset} is plain text: fine-tune it on "
                        "conversations, or start from the checkpoint it was fine-tuned from")
    if not (same_vocabulary(ckpt["meta"], meta) or adds_markers(ckpt["meta"], meta)):
        folder = Path(a.data_dir) / a.dataset
        text = "" if a.dataset in BUILT_IN_TEXTS else " --input YOUR_TEXT"
        theirs, ours = vocabulary_name(ckpt["meta"]), vocabulary_name(meta)
        raise UserError(f"{path} was trained on {theirs}, and {folder} is "
                        f"{'another ' * (ours == theirs)}{ours}: prepare it in the checkpoint's "
                        f"vocabulary with `python prepare.py{text} --dataset {a.dataset} "
                        f"--vocab_from {path}`")
    keep_shape(a, {k: ckpt["model_args"].get(k, getattr(GPTConfig, k)) for k in SHAPE}, path,
               "checkpoint")


def keep_shape(a, shape: dict, source, mode: str) -> None:
    """SHAPE_RULES for a new run from loaded weights (resume's are in inherit_settings): a
    shape flag not given is the model's (for GPT-2, block_size is ours capped at its context);
    one given and different is refused, all such flags named in one line. A block_size that
    may shrink is checked once chat data has set it (resolve_args, build_model)."""
    refused = []
    for k, rule in SHAPE_RULES[mode].items():
        if k not in a.given:  # (GPT-2's 1024 is a lot for a CPU: there it only caps ours)
            setattr(a, k, min(a.block_size, shape[k]) if rule == "shrink" and mode == "gpt2"
                    else shape[k])
        elif rule == "kept" and getattr(a, k) != shape[k]:
            refused.append(k)
    if refused:
        raise UserError(", ".join(f"--{k} {getattr(a, k)}" for k in refused) + f", but {source} "
                        "has " + ", ".join(f"{k} {shape[k]}" for k in refused) + ": "
                        f"{MODE_NAMES[mode]} (drop " + ", ".join(f"--{k}" for k in refused) + ")")


BUILT_IN_TEXTS = ("shakespeare_char", "shakespeare", "other_plays")  # prepare.py needs no --input


def same_vocabulary(a: dict, b: dict) -> bool:
    """Whether the same id means the same token in both: GPT-2 BPE, one character list, or
    one trained BPE, and the same chat markers (or none in either)."""
    return same_base(a, b) and a.get("vocab_size") == b.get("vocab_size") and \
        (a.get("chat") or {}).get("markers") == (b.get("chat") or {}).get("markers")


def same_base(a: dict, b: dict) -> bool:
    """The same tokenizer and characters (a trained BPE: merges, split pattern and
    <|endoftext|>), whether or not either has the chat markers."""
    return a.get("tokenizer") == b.get("tokenizer") and a.get("chars") == b.get("chars") and \
        bpe_vocabulary(a) == bpe_vocabulary(b)


def adds_markers(ckpt_meta: dict, meta: dict) -> bool:
    """Conversations in the vocabulary of a model trained without the markers: fine-tuning
    grows its embedding by them (gpt2_weights.grow_vocab)."""
    return (same_base(ckpt_meta, meta) and not ckpt_meta.get("chat") and bool(meta.get("chat"))
            and ckpt_meta.get("vocab_size") == meta["chat"]["markers"]["<|system|>"])


def vocabulary_name(meta: dict) -> str:
    chat = meta.get("chat")
    base = chat["markers"]["<|system|>"] if chat else meta["vocab_size"]  # the markers' first id
    name = {"gpt2": "GPT-2 BPE", "bpe": f"byte-level BPE of {base} tokens"}.get(
        meta["tokenizer"], f"{base} characters")
    return name + (" with the chat markers" if chat else "")


def check_memory(a, shape: dict, device: torch.device, world_size: int) -> None:
    """Refuse, before anything is allocated, a run that cannot fit in the device's free memory:
    about 16 bytes a parameter to train (fp32 weights, gradients, two AdamW moments), 4 to
    evaluate, plus the batch's activations, roughly. A lower bound: a run that passes may still
    run out (train() says so then), but one that fails this could never have fit."""
    n_params = count_params(shape)
    B, T, C = a.batch_size, shape["block_size"], shape["n_embd"]
    acts = B * T * (shape["n_layer"] * 16 * C + 2 * shape["vocab_size"]) * 4  # saved for backward
    need = n_params * 4 + (B * T * (C + shape["vocab_size"]) * 4 if a.eval_only
                           else n_params * 12 + acts)
    free = free_memory(device)
    if device.type == "cpu":
        need *= world_size  # the processes share one machine's memory
    if free is not None and need > free:
        raise UserError(f"this run needs about {need / 2**30:,.1f} GiB ({n_params / 1e6:,.1f}M "
                        f"parameters and a batch's activations), and {device} has "
                        f"{free / 2**30:,.1f} GiB free: lower --n_embd, --n_layer, --batch_size "
                        "or --block_size")


def count_params(shape: dict) -> int:
    """The model's parameter count, built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(GPTConfig(**shape)).parameters())


def load_meta(data_dir: Path, dataset: str) -> dict:
    """data/<dataset>/meta.json, checked: it and both splits must be there and readable; a
    trained BPE's merges are read from their file (checked against meta.json's SHA-256) into
    meta["bpe"]["merges"]."""
    folder = data_dir / dataset
    hint = "python prepare.py" + ("" if dataset == "shakespeare_char" else
                                  f" --dataset {dataset}")
    if not (folder / "meta.json").exists():
        raise UserError(f"no prepared data in {folder}: run `{hint}` first")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not {"tokenizer", "vocab_size"} <= meta.keys():
            raise ValueError("tokenizer or vocab_size missing")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{folder / 'meta.json'} is unreadable ({first_line(e)}): run `{hint}` "
                        "again") from None
    try:  # a trained BPE's merges go into the meta, so checkpoints carry the tokenizer
        meta = with_merges(meta, folder)
    except UserError as e:
        raise UserError(f"{e}: run `{hint}` again") from None
    names = ("{}.bin", "{}_mask.bin", "{}_index.bin") if meta.get("chat") else ("{}.bin",)
    for split in ("train", "val"):
        for name in (n.format(split) for n in names):
            if not (folder / name).is_file():
                raise UserError(f"{folder} has meta.json but no {name}: run `{hint}` again")
    return meta


# -----------------------------------------------------------------------------
# Conversations with checkable answers (instruct, reverse, addition): exact match


def last_replies(path: Path, tmpl: dict, limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `limit` conversations of a chat split, each cut before its last reply:
    (prompt, reply). The prompt ends with the last <|assistant|>, so it is exactly
    chat.render_prompt(messages[:-1]); the reply is the reference, its <|end|> included."""
    index = np.fromfile(chat_file(path, "index"), dtype="<i8")[:limit + 1]
    ids = np.fromfile(path, dtype=np.uint16, count=int(index[-1])).astype(np.int64)
    out = []
    for start, end in itertools.pairwise(index):
        c = ids[start:end]
        p = np.flatnonzero(c == marker_id(tmpl, "assistant"))[-1] + 1
        out.append((c[:p], c[p:]))
    return out


@torch.no_grad()
def exact_match(model, path: Path, tmpl: dict, device, limit: int = 500,
                batch_size: int = 500) -> tuple[float, int]:
    """The share of (up to `limit`) conversations of a split whose last reply, generated
    greedily (KV cache) to the conversation before it, is the reference reply exactly, up to
    and with <|end|>; and how many were checked. Prompts of one length go in one batch;
    each batch generates its longest reply's tokens (its <|end|> included) and no more."""
    by_length = {}
    for prompt, reply in last_replies(path, tmpl, limit):
        by_length.setdefault(len(prompt), []).append((prompt, reply))
    correct = checked = 0
    for P, pairs in by_length.items():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            prompts = torch.from_numpy(np.stack([q for q, _ in chunk])).to(device)  # (B, P)
            new = max(len(r) for _, r in chunk)
            out = generate(model, prompts, new, temperature=0)[:, P:].tolist()  # (B, new)
            # reply[:len(ref)] == ref: the reference, then its <|end|>: what comes after is cut
            correct += sum(got[:len(r)] == r.tolist() for got, (_, r) in zip(out, chunk,
                                                                              strict=True))
            checked += len(chunk)
    return correct / max(checked, 1), checked


# -----------------------------------------------------------------------------
# Muon, and the optimizer's parameter groups


class Muon(AdamW):
    """Muon (Jordan et al. 2024: MomentUm Orthogonalized by Newton-Schulz) for the groups
    marked "muon", the weight matrices inside the blocks; AdamW for the other groups.

    For a weight matrix W (rows x cols) with gradient G, at each step:
        B <- mu * B + G                       momentum
        U = G + mu * B                        Nesterov: the gradient one step ahead
        O = newton_schulz(U)                  U's singular values all set to about 1
        W <- W - lr * sqrt(max(1, rows / cols)) * O
    Every direction of the update moves by the same amount, whatever its gradient's size:
    rare directions learn as fast as common ones. The fused attention matrix c_attn holds
    three maps (q, k, v) with separate jobs: each third is orthogonalised on its own.
    """

    def group_step(self, group):
        if group.get("muon"):
            self.muon_step(group)
        else:
            self.adamw_step(group)

    def muon_step(self, group):
        lr, mu = group["lr"], group["momentum"]
        by_shape = {}  # (rows, cols) -> [(p, U)]: orthogonalised together, in one batch
        for p, pieces in zip(group["params"], group["pieces"], strict=True):
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf = state["momentum_buffer"]
            g = p.grad.float()
            buf.mul_(mu).add_(g)
            u = g.add(buf, alpha=mu).view(pieces, -1, p.size(1))  # (pieces, rows, cols)
            by_shape.setdefault(tuple(u.shape[1:]), []).append((p, u))
        for (rows, cols), todo in by_shape.items():
            o = newton_schulz(torch.cat([u for _, u in todo]))  # (all pieces, rows, cols)
            for (p, u), o_p in zip(todo, o.split([u.size(0) for _, u in todo]), strict=True):
                p.add_(o_p.view_as(p).to(p.dtype), alpha=-lr * max(1.0, rows / cols) ** 0.5)


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About U V^T for G = U S V^T (..., rows, cols): the nearest matrix with every singular
    value 1. Scaled so no singular value exceeds 1, X takes `steps` of the quintic iteration
        A = X X^T,  X <- a X + (b A + c A^2) X,  (a, b, c) = (3.4445, -4.7750, 2.0315)
    which maps each singular value s to a s + b s^3 + c s^5, pulling it into a band around 1
    in a few matmuls (the coefficients trade exactness for speed: s ends in about [0.7, 1.2];
    one that starts far below the rest, as a square matrix's smallest can, may lag behind).
    bf16 where matmuls run it natively: a GPU, or a CPU with AVX512-BF16 or AMX (there about
    twice as fast as fp32, and the iteration does not need fp32's precision); fp32 on other
    CPUs, which emulate bf16 and are slower in it."""
    a, b, c = 3.4445, -4.7750, 2.0315
    bf16 = G.is_cuda or (G.device.type == "cpu" and cpu_has_native_bf16())
    X = G.bfloat16() if bf16 else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide side: A is then the smaller of X X^T and X^T X
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)  # Frobenius >= spectral norm
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def configure_optimizer(model, weight_decay, learning_rate, betas, muon_lr=None,
                        muon_momentum=0.95):
    """AdamW decays matrices and embeddings (2-D and up), not biases or gains (1-D). With
    muon_lr, the 2-D weight matrices inside the blocks go to Muon instead; the embeddings,
    the (tied) output layer, gains and biases stay with AdamW. Returns the optimizer and how
    many tensors each group holds."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    to_muon = [(n, p) for n, p in named
               if muon_lr is not None and p.dim() == 2 and n.startswith("transformer.h.")]
    rest = [p for n, p in named if all(p is not q for _, q in to_muon)]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    counts = {"decayed": len(decay), "not decayed": len(no_decay)}
    if muon_lr is None:
        return AdamW(groups, lr=learning_rate, betas=betas), counts
    groups.append({"params": [p for _, p in to_muon], "muon": True, "momentum": muon_momentum,
                   "lr_scale": muon_lr / learning_rate, "weight_decay": 0.0,
                   "pieces": [3 if n.endswith("attn.c_attn.weight") else 1 for n, _ in to_muon]})
    counts["Muon"] = len(to_muon)
    return Muon(groups, lr=learning_rate, betas=betas), counts


# -----------------------------------------------------------------------------
# What the loop's one-line calls do: evaluation, checkpoints, logs, DDP


def make_meter(args, run: "Run", iter_num: int) -> Meter:
    return Meter(run.tokens_per_iter, run.flops_per_iter, run.peak, run.sync, iter_num,
                 args.max_iters, on_cpu=run.device.type == "cpu", log=run.log)


def evaluate_and_save(args, run: "Run", iter_num: int, best_val_loss: float, history: list,
                      meter: Meter, signals: StopSignals, losses: dict) -> tuple[dict, float, bool]:
    """On rank 0: evaluate (not counted in the speed, stopped at once by a signal), then save.
    Returns the losses (the last ones, if stopped), the best val loss so far, and whether to
    stop now. Under DDP the other ranks wait here for rank 0's decision, so a stop while it
    evaluates, saves or samples stops every rank together, before the step (they would
    otherwise wait in the step's all-reduce for a rank 0 that has left)."""
    stop = False
    if run.master:
        try:
            with meter.paused(), signals.interruptible():
                losses = evaluate(args, run, iter_num)
            best_val_loss = save(args, run, iter_num, best_val_loss, history, losses)
        except StopNow:  # the step has not begun: the state of iter_num is saved, below
            stop = True
    stop = all_ranks_any([stop or signals.asked], run.world_size, run.device)[0]
    return losses, best_val_loss, stop


def sync_gradients(model, last_micro_step: bool) -> None:
    """Under DDP, all-reduce the gradients once, after the last micro-batch of a step."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = last_micro_step


def log_step(run: "Run", meter: Meter, iter_num: int, lr: float, loss_sum, norm,
             history: list) -> None:
    """On rank 0: a CSV row of loss, learning rate and gradient norm; every print_interval
    steps also a printed line with the speed since the last one (in that row too). The loss is
    the whole global batch's: under DDP, each rank's mean, averaged over ranks (every rank
    takes part in that average, so every rank comes here)."""
    loss_sum = mean_over_ranks(loss_sum, run.world_size)
    if not run.master:
        return
    lossf, normf = loss_sum.item(), norm.item()
    history.append((iter_num, lossf))
    row = {"iter": iter_num, "loss": f"{lossf:.6f}", "lr": f"{lr:.6g}", "grad_norm": f"{normf:.6g}"}
    if iter_num % run.print_interval == 0:
        m = meter.read(iter_num)
        run.log(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, grad norm {normf:.3f}, "
                f"{m['ms']:.1f} ms/iter, {m['tokens_per_s']:,.0f} tokens/s, "
                f"MFU {100 * m['mfu']:.1f}%, {hms(m['elapsed'])} elapsed, {hms(m['eta'])} left")
        row |= {"ms_per_iter": f"{m['ms']:.3f}", "tokens_per_s": f"{m['tokens_per_s']:.1f}",
                "mfu": f"{m['mfu']:.4f}"}
    append_log(run.log_path, **row)


def save_and_say_how_to_resume(args, run: "Run", iter_num: int, best_val_loss: float,
                               history: list, rng: dict | None) -> None:
    """After a stop signal: save the last whole step's state (rng: the random streams as they
    were at its start, or None when it ended between steps) and print the resume command."""
    if run.master and not args.eval_only:
        save(args, run, iter_num, best_val_loss, history, rng=rng)
        run.log(f"stopped at iteration {iter_num}; resume with: python train.py "
                f"--init_from=resume --out_dir={args.out_dir}")


def bpb_note(loss: float, meta: dict, split: str = "val") -> str:
    """" (1.234 bpb)": a split's loss in bits per byte, to print beside it; "" without bytes."""
    sizes = loss_sizes(meta)
    return f" ({bits_per_byte(loss, *sizes[split]):.3f} bpb)" if sizes else ""


def evaluate(args, run: "Run", iter_num: int) -> dict:
    """The train and val loss (for conversations, on the answer tokens) and their bits per
    byte, and where the answers are checkable, the val exact match; logged; now and then a
    sample."""
    losses = estimate_loss(run.eval_model, run.get_batch, run.n_windows, args.eval_iters,
                           args.batch_size, seed=args.seed, ctx=run.ctx)
    acc, checked = exact_match(run.raw_model, run.splits["val"], run.meta["chat"],
                               run.device) if run.checkable else (None, 0)
    if sizes := loss_sizes(run.meta):  # per byte of text: compares across tokenizers
        losses |= {f"{s}_bpb": bits_per_byte(losses[s], *sizes[s]) for s in ("train", "val")}
    run.log(f"step {iter_num}: train loss {losses['train']:.4f}"
            f"{bpb_note(losses['train'], run.meta, 'train')}, val loss {losses['val']:.4f}"
            f"{bpb_note(losses['val'], run.meta)}, val perplexity {math.exp(losses['val']):.2f}"
            + (f", val exact match {100 * acc:.1f}% of {checked:,} conversations"
               if acc is not None else ""))
    if not args.eval_only:  # an evaluation alone writes nothing
        append_log(run.log_path, iter=iter_num, train_loss=f"{losses['train']:.6f}",
                   val_loss=f"{losses['val']:.6f}",
                   val_exact_match="" if acc is None else f"{acc:.4f}",
                   **{f"{s}_bpb": f"{losses[f'{s}_bpb']:.6f}" for s in ("train", "val")
                      if sizes})
    if acc is not None:
        losses["val_exact_match"] = acc
    if args.sample_every and iter_num % args.sample_every == 0:
        generate_and_print_sample(run.raw_model, run.prompt, run.decode, seed=args.seed,
                                  **run.sample_args)
    return losses


def save(args, run: "Run", iter_num: int, best_val_loss: float, history: list,
         losses: dict | None = None, rng: dict | None = None) -> float:
    """Save the latest training state to ckpt.pt (what --init_from=resume continues from), and
    when val improves, the weights to best.pt (what sample.py loads). Returns the best val loss.
    The first evaluation of a scratch run, an untrained model, saves nothing; that of a run
    started from a checkpoint does: if training on the new data never beats the weights it
    started from, best.pt keeps them. --eval_only never saves."""
    if args.eval_only or (iter_num == 0 and losses is not None and not run.started_from):
        return best_val_loss
    improved = losses is not None and losses["val"] < best_val_loss
    if improved:
        best_val_loss = losses["val"]
    state = run.checkpoint(iter_num, best_val_loss, history, rng)
    if improved:  # the weights and what they are, without the training state
        save_checkpoint({k: state[k] for k in ("model", "model_args", "meta", "config",
                                               "iter_num", "best_val_loss", "started_from",
                                               "vocab_grown")},
                        run.best_path)
    save_checkpoint(state, run.ckpt_path)
    run.saved_iter[:] = [iter_num]
    run.log(f"saved {run.ckpt_path}" + (f" and {run.best_path.name} (val {best_val_loss:.4f}"
                                         f"{bpb_note(best_val_loss, run.meta)})"
                                         if improved else ""))
    return best_val_loss


def check_finite(loss_sum, norm, iter_num: int, run: "Run", stop_asked: bool,
                 grad_clip: float) -> bool:
    """Stop a diverged run before it steps on a NaN; returns whether any rank asked to stop.

    float16's scaler skips steps with overflowing gradients by design, so there only the loss
    is watched. (.item() waits for the GPU each step: the price of never stepping on a NaN.)"""
    watched = loss_sum if run.dtype == "float16" else loss_sum + norm
    diverged, stop = all_ranks_any([not torch.isfinite(watched).item(), stop_asked],
                                   run.world_size, run.device)
    if diverged:
        kept = (f"the last good state is {run.ckpt_path} (iteration {run.saved_iter[0]})"
                if run.saved_iter else "no checkpoint was saved")
        advice = ("try a lower --learning_rate" if grad_clip else
                  "try a lower --learning_rate, or clipping (--grad_clip 1)")
        raise UserError(f"loss {loss_sum.item():.4g}, gradient norm {norm.item():.4g} at "
                        f"iteration {iter_num}: not finite; {kept}; {advice}", 1, "stopped")
    return stop


def generate_and_print_sample(model, prompt, decode, seed: int, max_new_tokens: int = 100,
                              temperature: float = 0.8):
    """What the model writes now, from a fixed prompt and seed: a qualitative progress check."""
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    out = generate(model, prompt, max_new_tokens, temperature=temperature, top_k=200,
                   generator=g)
    print("sample: " + repr(decode(out[0].tolist()))[:400])


# -----------------------------------------------------------------------------
# Setting up a run: the model, the optimizer, the data and the device, built once


@dataclass
class Run:
    """What setup() builds for the loop's plumbing: evaluation, checkpoints, logs, DDP."""
    raw_model: GPT  # the plain module: its parameters, its state_dict (no "_orig_mod." keys)
    eval_model: torch.nn.Module  # evaluation runs on rank 0 alone, outside DDP
    ctx: object  # autocast to the dtype, or nothing for float32
    device: torch.device
    dtype: str
    meta: dict
    checkable: bool  # conversations whose replies exact match can score (instruct, tasks)
    splits: dict  # split -> path of its .bin
    n_windows: dict  # split -> how many batch windows (or conversations) it has
    get_batch: Callable  # (split, ix) -> x, y on the device
    checkpoint: Callable  # (iter_num, best_val_loss, history, rng) -> the dict to save
    ckpt_path: Path  # the latest training state: what --init_from=resume continues from
    best_path: Path  # the weights with the best val loss: what sample.py loads
    saved_iter: list  # the iteration ckpt_path holds, once this run has one
    started_from: dict | None  # the checkpoint a new run started from: path, iteration, data
    log_path: Path
    log: Callable  # print on rank 0, nothing elsewhere
    world_size: int
    master: bool  # rank 0 prints, logs and saves
    prompt: torch.Tensor  # for the samples printed at evaluations
    decode: Callable
    sample_args: dict
    tokens_per_iter: int
    flops_per_iter: float
    peak: float
    sync: Callable
    print_interval: int = 1  # log_step prints every this many steps (a multiple of log_interval)


def build_model(args, meta: dict, ckpt: dict | None, start: tuple[dict, Path] | None,
                log=print) -> tuple[GPT, dict, dict | None]:
    """From scratch, from our checkpoint (resume, or a new run's start) or from OpenAI's GPT-2:
    (model, model_args, vocab_grown: the chat markers added to a model without them, or None)."""
    model_args = model_args_of(args, meta["vocab_size"])
    if ckpt is not None:
        return (*model_from_checkpoint(ckpt, Path(args.out_dir) / "ckpt.pt",
                                       dropout=args.dropout), ckpt.get("vocab_grown"))
    if start is not None:  # its weights, maybe with a shorter context (resolve_args checked)
        model, model_args = model_from_checkpoint(*start, dropout=args.dropout)
        crop_block_size(model, args.block_size)
        grown = add_markers(model, meta, start[1], log)
        return model, {**model_args, "block_size": args.block_size,
                       "vocab_size": model.config.vocab_size}, grown
    if args.init_from == "scratch":
        return GPT(GPTConfig(**model_args)), model_args, None
    if meta["tokenizer"] != "gpt2":  # OpenAI's GPT-2 weights, to fine-tune
        raise UserError(f"--init_from {args.init_from} needs GPT-2 BPE data, and "
                        f"data/{args.dataset} is {meta['tokenizer']}: try --dataset "
                        "shakespeare (python prepare.py --dataset shakespeare)")
    try:
        model = from_pretrained(args.init_from, dropout=args.dropout)
    except ValueError as e:
        raise UserError(first_line(e)) from None
    grown = add_markers(model, meta, args.init_from, log)
    if model.config.vocab_size < meta["vocab_size"]:
        raise UserError(f"{args.init_from} has {model.config.vocab_size} tokens, fewer "
                        f"than data/{args.dataset}'s {meta['vocab_size']}")
    if args.block_size > model.config.block_size:
        raise UserError(f"--block_size {args.block_size} is longer than {args.init_from}'s "
                        f"context of {model.config.block_size}")
    crop_block_size(model, args.block_size)
    return model, {k: getattr(model.config, k) for k in model_args}, grown


def add_markers(model: GPT, meta: dict, source, log=print) -> dict | None:
    """Conversations for a model trained without the chat markers (in their base vocabulary,
    which resolve_args checked): its embedding grows by them (gpt2_weights.grow_vocab), said in
    a line. Returns the record the checkpoints keep, or None when nothing grew."""
    old = model.config.vocab_size
    if not meta.get("chat") or old != meta["chat"]["markers"]["<|system|>"]:
        return None
    grow_vocab(model, meta["vocab_size"])
    log(f"{source} has no chat markers: its {old} token embeddings grow by "
        f"{meta['vocab_size'] - old}, each new one the mean of the old ones")
    return {"from": old, "to": meta["vocab_size"], "init": "mean of the old rows"}


def data_loader(args, meta: dict, device) -> tuple[dict, dict, Callable]:
    """(splits, n_windows, get_batch(split, ix)) for text windows or whole conversations
    (then a "window" is a conversation: the sampler draws their numbers)."""
    folder = Path(args.data_dir) / args.dataset
    splits = {s: folder / f"{s}.bin" for s in ("train", "val")}
    if meta.get("chat"):
        n_windows = {s: chat_file(p, "index").stat().st_size // 8 - 1 for s, p in splits.items()}
        return splits, n_windows, lambda split, ix: get_chat_batch(splits[split], ix,
                                                                   args.block_size, device)
    n_windows = {s: num_tokens(p) - args.block_size for s, p in splits.items()}
    if min(n_windows.values()) <= 0:
        raise UserError(f"block_size {args.block_size} is not shorter than the smallest "
                        f"split ({min(map(num_tokens, splits.values()))} tokens): lower "
                        "--block_size or use more text")
    return splits, n_windows, lambda split, ix: get_batch(splits[split], ix, args.block_size,
                                                          device)


def setup(args, settings: dict, meta: dict, ckpt: dict | None, start: tuple[dict, Path] | None,
          rank: int, world_size: int) -> Training:
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device = torch.device(args.device)
    # Every rank starts from the same seed for the model (DDP also copies rank 0's weights to
    # the others); dropout gets a stream of its own per rank, below.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":  # TF32 matmuls on Ampere and later (V100, T4: no effect)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, model_args, vocab_grown = build_model(args, meta, ckpt, start, log)
    model = model.to(device)
    optimizer, counts = configure_optimizer(
        model, args.weight_decay, args.learning_rate, (args.beta1, args.beta2),
        args.muon_lr if args.optimizer == "muon" else None, args.muon_momentum)
    scaler = torch.amp.GradScaler("cuda", enabled=(args.dtype == "float16"))
    splits, n_windows, get_split_batch = data_loader(args, meta, device)
    # --overfit_batch's one batch is drawn here, before any resume: a resumed run keeps it
    lengths = (np.diff(np.fromfile(chat_file(splits["train"], "index"), dtype="<i8"))
               if meta.get("chat") else None)  # conversations: micro-batches by length
    batches = Batches(lambda ix: get_split_batch("train", ix), n_windows["train"],
                      args.gradient_accumulation_steps, args.batch_size, args.seed, rank,
                      world_size, fixed=args.overfit_batch, lengths=lengths)
    iter_num, best_val_loss, history = 0, float("inf"), []
    out_dir = Path(args.out_dir)
    ckpt_path, log_path = out_dir / "ckpt.pt", out_dir / "log.csv"
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):  # float16's loss scale (empty when the scaler is off)
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        history = ckpt.get("history", [])
        set_rng_state(ckpt["rng"], batches.generator)
        log(f"resuming from {ckpt_path} at iteration {iter_num}")
    if rank > 0:
        torch.manual_seed(args.seed + rank)  # dropout masks differ between ranks
    if master and not args.eval_only:  # a fresh run starts a fresh log; a resumed one
        if iter_num:  # forgets what came after its checkpoint
            truncate_log(log_path, iter_num)
        else:
            log_path.unlink(missing_ok=True)
    if loss_sizes(meta) is None:
        log(f"no bits per byte: {Path(args.data_dir) / args.dataset / 'meta.json'} has no "
            "byte counts (an older prepare.py wrote it; prepare the data again to get them)")
    n_params = model.num_params()
    log(f"model: {n_params / 1e6:.2f}M parameters; device {device}, {args.dtype}; optimizer "
        "groups: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + " tensors"
        + (f"; {world_size} processes" if world_size > 1 else ""))
    raw_model = model  # checkpoints save this one: a compiled model prefixes keys "_orig_mod."
    if args.compile:
        model = CompiledOrEager(model, log)
    eval_model = model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # where the weights came from, when a new run started from a checkpoint: kept by resumes
    started_from = ckpt.get("started_from") if ckpt is not None else start and {
        "path": str(start[1]), "iter_num": start[0]["iter_num"],
        "dataset": start[0].get("config", {}).get("dataset")}

    def checkpoint(iter_num, best_val_loss, history, rng=None) -> dict:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "model_args": model_args, "config": settings,
                "iter_num": iter_num, "best_val_loss": best_val_loss, "meta": meta,
                "rng": rng_state(batches.generator, rng), "history": history,
                "started_from": started_from, "vocab_grown": vocab_grown}

    # a fixed prompt for the samples printed at evaluations: the start of the val split
    # (for conversations, the first one's last question, answered greedily)
    prompt, sample_args = np.fromfile(splits["val"], dtype=np.uint16, count=16), {}
    if meta.get("chat"):
        [(prompt, reply)] = last_replies(splits["val"], meta["chat"], 1)
        sample_args = {"max_new_tokens": len(reply), "temperature": 0}
    prompt = torch.from_numpy(prompt.astype(np.int64))[None].to(device)
    tokens_per_iter = args.gradient_accumulation_steps * args.batch_size * args.block_size
    ctx = autocast_ctx(device, args.dtype)
    run = Run(
        raw_model=raw_model, eval_model=eval_model, ctx=ctx, device=device,
        dtype=args.dtype, meta=meta, checkable=bool(meta.get("chat", {}).get("checkable")),
        splits=splits, n_windows=n_windows,
        get_batch=get_split_batch, checkpoint=checkpoint, ckpt_path=ckpt_path,
        best_path=out_dir / "best.pt", saved_iter=[iter_num] if ckpt else [],
        started_from=started_from, log_path=log_path, log=log, world_size=world_size,
        master=master, prompt=prompt, decode=get_tokenizer(meta)[1],
        sample_args=sample_args,
        tokens_per_iter=tokens_per_iter,
        flops_per_iter=flops_per_token(model_args, n_params) * tokens_per_iter / world_size,
        peak=device_peak_flops(device, args.dtype) if master else 1.0,
        sync=torch.cuda.synchronize if device.type == "cuda" else (lambda: None),
        print_interval=args.print_interval or args.log_interval)
    return Training(model, raw_model, optimizer, batches, ctx, scaler, iter_num, best_val_loss,
                    history, run)


def train(args) -> dict:
    """Check the settings, set up (DDP, lock, checkpoint, data, model), train, draw the curves."""
    check_args(args)
    rank, local_rank, world_size = setup_ddp(args.device, args.backend)
    log = print if rank == 0 else (lambda *a, **k: None)
    lock = None
    try:
        ckpt = load_resume_state(args) if args.init_from == "resume" else None
        start = load_start(args, log)
        meta, settings = resolve_args(args, ckpt, local_rank, world_size, log, start)
        if rank == 0 and not args.eval_only:  # one run per out_dir; an evaluation writes nothing
            lock = OutDirLock(Path(args.out_dir)).acquire()  # (the first thing written)
        if ckpt is not None and ckpt["iter_num"] >= args.max_iters and not args.eval_only:
            log(f"{Path(args.out_dir) / 'ckpt.pt'} is at iteration {ckpt['iter_num']}, already "
                f"at --max_iters {args.max_iters}: nothing to train (raise --max_iters)")
            return {"iter_num": ckpt["iter_num"], "best_val_loss": ckpt["best_val_loss"],
                    "history": ckpt.get("history", []), "final_losses": {}, "stopped": False}
        if ckpt is None and not args.eval_only and rank == 0:
            make_room(args, log)
        if args.warmup_iters > args.max_iters and args.decay_lr:
            log(f"note: --warmup_iters {args.warmup_iters} is longer than the run "
                f"({args.max_iters} iterations): the learning rate never reaches its peak")
        training = setup(args, settings, meta, ckpt, start, rank, world_size)
        del ckpt, start  # free the loaded copies before training starts
        result = train_loop(args, training)
        if rank == 0 and not args.eval_only and training.run.log_path.exists():
            try:
                log(f"wrote {plot_losses(Path(args.out_dir))}")
            except ImportError:
                log("matplotlib is not installed: no loss.png (pip install matplotlib)")
        log(f"done: {result['iter_num']} iterations in {result['elapsed']:.1f}s, best val loss "
            f"{result['best_val_loss']:.4f}{bpb_note(result['best_val_loss'], meta)}")
        return result
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if (where := out_of_memory(e)) is None:
            raise  # the CPU allocator's out of memory is a RuntimeError: only that one here
        raise UserError(f"out of {where} memory: lower --batch_size (raise "
                        "--gradient_accumulation_steps to keep the batch), --block_size, or the "
                        "model (--n_layer, --n_embd); the checkpoints in --out_dir are "
                        "untouched", 1, "stopped") from None
    finally:
        if lock is not None:
            lock.release()
        if torch.distributed.is_initialized():  # torchrun, even with a single process
            torch.distributed.destroy_process_group()


def load_resume_state(args) -> dict:
    """out_dir/ckpt.pt, checked to hold a whole training state."""
    path = Path(args.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path)
    if not RESUME_KEYS <= ckpt.keys():
        raise UserError(f"{path} holds a model but not a training state to resume")
    return ckpt


def load_start(args, log=print) -> tuple[dict, Path] | None:
    """--init_from=PATH, a checkpoint of ours or a run folder (its best.pt, else ckpt.pt): the
    (checkpoint, path) whose weights and architecture a new run starts from, at iteration 0
    with a fresh optimizer and schedule. None for the other --init_from values."""
    if args.init_from in ("scratch", "resume", *GPT2_NAMES):
        return None
    path = run_checkpoint(Path(args.init_from))
    if path is None:  # a folder without best.pt or ckpt.pt: GPT-2's weights, say
        return None
    if path.resolve().parent == Path(args.out_dir).resolve():
        raise UserError(f"{path} is in this run's own --out_dir {args.out_dir}: to continue "
                        "that run use --init_from=resume, or pick another --out_dir")
    ckpt = load_checkpoint(path)
    picked = {"best.pt": "its best weights", "ckpt.pt": "its latest state: it has no best.pt"}
    log(f"a new run from {path}" + (f" ({picked[path.name]})" if path.parent.samefile(
        args.init_from) else "") + f": iteration {ckpt['iter_num']} of a run on "
        f"{ckpt.get('config', {}).get('dataset')}")
    return ckpt, path


def make_room(args, log=print) -> None:
    """A new run in a used out_dir loses nothing: the earlier run's files move to
    out_dir/runs/<its time>/ (the newest --keep_runs kept), unless --overwrite replaces them."""
    out_dir = Path(args.out_dir)
    if args.overwrite:  # the old run's best weights must not pass for this run's
        (out_dir / "best.pt").unlink(missing_ok=True)
    else:
        keep_earlier_run(out_dir, args.keep_runs, log)


def main(argv=None) -> dict | None:
    """Train, and return what happened (losses by step, best val loss, checkpoint path)."""
    args = parse_args(argv)
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit, fail the write (EFBIG), not the
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # process: the message says what happened
    try:
        if args.plot:
            try:
                print(f"wrote {plot_losses(Path(args.plot))}")
            except ImportError:
                raise UserError("--plot needs matplotlib: pip install matplotlib") from None
            return None
        return train(args)
    except UserError as e:  # bad input (2), or a run that stopped by itself (1)
        print(f"train.py: {e.label}: {e}", file=sys.stderr)
        sys.exit(e.status)


if __name__ == "__main__":
    main()
