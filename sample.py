"""
Generate text from a trained checkpoint or from OpenAI's GPT-2, or score a text file.

    python sample.py                                        # from out/ckpt.pt
    python sample.py --start "ROMEO:" --num_samples 3 --max_new_tokens 200
    python sample.py --temperature 0                        # greedy: always the likeliest token
    python sample.py --top_p 0.9 --temperature 0.8          # nucleus sampling
    python sample.py --beam_width 4 --num_samples 2         # the 2 best of 4 beams
    python sample.py --start FILE:prompt.txt
    python sample.py --stream=False                         # print each sample when it is done
    python sample.py --score some.txt                       # its loss, perplexity, bits per byte
    python sample.py --start "ROMEO:" --attention attn.png  # draw the attention over the prompt
    python sample.py --init_from gpt2 --start "Hello"       # GPT-2 weights (needs transformers)
    python sample.py --chat                                 # talk to a model fine-tuned on chats
    python sample.py --chat --start "Reverse 123"           # one message, one reply
    echo "Reverse 123" | python sample.py --chat            # the message from stdin

The sampling itself is in gpt.py: generate_stream (the loop), then sample_next_token with its
filters: temperature, top_k_filter and top_p_filter (nucleus sampling). This file loads the
model, encodes the prompt, and prints. The tokenizer is rebuilt from the meta saved inside the
checkpoint, so samples always use the vocabulary the model was trained with; GPT-2's weights
come with GPT-2's BPE. A file (FILE:, --score) is read as prepare.py reads one. A flag that
would do nothing in the mode asked for is refused: see TAKES_EFFECT. --chat renders the
messages with the chat template saved in the checkpoint (chat.py) and prints the replies alone.
"""

import argparse
import codecs
import math
import re
import sys
import time
from pathlib import Path

import torch

import chat
from checkpoints import load_checkpoint, model_from_checkpoint, run_checkpoint
from devices import autocast_ctx, out_of_memory, pick_device, pick_dtype
from errors import UserError, first_line
from gpt import GPT, eval_mode
from settings import flags_given, str2bool
from tokenizer import (
    bits_per_byte,
    encoding_of,
    get_tokenizer,
    read_text_file,
)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--init_from", default="resume",
                   help="resume (the run in --out_dir), a checkpoint of ours (.pt) or its run "
                        "folder, gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a folder saved by "
                        "Hugging Face transformers")
    p.add_argument("--out_dir", default="out", help="the training run's folder")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                   help="best: the weights with the lowest val loss (best.pt); latest: where "
                        "training stopped (ckpt.pt)")
    p.add_argument("--start", default=None,
                   help="the prompt, or FILE:path to read it from a file (default: a newline, "
                        "or the vocabulary's first character if it has no newline); with "
                        "--chat, the one message to reply to")
    p.add_argument("--chat", action="store_true",
                   help="talk to a model fine-tuned on conversations: a message a line, each "
                        "reply streamed (/reset forgets, Ctrl-D quits); with --start, or stdin "
                        "that is not a terminal, one message and its reply alone")
    p.add_argument("--num_samples", type=int, default=5, help="how many samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens per sample")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="<1 sharper, >1 more random, 0 greedy")
    p.add_argument("--top_k", type=int, default=200, help="keep only the k likeliest (0: all)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="keep the smallest set of tokens with probability >= p (1: all)")
    p.add_argument("--beam_width", type=int, default=1,
                   help="keep the K likeliest sequences instead of sampling (1: off)")
    p.add_argument("--stream", type=str2bool, nargs="?", const=True, default=True,
                   help="print each token as it is generated (not with beam search)")
    p.add_argument("--score", default=None,
                   help="a text FILE: print its loss, perplexity and bits per byte under the "
                   "model, no sampling")
    p.add_argument("--score_stride", type=int, default=1,
                   help="scoring slides its window by this many tokens: 1 gives every token its "
                        "full context; larger is faster but gives some tokens less context")
    p.add_argument("--attention", metavar="PNG", default=None,
                   help="draw each layer's and head's attention weights over the prompt to "
                        "this image, no sampling (needs matplotlib)")
    p.add_argument("--attention_layers", default=None,
                   help="with --attention: which layers, e.g. 0,2 (default: all)")
    p.add_argument("--attention_heads", default=None,
                   help="with --attention: which heads, e.g. 0,1 (default: all)")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False,
                   help="torch.compile the forward pass (--score only; generation's "
                        "shapes change every step, so it stays eager)")
    return p


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
    if not 0 < a.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {a.top_p}")
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {a.temperature}")
    if a.top_k < 0 or a.num_samples <= 0 or a.max_new_tokens < 0:
        raise UserError("--top_k must be >= 0, --num_samples > 0 and --max_new_tokens >= 0")
    if a.beam_width < 1 or a.score_stride < 1:
        raise UserError("--beam_width and --score_stride must be >= 1")


# -----------------------------------------------------------------------------
# The main path: load the model, encode the prompt, sample, print


def main(argv=None) -> list[str] | dict:
    """The samples' texts, or with --score a dict of loss, perplexity, tokens, bpb, bytes."""
    args = parse_args(argv)
    try:
        return sample(args)
    except UserError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if (where := out_of_memory(e)) is None:
            raise
        print(f"sample.py: stopped: out of {where} memory: lower --num_samples, --beam_width or "
              "--max_new_tokens, or use --device=cpu", file=sys.stderr)
        sys.exit(1)


def parse_args(argv=None):
    """The flags, and in args.given the names of those given on the command line."""
    p = get_parser()
    args = p.parse_args(argv)
    args.given = flags_given(p, argv)
    return args


def sample(args) -> list[str] | dict:
    if not hasattr(args, "given"):  # built by hand, not by parse_args: everything was given
        args.given = set(vars(args))
    check_args(args)
    if "out_dir" in args.given and args.init_from != "resume":
        raise UserError(f"--out_dir has no effect with --init_from={args.init_from}: it names "
                        "the run that --init_from=resume loads")
    device = pick_device(args.device)
    model, meta = load_model(args.init_from, Path(args.out_dir), device, args.checkpoint,
                             "checkpoint" in args.given)
    mode = mode_of(args, meta)
    refuse_ignored_flags(args, mode)
    vocab_size = model.config.vocab_size
    if args.compile:
        model = torch.compile(model)
    ctx = autocast_ctx(device, pick_dtype(args.dtype, device))
    try:
        encode, decode = get_tokenizer(meta)
        token_bytes = token_bytes_fn(meta)
    except UserError as e:  # GPT-2's BPE files could not be had, or a BPE has no merges
        raise UserError(str(e)) from None

    if mode == "score":
        text = read_file(Path(args.score))
        ids = encode_text(file_encoder(meta, encode), text, vocab_size, "text")
        return score_file(model, args, ids, text, token_bytes, device, ctx)
    if mode in CHAT_MODES or mode == "task":  # a model fine-tuned on conversations
        talk = Chat(model, meta, args, file_encoder(meta, encode), decode, token_bytes, ctx)
        if mode == "task":  # prepare.py's reverse or addition problems: is the answer right?
            return answer_problem(talk, read_prompt(args.start or "")[1])
        return talk.loop() if args.start is None and sys.stdin.isatty() else [talk.one()]
    from_file, text = read_prompt(args.start or default_prompt(meta))
    start_ids = encode_text(file_encoder(meta, encode) if from_file else encode, text,
                            vocab_size, "prompt")
    if not start_ids:
        raise UserError("the prompt is empty")
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]  # (1, T)
    if mode == "attention":
        with ctx:
            return draw_attention(model, x, token_bytes, args)
    eot = meta.get("eot_token")  # GPT-2's <|endoftext|> ends a document; chars have none
    if mode == "beams":
        return print_beams(model, x, args, ctx, decode, eot)
    return print_samples(model, x, args, ctx, decode, token_bytes, eot)


def load_model(init_from: str, out_dir: Path, device, which: str = "best",
               which_given: bool = False) -> tuple[GPT, dict]:
    """The model and the meta its tokenizer is built from: our checkpoint alone (its config,
    weights and dataset meta), or GPT-2's weights, which always go with GPT-2's BPE.
    init_from is resume (out_dir), a checkpoint file or run folder of ours, or GPT-2's;
    `which` is best (a folder's best.pt, or ckpt.pt while there is none) or latest (ckpt.pt);
    which_given: --checkpoint was given, so it is refused where there is no run folder."""
    folder = out_dir if init_from == "resume" else Path(init_from)
    path = run_checkpoint(folder, which)
    if which_given and not (folder.is_dir() and path is not None):
        raise UserError(f"--checkpoint has no effect with --init_from={init_from}: it picks "
                        "best.pt or ckpt.pt in a run folder of ours")
    if path is None and init_from == "resume":
        path = out_dir / "ckpt.pt"  # there is none: load_checkpoint says how to train one
    if path is not None:
        ckpt = load_checkpoint(path, map_location=device)
        model, _ = model_from_checkpoint(ckpt, path)
        meta = ckpt["meta"]
    else:
        try:
            model = GPT.from_pretrained(init_from)
        except ValueError as e:
            raise UserError(first_line(e)) from None
        eot = 50256 if model.config.vocab_size > 50256 else None  # <|endoftext|>, if it has one
        meta = {"tokenizer": "gpt2", "eot_token": eot}
    return model.eval().to(device), meta


def checkpoint_name(args) -> str:
    """The checkpoint load_model loads, as a path, or GPT-2's weights by name."""
    folder = Path(args.out_dir) if args.init_from == "resume" else Path(args.init_from)
    return str(run_checkpoint(folder, args.checkpoint) or args.init_from)


def read_file(path: Path) -> str:
    """A FILE: prompt or a --score file, read exactly as prepare.py reads a text file: UTF-8,
    a byte-order mark opening it dropped, Windows line ends read as "\n", UTF-16 refused."""
    try:
        return read_text_file(path)
    except UserError as e:
        raise UserError(str(e)) from None


def file_encoder(meta: dict, encode):
    """How text read from a file is encoded: as prepare.py encodes a document, so a literal
    "<|endoftext|>" in it is plain text. (A prompt typed as --start=... is encoded by encode,
    where "<|endoftext|>" is a BPE's end-of-text token: ask for it by name.)"""
    enc = encoding_of(meta)  # GPT-2's BPE or a trained one; None for characters
    return encode if enc is None else enc.encode_ordinary


def default_prompt(meta: dict) -> str:
    """A newline, as nanoGPT starts; a text with no newline starts from its first character."""
    chars = meta.get("chars")
    return "\n" if chars is None or "\n" in chars else chars[0]


def read_prompt(start: str) -> tuple[bool, str]:
    """(whether it came from a file, the prompt's text)."""
    return (True, read_file(Path(start[5:]))) if start.startswith("FILE:") else (False, start)


def encode_text(encode, text: str, vocab_size: int, what: str) -> list[int]:
    try:
        ids = encode(text)
    except KeyError as e:
        raise UserError(f"{e.args[0]}; the {what} must use the training text's characters")
    if ids and max(ids) >= vocab_size:  # GPT-2's BPE in front of a smaller model from a folder
        raise UserError(f"the {what} has token id {max(ids)}, but the model's vocabulary has "
                        f"{vocab_size} tokens")
    return ids


def print_samples(model, x, args, ctx, decode, token_bytes, eot) -> list[str]:
    """Sample num_samples continuations of x (1, T); with --stream, print each token as it
    comes, so the output is the same text, just sooner."""
    start_ids = x[0].tolist()
    gen = torch.Generator(device=x.device).manual_seed(args.seed)
    show = (lambda s: print(s, end="", flush=True)) if args.stream else (lambda s: None)
    samples = []
    for _ in range(args.num_samples):
        t0 = time.perf_counter()
        stream, new = StreamDecoder(token_bytes), []
        show(stream.push(start_ids))
        with ctx:
            for tok in model.generate_stream(x, args.max_new_tokens, args.temperature,
                                             args.top_k, args.top_p, gen):
                if (t := tok.item()) == eot:
                    break  # a document ended: stop there
                new.append(t)
                show(stream.push(new[-1:]))
        dt = time.perf_counter() - t0
        samples.append(decode(start_ids + new))
        print(stream.flush() if args.stream else samples[-1])  # the rest, or all at once
        print(f"---------------  ({len(new)} tokens, {len(new) / dt:.0f} tokens/s)")
    return samples


# -----------------------------------------------------------------------------
# Streaming: text out as the tokens come


def token_bytes_fn(meta: dict):
    """id -> that token's UTF-8 bytes. A BPE token is a run of bytes, not of characters:
    '🙂' (4 bytes) arrives as two tokens, and neither alone is valid text. A chat model's
    markers are their names, as tokenizer.get_tokenizer's decode writes them (a model trained on
    conversations writes <|end|> when it is sampled as plain text too)."""
    if (enc := encoding_of(meta)) is not None:  # GPT-2's BPE or a trained one
        base = enc.decode_single_token_bytes
    else:
        chars = meta["chars"]
        base = lambda i: chars[i].encode("utf-8")
    names = {i: m.encode("utf-8") for m, i in meta.get("chat", {}).get("markers", {}).items()}
    return (lambda i: names[i] if i in names else base(i)) if names else base


class StreamDecoder:
    """Token ids in, text out as soon as it is whole: never half a character.

    Bytes that stop mid-character are held back until the character's last byte arrives;
    bytes that can never become valid UTF-8 turn into U+FFFD as soon as that is certain, just as
    decoding everything at the end would. Python's incremental UTF-8 decoder does both.
    """

    def __init__(self, token_bytes):
        self.token_bytes = token_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids) -> str:
        return self.utf8.decode(b"".join(self.token_bytes(i) for i in ids))

    def flush(self) -> str:
        """What is still held back: a character cut off at the end becomes U+FFFD."""
        return self.utf8.decode(b"", final=True)


# -----------------------------------------------------------------------------
# Chat: replies to messages, from a model fine-tuned on conversations (chat.py's template)


class Chat:
    """A conversation with the model. Each message is rendered after the history with the
    template saved in the checkpoint (chat.render_prompt); the reply is generated a token at a
    time, streamed through a StreamDecoder, until the model writes <|end|> (not printed) or
    --max_new_tokens, and joins the history. Any other marker, or GPT-2's <|endoftext|>, ends
    the reply too: the model would be starting a turn that is not its own.

    The prompt is kept within block_size by dropping the oldest exchanges first
    (chat.fit_history), leaving the reply room for min(--max_new_tokens, block_size // 4)
    tokens; a message too long for that may fill all block_size tokens (the window then slides
    as the model replies), and one longer is refused. Messages are encoded as prepare.py
    encodes a document: a literal "<|endoftext|>" is plain text, and no text is a marker."""

    def __init__(self, model, meta, args, encode, decode, token_bytes, ctx):
        self.model, self.meta, self.args, self.ctx = model, meta, args, ctx
        self.tmpl = saved_template(meta, args)
        self.encode, self.decode, self.token_bytes = encode, decode, token_bytes
        self.stops = set(self.tmpl["markers"].values()) | {meta.get("eot_token")}
        self.block_size = model.config.block_size
        self.limits = (self.block_size - min(args.max_new_tokens, self.block_size // 4),
                       self.block_size)  # what the prompt may take: leaving room, or not
        device = next(model.parameters()).device
        self.sampling = {"temperature": args.temperature, "top_k": args.top_k,
                         "top_p": args.top_p,
                         "generator": torch.Generator(device=device).manual_seed(args.seed)}
        self.show = (lambda s: print(s, end="", flush=True)) if args.stream else (lambda s: None)
        self.history = []  # the messages so far, {"role": ..., "content": ...}

    def one(self) -> str:
        """One message, --start or all of stdin, and the reply alone on stdout."""
        text = read_prompt(self.args.start)[1] if self.args.start is not None else \
            sys.stdin.read()
        if not (message := text.rstrip("\n")):
            raise UserError("the message is empty")
        return self.answer(message)

    def loop(self) -> list[str]:
        """Talk: a message a line, each reply streamed. /reset forgets the conversation; Ctrl-D
        (or Ctrl-C at the prompt) quits; Ctrl-C during a reply stops it there, and what it said
        stays in the history. A message that cannot be read is said so, and the chat goes on."""
        print("chat: type a message and Enter; /reset forgets the conversation, Ctrl-C stops "
              "a reply, Ctrl-D quits", file=sys.stderr)
        replies = []
        while True:
            try:
                message = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)  # end the prompt's line
                return replies
            if message.strip() == "/reset":
                self.history = []
                print("(the conversation is forgotten)", file=sys.stderr)
            elif message.strip():
                try:
                    replies.append(self.answer(message, interruptible=True))
                except UserError as e:
                    print(f"sample.py: {e}", file=sys.stderr)

    def answer(self, message: str, interruptible: bool = False) -> str:
        """Reply to message, shown as it comes; message and reply join the history. A task
        model is asked a problem in the layout it learned (zero-padded: '12+345' is asked as
        '012+345'), and its answer is checked, on stderr: stdout holds the reply alone."""
        task = self.meta.get("task")
        if problem := task and task_problem(task, self.meta["digits"], message):
            message = problem[0]
        ids = self.prompt(message)
        stream, new = StreamDecoder(self.token_bytes), []
        try:
            with self.ctx:
                for t in reply_tokens(self.model, ids, self.args.max_new_tokens, self.stops,
                                      self.sampling):
                    new.append(t)
                    self.show(stream.push([t]))
        except KeyboardInterrupt:
            if not interruptible:
                raise
        reply = self.decode(new)
        print(stream.flush() if self.args.stream else reply)
        self.history += [{"role": "user", "content": message},
                         {"role": "assistant", "content": reply}]
        if problem:
            print(f"{message} -> {reply}   {verdict(task, reply, problem[1])}", file=sys.stderr)
        return reply

    def prompt(self, message: str) -> list[int]:
        """The ids that ask for the reply to message: the history that fits, then message."""
        encode_text(self.encode, message, self.model.config.vocab_size, "message")
        messages = self.history + [{"role": "user", "content": message}]
        for limit in self.limits:
            kept, dropped = chat.fit_history(messages, self.encode, self.tmpl, limit, prompt=True)
            if kept is not None:
                break
        else:
            n = len(chat.render_prompt(messages[-1:], self.encode, self.tmpl))
            raise UserError(f"the message takes {n} tokens with the chat's markers, but the "
                            f"model reads at most {self.block_size}: shorten it")
        if dropped:
            print(f"note: forgot the oldest {dropped // 2} exchange(s) to keep the conversation "
                  f"within the model's {self.block_size} tokens", file=sys.stderr)
        self.history = kept[:-1]
        return chat.render_prompt(kept, self.encode, self.tmpl)


def saved_template(meta: dict, args) -> dict:
    """The chat template the checkpoint was trained with; one with none is refused."""
    if "chat" in meta:
        return meta["chat"]
    if meta.get("task"):
        raise UserError(f"{checkpoint_name(args)} is a task model from before tasks were "
                        "conversations: prepare the task and train it again (see the README)")
    raise UserError(f"{checkpoint_name(args)} was not trained on conversations: --chat needs a "
                    "model fine-tuned on prepare.py's conversations (see the README)")


def reply_tokens(model, prompt: list[int], max_new: int, stops: set, sampling: dict):
    """Yield the reply's token ids as they are generated, up to a stop id (not yielded) or
    max_new tokens. sampling: generate_stream's temperature, top_k, top_p, generator."""
    x = torch.tensor([prompt], dtype=torch.long, device=next(model.parameters()).device)
    for tok in model.generate_stream(x, max_new, **sampling):
        if (t := tok.item()) in stops:
            return
        yield t


# -----------------------------------------------------------------------------
# Beam search: the likeliest continuations instead of samples


def print_beams(model, x, args, ctx, decode, eot) -> list[str]:
    """The num_samples best of the beam_width beams. Beam search is deterministic, so it runs
    once, and it cannot stream: the best beam is known only at the end."""
    T = x.size(1)
    if args.num_samples > args.beam_width:
        print(f"note: beam search keeps {args.beam_width} beams, so it prints {args.beam_width}"
              f" of the {args.num_samples} samples asked for (raise --beam_width for more)",
              file=sys.stderr)
    t0 = time.perf_counter()
    with ctx:
        beams, scores = model.beam_search(x, args.max_new_tokens, args.beam_width, eot)
    rate = (beams.size(1) - T) / (time.perf_counter() - t0)  # steps of the whole beam per second
    samples = []
    for ids, logp in zip(beams[:args.num_samples].tolist(), scores.tolist()):
        new = ids[T:]
        new = new[:new.index(eot)] if eot in new else new
        samples.append(decode(ids[:T] + new))
        print(samples[-1])
        print(f"---------------  ({len(new)} tokens, log-prob {logp:.2f}, {rate:.0f} tokens/s)")
    return samples


# -----------------------------------------------------------------------------
# Scoring: how surprised is the model by a text?


def score_file(model, args, ids: list[int], text: str, token_bytes, device, ctx) -> dict:
    """The loss of text's ids (nats per scored token), its perplexity, and its bits per byte:
    the summed loss in bits over the UTF-8 bytes scored, which compares across tokenizers
    (tokenizer.bits_per_byte, here exact: the text is at hand). Every token but the first is
    scored (nothing predicts the first), so its bytes are left out."""
    if len(ids) < 2:
        raise UserError(f"{args.score} holds {len(ids)} token(s); scoring needs at least 2")
    with ctx:
        nll, n = score(model, torch.tensor(ids, device=device), args.score_stride)
    n_bytes = len(text.encode("utf-8")) - len(token_bytes(ids[0]))  # >= n: a byte a token
    bpb = bits_per_byte(nll, n, n_bytes)
    print(f"{args.score}: {n} tokens scored, loss {nll:.4f} nats/token, "
          f"perplexity {math.exp(nll):.2f}, {bpb:.4f} bits/byte ({n_bytes:,} bytes)")
    return {"loss": nll, "perplexity": math.exp(nll), "tokens": n, "bpb": bpb,
            "bytes": n_bytes}


@torch.no_grad()
def score(model: GPT, ids: torch.Tensor, stride: int = 1,
          batch_size: int = 16) -> tuple[float, int]:
    """Mean negative log-likelihood (nats/token) of ids (N,), and how many tokens it covers.

    Token t is predicted from the up to block_size tokens before it (the first token has no
    context, so it is not scored). Every window holds L = min(block_size, N-1) inputs. The
    first scores all L of its targets; each next one slides `stride` tokens right and scores
    only the targets that are new (a target of -1 carries no loss). With stride 1 every token
    sees all the context the model can take, for one window per token; with stride s a token
    past the first window sees at least L - s + 1 tokens, for 1/s of the work. A window holds
    only L targets, so a stride wider than L slides by L: every token after the first is
    scored exactly once, at any stride.
    """
    L = min(model.config.block_size, ids.numel() - 1)
    stride = min(stride, L)  # wider would skip the targets between two windows
    ends = list(range(L, ids.numel() - 1, stride)) + [ids.numel() - 1]  # inputs ids[end-L:end]
    prevs = [0] + ends[:-1]  # targets up to ids[prev] were scored by the window before
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(ends), batch_size):  # a batch of windows per forward
            end = torch.tensor(ends[i:i + batch_size], device=ids.device)[:, None]  # (B, 1)
            prev = torch.tensor(prevs[i:i + batch_size], device=ids.device)[:, None]  # (B, 1)
            pos = end - L + torch.arange(L, device=ids.device)  # (B, L) input positions
            targets = ids[pos + 1].masked_fill(pos < prev, -1)  # (B, L) only new targets count
            _, loss = model(ids[pos], targets)  # mean over the targets that count
            n = int((targets != -1).sum())
            total, count = total + loss.item() * n, count + n
    return total / count, count


# -----------------------------------------------------------------------------
# Tasks: answer a reversal or addition problem


def answer_problem(talk: Chat, text: str) -> list[str]:
    """Greedily answer one problem, asked as the user's message: e.g. '123+456' -> '9750',
    which is 579 written from the ones digit up. Shorter numbers are zero-padded to the trained
    layout; the answer ends at <|end|>, or one token past the right answer's length."""
    task, d = talk.meta["task"], talk.meta["digits"]
    if (problem := task_problem(task, d, text)) is None:
        example = chat.make_problem(task, 123, d)[0]
        raise UserError(f"this model answers {task} problems of up to {d} digits, like "
                        f"--start '{example}'; got {text!r}")
    prompt, right = problem
    ids = chat.render_prompt([{"role": "user", "content": prompt}], talk.encode, talk.tmpl)
    with talk.ctx:
        answer = talk.decode(list(reply_tokens(talk.model, ids, len(right) + 1, talk.stops,
                                               {"temperature": 0})))
    print(f"{prompt} -> {answer}   {verdict(task, answer, right)}")
    return [f"{prompt} -> {answer}"]


def task_problem(task: str, digits: int, text: str) -> tuple[str, str] | None:
    """(the problem in text as prepare.py lays it out, its right answer), or None when the text
    is not a problem of the task: '12+456=' -> ('012+456', '8640')."""
    pattern = r"(\d+)\|?" if task == "reverse" else r"(\d+)\+(\d+)=?"  # "|", "=": as once laid out
    m = re.fullmatch(pattern, text.replace(" ", "").strip())
    if m is None or any(len(n) > digits for n in m.groups()):
        return None
    numbers = [int(n) for n in m.groups()]  # problem number n, as prepare.py lays it out
    n = numbers[0] if task == "reverse" else numbers[0] * 10 ** digits + numbers[1]
    return chat.make_problem(task, n, digits)


def verdict(task: str, answer: str, right: str) -> str:
    """'(right)' or '(wrong)', with the sum an addition answer's reversed digits spell."""
    value = f"= {int(answer[::-1])}, " if task == "addition" and answer.isdigit() else ""
    return f"({value}{'right' if answer == right else 'wrong'})"


# -----------------------------------------------------------------------------
# A picture of attention: who looks at whom


MAX_TOKENS, MAX_PANELS, MAX_INCHES = 64, 16, 24  # the picture's caps: it fits a screen


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """Every layer's attention weights over the prompt idx (1, T): (n_layer, nh, T, T).
    Row t holds how much token t attends to each token 0..t; each row sums to 1. With `last`,
    only the last `last` queries' weights on the last `last` keys are kept, and each layer's
    are cut as soon as it has run: memory holds one layer's full weights, not all of them."""
    idx = idx[:, -model.config.block_size:]  # the model sees at most block_size tokens
    layers = [block.attn for block in model.transformer.h]
    kept = []

    def keep(attn, inputs, output):
        kept.append(attn.att[0, :, -last:, -last:].float().cpu() if last else
                    attn.att[0].float().cpu())
        attn.att = None

    hooks = [attn.register_forward_hook(keep) for attn in layers]
    with eval_mode(model):
        for attn in layers:
            attn.explicit = True  # the written-out formula, which keeps its weights
        try:
            model(idx)
        finally:
            for attn, hook in zip(layers, hooks):
                attn.explicit = False
                hook.remove()
    return torch.stack(kept)


def pick(spec: str | None, n: int, what: str) -> list[int]:
    """'0,2' -> [0, 2]; None -> all n."""
    if spec is None:
        return list(range(n))
    try:
        chosen = [int(s) for s in spec.split(",")]
    except ValueError:
        raise UserError(f"--attention_{what}s takes numbers like 0,2, not {spec!r}") from None
    if not all(0 <= c < n for c in chosen):
        raise UserError(f"--attention_{what}s {spec}: the model has {what}s 0 to {n - 1}")
    return chosen


def draw_attention(model, x, token_bytes, args) -> torch.Tensor:
    """Draw the chosen layers' and heads' attention over the prompt, a heatmap each, with the
    tokens on both axes; returns the weights drawn (layers, heads, T, T).

    The picture is capped so a screen can show it, whatever the prompt and the model: the last
    MAX_TOKENS tokens (their weights on earlier tokens are left out, so a row may sum to less
    than 1) and the first MAX_PANELS (layer, head) panels, in a grid at most MAX_INCHES wide
    and high. What was left out is said, with the flags that pick other panels."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--attention needs matplotlib: pip install matplotlib") from None
    n_layer, n_head = model.config.n_layer, model.config.n_head
    layers = pick(args.attention_layers, n_layer, "layer")
    heads = pick(args.attention_heads, n_head, "head")
    seen = min(x.size(1), model.config.block_size)  # the tokens the model attends over
    maps = attention_maps(model, x, MAX_TOKENS)[layers][:, heads]  # (layers, heads, T, T)
    T = maps.size(-1)
    labels = [token_bytes(i).decode("utf-8", errors="replace") for i in x[0, -T:].tolist()]
    labels = [repr(s)[1:-1] for s in labels]  # '\n' shows as \n
    panels = [(i, j) for i in range(len(layers)) for j in range(len(heads))][:MAX_PANELS]
    cols = min(len(panels), len(heads), 4)
    rows = math.ceil(len(panels) / cols)
    size = min(max(2.0, 0.25 * T), MAX_INCHES / cols, MAX_INCHES / rows)  # inches a panel
    font = max(2.0, min(6.0, 72 * size / (T + 6)))  # a label's height: what a token row has
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(size * cols, size * rows))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (i, j) in zip(axes.flat, panels):
        ax.imshow(maps[i, j].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layers[i]}, head {heads[j]}", fontsize=8)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=font)
        ax.set_yticks(range(T), labels, fontsize=font)
        ax.set_xlabel("key (attended to)", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(args.attention, dpi=100)
    except OSError as e:
        raise UserError(f"cannot write {args.attention}: {e.strerror}") from None
    finally:
        plt.close(fig)
    print(f"wrote {args.attention}: attention of {len(layers)} layer(s) x {len(heads)} "
          f"head(s) over {T} tokens")
    if T < seen:
        print(f"note: drew the last {T} of the prompt's {seen} tokens (their weights on the "
              f"first {seen - T} are left out); a shorter --start shows others", file=sys.stderr)
    if len(panels) < len(layers) * len(heads):
        (i, j) = panels[-1]
        print(f"note: drew {len(panels)} of {len(layers) * len(heads)} panels (layer "
              f"{layers[0]} head {heads[0]} to layer {layers[i]} head {heads[j]}); pick others "
              f"with --attention_layers and --attention_heads, e.g. "
              f"--attention_layers={layers[-1]}", file=sys.stderr)
    return maps


if __name__ == "__main__":
    main()
