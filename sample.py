"""
Generate text from a trained checkpoint or from OpenAI's GPT-2, or score a text file.

    python sample.py                                        # from out/best.pt
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

The sampling itself is gpt.py's: generate_plain (the lecture's loop), then sample_next_token
with its filters: temperature, top_k_filter and top_p_filter (nucleus sampling); the same loop
with a KV cache, streamed, is inference.py's generate_stream. This file loads the
model (out/best.pt: the lowest val loss; --checkpoint=latest: ckpt.pt, where training
stopped), encodes the prompt, and prints. The tokenizer is rebuilt from the meta saved inside the
checkpoint, so samples always use the vocabulary the model was trained with; GPT-2's weights
come with GPT-2's BPE. A file (FILE:, --score) is read as prepare.py reads one. A flag that
would do nothing in the mode asked for is refused: see settings.TAKES_EFFECT. --chat renders
the messages with the chat template saved in the checkpoint (chat.py) and prints the replies
alone: chat_loop.py. --score and --attention are scoring.py's.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from chat_loop import Chat, answer_problem
from checkpoints import load_checkpoint, model_from_checkpoint, run_checkpoint
from corpus import one_text, read_text_file
from devices import autocast_ctx, check_fits, out_of_memory, pick_device, pick_dtype
from errors import UserError, first_line, readable_output
from gpt import GPT
from gpt2_weights import from_pretrained
from inference import beam_search, generate_stream
from scoring import draw_attention, score_file
from settings import (
    CHAT_MODES,
    check_sample_args,
    flags_given,
    mode_of,
    refuse_ignored_flags,
    str2bool,
)
from tokenizer import (
    StreamDecoder,
    encode_text,
    encoding_of,
    get_tokenizer,
    token_bytes_fn,
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


# -----------------------------------------------------------------------------
# The main path: load the model, encode the prompt, sample, print


def main(argv=None) -> list[str] | dict:
    """The samples' texts, or with --score a dict of loss, perplexity, tokens, bpb, bytes."""
    readable_output()  # a name that is not UTF-8 prints, never a traceback
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
    """main without its exit codes: load the model, encode the prompt, sample and print (or
    score, chat, answer a task's problem, draw the attention, search beams, as the mode asks).
    Raises UserError for what the user can fix."""
    if not hasattr(args, "given"):  # built by hand, not by parse_args: everything was given
        args.given = set(vars(args))
    check_sample_args(args)
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
        return score_file(model, ids, text, token_bytes, args.score, args.score_stride, ctx)
    if mode in CHAT_MODES or mode == "task":  # a model fine-tuned on conversations
        talk = Chat(model, meta, args, file_encoder(meta, encode), decode, token_bytes, ctx,
                    name=checkpoint_name(args))
        if mode == "task":  # prepare.py's reverse or addition problems: is the answer right?
            return answer_problem(talk, read_prompt(args.start or "")[1])
        if args.start is None and sys.stdin.isatty():
            return talk.loop()
        message = read_prompt(args.start)[1] if args.start is not None else read_stdin()
        return [talk.one(message)]
    from_file, text = read_prompt(args.start or default_prompt(meta))
    start_ids = encode_text(file_encoder(meta, encode) if from_file else encode, text,
                            vocab_size, "prompt")
    if not start_ids:
        raise UserError("the prompt is empty")
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]  # (1, T)
    if mode == "attention":
        with ctx:
            return draw_attention(model, x, token_bytes, args.attention, args.attention_layers,
                                  args.attention_heads)
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
    which_given: --checkpoint was given, so it is refused where there is no run folder.
    Loaded onto the CPU, then moved to the device: a model too big for either's free memory
    is refused (UserError) before it is loaded or moved."""
    folder = out_dir if init_from == "resume" else Path(init_from)
    path = run_checkpoint(folder, which)
    if which_given and not (folder.is_dir() and path is not None):
        raise UserError(f"--checkpoint has no effect with --init_from={init_from}: it picks "
                        "best.pt or ckpt.pt in a run folder of ours")
    if path is None and init_from == "resume":
        path = out_dir / "ckpt.pt"  # there is none: load_checkpoint says how to train one
    if path is not None:
        ckpt = load_checkpoint(path)  # onto the CPU: the device takes the model once it fits
        model, _ = model_from_checkpoint(ckpt, path)
        meta = ckpt["meta"]
    else:
        try:
            model = from_pretrained(init_from)
        except ValueError as e:
            raise UserError(first_line(e)) from None
        eot = 50256 if model.config.vocab_size > 50256 else None  # <|endoftext|>, if it has one
        meta = {"tokenizer": "gpt2", "eot_token": eot}
    if device.type != "cpu":  # on the CPU it is in memory already
        n = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        check_fits(n, device, f"the model ({model.num_params() / 1e6:,.1f}M parameters)",
                   "sample on the CPU (--device=cpu), or free the device's memory")
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
    """(whether it came from a file, the prompt's text): --start's text is read as a file's
    text is (corpus.one_text: CRLF as "\n", a byte that is not UTF-8 refused, naming it)."""
    if start.startswith("FILE:"):
        return True, read_file(Path(start[5:]))
    return False, one_text(start, "--start", from_bytes=True)  # argv: bytes, surrogateescaped


def read_stdin() -> str:
    """All of stdin, read as a file's text is (a byte that is not UTF-8 refused, naming it,
    rather than a traceback from a strict UTF-8 locale)."""
    if (raw := getattr(sys.stdin, "buffer", None)) is None:  # already text (a test's StringIO)
        return one_text(sys.stdin.read(), "stdin")
    return one_text(raw.read().decode("utf-8", "surrogateescape"), "stdin", from_bytes=True)


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
            for tok in generate_stream(model, x, args.max_new_tokens, args.temperature,
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
        beams, scores = beam_search(model, x, args.max_new_tokens, args.beam_width, eot)
    rate = (beams.size(1) - T) / (time.perf_counter() - t0)  # steps of the whole beam per second
    samples = []
    for ids, logp in zip(beams[:args.num_samples].tolist(), scores.tolist()):
        new = ids[T:]
        new = new[:new.index(eot)] if eot in new else new
        samples.append(decode(ids[:T] + new))
        print(samples[-1])
        print(f"---------------  ({len(new)} tokens, log-prob {logp:.2f}, {rate:.0f} tokens/s)")
    return samples


if __name__ == "__main__":
    main()
