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
import csv
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
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt import GPT, GPT2_NAMES, GPTConfig, first_line
from prepare import get_tokenizer

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


# Named sets of defaults; flags given on the command line still win over them.
PRESETS = {
    # The fast CPU recipe: reaches the val loss of nanoGPT's CPU recipe in half its wall time
    # (README, Speed, has the search that found it).
    "cpu": {"device": "cpu", "compile": False, "n_layer": 2, "n_head": 4, "n_embd": 128,
            "block_size": 64, "batch_size": 24, "max_iters": 800, "learning_rate": 4e-3,
            "warmup_iters": 30, "min_lr": 1e-4, "dropout": 0.0, "eval_interval": 800,
            "eval_iters": 20, "log_interval": 100, "sample_every": 0},
    # nanoGPT's config files, so its documented command lines run unchanged, e.g.
    # `python train.py config/train_shakespeare_char.py --device=cpu ...`
    "train_shakespeare_char": {"out_dir": "out-shakespeare-char"},  # our defaults otherwise
    "finetune_shakespeare": {"out_dir": "out-shakespeare", "init_from": "gpt2-xl",
                             "dataset": "shakespeare", "eval_interval": 5, "eval_iters": 40,
                             "batch_size": 1, "gradient_accumulation_steps": 32,
                             "max_iters": 20, "learning_rate": 3e-5, "decay_lr": False,
                             "dropout": 0.0, "bias": True},
}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a GPT on data/<dataset>/.")

    def flag(name, default, help):  # a boolean that works as --x, --x=True and --x=False
        p.add_argument(name, type=str2bool, nargs="?", const=True, default=default, help=help)

    p.add_argument("config", nargs="?", default=None,
                   help="a nanoGPT config file name, e.g. config/train_shakespeare_char.py: "
                        "the same as --preset train_shakespeare_char")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a named set of settings (cpu: the fast CPU recipe)")
    g = p.add_argument_group("I/O")
    g.add_argument("--out_dir", default="out", help="where checkpoints and logs go")
    g.add_argument("--eval_interval", type=int, default=250, help="evaluate every this many steps")
    g.add_argument("--log_interval", type=int, default=10, help="print a line every this many")
    g.add_argument("--eval_iters", type=int, default=200, help="batches per loss estimate")
    flag("--eval_only", False, "evaluate once and exit")
    flag("--always_save_checkpoint", False, "save at every eval, not only when val improves")
    g.add_argument("--init_from", default="scratch", help="'scratch' or 'resume' (from out_dir)")
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
    g.add_argument("--batch_size", type=int, default=64, help="sequences per micro-batch")
    g.add_argument("--block_size", type=int, default=256, help="maximum context length")
    flag("--overfit_batch", False, "train on one fixed batch, dropout off: a debugging check")
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
    g.add_argument("--backend", default="auto",
                   help="distributed backend under torchrun: auto (nccl on CUDA, else gloo)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = get_parser()
    args = p.parse_args(argv)
    if args.config:  # nanoGPT's config files are not read (no code runs from a config): named
        name = Path(args.config).stem
        if name not in PRESETS:
            p.error(f"{args.config} is not a config this code knows; known: "
                    f"{', '.join(sorted(PRESETS))} (or pass flags)")
        args.preset = args.preset or name
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)  # again, so the command line's flags override the preset
    return args


def check_args(a) -> None:
    """Refuse settings that cannot work, with a message that says what to change."""
    if a.n_embd % a.n_head != 0:
        raise UserError(f"n_embd ({a.n_embd}) must be divisible by n_head ({a.n_head})")
    if a.learning_rate <= 0 or a.min_lr < 0 or (a.decay_lr and a.min_lr > a.learning_rate):
        raise UserError("need learning_rate > 0 and 0 <= min_lr <= learning_rate")
    for name in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_iters",
                 "eval_interval", "log_interval", "gradient_accumulation_steps"):
        if getattr(a, name) <= 0:
            raise UserError(f"--{name} must be positive")
    if a.max_iters < 0 or a.warmup_iters < 0 or a.grad_clip < 0 or (a.sample_every or 0) < 0:
        raise UserError("max_iters, warmup_iters, grad_clip and sample_every cannot be negative")
    if not 0 <= a.dropout < 1:
        raise UserError("dropout must be in [0, 1)")
    if a.lr_decay_iters is None:  # a short run (a smoke test) may end inside the warmup
        a.lr_decay_iters = max(a.max_iters, a.warmup_iters)
    if a.decay_lr and a.warmup_iters > a.lr_decay_iters:
        raise UserError(f"warmup_iters ({a.warmup_iters}) is longer than lr_decay_iters "
                        f"({a.lr_decay_iters}): lower --warmup_iters")
    if a.sample_every is None:
        a.sample_every = a.eval_interval
    if a.overfit_batch:
        a.dropout = 0.0  # one batch, memorised: dropout would only fight it
    if a.init_from not in ("scratch", "resume", *GPT2_NAMES) and not Path(a.init_from).is_dir():
        raise UserError(f"--init_from must be scratch, resume, one of {', '.join(GPT2_NAMES)} "
                        f"or a folder of GPT-2 weights, not {a.init_from!r}")


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
    return to_device(xy[:, :-1].contiguous(), xy[:, 1:].contiguous(), device)


def get_task_batch(path: Path, ix: torch.Tensor, meta: dict, device: torch.device):
    """Whole problems number ix (B,) of a task dataset (prepare.py --dataset reverse|addition).

    A row is prompt + answer, L = example_len tokens; x = row[:-1], y = row[1:] (B, L-1), and
    y is -1 (no loss) where the target is still part of the prompt: the model is scored on
    the answer alone, the only part it can know.
    """
    data = np.memmap(path, dtype=np.uint16, mode="r").reshape(-1, meta["example_len"])
    rows = torch.from_numpy(data[ix.numpy()].astype(np.int64))  # (B, L)
    y = mask_prompt_targets(rows[:, 1:], meta["prompt_len"])
    return to_device(rows[:, :-1].contiguous(), y, device)


def mask_prompt_targets(y: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """y (B, L-1) with -1 wherever the target is a prompt token: y[:, j] is token j+1, and
    the answer starts at token prompt_len."""
    y = y.clone()
    y[:, :prompt_len - 1] = -1
    return y


def to_device(x, y, device):
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def num_tokens(path: Path) -> int:
    return os.path.getsize(path) // 2


@torch.no_grad()
def estimate_loss(model, get_split_batch, n_windows: dict, eval_iters: int, batch_size: int,
                  ctx, seed: int = 0) -> dict:
    """Mean loss over eval_iters batches of each split, in eval mode (no dropout).

    The batches come from their own generator, seeded the same each time: every evaluation
    scores the same windows, so successive numbers compare, and training's random stream
    is left untouched (which keeps resumed runs exact).
    """
    out = {}
    model.eval()
    for split, high in n_windows.items():
        g = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            ix = torch.randint(high, (batch_size,), generator=g)
            x, y = get_split_batch(split, ix)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


@torch.no_grad()
def exact_match(model, path: Path, meta: dict, device, batch_size: int = 500) -> float:
    """The share of a task's problems whose whole answer greedy decoding gets right."""
    L, P = meta["example_len"], meta["prompt_len"]
    rows = torch.from_numpy(np.fromfile(path, dtype=np.uint16).reshape(-1, L).astype(np.int64))
    correct = 0
    for chunk in rows.to(device).split(batch_size):
        out = model.generate(chunk[:, :P], L - P, temperature=0)  # (B, L)
        correct += (out[:, P:] == chunk[:, P:]).all(dim=1).sum().item()
    return correct / len(rows)


def generate_and_print_sample(model, prompt, decode, seed: int, max_new_tokens: int = 100,
                              temperature: float = 0.8):
    """What the model writes now, from a fixed prompt and seed: a qualitative progress check."""
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    out = model.generate(prompt, max_new_tokens, temperature=temperature, top_k=200,
                         generator=g)
    print("sample: " + repr(decode(out[0].tolist()))[:400])


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
        raise UserError(f"{path} is not a checkpoint this code can load safely "
                        f"({first_line(e)})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "meta"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint written by train.py")
    return ckpt


RESUME_KEYS = {"optimizer", "iter_num", "best_val_loss", "rng"}  # besides the model's own


def model_from_checkpoint(ckpt: dict, path: Path, **overrides) -> tuple[GPT, dict]:
    """Rebuild the GPT a checkpoint describes and load its weights: (model, model_args).
    One from other code (other config fields, other parameter names) is refused."""
    try:
        model_args = {**ckpt["model_args"], **overrides}
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, KeyError, ValueError, AssertionError) as e:
        raise UserError(f"{path} does not hold a model this code can build "
                        f"({first_line(e)})") from None
    return model, model_args


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
    # RNG states are CPU byte tensors, whatever device the checkpoint was loaded onto
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    batch_gen.set_state(state["batches"].cpu())


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


def autocast_ctx(device: torch.device, dtype: str):
    """Mixed precision for forward passes: autocast to dtype, or nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def pick_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bfloat16" if bf16 else "float32"
    if name != "float32" and device.type != "cuda":
        raise UserError(f"--dtype {name} needs a CUDA device; use float32 on {device.type}")
    return name


# -----------------------------------------------------------------------------
# Model FLOPs utilisation: the share of the device's peak that the model's math uses

# Dense bf16 tensor-core peaks from the vendors' data sheets, in FLOP/s (float32 runs as TF32
# on these, at half the rate). A GPU not listed gets its peak measured.
GPU_PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100": 756e12,
                 "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def flops_per_token(model_args: dict, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 per parameter (2 forward, 4 backward)
    for the matmuls, plus attention's own: 6 * 2 * n_layer * block_size * n_embd."""
    n_layer, T, C = model_args["n_layer"], model_args["block_size"], model_args["n_embd"]
    return 6 * n_params + 12 * n_layer * T * C


def measure_matmul_peak(device: torch.device, dtype=torch.float32, n: int = 1024,
                        reps: int = 10) -> float:
    """FLOP/s of the best of `reps` (n x n) @ (n x n) matmuls: 2 n^3 FLOPs each."""
    g = torch.Generator(device=device).manual_seed(0)  # leave the training RNG alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(reps + 2):  # the first two warm up
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def device_peak_flops(device: torch.device, dtype: str) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():  # most specific names come first
            if key in name:
                return peak if dtype != "float32" else peak / 2
        return measure_matmul_peak(device, torch.bfloat16, n=4096)
    return measure_matmul_peak(device)


# -----------------------------------------------------------------------------
# Logs and plots

LOG_FIELDS = ["iter", "loss", "lr", "grad_norm", "ms_per_iter", "tokens_per_s", "mfu",
              "train_loss", "val_loss", "val_exact_match"]


def append_log(path: Path, **row) -> None:
    """One CSV row per log line or evaluation; fields a row doesn't have stay empty."""
    new = not path.exists()
    with open(path, "a", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def truncate_log(path: Path, iter_num: int) -> None:
    """On resume, drop what the interrupted run logged after its checkpoint."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", newline="") as f:
        # the resumed run evaluates at iter_num again: keep only that step's training row
        rows = [r for r in csv.DictReader(f)
                if int(r["iter"]) < iter_num or (int(r["iter"]) == iter_num and r["loss"])]
    path.unlink()
    for r in rows:
        append_log(path, **r)


def plot_losses(out_dir: Path) -> Path:
    """Draw out_dir/log.csv's loss curves to out_dir/loss.png."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    log = out_dir / "log.csv"
    if not log.exists():
        raise UserError(f"no {log} to plot: train with --out_dir {out_dir} first")
    with open(log, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))

    def series(field):
        pts = [(int(r["iter"]), float(r[field])) for r in rows if r[field]]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(*series("loss"), color="tab:blue", alpha=0.3, lw=1, label="train (one batch)")
    ax.plot(*series("train_loss"), "o-", color="tab:blue", label="train (estimate)")
    ax.plot(*series("val_loss"), "o-", color="tab:orange", label="val (estimate)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"{out_dir.name}: training curves")
    ax.grid(alpha=0.3)
    ax.legend()
    png = out_dir / "loss.png"
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png


# -----------------------------------------------------------------------------
# Distributed data parallel: one process per device, launched by torchrun


def setup_ddp(args):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process.

    Returns (rank, world_size); world_size 1 means no DDP."""
    if "RANK" not in os.environ:
        return 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    backend = args.backend if args.backend != "auto" else ("nccl" if on_gpu else "gloo")
    if on_gpu:
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(args.device)
    else:
        args.device = "cpu"
    torch.distributed.init_process_group(backend=backend)
    if args.gradient_accumulation_steps % world_size:
        raise UserError(f"--gradient_accumulation_steps ({args.gradient_accumulation_steps}) "
                        f"must be a multiple of the number of processes ({world_size})")
    return rank, world_size


def all_ranks_any(flags: list, world_size: int, device) -> list:
    """Each flag made true on every rank if it is true on any, so all ranks stop together."""
    if world_size == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


# -----------------------------------------------------------------------------
# The training loop


class Diverged(Exception):
    """The loss or the gradient norm stopped being a finite number."""


def main(argv=None) -> dict | None:
    """Train, and return what happened (losses by step, best val loss, checkpoint path)."""
    args = parse_args(argv)
    try:
        if args.plot:
            try:
                print(f"wrote {plot_losses(Path(args.plot))}")
            except ImportError:
                raise UserError("--plot needs matplotlib: pip install matplotlib") from None
            return None
        return train(args)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        sys.exit(1)


def train(args) -> dict:
    check_args(args)
    rank, world_size = setup_ddp(args)
    try:
        return train_loop(args, rank, world_size)
    finally:
        if torch.distributed.is_initialized():  # torchrun, even with a single process
            torch.distributed.destroy_process_group()


def train_loop(args, rank: int, world_size: int) -> dict:
    master = rank == 0  # only rank 0 prints, logs and saves
    log = print if master else (lambda *a, **k: None)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    compile_model = args.compile if args.compile is not None else device.type == "cuda"
    # Every rank starts from the same seed for the model (DDP also copies rank 0's weights to
    # the others); dropout gets a stream of its own per rank.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
    # Decided once, so the loop has no device branches: autocast (or nothing), and a gradient
    # scaler that is a no-op unless float16 (whose small range needs the loss scaled up).
    ctx = autocast_ctx(device, dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == "float16"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # model and optimizer ------------------------------------------------------
    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    ckpt_path, log_path = out_dir / "ckpt.pt", out_dir / "log.csv"
    meta = load_meta(data_dir, args.dataset)
    task = meta.get("task")  # a task dataset: whole problems, loss on the answers only
    if task:
        args.block_size = meta["example_len"] - 1  # a problem, less its last token
    iter_num, best_val_loss, history = 0, float("inf"), []
    model_args = {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                  "block_size": args.block_size, "bias": args.bias,
                  "vocab_size": meta["vocab_size"], "dropout": args.dropout}
    ckpt = None
    if args.init_from == "resume":  # the architecture comes from the checkpoint
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if not RESUME_KEYS <= ckpt.keys():
            raise UserError(f"{ckpt_path} holds a model but not a training state to resume")
        if ckpt["meta"] != meta:
            raise UserError(f"{ckpt_path} was trained on other data than data/{args.dataset}")
        model, model_args = model_from_checkpoint(ckpt, ckpt_path, dropout=args.dropout)
    elif args.init_from == "scratch":
        model = GPT(GPTConfig(**model_args))
    else:  # OpenAI's GPT-2 weights, to fine-tune
        if meta["tokenizer"] != "gpt2":
            raise UserError(f"--init_from {args.init_from} needs GPT-2 BPE data, and "
                            f"data/{args.dataset} is {meta['tokenizer']}: try --dataset "
                            "shakespeare (python prepare.py --dataset shakespeare)")
        try:
            model = GPT.from_pretrained(args.init_from, dropout=args.dropout)
        except ValueError as e:
            raise UserError(str(e)) from None
        if model.config.vocab_size < meta["vocab_size"]:
            raise UserError(f"{args.init_from} has {model.config.vocab_size} tokens, fewer "
                            f"than data/{args.dataset}'s {meta['vocab_size']}")
        if args.block_size < model.config.block_size:
            model.crop_block_size(args.block_size)
        model_args = {k: getattr(model.config, k) for k in model_args}
    args.block_size = model_args["block_size"]  # settled: the data windows depend on it
    model = model.to(device)
    optimizer, (n_decay, n_no_decay) = configure_optimizer(
        model, args.weight_decay, args.learning_rate, (args.beta1, args.beta2))

    # data ---------------------------------------------------------------------
    splits = {s: data_dir / args.dataset / f"{s}.bin" for s in ("train", "val")}
    if task:
        n_windows = {s: num_tokens(p) // meta["example_len"] for s, p in splits.items()}

        def get_split_batch(split, ix):
            return get_task_batch(splits[split], ix, meta, device)
    else:
        n_windows = {s: num_tokens(p) - args.block_size for s, p in splits.items()}
        if min(n_windows.values()) <= 0:
            raise UserError(f"block_size {args.block_size} is not shorter than the smallest "
                            f"split ({min(map(num_tokens, splits.values()))} tokens): lower "
                            "--block_size or use more text")

        def get_split_batch(split, ix):
            return get_batch(splits[split], ix, args.block_size, device)
    # Which windows each step trains on. Every rank draws the same offsets for the whole
    # global batch and takes its own slice, so N processes see exactly what one would.
    batch_gen = torch.Generator().manual_seed(args.seed)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):  # float16's loss scale (empty when the scaler is off)
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        history = ckpt.get("history", [])
        set_rng_state(ckpt["rng"], batch_gen)
        log(f"resuming from {ckpt_path} at iteration {iter_num}")
        del ckpt
    if rank > 0:
        torch.manual_seed(args.seed + rank)  # dropout masks differ between ranks
    if master:  # a fresh run starts a fresh log; a resumed one forgets what came after its save
        out_dir.mkdir(parents=True, exist_ok=True)
        if iter_num:
            truncate_log(log_path, iter_num)
        else:
            log_path.unlink(missing_ok=True)
    n_params = model.num_params()
    log(f"model: {n_params / 1e6:.2f}M parameters; device {device}, {dtype}; optimizer "
        f"groups: {n_decay} decayed tensors, {n_no_decay} not"
        + (f"; {world_size} processes" if world_size > 1 else ""))
    raw_model = model  # checkpoints save this one: a compiled model prefixes keys "_orig_mod."
    if compile_model:
        model = torch.compile(model)
    eval_model = model  # evaluation runs on rank 0 alone, outside DDP
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint() -> dict:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "model_args": model_args,
                "config": vars(args), "iter_num": iter_num,
                "best_val_loss": best_val_loss, "meta": meta, "rng": rng_state(batch_gen),
                "history": history}

    # a fixed prompt for the sample printed at evaluations: the start of the val split
    # (for a task, its first problem, answered greedily)
    decode = get_tokenizer(meta)[1]
    prompt = torch.from_numpy(np.fromfile(splits["val"], dtype=np.uint16, count=meta.get(
        "prompt_len", 16)).astype(np.int64))[None].to(device)
    sample_args = ({"max_new_tokens": meta["answer_len"], "temperature": 0} if task else {})

    # Ctrl-C finishes the current step, saves, and exits, instead of losing the run.
    # The handler only asks; the ranks agree after each step (all_ranks_any) and then all stop
    # at the same iteration, or a rank would wait forever in the next gradient all-reduce.
    stop = {"asked": False, "now": False}

    def on_sigint(signum, frame):
        log("\ninterrupted: finishing this step, then saving a checkpoint", flush=True)
        stop["asked"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    gas = args.gradient_accumulation_steps // world_size  # micro-steps on this rank
    tokens_per_iter = args.gradient_accumulation_steps * args.batch_size * args.block_size
    flops_per_iter = flops_per_token(model_args, n_params) * tokens_per_iter / world_size
    peak = device_peak_flops(device, dtype) if master else 1.0
    # offsets of the global batch, (gradient_accumulation_steps, batch_size), for one step
    def draw_offsets():
        return torch.randint(n_windows["train"],
                             (args.gradient_accumulation_steps, args.batch_size),
                             generator=batch_gen)

    fixed_ix = draw_offsets() if args.overfit_batch else None  # one batch, again and again
    saved, losses = False, {}
    t_start = t0 = time.perf_counter()
    eval_time, steps_since_log = 0.0, 0  # evaluation time is left out of ms/iter
    try:
        while True:
            # 1) set this step's learning rate
            lr = (get_lr(iter_num, args.learning_rate, args.warmup_iters, args.lr_decay_iters,
                         args.min_lr) if args.decay_lr else args.learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 2) evaluate now and then, and at the very end; save when val improves
            last = iter_num == args.max_iters or stop["now"]
            if master and (iter_num % args.eval_interval == 0 or last or args.eval_only):
                t_eval = time.perf_counter()
                losses = estimate_loss(eval_model, get_split_batch, n_windows, args.eval_iters,
                                       args.batch_size, ctx, seed=args.seed)
                acc = exact_match(raw_model, splits["val"], meta, device) if task else None
                log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss "
                    f"{losses['val']:.4f}, val perplexity {math.exp(losses['val']):.2f}"
                    + (f", val exact match {100 * acc:.1f}% of {n_windows['val']:,} problems"
                       if task else ""))
                append_log(log_path, iter=iter_num, train_loss=f"{losses['train']:.6f}",
                           val_loss=f"{losses['val']:.6f}",
                           val_exact_match="" if acc is None else f"{acc:.4f}")
                if acc is not None:
                    losses["val_exact_match"] = acc
                if args.sample_every and iter_num % args.sample_every == 0:
                    generate_and_print_sample(raw_model, prompt, decode, seed=args.seed,
                                              **sample_args)
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                # a run always leaves a checkpoint, and Ctrl-C always saves where it stopped
                if iter_num > 0 and (improved or args.always_save_checkpoint or stop["now"]
                                     or (last and not saved)):
                    save_checkpoint(checkpoint(), ckpt_path)
                    saved = True
                    log(f"saved checkpoint to {ckpt_path}")
                eval_time += time.perf_counter() - t_eval
            if last or args.eval_only:
                break

            # 3) forward, backward over this rank's micro-batches; gradients add up
            ix = fixed_ix if fixed_ix is not None else draw_offsets()
            loss_sum = 0.0
            for micro_step in range(gas):
                if world_size > 1:  # all-reduce the gradients once, after the last micro-step
                    model.require_backward_grad_sync = micro_step == gas - 1
                x, y = get_split_batch("train", ix[rank * gas + micro_step])
                with ctx:
                    _, loss = model(x, y)
                    # the mean over all micro-batches, not the sum: divide here
                    loss = loss / gas
                scaler.scale(loss).backward()
                loss_sum = loss_sum + loss.detach()

            # 4) clip the global gradient norm (on unscaled gradients), check, step, clear
            scaler.unscale_(optimizer)
            norm = (clip_grad_norm(raw_model.parameters(), args.grad_clip) if args.grad_clip
                    else grad_norm(raw_model.parameters()))
            # float16's scaler skips steps with overflowing gradients by design; else a
            # non-finite norm, like a non-finite loss, means the run has diverged
            watched = loss_sum if dtype == "float16" else loss_sum + norm
            # (.item() waits for the GPU each step: the price of never stepping on a NaN)
            diverged, stop["now"] = all_ranks_any([not torch.isfinite(watched).item(),
                                                   stop["asked"]], world_size, device)
            if diverged:
                kept = (f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists()
                        else "no checkpoint was saved")
                raise Diverged(f"loss {loss_sum.item():.4g}, gradient norm {norm.item():.4g} "
                               f"at iteration {iter_num}: not finite; {kept} (try a lower "
                               "--learning_rate or --grad_clip 1)")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            steps_since_log += 1

            # 5) log now and then: formatting, CSV and timing need the host
            if iter_num % args.log_interval == 0 and master:
                sync()
                dt = time.perf_counter() - t0 - eval_time
                ms = 1000 * dt / steps_since_log
                t0, eval_time, steps_since_log = time.perf_counter(), 0.0, 0
                lossf, normf = loss_sum.item(), norm.item()
                history.append((iter_num, lossf))
                tokens_per_s = tokens_per_iter / (ms / 1000)
                mfu = flops_per_iter / (ms / 1000) / peak
                log(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, grad norm {normf:.3f}, "
                    f"{ms:.1f} ms/iter, {tokens_per_s:,.0f} tokens/s, MFU {100 * mfu:.1f}%")
                append_log(log_path, iter=iter_num, loss=f"{lossf:.6f}", lr=f"{lr:.6g}",
                           grad_norm=f"{normf:.6g}", ms_per_iter=f"{ms:.3f}",
                           tokens_per_s=f"{tokens_per_s:.1f}", mfu=f"{mfu:.4f}")
    finally:
        signal.signal(signal.SIGINT, old_handler)
    elapsed = time.perf_counter() - t_start
    if stop["now"]:
        log(f"stopped at iteration {iter_num}; resume with: python train.py "
            f"--init_from=resume --out_dir={args.out_dir} (and your other flags)")
    if master and log_path.exists():
        try:
            log(f"wrote {plot_losses(out_dir)}")
        except ImportError:
            log("matplotlib is not installed: no loss.png (pip install matplotlib)")
    log(f"done: {iter_num} iterations in {elapsed:.1f}s, best val loss {best_val_loss:.4f}")
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "history": history,
            "final_losses": losses, "elapsed": elapsed, "ckpt_path": str(ckpt_path)}


if __name__ == "__main__":
    main()
