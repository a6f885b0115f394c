"""
A run's log: its speed as it goes, the CSV log of every step and evaluation, its plot.

train.py prints each log line's speed (ms/iter, tokens/s, MFU, time elapsed and left) from a
Meter, appends the figures to out_dir/log.csv, and draws that to out_dir/loss.png. Nothing here
changes what the model computes or how it learns.
"""

import csv
import time
from contextlib import contextmanager
from pathlib import Path

from errors import UserError, first_line

# -----------------------------------------------------------------------------
# Speed: ms/iter, tokens/s, MFU, the time left


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


def save_figure(fig, png: Path) -> Path:
    """Write fig to png and close it; UserError when png cannot be written."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(png, dpi=100, bbox_inches="tight")
    except OSError as e:
        raise UserError(f"cannot write {png}: {e.strerror}") from None
    finally:
        plt.close(fig)
    return png


def plot_losses(out_dir: Path) -> Path:
    """Draw out_dir/log.csv to out_dir/loss.png."""

    fig = draw_curves(read_log(out_dir / "log.csv"), out_dir.name)
    png = out_dir / "loss.png"
    return save_figure(fig, png)


def plot_reward_vs_kl(curves: dict[str, list[dict]], png: Path) -> Path:
    """Reward over-optimisation as Gao et al. (2022) draw it: for each run (label -> its
    evaluations, each with val_kl, val_score and perhaps val_checked), the score PPO climbs
    (left) and the checker's share right (right) against the KL from the reference (nats a
    reply). A proxy that keeps rising while the checked score turns down is over-optimised.
    Raises ImportError without matplotlib, UserError when png cannot be written."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, (ax_score, ax_checked) = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for label, evals in curves.items():
        kl = [e["val_kl"] for e in evals]
        line, = ax_score.plot(kl, [e["val_score"] for e in evals], "o-", label=label)
        checked = [(e["val_kl"], e["val_checked"]) for e in evals if "val_checked" in e]
        if checked:
            ax_checked.plot(*zip(*checked), "o-", color=line.get_color(), label=label)
    ax_score.set_ylabel("score trained on (reward model, or checker)")
    ax_checked.set_ylabel("share right by the checker")
    for ax in (ax_score, ax_checked):
        ax.set_xlabel("KL(policy || SFT model), nats a reply")
        ax.grid(alpha=0.3)
    ax_score.legend(fontsize=8)
    fig.suptitle("held-out replies, sampled as in training, at each evaluation")
    return save_figure(fig, png)
