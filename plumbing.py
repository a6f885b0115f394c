"""
The parts of training and sampling that are not the lesson: you can skip this file.

train.py and sample.py use it for: one-line errors, device and precision choice, checkpoint
files and RNG state, several processes (DDP), model FLOPs utilisation, the CSV log and its plot,
and stop signals.
Nothing here changes what the model computes or how it learns.
"""

import csv
import functools
import os
import shutil
import signal
import socket
import sys
import time
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from errors import UserError, first_line
from files import write_atomic
from gpt import GPT, GPTConfig

# -----------------------------------------------------------------------------
# Device and precision


def out_of_memory(e: BaseException) -> str | None:
    """"GPU" or "CPU" when e is running out of memory, else None. torch raises OutOfMemoryError
    on a GPU, but on a CPU its allocator raises a plain RuntimeError."""
    text = str(e)
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (isinstance(e, RuntimeError) and any(
            s in text for s in ("can't allocate memory", "not enough memory"))):
        return "GPU" if "CUDA" in text or "MPS" in text else "CPU"
    return None


def pick_device(name: str) -> torch.device:
    """'auto' is the best device here: cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N "
                        "or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but this PyTorch sees no CUDA GPU (try --device cpu)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}, but there are {torch.cuda.device_count()} GPUs")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps, but MPS is not available here (try --device cpu)")
    return dev


def pick_dtype(name: str, device: torch.device, cpu_speedup=None) -> str:
    """'auto' is bfloat16 on a GPU that runs it natively (Ampere and later: V100 and T4 report
    bf16 support through emulation, which is slower than float32). On a CPU it is bfloat16
    only where cpu_speedup(), a measurement of this model's training step, finds it at least
    1.2x faster than float32 (CPUs with AMX or AVX512-BF16 often do, for large enough
    matrices); else float32. An explicit bfloat16 runs on any CPU, through CPU autocast."""
    if name == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        else:
            bf16 = device.type == "cpu" and cpu_speedup is not None and cpu_speedup() >= 1.2
        return "bfloat16" if bf16 else "float32"
    if name == "float16" and device.type != "cuda":
        raise UserError(f"--dtype float16 needs a CUDA device; on {device.type} use bfloat16 "
                        "or float32")
    if name == "bfloat16" and device.type == "mps":
        raise UserError("--dtype bfloat16 is not supported on MPS here; use float32")
    return name


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 matrix math in hardware (AMX or AVX512-BF16): elsewhere
    bf16 is emulated, and slower than float32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def bf16_speedup(model_args: dict, batch_size: int, log=print, rounds: int = 3) -> float:
    """How many times faster a training step (forward and backward) of this model runs on the
    CPU under bf16 autocast than in float32: the best of a few steps each, alternating, on
    random tokens, measured now, without touching the run's random streams. Small models
    (n_embd < 256) are not measured: their steps are bound by overheads, and bf16 does not pay
    there. Neither is a CPU without native bf16."""
    if model_args["n_embd"] < 256 or not cpu_has_native_bf16():
        return 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**model_args))
        x = torch.randint(model_args["vocab_size"], (min(batch_size, 8),
                                                     model_args["block_size"]))
        best = {"float32": float("inf"), "bfloat16": float("inf")}
        for i in range(rounds + 1):  # the first round warms up
            for dtype in ("float32", "bfloat16"):
                t0 = time.perf_counter()
                with autocast_ctx(torch.device("cpu"), dtype):
                    _, loss = model(x, x)
                loss.backward()
                if i > 0:
                    best[dtype] = min(best[dtype], time.perf_counter() - t0)
    speedup = best["float32"] / best["bfloat16"]
    log(f"--dtype auto: a bf16 training step of this model runs {speedup:.2f}x as fast as "
        f"fp32 on this CPU, so {'bfloat16' if speedup >= 1.2 else 'float32'} (1.2x or more "
        "picks bfloat16)")
    return speedup


def autocast_ctx(device: torch.device, dtype: str):
    """Mixed precision for forward passes: autocast to dtype, or nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(ckpt: dict, path: Path) -> None:
    """Write it whole or not at all (files.write_atomic: a temporary file of its own beside the
    target, flushed, renamed over it). A crash, Ctrl-C or a full disk mid-save leaves the
    previous checkpoint whole. Raises UserError naming the path and why."""
    try:
        write_atomic(path, lambda f: torch.save(ckpt, f))
    except UserError as e:  # no temporary file could be made there
        raise UserError(f"{e}; the previous checkpoint there is untouched") from None
    except (OSError, RuntimeError) as e:  # a full disk (ENOSPC), a file-size limit (EFBIG)
        while not isinstance(e, OSError) and e.__context__ is not None:
            e = e.__context__  # torch.save wraps the OSError in a RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise UserError(f"cannot write {path}: {why}; the previous checkpoint there is "
                        "untouched") from None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load with weights_only=True: tensors and plain data only, never arbitrary code."""
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: train one with `python train.py "
                        f"--out_dir {path.parent}`")
    if not zipfile.is_zipfile(path):  # what torch.save writes
        raise UserError(f"{path} is not a checkpoint: it is truncated or corrupt, or some "
                        "other file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises many types for a bad file)
        kind = "holds objects other than tensors and plain data" if "Unpickl" in str(e) \
            else "is truncated or corrupt"
        raise UserError(f"{path} is not a checkpoint: it {kind} ({first_line(e)[:120]})") \
            from None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "meta"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint written by train.py")
    return ckpt


RESUME_KEYS = {"optimizer", "iter_num", "best_val_loss", "rng"}  # besides the model's own


def run_checkpoint(path: Path, which: str = "best") -> Path | None:
    """Our checkpoint at path: a file itself, or in a run folder best.pt (the best weights),
    else ckpt.pt (the latest state); with which="latest", ckpt.pt alone. None for a folder
    with neither (GPT-2's, say) or nothing."""
    if path.is_file():
        return path
    for name in ("best.pt", "ckpt.pt") if which == "best" else ("ckpt.pt",):
        if (path / name).is_file():
            return path / name
    return None


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


def step_rng_state(batch_gen: torch.Generator) -> dict:
    """The streams a training step draws from (dropout's, and the batches'): a few
    microseconds, cheap enough to take before every step."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "batches": batch_gen.get_state(),
    }


def rng_state(batch_gen: torch.Generator, step_state: dict | None = None) -> dict:
    """Every random stream a run draws from, so a resumed run continues it exactly: now, or
    as they were at step_state's step (numpy's seeded stream, which no step draws from, is
    the same then as now)."""
    np_state = np.random.get_state()
    return {**(step_state or step_rng_state(batch_gen)),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(state: dict, batch_gen: torch.Generator) -> None:
    # RNG states are CPU byte tensors, whatever device the checkpoint was loaded onto
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    batch_gen.set_state(state["batches"].cpu())


# -----------------------------------------------------------------------------
# Distributed data parallel: one process per device, launched by torchrun


def setup_ddp(device: str, backend: str) -> tuple[int, int, int]:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process.

    Returns (rank, local_rank, world_size); world_size 1 means no DDP."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend=backend)
    return rank, local_rank, world_size


def mean_over_ranks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """x averaged over every rank (x itself without DDP): a collective, so every rank calls it."""
    if world_size == 1:
        return x
    x = x.detach().clone()
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x / world_size


def all_ranks_any(flags: list, world_size: int, device) -> list:
    """Each flag made true on every rank if it is true on any, so all ranks stop together."""
    if world_size == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


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
    # a CPU's bf16 (AMX) matmuls can run several times its fp32 ones: measure the dtype used
    return measure_matmul_peak(device, torch.bfloat16 if dtype == "bfloat16" else torch.float32)


class Meter:
    """Speed since the last log line: ms/iter, tokens/s and MFU, with evaluation time left
    out (`with meter.paused():`), plus the elapsed time and an estimate of the time left."""

    def __init__(self, tokens_per_iter: int, flops_per_iter: float, peak: float, sync,
                 first_iter: int, max_iters: int, on_cpu: bool = False, log=print):
        self.tokens_per_iter, self.flops_per_iter, self.peak = tokens_per_iter, flops_per_iter, peak
        self.sync, self.first_iter, self.max_iters = sync, first_iter, max_iters
        self.on_cpu, self.log = on_cpu, log
        self.t_start = self.t0 = time.perf_counter()
        self.paused_s, self.steps, self.total_steps, self.t1 = 0.0, 0, 0, 0.0

    def step(self):
        """Count a step. After the 4th, on a CPU, warn if the whole run will take hours."""
        self.steps += 1
        self.total_steps += 1
        if self.on_cpu and self.total_steps in (1, 4):
            if self.total_steps == 1:  # the first step pays for warm-up: time the next three
                self.t1 = time.perf_counter()
                return
            left = (time.perf_counter() - self.t1) / 3 * (self.max_iters - self.first_iter - 4)
            if hint := long_run_hint(left):
                self.log(hint)

    @contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def read(self, iter_num: int) -> dict:
        """The figures for the steps since the last read (waits for the device first)."""
        self.sync()
        now = time.perf_counter()
        s = max(now - self.t0 - self.paused_s, 1e-9) / max(self.steps, 1)  # seconds per step
        elapsed = now - self.t_start
        done = max(iter_num - self.first_iter, 1)
        eta = elapsed / done * max(self.max_iters - iter_num, 0)
        self.t0, self.paused_s, self.steps = now, 0.0, 0
        return {"ms": 1000 * s, "tokens_per_s": self.tokens_per_iter / s,
                "mfu": self.flops_per_iter / s / self.peak, "elapsed": elapsed, "eta": eta}


def long_run_hint(seconds_left: float) -> str | None:
    """A one-line warning for a CPU run that will take over an hour, else None."""
    if seconds_left < 3600:
        return None
    return (f"note: at this speed the run needs about {hms(seconds_left)} more on this CPU; "
            "for a small model that trains in about a minute, try --preset=cpu")


def hms(seconds: float) -> str:
    """12.3 -> '12s', 754 -> '12m34s', 8000 -> '2h13m'."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def free_memory(device: torch.device) -> int | None:
    """Bytes free now: CUDA's count, the CPU's MemAvailable (else its free pages); None if
    unknown (MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


RUN_FILES = ("ckpt.pt", "best.pt", "log.csv", "loss.png")  # what a run writes in its out_dir


def keep_earlier_run(out_dir: Path, keep: int, log=print) -> Path | None:
    """Before a new run in a used out_dir: move the earlier run's files into
    out_dir/runs/<the time it last wrote>/, and delete the oldest kept runs beyond `keep` (0:
    keep none). Returns the folder they went to, or None when there was nothing to keep."""
    files = [out_dir / f for f in RUN_FILES if (out_dir / f).is_file()]
    if not files:
        return None
    when = time.strftime("%Y-%m-%d_%H%M%S", time.localtime(max(f.stat().st_mtime
                                                                 for f in files)))
    runs = out_dir / "runs"
    dest, n = runs / when, 1
    while dest.exists():  # two runs in the same second
        n += 1
        dest = runs / f"{when}_{n}"
    try:
        dest.mkdir(parents=True)
        for f in files:
            os.replace(f, dest / f.name)
    except OSError as e:
        raise UserError(f"cannot keep the earlier run's files in {dest}: {e.strerror or e}; "
                        "pass --overwrite to replace them, or pick another --out_dir") from None
    log(f"the earlier run in {out_dir} ({', '.join(f.name for f in files)}) is now in {dest}")
    kept = sorted((d for d in runs.iterdir() if d.is_dir()), key=lambda d: d.name)
    for old in kept[:max(len(kept) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
        log(f"deleted {old}: --keep_runs {keep} keeps the newest {keep} earlier runs")
    return None if keep == 0 else dest


# -----------------------------------------------------------------------------
# Logs and plots

LOG_FIELDS = ["iter", "loss", "lr", "grad_norm", "ms_per_iter", "tokens_per_s", "mfu",
              "train_loss", "val_loss", "val_exact_match", "train_bpb", "val_bpb"]


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


def read_log(path: Path) -> list[dict]:
    """log.csv's rows, each checked: a malformed file is a one-line error, not a traceback."""
    if not path.exists():
        raise UserError(f"no {path} to plot: train with --out_dir {path.parent} first")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            int(r["iter"])
            for field in LOG_FIELDS[1:]:
                if r.get(field):
                    float(r[field])  # a ValueError if it is not a number
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path} is not a log.csv written by train.py ({first_line(e)})") \
            from None
    return rows


def draw_curves(rows: list[dict], title: str):
    """The figure of a log: the losses on top; below them the learning rate (warmup, then
    cosine decay: get_lr) and the gradient norm before clipping, on a second axis."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    def series(field):
        pts = [(int(r["iter"]), float(r[field])) for r in rows if r.get(field)]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                    gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(*series("loss"), color="tab:blue", alpha=0.3, lw=1, label="train (one batch)")
    ax.plot(*series("train_loss"), "o-", color="tab:blue", label="train (estimate)")
    ax.plot(*series("val_loss"), "o-", color="tab:orange", label="val (estimate)")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"{title}: training curves")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot(*series("lr"), color="tab:green")
    ax_lr.set_ylabel("learning rate", color="tab:green")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    ax_norm = ax_lr.twinx()  # a second y axis: the norm has other units
    ax_norm.plot(*series("grad_norm"), color="tab:red", alpha=0.6, lw=1)
    ax_norm.set_ylabel("gradient norm (before clipping)", color="tab:red")
    return fig


def plot_losses(out_dir: Path) -> Path:
    """Draw out_dir/log.csv to out_dir/loss.png."""
    import matplotlib.pyplot as plt

    fig = draw_curves(read_log(out_dir / "log.csv"), out_dir.name)
    png = out_dir / "loss.png"
    try:
        fig.savefig(png, dpi=100, bbox_inches="tight")
    except OSError as e:
        raise UserError(f"cannot write {png}: {e.strerror}") from None
    finally:
        plt.close(fig)
    return png


# -----------------------------------------------------------------------------
# Stop signals: save and exit, instead of losing the run


class StopNow(Exception):
    """Raised by StopSignals when the run must stop at once, mid-step or mid-evaluation."""


class StopSignals:
    """While active, Ctrl-C (SIGINT), SIGTERM (what schedulers and `kill` send before killing)
    and SIGUSR1 (Slurm's --signal) ask the run to stop: `asked` turns True, and the training
    loop saves at the end of the step and exits. An evaluation is not waited for: a signal
    during one (`with signals.interruptible():`) raises StopNow at once. A second signal raises
    StopNow wherever the loop is, except inside `with signals.critical():` (the optimizer
    step, which must not be cut in half), where it sets `now` for the loop to see after it.
    With at_once=False (DDP) a second signal outside an evaluation does no more than the first:
    a rank that left mid-step would leave the others waiting in its collectives, so every rank
    finishes the step and they stop together.
    The old handlers come back at the end. Windows has no SIGUSR1: it is skipped there."""

    def __init__(self, log=print, at_once: bool = True):
        self.asked = self.now = self.in_critical = self.in_eval = False
        self.log, self.old, self.at_once = log, {}, at_once

    def handler(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.asked:
            self.asked = True
            again = "again to stop at once" if self.at_once else "every process finishes it"
            self.log(f"\n{name}: saving and stopping after this step ({again})", flush=True)
            if self.in_eval:
                raise StopNow(name)
        elif not (self.at_once or self.in_eval):
            return  # DDP: the first signal's stop, at the end of the step, on every rank
        elif self.in_critical:
            self.now = True
        else:
            raise StopNow(name)

    @contextmanager
    def critical(self):
        self.in_critical = True
        try:
            yield
        finally:
            self.in_critical = False

    @contextmanager
    def interruptible(self):
        self.in_eval = True
        try:
            if self.asked:
                raise StopNow("stop")
            yield
        finally:
            self.in_eval = False

    def __enter__(self):
        for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
            sig = getattr(signal, name, None)
            if sig is not None:
                self.old[sig] = signal.signal(sig, self.handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)


# -----------------------------------------------------------------------------
# One run per output folder


class OutDirLock:
    """An exclusive lock on out_dir for one training run, so two runs never write the same
    checkpoint and log. The operating system holds it (flock on Linux and macOS, msvcrt's
    byte lock on Windows) and frees it when the process ends, however it ends: the lock file
    a killed run leaves behind blocks nobody. The file says who holds it, for the message."""

    def __init__(self, out_dir: Path):
        self.path, self.f = out_dir / "train.lock", None

    def acquire(self) -> "OutDirLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        except OSError as e:
            raise UserError(f"cannot write to --out_dir {self.path.parent}: "
                            f"{e.strerror or e}") from None
        try:
            lock_file(f)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{self.path.parent} is in use by another training run ({holder}):"
                            f" wait for it, stop it, or pick another --out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        self.f = f
        return self

    def release(self) -> None:
        if self.f is not None:
            self.f.close()  # closing the file releases the lock
            self.f = None


def lock_file(f) -> None:
    """Take an exclusive lock on an open file without waiting; OSError if another has it."""
    if sys.platform == "win32":
        import msvcrt
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# -----------------------------------------------------------------------------
# torch.compile, or eager mode where it cannot compile


class CompiledOrEager(torch.nn.Module):
    """torch.compile(model), falling back to the plain model if compiling fails (no Triton on
    Windows and some installs). Compilation happens at the first call, so that is where a
    failure shows: it is reported in one line and the call runs again in eager mode."""

    def __init__(self, model: torch.nn.Module, log=print):
        super().__init__()
        self.eager, self.log = model, log
        self.compiled = torch.compile(model)

    def forward(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 (dynamo and inductor raise many types)
                self.log(f"torch.compile failed ({first_line(e)[:150]}); running without "
                         "it (--compile=False skips the attempt)")
                self.compiled = None
        return self.eager(*args, **kwargs)
