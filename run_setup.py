"""
Setting a training run up: where it starts, its model, and the Run its loop's calls use.

train.py's train() and setup() call these: the state a resume continues (out_dir/ckpt.pt) or
the checkpoint a new run starts from (--init_from=PATH), room made in a used out_dir, the model
built from scratch, from our checkpoint or from GPT-2's weights (with the chat markers added
where conversations need them), a resume's optimizer state and random streams restored, and
around what train.py builds, the log, torch.compile, DDP and the Run (bookkeeping.py).
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from bookkeeping import Run, last_replies, loss_sizes
from checkpoints import (
    RESUME_KEYS,
    keep_earlier_run,
    load_checkpoint,
    model_from_checkpoint,
    rng_state,
    run_checkpoint,
    set_rng_state,
)
from corpus import prepare_command
from devices import CompiledOrEager, autocast_ctx, device_peak_flops, flops_per_token
from errors import UserError, first_line
from gpt import GPT, GPTConfig
from gpt2_weights import GPT2_NAMES, crop_block_size, from_pretrained, grow_vocab
from runlog import truncate_log
from settings import model_args_of
from tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# Where a run starts: a resume's state, a new run's checkpoint, room in out_dir


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


# -----------------------------------------------------------------------------
# The model: from scratch, from our checkpoint, or from GPT-2's weights


def add_markers(model: GPT, meta: dict, source, log=print) -> dict | None:
    """Conversations for a model trained without the chat markers (in their base vocabulary,
    which resolve_args checked): its embedding grows by them (gpt2_weights.grow_vocab), said in a
    line.
    Returns the record the checkpoints keep, or None when nothing grew."""
    old = model.config.vocab_size
    if not meta.get("chat") or old != meta["chat"]["markers"]["<|system|>"]:
        return None
    grow_vocab(model, meta["vocab_size"])
    log(f"{source} has no chat markers: its {old} token embeddings grow by "
        f"{meta['vocab_size'] - old}, each new one the mean of the old ones")
    return {"from": old, "to": meta["vocab_size"], "init": "mean of the old rows"}


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
                        f"{Path(args.data_dir) / args.dataset} is {meta['tokenizer']}: try "
                        "--dataset shakespeare (prepared by "
                        f"`{prepare_command('shakespeare', args.data_dir)}`)")
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


# -----------------------------------------------------------------------------
# Around what train.py builds: a resume's state, the log, compile, DDP, the Run


def restore_state(ckpt: dict | None, optimizer, scaler, generator: torch.Generator, path: Path,
                  log=print) -> tuple[int, float, list]:
    """Where training starts: (iter_num, best_val_loss, history), (0, inf, []) for a new run. A
    resume (ckpt, read from path) also gets back its optimizer state, float16's loss scale,
    and the random streams of dropout and of the batches (generator)."""
    if ckpt is None:
        return 0, float("inf"), []
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):  # float16's loss scale (empty when the scaler is off)
        scaler.load_state_dict(ckpt["scaler"])
    iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    history = ckpt.get("history", [])
    set_rng_state(ckpt["rng"], generator)
    log(f"resuming from {path} at iteration {iter_num}")
    return iter_num, best_val_loss, history


def make_run(args, settings: dict, meta: dict, ckpt: dict | None,
             start: tuple[dict, Path] | None, rank: int, world_size: int, log: Callable, *,
             model: GPT, model_args: dict, vocab_grown: dict | None, counts: dict, optimizer,
             scaler, generator: torch.Generator, data: tuple, iter_num: int,
             estimate_loss: Callable) -> tuple[torch.nn.Module, Run]:
    """The rest of the set-up, around what train.py's setup built (the model, its optimizer,
    the batches' generator, data_loader's (splits, n_windows, get_batch)): a fresh log, or a
    resumed one cut back to its checkpoint; the model compiled and wrapped for DDP; and the
    Run the loop's calls use. Returns (the model the loop calls, the Run)."""
    master, device = rank == 0, torch.device(args.device)
    splits, n_windows, get_split_batch = data
    out_dir = Path(args.out_dir)
    ckpt_path, log_path = out_dir / "ckpt.pt", out_dir / "log.csv"
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

    # where the weights came from, when a new run started from trained ones: kept by resumes
    started_from = ckpt.get("started_from") if ckpt is not None else start and {
        "path": str(start[1]), "iter_num": start[0]["iter_num"],
        "dataset": start[0].get("config", {}).get("dataset")}
    if ckpt is None and start is None and args.init_from != "scratch":  # GPT-2's weights
        started_from = {"path": args.init_from, "iter_num": None, "dataset": None}

    def checkpoint(iter_num, best_val_loss, history, rng=None) -> dict:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "model_args": model_args, "config": settings,
                "iter_num": iter_num, "best_val_loss": best_val_loss, "meta": meta,
                "rng": rng_state(generator, rng), "history": history,
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
    return model, Run(
        raw_model=raw_model, eval_model=eval_model, ctx=ctx, device=device,
        dtype=args.dtype, meta=meta, checkable=bool(meta.get("chat", {}).get("checkable")),
        splits=splits, n_windows=n_windows,
        get_batch=get_split_batch, estimate_loss=estimate_loss, checkpoint=checkpoint,
        ckpt_path=ckpt_path,
        best_path=out_dir / "best.pt", saved_iter=[iter_num] if ckpt else [],
        started_from=started_from, log_path=log_path, log=log, world_size=world_size,
        master=master, prompt=prompt, decode=get_tokenizer(meta)[1],
        sample_args=sample_args,
        tokens_per_iter=tokens_per_iter,
        flops_per_iter=flops_per_token(model_args, n_params) * tokens_per_iter / world_size,
        peak=device_peak_flops(device, args.dtype) if master else 1.0,
        sync=torch.cuda.synchronize if device.type == "cuda" else (lambda: None),
        print_interval=args.print_interval or args.log_interval)
