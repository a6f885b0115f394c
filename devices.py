"""
Where a run computes, and how fast: the device, its precision, several processes, FLOPs.

train.py and sample.py use it for: the device and dtype (and running out of memory on one,
or refusing beforehand what cannot fit: check_fits, which bigram.py and checkpoints.py use
too), mixed precision, several processes (DDP, launched by torchrun), model FLOPs
utilisation, and torch.compile with a fallback to eager mode where compiling fails. Nothing
here changes what the model computes or how it learns.
"""

import functools
import os
import time
import traceback
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from errors import UserError, first_line
from gpt import GPT, GPTConfig
from stop_signals import StopNow

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


def size_text(n: int) -> str:
    """Bytes as people read them: GiB from a tenth of one, MiB below."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:,.1f} MiB"


def check_fits(need: int, device: torch.device, what: str, remedy: str) -> None:
    """Refuse, before anything is allocated, `need` bytes that cannot fit in the device's free
    memory: a UserError naming both, "<what> needs about X, and <device> has Y free: <remedy>".
    Free memory unknown (MPS): not checked."""
    free = free_memory(device)
    if free is not None and need > free:
        raise UserError(f"{what} needs about {size_text(need)}, and {device} has "
                        f"{size_text(free)} free: {remedy}")


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


def sync_gradients(model, last_micro_step: bool) -> None:
    """Under DDP, all-reduce the gradients once, after the last micro-batch of a step."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = last_micro_step


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


# -----------------------------------------------------------------------------
# torch.compile, or eager mode where it cannot compile


COMPILERS = ("torch._dynamo", "torch._inductor")  # the modules whose failure is compiling's


def stop_or_oom(e: BaseException) -> BaseException | None:
    """The stop request (StopNow, Ctrl-C) or out-of-memory error that e is or wraps, else
    None: dynamo wraps what its backend raised (as inner_exception, or the cause). Neither is
    a failure to compile, and eager mode would meet the same."""
    seen = []
    while e is not None and not any(e is s for s in seen):
        if isinstance(e, (StopNow, KeyboardInterrupt)) or out_of_memory(e) is not None:
            return e
        seen.append(e)
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
    return None


def from_compiler(e: BaseException) -> bool:
    """Whether e may be a failure to compile: an exception of dynamo's or inductor's (such as
    BackendCompilerFailed, for a missing Triton or C compiler), or one raised inside their
    code (an ImportError, a RuntimeError). A model's own error (a wrong shape) is one too
    when compiled: the caller tells them apart by running the model eagerly."""
    if type(e).__module__.startswith(COMPILERS):
        return True
    return any(frame.f_globals.get("__name__", "").startswith(COMPILERS)
               for frame, _ in traceback.walk_tb(e.__traceback__))


class CompiledOrEager(torch.nn.Module):
    """torch.compile(model), falling back to the plain model if compiling fails (no Triton on
    Windows and some installs). Compilation happens at the first call, so that is where a
    failure shows, and the only place one is caught: reported in one line, the call runs again
    in eager mode, and eager mode it stays. Whatever else the first call raises propagates: a
    stop (StopNow), running out of memory, or an error the eager model raises too (a wrong
    shape, which it raises in place of the compiled one's); after a first call that ran,
    nothing is caught."""

    def __init__(self, model: torch.nn.Module, log=print):
        super().__init__()
        self.eager, self.log = model, log
        self.compiled, self.ran = torch.compile(model), False

    def forward(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        if self.ran:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # sorted here: only a failure to compile falls back
            if (stop := stop_or_oom(e)) is not None and stop is not e:
                raise stop from None  # unwrapped: train.py knows a StopNow, not dynamo's
            if stop is not None or not from_compiler(e):
                raise
            why = getattr(e, "inner_exception", None) or e  # what the backend raised
            failure = f"{type(why).__name__}: {first_line(why)[:150]}"
        else:
            self.ran = True
            return out
        out = self.eager(*args, **kwargs)  # the model's own error raises here, eagerly
        self.log(f"torch.compile failed ({failure}); running without it (--compile=False "
                 "skips the attempt)")
        self.compiled = None
        return out
