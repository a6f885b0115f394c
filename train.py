"""
Train a GPT on a prepared dataset.

    python prepare.py && python train.py --preset=cpu       # a small model on the CPU, ~30 s
    python prepare.py && python train.py                    # baby GPT on Tiny Shakespeare (GPU)
    python train.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 \\
        --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \\
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0   # nanoGPT's CPU recipe
    python train.py --init_from=resume                      # continue from out_dir/ckpt.pt

Read it top to bottom: the data (get_batch, get_chat_batch for conversations, estimate_loss,
the training batches), the three formulas (AdamW, get_lr, clip_grad_norm), the training loop
and the set-up that builds what it trains; then the command line and main(). That is the
lesson; what is not lives beside it, one job a module: the model in gpt.py, the settings'
presets, checks and inheritance in settings.py, Muon in muon.py, where a run starts and what
is set up around the loop in run_setup.py, what the loop's one-line calls do (evaluation,
checkpoints, log lines) in bookkeeping.py; below them devices.py, checkpoints.py, runlog.py
and stop_signals.py; the chat template in chat.py.
"""

import argparse
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

from bookkeeping import (
    Run,
    bpb_note,
    check_finite,
    evaluate_and_save,
    log_step,
    make_meter,
    save_and_say_how_to_resume,
)
from chat import chat_file
from checkpoints import OutDirLock, step_rng_state
from devices import mean_over_ranks, out_of_memory, setup_ddp, sync_gradients
from errors import UserError, readable_output
from gpt import MLPS, NORMS, POS_EMBS, eval_mode
from muon import Muon
from run_setup import (
    build_model,
    load_resume_state,
    load_start,
    make_room,
    make_run,
    restore_state,
)
from runlog import plot_losses
from settings import PRESETS, check_args, flags_given, resolve_args, str2bool
from stop_signals import StopNow, StopSignals

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


def to_device(x, y, device):
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def num_tokens(path: Path) -> int:
    return path.stat().st_size // 2


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


@torch.no_grad()
def estimate_loss(model, get_split_batch, n_windows: dict, eval_iters: int, batch_size: int,
                  seed: int = 0, ctx=None) -> dict:
    """Mean loss over eval_iters batches of each split, in eval mode (no dropout; the mode the
    model was in comes back after, even on an exception): the mean over every target of them
    all (for conversations, every answer token: batches with more answer tokens weigh more, as
    in training; for text windows, the mean of the batches').

    The batches come from their own generator, seeded the same each time: every evaluation
    scores the same windows, so successive numbers compare, and training's random stream
    is left untouched (which keeps resumed runs exact).
    """
    out, ctx = {}, ctx or nullcontext()  # ctx: autocast to the training dtype, if any
    with eval_mode(model):  # the mode it found comes back, even on an exception (a stop)
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
    return out



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
# Optimizer: AdamW, by hand, and the parameter groups


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW computes it.

    For each parameter p with gradient g, at step t (1-based):
        p <- p * (1 - lr * weight_decay)            decay, separate from the gradient
        m <- beta1 * m + (1 - beta1) * g            running mean of gradients
        v <- beta2 * v + (1 - beta2) * g^2          running mean of squared gradients
        m_hat = m / (1 - beta1^t)                   bias correction: m, v start at 0
        v_hat = v / (1 - beta2^t)
        p <- p - lr * m_hat / (sqrt(v_hat) + eps)
    The code does not go parameter by parameter: each torch._foreach_* call does one line of
    this math for all of a group's tensors at once, which is what makes torch's own
    implementation fast. m's update is written as a lerp, and the bias corrections are folded
    into the last line: p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
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
            self.adamw_step(group)
        return loss

    def adamw_step(self, group):  # (muon.Muon takes it for the groups that are not Muon's)
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
    return Muon(groups, AdamW.adamw_step, lr=learning_rate, betas=betas), counts


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
    """What the loop trains, with what, and from where; setup(), below, builds it."""
    model: torch.nn.Module  # what the loop calls: maybe compiled, maybe wrapped in DDP
    optimizer: torch.optim.Optimizer  # AdamW, or muon.Muon (with AdamW's update for the rest)
    batches: Batches  # () -> this step's micro-batches
    scaler: torch.amp.GradScaler  # float16's loss scaling; a no-op for other dtypes
    iter_num: int  # where training starts: 0, or a resumed checkpoint's step
    best_val_loss: float
    history: list  # (iteration, training loss) at each log line
    run: Run  # the plumbing: the plain model (run.raw_model), autocast (run.ctx), evaluation,
    # checkpoints, logs, DDP (bookkeeping.py)


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
                    with run.ctx:
                        _, loss = model(x, y)
                        loss = loss * weight  # the mean over the step's targets, not the sum
                    t.scaler.scale(loss).backward()
                    loss_sum = loss_sum + loss.detach()

                # 4) clip the global gradient norm (of the unscaled gradients), check, step
                t.scaler.unscale_(optimizer)
                params = run.raw_model.parameters()  # the plain GPT's, not a wrapper's
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


# -----------------------------------------------------------------------------
# Setting up what the loop trains: the model, the optimizer, the batches


def setup(args, settings: dict, meta: dict, ckpt: dict | None, start: tuple[dict, Path] | None,
          rank: int, world_size: int) -> Training:
    """The model (from scratch, our checkpoint or GPT-2's weights), its optimizer and the
    training batches, each restored from ckpt on a resume; run_setup.make_run builds the rest
    (the log, torch.compile, DDP, the Run)."""
    log = print if rank == 0 else (lambda *a, **k: None)
    device = torch.device(args.device)
    # Every rank starts from the same seed for the model (DDP also copies rank 0's weights to
    # the others); dropout gets a stream of its own per rank, below.
    torch.manual_seed(args.seed)
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
    iter_num, best_val_loss, history = restore_state(ckpt, optimizer, scaler, batches.generator,
                                                     Path(args.out_dir) / "ckpt.pt", log)
    if rank > 0:
        torch.manual_seed(args.seed + rank)  # dropout masks differ between ranks
    model, run = make_run(args, settings, meta, ckpt, start, rank, world_size, log, model=model,
                          model_args=model_args, vocab_grown=vocab_grown, counts=counts,
                          optimizer=optimizer, scaler=scaler, generator=batches.generator,
                          data=(splits, n_windows, get_split_batch), iter_num=iter_num,
                          estimate_loss=estimate_loss)
    return Training(model, optimizer, batches, scaler, iter_num, best_val_loss, history, run)


# -----------------------------------------------------------------------------
# The command line


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
    flag("--always_save_checkpoint", True, "save the latest state (ckpt.pt) at every evaluation; "
         "False, as in nanoGPT: only when val improves (the best weights go to best.pt either way)")
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


# -----------------------------------------------------------------------------
# main: check, set up, train


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


def main(argv=None) -> dict | None:
    """Train, and return what happened (losses by step, best val loss, checkpoint path)."""
    readable_output()  # a name that is not UTF-8 prints, never a traceback
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
