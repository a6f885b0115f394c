"""Every script's command line beyond its flags: how flags are read, checked and inherited.

A script declares its flags with argparse (its own job, at its top); this module holds what
sits behind them, so that no script opens with tables: booleans in every spelling, which flags
were given, presets, the checks that refuse a flag that cannot work, and what a resumed or
fine-tuned run takes from its checkpoint.
"""

import argparse
import math

from errors import UserError

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


def check_args(a) -> None:
    """sample.py's numbers that no mode can take, refused as a UserError."""
    if not 0 < a.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {a.top_p}")
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {a.temperature}")
    if a.top_k < 0 or a.num_samples <= 0 or a.max_new_tokens < 0:
        raise UserError("--top_k must be >= 0, --num_samples > 0 and --max_new_tokens >= 0")
    if a.beam_width < 1 or a.score_stride < 1:
        raise UserError("--beam_width and --score_stride must be >= 1")
