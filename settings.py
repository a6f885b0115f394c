"""Every script's command line beyond its flags: how flags are read, checked and inherited.

A script declares its flags with argparse (its own job, at its top); this module holds what
sits behind them, so that no script opens with tables: booleans in every spelling, which flags
were given, presets, the checks that refuse a flag that cannot work, and what a resumed or
fine-tuned run takes from its checkpoint.
"""

import argparse
import json
import math
from pathlib import Path

import torch

from corpus import BUILT_IN_TEXTS, NO_INPUT_DATASETS, prepare_command
from devices import bf16_speedup, free_memory, pick_device, pick_dtype
from errors import UserError, first_line
from gpt import GPT, GPTConfig
from gpt2_weights import GPT2_NAMES
from tokenizer import bpe_vocabulary, with_merges

# -----------------------------------------------------------------------------
# Reading flags: booleans, and which flags were given


def str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def flags_given(parser: argparse.ArgumentParser, argv=None) -> set:
    """The names of the flags given on the command line (not those left at their defaults):
    the same argv parsed again with every default suppressed. The parser's defaults are gone
    afterwards, so parse with it before calling this."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# -----------------------------------------------------------------------------
# train.py's settings: presets, checks, shape rules, what a resume inherits

# Named sets of defaults; flags given on the command line still win over them. The CPU presets
# log every step to log.csv (cheap), print every 50 or 100, and evaluate 6 times, so loss.png
# has curves with a shape: evaluation has its own generator, so training is the same as with
# one evaluation at the end (the same final val loss), and it costs ~6% more time.
PRESETS = {
    # The fast CPU recipe: nanoGPT's CPU recipe's val loss in under a quarter of its time, with
    # the modern switches and Muon (the searches that found it are in RESULTS.md).
    "cpu": {"device": "cpu", "compile": False, "n_layer": 2, "n_head": 4, "n_embd": 128,
            "block_size": 64, "batch_size": 24, "max_iters": 250, "learning_rate": 4e-3,
            "warmup_iters": 30, "min_lr": 1e-4, "dropout": 0.0, "eval_interval": 50,
            "eval_iters": 20, "log_interval": 1, "print_interval": 50, "sample_every": 0,
            "pos_emb": "rope",
            "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True, "optimizer": "muon"},
    # The same model, longer: 0.15 and more below nanoGPT's CPU recipe in its time
    "cpu_best": {"device": "cpu", "compile": False, "n_layer": 2, "n_head": 4, "n_embd": 128,
                 "block_size": 64, "batch_size": 24, "max_iters": 1100, "learning_rate": 4e-3,
                 "warmup_iters": 30, "min_lr": 1e-4, "dropout": 0.0, "eval_interval": 220,
                 "eval_iters": 20, "log_interval": 1, "print_interval": 100, "sample_every": 0,
                 "pos_emb": "rope",
                 "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True, "optimizer": "muon"},
    # nanoGPT's config files, so its documented command lines run unchanged, e.g.
    # `python train.py config/train_shakespeare_char.py --device=cpu ...`
    "train_shakespeare_char": {"out_dir": "out-shakespeare-char"},  # our defaults otherwise
    "finetune_shakespeare": {"out_dir": "out-shakespeare", "init_from": "gpt2-xl",
                             "dataset": "shakespeare", "eval_interval": 5, "eval_iters": 40,
                             "batch_size": 1, "gradient_accumulation_steps": 32,
                             "max_iters": 20, "learning_rate": 3e-5, "decay_lr": False,
                             "dropout": 0.0, "bias": True},
    # GPT-2 (124M) on OpenWebText: ~0.5M tokens per step (12 x 1024 x 40), 600k steps
    "train_gpt2": {"dataset": "openwebtext", "n_layer": 12, "n_head": 12, "n_embd": 768,
                   "block_size": 1024, "batch_size": 12, "gradient_accumulation_steps": 40,
                   "max_iters": 600000, "lr_decay_iters": 600000, "learning_rate": 6e-4,
                   "min_lr": 6e-5, "warmup_iters": 2000, "weight_decay": 0.1, "beta2": 0.95,
                   "dropout": 0.0, "bias": False, "eval_interval": 1000, "eval_iters": 200,
                   "log_interval": 10},
    # OpenAI's weights scored on OpenWebText's val split, nothing written
    **{f"eval_{name.replace('-', '_')}": {
        "init_from": name, "eval_only": True, "dataset": "openwebtext", "block_size": 1024,
        "batch_size": 8, "eval_iters": 500, "dropout": 0.0, "sample_every": 0}
       for name in GPT2_NAMES},
}


def check_args(a) -> None:
    """Refuse settings that cannot work, with a message that says what to change."""
    for name in ("learning_rate", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip",
                 "dropout", "muon_lr", "muon_momentum"):
        if not math.isfinite(getattr(a, name)):
            raise UserError(f"--{name} must be a finite number, not {getattr(a, name)}")
    if not (0 <= a.beta1 < 1 and 0 <= a.beta2 < 1 and 0 <= a.muon_momentum < 1):
        raise UserError(f"--beta1, --beta2 and --muon_momentum must be in [0, 1), got "
                        f"{a.beta1}, {a.beta2} and {a.muon_momentum}")
    if a.muon_lr <= 0:
        raise UserError(f"--muon_lr must be positive, got {a.muon_lr}")
    if not 0 <= a.seed < 2 ** 32:
        raise UserError(f"--seed must be from 0 to 2**32 - 1, got {a.seed}")
    if a.weight_decay < 0:
        raise UserError(f"--weight_decay cannot be negative, got {a.weight_decay}")
    for name in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_iters",
                 "eval_interval", "log_interval", "gradient_accumulation_steps"):
        if getattr(a, name) <= 0:
            raise UserError(f"--{name} must be positive")
    if a.print_interval is not None and (a.print_interval <= 0
                                         or a.print_interval % a.log_interval):
        raise UserError(f"--print_interval ({a.print_interval}) must be a positive multiple of "
                        f"--log_interval ({a.log_interval})")
    if a.keep_runs < 0:
        raise UserError(f"--keep_runs cannot be negative, got {a.keep_runs}")
    if a.learning_rate <= 0 or a.min_lr < 0 or (a.decay_lr and a.min_lr > a.learning_rate):
        raise UserError("need learning_rate > 0 and 0 <= min_lr <= learning_rate")
    if a.max_iters < 0 or a.warmup_iters < 0 or a.grad_clip < 0 or (a.sample_every or 0) < 0:
        raise UserError("max_iters, warmup_iters, grad_clip and sample_every cannot be negative")
    if not 0 <= a.dropout < 1:
        raise UserError("dropout must be in [0, 1)")
    if a.decay_lr and a.lr_decay_iters is not None and a.warmup_iters > a.lr_decay_iters:
        raise UserError(f"warmup_iters ({a.warmup_iters}) is longer than lr_decay_iters "
                        f"({a.lr_decay_iters}): lower --warmup_iters")
    if a.init_from not in ("scratch", "resume", *GPT2_NAMES) and not Path(a.init_from).exists():
        raise UserError(f"--init_from {a.init_from}: no such file or folder (it takes scratch, "
                        f"resume, {', '.join(GPT2_NAMES)}, a checkpoint of ours or its run "
                        "folder, or a folder of GPT-2 weights)")


# -----------------------------------------------------------------------------
# train.py's settings: the shape rules, and what a resume or a new run from weights takes

# A resumed run takes the settings it was started with, except these (about this invocation),
# and refuses a different shape: its weights have the checkpoint's. (always_save_checkpoint is
# this invocation's too, as in nanoGPT; older checkpoints hold a False that meant nothing.)
NOT_INHERITED = {"config", "preset", "init_from", "out_dir", "eval_only", "plot", "overwrite",
                 "keep_runs", "always_save_checkpoint"}
SWITCHES = ("pos_emb", "norm", "mlp", "qk_norm")  # beyond GPT-2: gpt.py's GPTConfig
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias", *SWITCHES)


# Which flags take effect in which mode; every flag not named here takes effect in all four
# (a resumed run takes those not given from its checkpoint, and names the ones that change).
#   mode (--init_from)                     n_layer n_head n_embd   block_size   dropout
#                                          bias pos_emb norm mlp
#                                          qk_norm
#   scratch                                set                     set          set
#   resume (out_dir/ckpt.pt)               kept                    kept         set
#   checkpoint (PATH: ours, or its folder) kept                    may shrink   set
#   gpt2 (gpt2* or a GPT-2 weights folder) kept                    may shrink   set
# kept: not given, it is the loaded model's; given and different, the run is refused in one line
# naming the flag and the mode (the weights could not take it). may shrink: a shorter context
# keeps the first position embeddings; a longer one is refused. n_embd % n_head is checked on
# the shape the model will have, after these rules.
SHAPE_RULES = {"scratch": dict.fromkeys(SHAPE, "set"), "resume": dict.fromkeys(SHAPE, "kept"),
               "checkpoint": {**dict.fromkeys(SHAPE, "kept"), "block_size": "shrink"},
               "gpt2": {**dict.fromkeys(SHAPE, "kept"), "block_size": "shrink"}}
MODE_NAMES = {"resume": "a resumed run keeps its checkpoint's architecture",
              "checkpoint": "a run started from a checkpoint keeps its architecture",
              "gpt2": "a run from GPT-2 weights keeps GPT-2's architecture"}
GPT2_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
               "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}  # n_layer, n_head, n_embd


def gpt2_shape(init_from: str) -> dict | None:
    """The shape of OpenAI's GPT-2 (by name) or of a folder of its weights (its config.json),
    read without loading any weights; None when the folder has no readable config (then
    loading it says why)."""
    if init_from in GPT2_SHAPES:
        n_layer, n_head, n_embd = GPT2_SHAPES[init_from]
        block_size = 1024
    else:
        try:
            c = json.loads((Path(init_from) / "config.json").read_text(encoding="utf-8"))
            n_layer, n_head, n_embd, block_size = (int(c["n_layer"]), int(c["n_head"]),
                                                   int(c["n_embd"]), int(c["n_positions"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size,
            "bias": True, **{k: getattr(GPTConfig, k) for k in SWITCHES}}


def model_args_of(a, vocab_size: int) -> dict:
    """GPTConfig's fields, as these settings give them."""
    return {k: getattr(a, k) for k in SHAPE} | {"vocab_size": vocab_size, "dropout": a.dropout}


def inherit_settings(a, ckpt: dict, log=print) -> None:
    """Settings not given now come from the checkpoint; given ones that differ are named in
    one line; a different shape is refused (the weights could not take it)."""
    saved, changed = ckpt.get("config", {}), []
    for k, old in saved.items():
        if k in NOT_INHERITED or k not in vars(a):
            continue
        if k not in a.given:
            setattr(a, k, old)
        elif getattr(a, k) != old:
            if k in SHAPE and ckpt["model_args"].get(k) != getattr(a, k):
                raise UserError(f"--{k} {getattr(a, k)}, but {a.out_dir}/ckpt.pt was trained "
                                f"with {k} {ckpt['model_args'].get(k)}: drop the flag to resume")
            changed.append(f"{k} {old} -> {getattr(a, k)}")
    if changed:
        log("overriding: " + ", ".join(changed))


def keep_shape(a, shape: dict, source, mode: str) -> None:
    """SHAPE_RULES for a new run from loaded weights (resume's are in inherit_settings): a
    shape flag not given is the model's (for GPT-2, block_size is ours capped at its context);
    one given and different is refused, all such flags named in one line. A block_size that
    may shrink is checked once chat data has set it (resolve_args, build_model)."""
    refused = []
    for k, rule in SHAPE_RULES[mode].items():
        if k not in a.given:  # (GPT-2's 1024 is a lot for a CPU: there it only caps ours)
            setattr(a, k, min(a.block_size, shape[k]) if rule == "shrink" and mode == "gpt2"
                    else shape[k])
        elif rule == "kept" and getattr(a, k) != shape[k]:
            refused.append(k)
    if refused:
        raise UserError(", ".join(f"--{k} {getattr(a, k)}" for k in refused) + f", but {source} "
                        "has " + ", ".join(f"{k} {shape[k]}" for k in refused) + ": "
                        f"{MODE_NAMES[mode]} (drop " + ", ".join(f"--{k}" for k in refused) + ")")


def take_shape(a, meta: dict, ckpt: dict, path: Path) -> None:
    """A new run from our checkpoint (--init_from=PATH) has its architecture: shape flags not
    given come from it, given ones must match (block_size may shrink: checked in
    resolve_args, after chat data has set it). The data must have its vocabulary, or be
    conversations in it (build_model then adds the chat markers to the model)."""
    if ckpt["meta"].get("chat") and not meta.get("chat") and same_base(ckpt["meta"], meta):
        raise UserError(f"{path} was fine-tuned on conversations, and "
                        f"{Path(a.data_dir) / a.dataset} is plain text: fine-tune it on "
                        "conversations, or start from the checkpoint it was fine-tuned from")
    if not (same_vocabulary(ckpt["meta"], meta) or adds_markers(ckpt["meta"], meta)):
        folder = Path(a.data_dir) / a.dataset
        text = () if a.dataset in BUILT_IN_TEXTS else ("--input", "YOUR_TEXT")
        theirs, ours = vocabulary_name(ckpt["meta"]), vocabulary_name(meta)
        command = prepare_command(a.dataset, a.data_dir, *text, "--vocab_from", str(path))
        fix = (f"prepare it in the checkpoint's vocabulary with `{command}`"
               if a.dataset not in NO_INPUT_DATASETS or a.dataset in BUILT_IN_TEXTS else
               "a generated dataset has its own, so train it from scratch")
        raise UserError(f"{path} was trained on {theirs}, and {folder} is "
                        f"{'another ' * (ours == theirs)}{ours}: {fix}")
    keep_shape(a, {k: ckpt["model_args"].get(k, getattr(GPTConfig, k)) for k in SHAPE}, path,
               "checkpoint")


# -----------------------------------------------------------------------------
# train.py's settings: the data, and whether a checkpoint's vocabulary fits it


def load_meta(data_dir: Path, dataset: str) -> dict:
    """data/<dataset>/meta.json, checked: it and both splits must be there and readable; a
    trained BPE's merges are read from their file (checked against meta.json's SHA-256) into
    meta["bpe"]["merges"]."""
    folder = data_dir / dataset
    hint = prepare_command(dataset, data_dir)
    if not (folder / "meta.json").exists():
        raise UserError(f"no prepared data in {folder}: run `{hint}` first")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not {"tokenizer", "vocab_size"} <= meta.keys():
            raise ValueError("tokenizer or vocab_size missing")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{folder / 'meta.json'} is unreadable ({first_line(e)}): run `{hint}` "
                        "again") from None
    try:  # a trained BPE's merges go into the meta, so checkpoints carry the tokenizer
        meta = with_merges(meta, folder)
    except UserError as e:
        raise UserError(f"{e}: run `{hint}` again") from None
    names = ("{}.bin", "{}_mask.bin", "{}_index.bin") if meta.get("chat") else ("{}.bin",)
    for split in ("train", "val"):
        for name in (n.format(split) for n in names):
            if not (folder / name).is_file():
                raise UserError(f"{folder} has meta.json but no {name}: run `{hint}` again")
    return meta


def same_data(a: dict, b: dict) -> bool:
    """Whether two datasets' metas describe the same tokens: tokenizer, vocabulary, text, task
    and conversations (not where the text was read from)."""
    keys = ("tokenizer", "vocab_size", "chars", "bpe", "sha256", "task", "digits")
    # a conversation's answer counts (for bits per byte) are newer than some checkpoints
    chat = lambda m: {k: v for k, v in (m.get("chat") or {}).items() if "_answer_" not in k}
    return all(a.get(k) == b.get(k) for k in keys) and chat(a) == chat(b)




def same_base(a: dict, b: dict) -> bool:
    """The same tokenizer and characters (a trained BPE: merges, split pattern and
    <|endoftext|>), whether or not either has the chat markers."""
    return a.get("tokenizer") == b.get("tokenizer") and a.get("chars") == b.get("chars") and \
        bpe_vocabulary(a) == bpe_vocabulary(b)


def same_vocabulary(a: dict, b: dict) -> bool:
    """Whether the same id means the same token in both: GPT-2 BPE, one character list, or
    one trained BPE, and the same chat markers (or none in either)."""
    return same_base(a, b) and a.get("vocab_size") == b.get("vocab_size") and \
        (a.get("chat") or {}).get("markers") == (b.get("chat") or {}).get("markers")


def adds_markers(ckpt_meta: dict, meta: dict) -> bool:
    """Conversations in the vocabulary of a model trained without the markers: fine-tuning
    grows its embedding by them (gpt2_weights.grow_vocab)."""
    return (same_base(ckpt_meta, meta) and not ckpt_meta.get("chat") and bool(meta.get("chat"))
            and ckpt_meta.get("vocab_size") == meta["chat"]["markers"]["<|system|>"])


def vocabulary_name(meta: dict) -> str:
    chat = meta.get("chat")
    base = chat["markers"]["<|system|>"] if chat else meta["vocab_size"]  # the markers' first id
    name = {"gpt2": "GPT-2 BPE", "bpe": f"byte-level BPE of {base} tokens"}.get(
        meta["tokenizer"], f"{base} characters")
    return name + (" with the chat markers" if chat else "")


# -----------------------------------------------------------------------------
# train.py's settings: everything derived from them, in one place


def chat_block_size(a, meta: dict) -> None:
    """Conversations are trained whole: block_size is, unless given, the longest less one
    token (x = c[:-1]); a given one may be longer (more padding, a longer chat history in
    sample.py), not shorter: the longest conversation would not fit."""
    longest = meta["chat"]["max_len"]
    if "block_size" not in a.given:
        a.block_size = longest - 1
    elif a.block_size < longest - 1:
        raise UserError(f"--block_size {a.block_size} is shorter than {a.dataset}'s longest "
                        f"conversation ({longest} tokens, so block_size {longest - 1}): drop "
                        "the flag, or prepare the data with a smaller --block_size")


def count_params(shape: dict) -> int:
    """The model's parameter count, built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(GPTConfig(**shape)).parameters())


def check_memory(a, shape: dict, device: torch.device, world_size: int) -> None:
    """Refuse, before anything is allocated, a run that cannot fit in the device's free memory:
    about 16 bytes a parameter to train (fp32 weights, gradients, two AdamW moments), 4 to
    evaluate, plus the batch's activations, roughly. A lower bound: a run that passes may still
    run out (train() says so then), but one that fails this could never have fit."""
    n_params = count_params(shape)
    B, T, C = a.batch_size, shape["block_size"], shape["n_embd"]
    acts = B * T * (shape["n_layer"] * 16 * C + 2 * shape["vocab_size"]) * 4  # saved for backward
    need = n_params * 4 + (B * T * (C + shape["vocab_size"]) * 4 if a.eval_only
                           else n_params * 12 + acts)
    free = free_memory(device)
    if device.type == "cpu":
        need *= world_size  # the processes share one machine's memory
    if free is not None and need > free:
        raise UserError(f"this run needs about {need / 2**30:,.1f} GiB ({n_params / 1e6:,.1f}M "
                        f"parameters and a batch's activations), and {device} has "
                        f"{free / 2**30:,.1f} GiB free: lower --n_embd, --n_layer, --batch_size "
                        "or --block_size")


def resolve_args(a, ckpt: dict | None, local_rank: int, world_size: int, log=print,
                 start: tuple[dict, Path] | None = None):
    """Every setting derived from the checkpoint, the data or other settings, in this one
    place; nothing else rewrites them. Returns the dataset's meta, and the settings as given
    (before anything was derived from them), which the checkpoints keep. ckpt is the state
    a resume continues; start, the (checkpoint, path) a new run starts from."""
    if ckpt is not None:
        inherit_settings(a, ckpt, log)
    settings = {k: v for k, v in vars(a).items() if k != "given"}
    meta = load_meta(Path(a.data_dir), a.dataset)
    if ckpt is not None and not same_data(ckpt["meta"], meta):
        raise UserError(f"{a.out_dir}/ckpt.pt was trained on other data than "
                        f"{Path(a.data_dir) / a.dataset} (another tokenizer, vocabulary or text)")
    if start is not None:
        take_shape(a, meta, *start)
    elif a.init_from not in ("scratch", "resume") and (shape := gpt2_shape(a.init_from)):
        keep_shape(a, shape, a.init_from, "gpt2")
    if a.lr_decay_iters is None:  # a short run (a smoke test) may end inside the warmup
        a.lr_decay_iters = max(a.max_iters, a.warmup_iters)
    if a.sample_every is None:
        a.sample_every = a.eval_interval
    if a.overfit_batch:
        a.dropout = 0.0  # one batch, memorised: dropout would only fight it
    if meta.get("chat"):
        chat_block_size(a, meta)
    if start is not None and a.block_size > start[0]["model_args"]["block_size"]:
        raise UserError(f"block_size {a.block_size} is longer than {start[1]}'s context of "
                        f"{start[0]['model_args']['block_size']}: it can shrink, not grow")
    if ckpt is not None:  # the architecture is the checkpoint's
        for k in SHAPE:
            setattr(a, k, ckpt["model_args"].get(k, getattr(GPTConfig, k)))
    if a.n_embd % a.n_head != 0:  # on the shape the model will have, not on replaced flags
        raise UserError(f"n_embd ({a.n_embd}) must be divisible by n_head ({a.n_head})")
    if world_size > 1:  # torchrun: one process per GPU, or gloo processes on the CPU
        a.device = f"cuda:{local_rank}" if a.device != "cpu" and torch.cuda.is_available() \
            else "cpu"
        if a.gradient_accumulation_steps % world_size:
            raise UserError(f"--gradient_accumulation_steps ({a.gradient_accumulation_steps}) "
                            f"must be a multiple of the number of processes ({world_size})")
    device = pick_device(a.device)
    shape = model_args_of(a, meta["vocab_size"])
    check_memory(a, shape, device, world_size)  # before anything is allocated
    cpu_speedup = ((lambda: bf16_speedup(shape, a.batch_size, log)) if world_size == 1
                   and (a.init_from in ("scratch", "resume") or start) else None)  # (ranks agree)
    a.device, a.dtype = str(device), pick_dtype(a.dtype, device, cpu_speedup)
    if a.compile is None:
        a.compile = device.type == "cuda"
    return meta, settings


# -----------------------------------------------------------------------------
# sample.py's settings: which flag takes effect in which mode


# Every flag takes effect in a mode, or is refused there in one line that says why (only a
# flag given on the command line: the defaults never are). The mode, first match wins:
#   score      --score FILE (any model, a task model's too)
#   chat       --chat: replies to messages, sampled (a model fine-tuned on conversations)
#   chatgreedy --chat --temperature=0: the likeliest reply
#   task       the checkpoint's meta has "task" (prepare.py's reverse or addition problems)
#   attention  --attention PNG
#   beams      --beam_width > 1
#   greedy     --temperature=0: always the likeliest token
#   sampling   otherwise
#
#   flag               sampling  greedy  beams  score  attention  task  chat  chatgreedy
#   --init_from, --device, --dtype: every mode
#   --out_dir          every mode, with --init_from=resume (refused with any other --init_from)
#   --checkpoint       every mode, for a run folder (refused for a .pt file or GPT-2's weights)
#   --chat              -        -       -      -        -       -   (mode)   (mode)
#   --start               Y        Y       Y      -        Y       Y     Y      Y
#   --num_samples         Y        Y       Y      -        -       -     -      -
#   --max_new_tokens      Y        Y       Y      -        -       -     Y      Y
#   --temperature         Y        Y       -      -        -       -     Y      Y
#   --top_k, --top_p      Y        -       -      -        -       -     Y      -
#   --seed                Y        -       -      -        -       -     Y      -
#   --stream              Y        Y       -      -        -       -     Y      Y
#   --beam_width          Y (1)    Y (1)   Y      -        -       -     -      -
#   --score_stride        -        -       -      Y        -       -     -      -
#   --attention         (mode)   (mode)  (mode)   -        Y       -     -      -
#   --attention_layers    -        -       -      -        Y       -     -      -
#   --attention_heads     -        -       -      -        Y       -     -      -
#   --compile             -        -       -      Y        -       -     -      -
# (--attention picks its mode over sampling and beams, and --chat over all but --score: with
# them, the flags of the modes they replace are the ones refused.)
TAKES_EFFECT = {
    "chat": {"chat", "chatgreedy"},
    "start": {"sampling", "greedy", "beams", "attention", "task", "chat", "chatgreedy"},
    "num_samples": {"sampling", "greedy", "beams"},
    "max_new_tokens": {"sampling", "greedy", "beams", "chat", "chatgreedy"},
    "temperature": {"sampling", "greedy", "chat", "chatgreedy"},
    "top_k": {"sampling", "chat"},
    "top_p": {"sampling", "chat"},
    "seed": {"sampling", "chat"},
    "stream": {"sampling", "greedy", "chat", "chatgreedy"},
    "beam_width": {"sampling", "greedy", "beams"},
    "score_stride": {"score"},
    "attention": {"attention"},
    "attention_layers": {"attention"},
    "attention_heads": {"attention"},
    "compile": {"score"},
}  # the other flags (init_from, out_dir, checkpoint, device, dtype) take effect in every mode
MODE_NAME = {"sampling": "when sampling", "greedy": "with --temperature=0",
             "beams": "with beam search (--beam_width > 1)", "score": "with --score",
             "attention": "with --attention", "task": "with a task model",
             "chat": "with --chat", "chatgreedy": "with --chat --temperature=0"}
WHY = {  # why a flag does nothing in a mode: the mode's reason, unless the flag has its own
    "sampling": "sampling draws new tokens after the prompt",
    "greedy": "greedy decoding always takes the likeliest token, it draws no random tokens",
    "beams": "beam search keeps the likeliest sequences, it draws no random tokens",
    "score": "--score only scores the file's text",
    "attention": "--attention only draws the attention over the prompt, it generates nothing",
    "task": "a task model only answers the problem in --start, greedily, up to its end of turn",
    "chat": "a chat streams one sampled reply to each message",
    "chatgreedy": "greedy decoding always takes the likeliest token, it draws no random tokens",
    ("stream", "beams"): "beam search cannot stream: the best beam is known only at the end",
    ("start", "score"): "--score reads its text from the file, there is no prompt",
    ("num_samples", "chat"): "a chat gives one reply to each message",
    ("num_samples", "chatgreedy"): "a chat gives one reply to each message",
    ("beam_width", "chatgreedy"): "a chat streams its reply as it is decoded; beam search "
                                  "cannot stream",
    "score_stride": "it goes with --score only",
    "attention_layers": "it goes with --attention only",
    "attention_heads": "it goes with --attention only",
    "compile": "only --score runs compiled (generation's shapes change every step, so it "
               "stays eager; --attention is a single forward)",
}
CHAT_MODES = ("chat", "chatgreedy")


def mode_of(args, meta: dict) -> str:
    """The mode sample.py's flags ask for with a checkpoint of this meta: the table's order."""
    if args.score is not None:
        return "score"
    if args.chat:
        return "chatgreedy" if args.temperature == 0 else "chat"
    if meta.get("task"):
        return "task"
    if args.attention:
        return "attention"
    if args.beam_width > 1:
        return "beams"
    return "greedy" if args.temperature == 0 else "sampling"


def refuse_ignored_flags(args, mode: str) -> None:
    """The first flag given that would do nothing in this mode, refused in one line."""
    for flag, modes in TAKES_EFFECT.items():
        if flag in args.given and mode not in modes:
            why = WHY.get((flag, mode)) or WHY.get(flag) or WHY[mode]
            raise UserError(f"--{flag} has no effect {MODE_NAME[mode]}: {why}")


def check_sample_args(a) -> None:
    """sample.py's numbers that no mode can take, refused as a UserError."""
    if not 0 < a.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {a.top_p}")
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {a.temperature}")
    if a.top_k < 0 or a.num_samples <= 0 or a.max_new_tokens < 0:
        raise UserError("--top_k must be >= 0, --num_samples > 0 and --max_new_tokens >= 0")
    if a.beam_width < 1 or a.score_stride < 1:
        raise UserError("--beam_width and --score_stride must be >= 1")
