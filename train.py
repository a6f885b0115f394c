"""
Train a GPT on a prepared dataset.

    python prepare.py && python train.py                   # baby GPT on Tiny Shakespeare (GPU)
    python train.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 \\
        --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \\
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0   # nanoGPT's CPU recipe
    python train.py --init_from=resume                     # continue from out_dir/ckpt.pt

Everything a learner needs is in this file, top to bottom: the settings, the data loader, the
hand-written AdamW, the learning-rate schedule, gradient clipping, evaluation, checkpoints and
the training loop itself. The model lives in gpt.py.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


# -----------------------------------------------------------------------------
# Settings


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a GPT on data/<dataset>/.")

    def flag(name, default, help):  # a boolean that works as --x, --x=True and --x=False
        p.add_argument(name, type=str2bool, nargs="?", const=True, default=default, help=help)

    g = p.add_argument_group("I/O")
    g.add_argument("--out_dir", default="out", help="where checkpoints and logs go")
    g.add_argument("--eval_interval", type=int, default=250, help="evaluate every this many steps")
    g.add_argument("--log_interval", type=int, default=10, help="print a line every this many")
    g.add_argument("--eval_iters", type=int, default=200, help="batches per loss estimate")
    flag("--eval_only", False, "evaluate once and exit")
    flag("--always_save_checkpoint", False, "save at every eval, not only when val improves")
    g.add_argument("--init_from", default="scratch", help="'scratch' or 'resume' (from out_dir)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="shakespeare_char", help="folder under data/")
    g.add_argument("--data_dir", default=str(ROOT / "data"), help="where dataset folders live")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches summed into one update (a bigger batch in less memory)")
    g.add_argument("--batch_size", type=int, default=64, help="sequences per micro-batch")
    g.add_argument("--block_size", type=int, default=256, help="maximum context length")
    g = p.add_argument_group("model")
    g.add_argument("--n_layer", type=int, default=6, help="how many transformer blocks")
    g.add_argument("--n_head", type=int, default=6, help="attention heads per block")
    g.add_argument("--n_embd", type=int, default=384, help="width of the residual stream")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout rate (0 to turn off)")
    flag("--bias", False, "biases in Linear and LayerNorm layers (GPT-2 has them)")
    g = p.add_argument_group("optimizer (AdamW) and schedule")
    g.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--max_iters", type=int, default=5000, help="optimizer steps in all")
    g.add_argument("--weight_decay", type=float, default=1e-1, help="decoupled weight decay")
    g.add_argument("--beta1", type=float, default=0.9, help="momentum of the gradient mean")
    g.add_argument("--beta2", type=float, default=0.99, help="momentum of the squared gradient")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global norm; 0 = off")
    flag("--decay_lr", True, "warm up then decay the learning rate (else keep it flat)")
    g.add_argument("--warmup_iters", type=int, default=100, help="linear warmup steps")
    g.add_argument("--lr_decay_iters", type=int, default=None,
                   help="step where cosine decay reaches min_lr (default: max_iters)")
    g.add_argument("--min_lr", type=float, default=1e-4, help="learning rate after decay")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA where supported, else float32")
    flag("--compile", None, "torch.compile the model (default: on for CUDA, off elsewhere)")
    g.add_argument("--seed", type=int, default=1337, help="seed for init, batches and dropout")
    return p


def check_args(a) -> None:
    """Refuse settings that cannot work, with a message that says what to change."""
    if a.n_embd % a.n_head != 0:
        raise UserError(f"n_embd ({a.n_embd}) must be divisible by n_head ({a.n_head})")
    if a.learning_rate <= 0 or a.min_lr < 0 or a.min_lr > a.learning_rate:
        raise UserError("need learning_rate > 0 and 0 <= min_lr <= learning_rate")
    for name in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_iters",
                 "eval_interval", "log_interval", "gradient_accumulation_steps"):
        if getattr(a, name) <= 0:
            raise UserError(f"--{name} must be positive")
    if a.max_iters < 0 or a.warmup_iters < 0 or a.grad_clip < 0:
        raise UserError("max_iters, warmup_iters and grad_clip cannot be negative")
    if not 0 <= a.dropout < 1:
        raise UserError("dropout must be in [0, 1)")
    if a.lr_decay_iters is None:
        a.lr_decay_iters = a.max_iters
    if a.decay_lr and a.warmup_iters > a.lr_decay_iters:
        raise UserError(f"warmup_iters ({a.warmup_iters}) is longer than lr_decay_iters "
                        f"({a.lr_decay_iters}): lower --warmup_iters")
    if a.init_from not in ("scratch", "resume"):
        raise UserError(f"--init_from must be 'scratch' or 'resume', not {a.init_from!r}")


# -----------------------------------------------------------------------------
# Learning-rate schedule


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int,
           min_lr: float) -> float:
    """The learning rate for step `it` (0-based), a pure function of the schedule."""
    # 1) linear warmup; step 0 already gets lr/warmup_iters, never exactly 0
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    # 2) after the decay, stay at min_lr
    if it >= lr_decay_iters:
        return min_lr
    # 3) in between, cosine from learning_rate down to min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


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
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
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
            for s in states:
                s["step"] += 1
            t = states[0]["step"].item()
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(m, grads, 1 - beta1)  # m + (1-beta1)(g - m)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
            bias_correction1 = 1 - beta1 ** t
            bias_correction2 = 1 - beta2 ** t
            # p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(bias_correction2))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, -lr / bias_correction1)
        return loss


def configure_optimizer(model, weight_decay, learning_rate, betas):
    """Decay matrices and embeddings (2-D and up); not biases or LayerNorm gains (1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=learning_rate, betas=betas), (len(decay), len(no_decay))


# -----------------------------------------------------------------------------
# Gradient clipping


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale all gradients by one factor so their global L2 norm is at most max_norm.

    norm = sqrt(sum over every gradient entry of g^2). Returns the norm before clipping.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # 1 when already small enough
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm


# -----------------------------------------------------------------------------
# Data


def load_meta(data_dir: Path, dataset: str) -> dict:
    folder = data_dir / dataset
    if not (folder / "meta.json").exists():
        hint = "python prepare.py" + ("" if dataset == "shakespeare_char" else
                                      f" --dataset {dataset}")
        raise UserError(f"no prepared data in {folder}: run `{hint}` first")
    with open(folder / "meta.json", encoding="utf-8") as f:
        return json.load(f)


def get_batch(path: Path, ix: torch.Tensor, block_size: int, device: torch.device):
    """Token windows starting at offsets ix (B,): x (B, T) and y = x shifted by one (B, T).

    The file is memory-mapped afresh for each batch: a long-lived np.memmap keeps growing
    in memory as pages are touched.
    """
    data = np.memmap(path, dtype=np.uint16, mode="r")
    rows = data[ix.numpy()[:, None] + np.arange(block_size + 1)]  # (B, T+1) in one gather
    xy = torch.from_numpy(rows.astype(np.int64))
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def num_tokens(path: Path) -> int:
    return os.path.getsize(path) // 2


@torch.no_grad()
def estimate_loss(model, splits: dict, eval_iters: int, batch_size: int, block_size: int,
                  device, ctx, seed: int = 0) -> dict:
    """Mean loss over eval_iters batches of each split, in eval mode (no dropout).

    The batches come from their own generator, seeded the same each time: every evaluation
    scores the same windows, so successive numbers compare, and training's random stream
    is left untouched (which keeps resumed runs exact).
    """
    out = {}
    model.eval()
    for split, path in splits.items():
        g = torch.Generator().manual_seed(seed)
        high = num_tokens(path) - block_size
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            ix = torch.randint(high, (batch_size,), generator=g)
            x, y = get_batch(path, ix, block_size, device)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


# -----------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(ckpt: dict, path: Path) -> None:
    """Write to a temporary file beside the target, flush it to disk, then rename over it.
    A crash or Ctrl-C mid-save leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load with weights_only=True: tensors and plain data only, never arbitrary code."""
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: train one with `python train.py "
                        f"--out_dir {path.parent}`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises many types for a bad file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a checkpoint this code can load safely ({first})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by train.py")
    return ckpt


def rng_state(batch_gen: torch.Generator) -> dict:
    """Every random stream a run draws from, so a resumed run continues it exactly."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "batches": batch_gen.get_state(),
    }


def set_rng_state(state: dict, batch_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    batch_gen.set_state(state["batches"])


# -----------------------------------------------------------------------------
# Device and precision


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but this PyTorch sees no CUDA GPU (try --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps, but MPS is not available here (try --device cpu)")
    return dev


def pick_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bfloat16" if bf16 else "float32"
    if name != "float32" and device.type != "cuda":
        raise UserError(f"--dtype {name} needs a CUDA device; use float32 on {device.type}")
    return name


# -----------------------------------------------------------------------------
# The training loop


def main(argv=None) -> dict:
    """Train, and return what happened (losses by step, best val loss, checkpoint path)."""
    args = get_parser().parse_args(argv)
    try:
        return train(args)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def train(args) -> dict:
    check_args(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    compile_model = args.compile if args.compile is not None else device.type == "cuda"
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
    # Decided once, so the loop has no device branches: autocast (or nothing), and a gradient
    # scaler that is a no-op unless float16 (whose small range needs the loss scaled up).
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    ctx = (torch.autocast(device_type="cuda", dtype=ptdtype[dtype]) if dtype != "float32"
           else nullcontext())
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == "float16"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # data ---------------------------------------------------------------------
    data_dir = Path(args.data_dir)
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    meta = load_meta(data_dir, args.dataset)
    splits = {s: data_dir / args.dataset / f"{s}.bin" for s in ("train", "val")}
    shortest = min(num_tokens(p) for p in splits.values())
    if args.block_size >= shortest:
        raise UserError(f"block_size {args.block_size} is not shorter than the smallest split "
                        f"({shortest} tokens): lower --block_size or use more text")
    batch_gen = torch.Generator().manual_seed(args.seed)  # which windows each step trains on

    # model and optimizer ------------------------------------------------------
    iter_num, best_val_loss, history = 0, float("inf"), []
    model_args = {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                      "block_size": args.block_size, "bias": args.bias, "vocab_size": meta["vocab_size"],
                      "dropout": args.dropout}
    ckpt = None
    if args.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if ckpt["meta"] != meta:
            raise UserError(f"{ckpt_path} was trained on other data than data/{args.dataset}")
        model_args = ckpt["model_args"]  # the architecture comes from the checkpoint
        model_args["dropout"] = args.dropout
        args.block_size = model_args["block_size"]
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer, (n_decay, n_no_decay) = configure_optimizer(
        model, args.weight_decay, args.learning_rate, (args.beta1, args.beta2))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        history = ckpt.get("history", [])
        set_rng_state(ckpt["rng"], batch_gen)
        print(f"resuming from {ckpt_path} at iteration {iter_num}")
        del ckpt
    print(f"model: {model.num_params() / 1e6:.2f}M parameters; device {device}, {dtype}; "
          f"optimizer groups: {n_decay} decayed tensors, {n_no_decay} not")
    raw_model = model  # checkpoints save this one: a compiled model prefixes keys "_orig_mod."
    if compile_model:
        model = torch.compile(model)

    def checkpoint() -> dict:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_args": model_args, "config": vars(args), "iter_num": iter_num,
                "best_val_loss": best_val_loss, "meta": meta, "rng": rng_state(batch_gen),
                "history": history}

    # Ctrl-C finishes the current step, saves, and exits, instead of losing the run.
    stop = {"now": False}

    def on_sigint(signum, frame):
        print("\ninterrupted: finishing this step, then saving a checkpoint", flush=True)
        stop["now"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    tokens_per_iter = args.gradient_accumulation_steps * args.batch_size * args.block_size
    n_train = num_tokens(splits["train"])
    saved = False
    t0, t_start = time.perf_counter(), time.perf_counter()
    try:
        while True:
            # 1) set this step's learning rate
            lr = (get_lr(iter_num, args.learning_rate, args.warmup_iters, args.lr_decay_iters,
                         args.min_lr) if args.decay_lr else args.learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 2) evaluate now and then, and at the very end; save when val improves
            last = iter_num == args.max_iters or stop["now"]
            if iter_num % args.eval_interval == 0 or last or args.eval_only:
                losses = estimate_loss(model, splits, args.eval_iters, args.batch_size,
                                       args.block_size, device, ctx, seed=args.seed)
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss "
                      f"{losses['val']:.4f}, val perplexity {math.exp(losses['val']):.2f}")
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                # a run always leaves a checkpoint, and Ctrl-C always saves where it stopped
                if iter_num > 0 and (improved or args.always_save_checkpoint or stop["now"]
                                     or (last and not saved)):
                    save_checkpoint(checkpoint(), ckpt_path)
                    saved = True
                    print(f"saved checkpoint to {ckpt_path}")
            if last or args.eval_only:
                break

            # 3) forward, backward over the micro-batches; gradients add up
            ix = torch.randint(n_train - args.block_size,
                               (args.gradient_accumulation_steps, args.batch_size),
                               generator=batch_gen)
            loss_sum = 0.0
            for micro_step in range(args.gradient_accumulation_steps):
                x, y = get_batch(splits["train"], ix[micro_step], args.block_size, device)
                with ctx:
                    _, loss = model(x, y)
                    # the mean over all micro-batches, not the sum: divide here
                    loss = loss / args.gradient_accumulation_steps
                scaler.scale(loss).backward()
                loss_sum = loss_sum + loss.detach()

            # 4) clip the global gradient norm (on unscaled gradients), step, clear
            scaler.unscale_(optimizer)
            norm = (clip_grad_norm(raw_model.parameters(), args.grad_clip) if args.grad_clip
                    else None)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1

            # 5) log; .item() waits for the GPU, so only do it at log steps
            if iter_num % args.log_interval == 0:
                sync()
                dt = time.perf_counter() - t0
                t0 = time.perf_counter()
                lossf = loss_sum.item()
                history.append((iter_num, lossf))
                steps = min(iter_num, args.log_interval)
                ms = 1000 * dt / steps
                gn = f", grad norm {norm.item():.3f}" if norm is not None else ""
                print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}{gn}, {ms:.1f} ms/iter, "
                      f"{tokens_per_iter / (ms / 1000):,.0f} tokens/s")
    finally:
        signal.signal(signal.SIGINT, old_handler)
    elapsed = time.perf_counter() - t_start
    if stop["now"]:
        print(f"stopped at iteration {iter_num}; resume with: python train.py "
              f"--init_from=resume --out_dir={args.out_dir} (and your other flags)")
    print(f"done: {iter_num} iterations in {elapsed:.1f}s, best val loss {best_val_loss:.4f}")
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "history": history,
            "final_losses": losses, "elapsed": elapsed, "ckpt_path": str(ckpt_path)}


if __name__ == "__main__":
    main()
