"""
Stop signals: a run asked to stop (Ctrl-C, SIGTERM, SIGUSR1) saves and exits, not lost.

train.py's loop runs inside StopSignals: the first signal finishes the step, saves and stops;
a second one stops at once, though never in the middle of an optimizer step. Nothing here
changes what the model computes or how it learns.
"""

import signal
from contextlib import contextmanager

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
