"""
A run's files in its out_dir: checkpoints and their random streams, earlier runs, the lock.

A checkpoint is written whole or not at all, loaded with tensors and plain data only, and
rebuilt into the GPT it describes; its random streams let a resumed run continue exactly. A new
run in a used out_dir moves the earlier run's files aside, and one lock keeps two runs from
writing the same out_dir. Nothing here changes what the model computes or how it learns.
"""

import os
import shutil
import socket
import sys
import time
import zipfile
from pathlib import Path

import torch

from devices import check_fits, out_of_memory
from errors import UserError, first_line
from files import write_atomic
from gpt import GPT, GPTConfig

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


def load_checkpoint(path: Path) -> dict:
    """Load onto the CPU with weights_only=True: tensors and plain data only, never arbitrary
    code. Raises UserError: no such file, not a checkpoint, or too big for the free memory
    (refused before loading: torch.save stores tensors uncompressed, so a checkpoint takes
    about its file's size)."""
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: train one with `python train.py "
                        f"--out_dir {path.parent}`")
    if not zipfile.is_zipfile(path):  # what torch.save writes
        raise UserError(f"{path} is not a checkpoint: it is truncated or corrupt, or some "
                        "other file")
    check_fits(path.stat().st_size, torch.device("cpu"), f"loading {path}",
               "free some memory, or load it on a machine with more")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a bad file
        if out_of_memory(e) is not None:  # not a bad file: the memory ran out
            raise
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
    as they were at step_state's step. (numpy's global stream is not among them: nothing in
    training draws from it.)"""
    return step_state or step_rng_state(batch_gen)


def set_rng_state(state: dict, batch_gen: torch.Generator) -> None:
    # RNG states are CPU byte tensors, whatever device the checkpoint was loaded onto
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    # (older checkpoints also hold numpy's global stream, which nothing draws from: unused)
    batch_gen.set_state(state["batches"].cpu())


# -----------------------------------------------------------------------------
# Earlier runs: kept, not overwritten

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
