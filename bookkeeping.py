"""
What the training loop's one-line calls do: evaluate and save, log a step, check it, stop.

train.py's loop calls evaluate_and_save at each evaluation, log_step at each log line,
check_finite after each backward pass and save_and_say_how_to_resume after a stop signal; each
works on the Run that run_setup.py builds: the model to evaluate and save, its checkpoint
paths, its log, several processes. Evaluation scores the train and val loss (in bits per byte
too), on checkable conversations the val exact match, and prints a sample.
"""

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chat import chat_file, marker_id
from checkpoints import save_checkpoint
from devices import all_ranks_any, mean_over_ranks
from errors import UserError
from gpt import GPT
from inference import generate
from runlog import Meter, append_log, hms
from stop_signals import StopNow, StopSignals
from tokenizer import bits_per_byte

# -----------------------------------------------------------------------------
# What the calls work on: the Run


@dataclass
class Run:
    """What run_setup.make_run builds for the loop and its calls: evaluation, checkpoints, logs,
    DDP."""
    raw_model: GPT  # the plain module: its parameters (clipped, saved), its state_dict (no
    # "_orig_mod." keys)
    eval_model: torch.nn.Module  # evaluation runs on rank 0 alone, outside DDP
    ctx: object  # autocast to the dtype, or nothing for float32: training's and evaluation's
    device: torch.device
    dtype: str
    meta: dict
    checkable: bool  # conversations whose replies exact match can score (instruct, tasks)
    splits: dict  # split -> path of its .bin
    n_windows: dict  # split -> how many batch windows (or conversations) it has
    get_batch: Callable  # (split, ix) -> x, y on the device
    estimate_loss: Callable  # train.py's: (model, get_batch, n_windows, ...) -> split -> loss
    checkpoint: Callable  # (iter_num, best_val_loss, history, rng) -> the dict to save
    ckpt_path: Path  # the latest training state: what --init_from=resume continues from
    best_path: Path  # the weights with the best val loss: what sample.py loads
    saved_iter: list  # the iteration ckpt_path holds, once this run has one
    started_from: dict | None  # the weights a new run started from: path, iteration, data
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


# -----------------------------------------------------------------------------
# Scores: bits per byte, exact match on conversations, a sample


def loss_sizes(meta: dict) -> dict | None:
    """split -> (tokens, UTF-8 bytes) of the text that carries loss, from meta.json: a text
    split's, or a chat split's answers (their <|end|> markers carry loss but have no bytes).
    None for data prepared before prepare.py counted bytes: then there is no bits per byte."""
    counts, infix = (meta["chat"], "_answer") if meta.get("chat") else (meta, "")
    sizes = {s: (counts.get(f"{s}{infix}_tokens"), counts.get(f"{s}{infix}_bytes"))
             for s in ("train", "val")}
    return sizes if all(n and b for n, b in sizes.values()) else None


def bpb_note(loss: float, meta: dict, split: str = "val") -> str:
    """" (1.234 bpb)": a split's loss in bits per byte, to print beside it; "" without bytes."""
    sizes = loss_sizes(meta)
    return f" ({bits_per_byte(loss, *sizes[split]):.3f} bpb)" if sizes else ""


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
def replies_right(model, path: Path, tmpl: dict, device, limit: int = 500,
                  batch_size: int = 500) -> list[tuple[np.ndarray, bool]]:
    """For each of (up to `limit`) conversations of a split, in order: (its prompt, whether
    its last reply, generated greedily (KV cache) to the conversation before it, is the
    reference reply exactly, up to and with <|end|>). Prompts of one length go in one batch;
    each batch generates its longest reply's tokens (its <|end|> included) and no more."""
    pairs = last_replies(path, tmpl, limit)
    by_length, right = {}, [False] * len(pairs)
    for i, (prompt, _) in enumerate(pairs):
        by_length.setdefault(len(prompt), []).append(i)
    for P, which in by_length.items():
        for j in range(0, len(which), batch_size):
            chunk = which[j:j + batch_size]
            prompts = torch.from_numpy(np.stack([pairs[i][0] for i in chunk])).to(device)
            new = max(len(pairs[i][1]) for i in chunk)
            out = generate(model, prompts, new, temperature=0)[:, P:].tolist()  # (B, new)
            # reply[:len(ref)] == ref: the reference, then its <|end|>: what comes after is cut
            for i, got in zip(chunk, out, strict=True):
                right[i] = got[:len(pairs[i][1])] == pairs[i][1].tolist()
    return [(prompt, ok) for (prompt, _), ok in zip(pairs, right, strict=True)]


def exact_match(model, path: Path, tmpl: dict, device, limit: int = 500,
                batch_size: int = 500) -> tuple[float, int]:
    """The share of (up to `limit`) conversations of a split whose last reply, generated
    greedily, is the reference exactly (replies_right); and how many were checked."""
    right = [ok for _, ok in replies_right(model, path, tmpl, device, limit, batch_size)]
    return sum(right) / max(len(right), 1), len(right)


def generate_and_print_sample(model, prompt, decode, seed: int, max_new_tokens: int = 100,
                              temperature: float = 0.8):
    """What the model writes now, from a fixed prompt and seed: a qualitative progress check."""
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    out = generate(model, prompt, max_new_tokens, temperature=temperature, top_k=200,
                   generator=g)
    print("sample: " + repr(decode(out[0].tolist()))[:400])


# -----------------------------------------------------------------------------
# Evaluate, then save: the latest state, and the best weights


def evaluate(args, run: Run, iter_num: int) -> dict:
    """The train and val loss (for conversations, on the answer tokens) and their bits per
    byte, and where the answers are checkable, the val exact match; logged; now and then a
    sample."""
    losses = run.estimate_loss(run.eval_model, run.get_batch, run.n_windows, args.eval_iters,
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


def save(args, run: Run, iter_num: int, best_val_loss: float, history: list,
         losses: dict | None = None, rng: dict | None = None) -> float:
    """Save the latest training state to ckpt.pt (what --init_from=resume continues from), and
    when val improves, the weights to best.pt (what sample.py loads). Returns the best val loss.
    The first evaluation of a scratch run, an untrained model, saves nothing; that of a run
    started from trained weights (a checkpoint of ours, or GPT-2's) does: if training on the
    new data never beats the weights it started from, best.pt keeps them. With
    --always_save_checkpoint=False (nanoGPT's meaning) an evaluation saves only when val
    improves; a stop (losses None) still saves, to resume from. --eval_only never saves."""
    if args.eval_only or (iter_num == 0 and losses is not None and not run.started_from):
        return best_val_loss
    improved = losses is not None and losses["val"] < best_val_loss
    if improved:
        best_val_loss = losses["val"]
    elif losses is not None and not args.always_save_checkpoint:
        return best_val_loss  # no better: ckpt.pt keeps the state of the last improvement
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


def evaluate_and_save(args, run: Run, iter_num: int, best_val_loss: float, history: list,
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


def save_and_say_how_to_resume(args, run: Run, iter_num: int, best_val_loss: float,
                               history: list, rng: dict | None) -> None:
    """After a stop signal: save the last whole step's state (rng: the random streams as they
    were at its start, or None when it ended between steps) and print the resume command."""
    if run.master and not args.eval_only:
        save(args, run, iter_num, best_val_loss, history, rng=rng)
        run.log(f"stopped at iteration {iter_num}; resume with: python train.py "
                f"--init_from=resume --out_dir={args.out_dir}")


# -----------------------------------------------------------------------------
# Each step: its log line, its speed, a check that it is finite


def make_meter(args, run: Run, iter_num: int) -> Meter:
    return Meter(run.tokens_per_iter, run.flops_per_iter, run.peak, run.sync, iter_num,
                 args.max_iters, on_cpu=run.device.type == "cpu", log=run.log)


def log_step(run: Run, meter: Meter, iter_num: int, lr: float, loss_sum, norm,
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


def check_finite(loss_sum, norm, iter_num: int, run: Run, stop_asked: bool,
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
