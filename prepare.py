"""
Turn raw text into training data: data/<dataset>/{train.bin, val.bin, meta.json}.

    python prepare.py                                  # Tiny Shakespeare, characters
    python prepare.py --dataset shakespeare            # Tiny Shakespeare, GPT-2 BPE tokens
    python prepare.py --input my.txt --dataset mine    # any UTF-8 text file
    python prepare.py --input corpus/ --dataset web --tokenizer gpt2   # a folder: .txt, .jsonl
    python prepare.py --input shards/ --text_field content --dataset web --tokenizer gpt2
    python prepare.py --hf_dataset openwebtext --dataset owt --tokenizer gpt2
    python prepare.py --input my.txt --dataset mine --tokenizer bpe --vocab_size 4096
                                                       # a byte-level BPE learned from my.txt
    python prepare.py --hf_dataset HuggingFaceFW/fineweb-edu:sample-10BT --streaming \\
        --dataset edu --tokenizer gpt2                 # read as it downloads
    python prepare.py --dataset reverse --digits 8     # a task with known answers
    python prepare.py --dataset other_plays --vocab_from data/shakespeare_char --drop_unknown
                                                       # 29 more plays, in Tiny Shakespeare's ids
    python prepare.py --input convs.jsonl --dataset mine_chat   # conversations (see below)
    python prepare.py --dataset instruct               # generated instructions, checkable
    python prepare.py --dataset shakespeare_chat       # questions on the play, for fine-tuning

train.bin and val.bin hold uint16 token ids; meta.json says how to turn ids back into text (the
tokenizer kind and, for characters, the vocabulary; for a BPE learned here, the merges file
beside it, merges.txt, and its SHA-256), plus token counts and where the text came from. It is
JSON, so anyone can read it. The tokenizers themselves are in tokenizer.py. It also counts the
UTF-8 bytes of each split's text, so that train.py can report bits per byte, which compare
across tokenizers: a newline between character documents is text and counts its byte;
<|endoftext|> is a token, not text, and counts none. For conversations, the bytes are those
of the answers, the text that carries loss.

Each file, JSON record or dataset row is one document. Documents are joined by <|endoftext|> for
BPE (so the model learns where a text ends) and by a newline for characters. A single text
(one file, or Tiny Shakespeare) gives its first 90% of characters to train and the last 10% to
val; a collection holds out its last 10% of documents, whole (--val_fraction). Tiny Shakespeare
in characters (1 MB) is prepared whole, the lecture's way: the first section below. Everything
else is read and written piece by piece, so memory stays flat whatever its size, and BPE runs
on every core (--num_proc). For the same one text, both ways write the same bytes. A BPE of
your own (--tokenizer bpe) first learns its merges from the start of the train split (at most
--bpe_train_bytes of it, held in memory).
Parquet files and --hf_dataset are read with `datasets` (pip install datasets).

Conversations, for instruction tuning: each record of .jsonl / .json / .parquet files (or a
folder of them) is one, {"prompt": ..., "response": ...} or {"messages": [{"role": "system" |
"user" | "assistant", "content": ...}, ...]}. They are told from text by their first record: if
it has "messages", "prompt" or "response", the input is conversations (what a user with such a
file means; --format chat or text says so outright). chat.py renders each (its markers are 4 ids
past the tokenizer's), and each split gets three files: s.bin (ids), s_mask.bin (uint8: 1 on
the assistant's tokens and its <|end|>, the only ones that carry loss) and s_index.bin (int64:
where each conversation starts); meta.json's "chat" holds the template and the counts. Val holds
the last conversations, whole. One longer than --block_size + 1 tokens loses its oldest
exchanges, or is left out when its last one alone does not fit. The reverse and addition tasks,
and --dataset instruct and shakespeare_chat, are conversations written the same way.

This file holds the lecture's way and the command line; the machinery is beside it: corpus.py
reads the sources, pipeline.py writes a text dataset piece by piece (vocabulary.py: character
ids at scale, and --vocab_from), conversations.py writes conversations, and tasks.py makes
the generated ones.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

import chat
from bpe import SPLIT_PATTERNS
from conversations import looks_like_chat, prepare_chat
from corpus import (
    DATA_DIR,
    file_source,
    find_files,
    hub_source,
    other_plays_source,
    sha256_of,
    shakespeare_source,
)
from errors import UserError, readable_output
from files import write_synced
from pipeline import (
    BINS,
    CHUNK_CHARS,
    BpeSettings,
    available_cores,
    check_out_dir,
    commit,
    merges_wanted,
    prepare,
    steady_malloc,
    temp_bins,
)
from tasks import prepare_instruct, prepare_shakespeare_chat, prepare_task
from tokenizer import EOT, MERGES_FILE, char_tokenizer
from vocabulary import vocabulary_of

TASKS = ("reverse", "addition")
GENERATED = {"reverse": (100_000, 1_000), "addition": (100_000, 1_000),  # (train, val)
             "instruct": (100_000, 500), "shakespeare_chat": (5_000, 500)}
PLAIN_BYTES = 16 << 20  # Tiny Shakespeare under this is prepared whole (~12x its size in memory)
BPE_VOCAB_SIZE = 4096  # --tokenizer bpe: token ids in all, unless --vocab_size says
BPE_TRAIN_BYTES = 100_000_000  # the merges are learned from at most this much text
BPE_FLAGS = ("vocab_size", "split_pattern", "bpe_train_bytes")  # only with --tokenizer bpe


# -----------------------------------------------------------------------------
# Characters, as in the lecture
#
# The lecture's character tokenizer (tokenizer.char_tokenizer) on one text held in memory
# whole: what `python prepare.py` does with Tiny Shakespeare (1 MB). pipeline.py does the same
# in pieces, so that memory stays flat for texts of any size, and splits collections of
# documents; for one text it writes these very bytes
# (test_plain_and_streaming_write_the_same_files).


def prepare_plain(text: str, out_dir: Path, describe: str, documents: int = 1,
                  val_fraction: float = 0.1) -> dict:
    """One text (at most 65,536 distinct characters) -> out_dir/{train.bin, val.bin, meta.json},
    byte for byte what prepare() writes for it. documents: how many were joined by newlines
    into text. Returns the meta."""
    chars, encode, _ = char_tokenizer(text)  # decoding is sample.py's, from meta's chars
    data = np.array(encode(text), dtype=np.uint16)  # 2 bytes a token: ids up to 65,535
    n = int((1 - val_fraction) * len(data))  # first 90% will be train, rest val
    train_data, val_data = data[:n], data[n:]
    if min(len(train_data), len(val_data)) < 2:  # as prepare() refuses it
        raise UserError(f"the text is too short for a train/val split ({len(text):,} "
                           "characters)")
    raw = text.encode("utf-8")
    train_bytes = len(text[:n].encode("utf-8"))  # UTF-8 bytes per split: for bits per byte
    meta = {"tokenizer": "char", "source": describe, "sha256": sha256_of(raw),
            "vocab_size": len(chars), "chars": chars,  # ids back to text: decode, in JSON
            "train_tokens": len(train_data), "val_tokens": len(val_data),
            "train_bytes": train_bytes, "val_bytes": len(raw) - train_bytes,
            "split": "text", "documents": documents, "val_from_char": n}
    check_out_dir(out_dir)
    try:  # plumbing, as in prepare(): temporary files renamed into place, meta.json last
        with temp_bins(out_dir) as (train_tmp, val_tmp):
            write_synced(train_tmp, train_data.tobytes())
            write_synced(val_tmp, val_data.tobytes())
            commit(out_dir, BINS, [train_tmp, val_tmp], meta)
    except OSError as e:  # a full disk, say: the old dataset stays
        raise UserError(f"cannot write in {out_dir}: {e.strerror or e}") from None
    return meta


# -----------------------------------------------------------------------------
# The command line: which module each input goes to


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--dataset", default="shakespeare_char",
                   help="folder under data/ to write (shakespeare_char, shakespeare, reverse, "
                   "addition, other_plays: 29 more plays to pretrain on, instruct: generated "
                   "instructions, shakespeare_chat: questions on the play, or any name)")
    p.add_argument("--tokenizer", choices=["char", "gpt2", "bpe"], default=None,
                   help="char, gpt2 (GPT-2's BPE) or bpe (a byte-level BPE learned from this "
                   "text; default: gpt2 for 'shakespeare', else char)")
    p.add_argument("--data_dir", default=str(DATA_DIR), help="where dataset folders live")
    g = p.add_argument_group("your own text (default: Tiny Shakespeare)")
    g.add_argument("--input", nargs="+", default=None,
                   help="files or folders: .txt is one document, .jsonl / .json one per record, "
                   ".parquet one per row; a folder gives all of these below it, sorted")
    g.add_argument("--text_field", default=None,
                   help="which field of a record or column of a dataset holds the text "
                   "(default: text)")
    g.add_argument("--hf_dataset", default=None,
                   help="a Hugging Face dataset, NAME or NAME:CONFIG, e.g. openwebtext or "
                   "HuggingFaceFW/fineweb-edu:sample-10BT (needs: pip install datasets)")
    g.add_argument("--split", default=None, help="which split of --hf_dataset (default: train)")
    g.add_argument("--streaming", action="store_true",
                   help="read --hf_dataset as it downloads, without a copy on disk")
    g.add_argument("--format", choices=["auto", "text", "chat"], default="auto",
                   help="chat: each record is a conversation, {\"prompt\": ..., \"response\": "
                   "...} or {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}; text: "
                   "a document. auto (default): chat when the first record of the first .jsonl, "
                   ".json or .parquet file has \"messages\", \"prompt\" or \"response\"")
    g.add_argument("--val_fraction", type=float, default=None,
                   help="how much to hold out for val: the end of a single text, or the last "
                   "documents of a collection, whole (default: 0.1)")
    g.add_argument("--num_proc", type=int, default=None,
                   help="processes for GPT-2 BPE and for datasets (default: the cores this process "
                   "may use)")
    g = p.add_argument_group("a BPE of your own (--tokenizer bpe)")
    g.add_argument("--vocab_size", type=int, default=None,
                   help="how many token ids in all: the 256 bytes, the merges to learn, "
                   f"<|endoftext|> (and a chat dataset's 4 markers); at most 65,536 (default: "
                   f"{BPE_VOCAB_SIZE:,})")
    g.add_argument("--split_pattern", choices=list(SPLIT_PATTERNS), default=None,
                   help="how text is cut into chunks that merges never cross: gpt2 (GPT-2's "
                   "regex) or gpt4 (GPT-4's: digits in threes, newlines kept with punctuation; "
                   "default: gpt2)")
    g.add_argument("--bpe_train_bytes", type=int, default=None,
                   help="learn the merges from at most this many bytes of the train split, "
                   f"held in memory (default: {BPE_TRAIN_BYTES:,}, 100 MB)")
    g = p.add_argument_group("another model's vocabulary (to fine-tune it on this text)")
    g.add_argument("--vocab_from", default=None,
                   help="a prepared dataset folder, a checkpoint (.pt) or a run folder: write "
                   "this text with its token ids (for characters, its vocabulary)")
    g.add_argument("--drop_unknown", action="store_true",
                   help="with --vocab_from: drop the characters its vocabulary lacks (without "
                   "it, they are refused and named)")
    g = p.add_argument_group("conversations (chat input, tasks, instruct, shakespeare_chat)")
    g.add_argument("--block_size", type=int, default=None,
                   help="the context to train with: a longer conversation loses its oldest "
                   "exchanges, or is left out if its last one alone is too long (default: 256 "
                   "for characters, 1024 for GPT-2 BPE)")
    g = p.add_argument_group("generated data (--dataset reverse, addition, instruct or "
                             "shakespeare_chat)")
    g.add_argument("--digits", type=int, default=None, help="digits per number (8 / 3)")
    g.add_argument("--num_train", type=int, default=None,
                   help="training conversations (default: " + ", ".join(
                       f"{name} {n:,}" for name, (n, _) in GENERATED.items()) + ")")
    g.add_argument("--num_val", type=int, default=None, help="held-out conversations (default: "
                   + ", ".join(f"{name} {n:,}" for name, (_, n) in GENERATED.items()) + ")")
    g.add_argument("--seed", type=int, default=1337, help="seed for the problems")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Refuse, in one line, flags that would otherwise be silently ignored or misread."""
    text_flags = ("input", "hf_dataset", "text_field", "split", "streaming", "val_fraction",
                  "tokenizer", "num_proc", "vocab_from", "drop_unknown", *BPE_FLAGS)
    if args.dataset in GENERATED:
        for name in text_flags + (() if args.dataset in TASKS else ("digits",)):
            if getattr(args, name) not in (None, False):
                raise UserError(f"--{name} does not apply to --dataset {args.dataset}: its "
                                   "problems are generated (see --num_train, --num_val"
                                   f"{', --digits' if args.dataset in TASKS else ''})")
        if args.format != "auto":
            raise UserError(f"--format does not apply to --dataset {args.dataset}: it is "
                               "generated as conversations")
        return
    for name in ("digits", "num_train", "num_val"):
        if getattr(args, name) is not None:
            raise UserError(f"--{name} only applies to --dataset reverse or addition"
                               + ("" if name == "digits" else ", instruct or shakespeare_chat"))
    if args.format == "chat" and not args.input:
        raise UserError("--format chat reads conversations from --input files "
                           "(.jsonl, .json, .parquet)")
    if args.input and args.hf_dataset:
        raise UserError("--input and --hf_dataset are two sources: give one")
    for name in ("split", "streaming"):
        if getattr(args, name) not in (None, False) and not args.hf_dataset:
            raise UserError(f"--{name} only applies to --hf_dataset")
    if args.text_field is not None and not (args.input or args.hf_dataset):
        raise UserError("--text_field only applies to --input or --hf_dataset")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UserError("--val_fraction must be between 0 and 1, e.g. 0.1")
    if args.num_proc is not None and args.num_proc < 1:
        raise UserError("--num_proc must be at least 1")
    if args.drop_unknown and not args.vocab_from:
        raise UserError("--drop_unknown only applies to --vocab_from")
    for name in BPE_FLAGS:
        if getattr(args, name) is None:
            continue
        if args.vocab_from:
            raise UserError(f"--{name} does not apply with --vocab_from: the text is written "
                               f"in {args.vocab_from}'s vocabulary")
        if args.tokenizer != "bpe":
            raise UserError(f"--{name} only applies to --tokenizer bpe (a BPE learned from "
                               "this text)")
    if args.bpe_train_bytes is not None and args.bpe_train_bytes < 1:
        raise UserError("--bpe_train_bytes must be at least 1")


def main(argv=None, chunk_chars: int = CHUNK_CHARS) -> dict:
    readable_output()  # a name that is not UTF-8 prints, never a traceback
    args = parse_args(argv)
    out_dir = Path(args.data_dir) / args.dataset
    steady_malloc()  # memory flat whatever the input's size (pipeline.steady_malloc)
    try:
        check_args(args)
        if args.dataset in GENERATED:
            return report_chat(prepare_generated(args, out_dir), out_dir)
        tokenizer, given_vocab = choose_tokenizer(args)
        text_field = args.text_field or "text"
        num_proc = args.num_proc or available_cores()
        val_fraction = args.val_fraction or 0.1
        plain = False
        if args.input and is_chat_input(args):
            block_size = args.block_size if args.block_size is not None else (
                1024 if tokenizer == "gpt2" else 256)
            meta = prepare_chat(find_files(args.input), tokenizer, given_vocab,
                                args.drop_unknown, val_fraction, block_size, out_dir,
                                "file " + ", ".join(args.input),
                                bpe_settings(args, given_vocab, [EOT, *chat.MARKERS]))
            return report_chat(meta, out_dir)
        if args.block_size is not None:
            raise UserError("--block_size only applies to conversations")
        if args.hf_dataset:
            source = hub_source(args.hf_dataset, args.split or "train", args.streaming,
                                text_field, num_proc)
        elif args.input:
            source = file_source(args.input, text_field, chunk_chars)
        elif args.dataset == "other_plays":
            source = other_plays_source()
        else:
            source = shakespeare_source()
            # small enough to hold whole: the lecture's way (prepare_plain), same bytes
            plain = (tokenizer == "char" and given_vocab is None
                     and source.total_bytes < PLAIN_BYTES)
        print(f"source: {source.describe}")
        if plain:  # one text item per play, joined by newlines as prepare() joins documents
            plays = [value for kind, value in source.items() if kind == "text"]
            meta = prepare_plain("\n".join(plays), out_dir, source.describe, len(plays),
                                 val_fraction)
        else:
            meta = prepare(source, tokenizer, out_dir, val_fraction, num_proc, chunk_chars,
                           given_vocab, args.drop_unknown, bpe_settings(args, given_vocab, [EOT]))
    except UserError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the temporary files are gone; the old dataset is in place
        print("prepare.py: interrupted", file=sys.stderr)
        sys.exit(130)
    held_out = (f"the last {meta['val_documents']:,} of {meta['documents']:,} documents, "
                f"from {meta['val_from']}" if meta["split"] == "documents"
                else "the end of the text")
    report_dropped(meta)
    merges = f" (merges in {MERGES_FILE})" if meta["tokenizer"] == "bpe" else ""
    print(f"wrote {out_dir}: {meta['tokenizer']} tokens{merges}, vocab_size "
          f"{meta['vocab_size']:,}, train {meta['train_tokens']:,}, val {meta['val_tokens']:,} "
          f"({held_out})")
    report_forced_cuts(meta)
    return meta


def bpe_settings(args, given_vocab: dict | None, specials: list[str]) -> BpeSettings | None:
    """What to learn for --tokenizer bpe (None: no BPE to learn, or --vocab_from's merges)."""
    if args.tokenizer != "bpe" or given_vocab is not None:
        return None
    vocab_size = BPE_VOCAB_SIZE if args.vocab_size is None else args.vocab_size
    return BpeSettings(merges_wanted(vocab_size, specials), args.split_pattern or "gpt2",
                       args.bpe_train_bytes or BPE_TRAIN_BYTES)


def is_chat_input(args) -> bool:
    """--format chat, or (auto) the first record looks like a conversation; --text_field
    says text."""
    if args.format == "auto" and args.text_field is None:
        return looks_like_chat(find_files(args.input))
    if args.format == "chat" and args.text_field is not None:
        raise UserError("--text_field does not apply to --format chat: a conversation's "
                           "fields are its own")
    return args.format == "chat"


def prepare_generated(args, out_dir: Path) -> dict:
    """--dataset reverse, addition, instruct, shakespeare_chat: conversations made here."""
    num_train, num_val = GENERATED[args.dataset]
    num_train = num_train if args.num_train is None else args.num_train
    num_val = num_val if args.num_val is None else args.num_val
    block_size = 256 if args.block_size is None else args.block_size
    if num_train < 1 or num_val < 1:
        raise UserError("--num_train and --num_val must be at least 1")
    if args.dataset in TASKS:
        default_digits = 8 if args.dataset == "reverse" else 3
        digits = default_digits if args.digits is None else args.digits  # 0 is refused
        return prepare_task(args.dataset, digits, num_train, num_val, args.seed, out_dir,
                            block_size)
    if args.dataset == "instruct":
        return prepare_instruct(num_train, num_val, args.seed, block_size, out_dir)
    return prepare_shakespeare_chat(num_train, num_val, args.seed, block_size,
                                    Path(args.data_dir), out_dir)


def report_dropped(meta: dict) -> None:
    if dropped := meta.get("dropped_characters"):
        print(f"dropped {sum(dropped.values()):,} characters that {meta['vocab_from']}'s "
              "vocabulary lacks: " + ", ".join(f"{ch!r} {n:,}" for ch, n in dropped.items()))
    for what in ("documents", "conversations"):
        if emptied := meta.get(f"emptied_{what}"):
            print(f"{emptied:,} {what} were left out: --drop_unknown left them "
                  f"{'no text' if what == 'documents' else 'no answer'}")


def report_forced_cuts(meta: dict) -> None:
    """Say it when BPE had to cut text where its tokens may change (pipeline.safe_pieces)."""
    if forced := meta.get("forced_cuts"):
        n = forced["count"]
        print(f"note: {n:,} {'stretch' if n == 1 else 'stretches'} of "
              f"{forced['after_chars']:,} characters had no space, newline or end of a word to "
              f"cut at; {'it was' if n == 1 else 'each was'} cut there, so its tokens near the "
              "cut may differ from encoding it whole")


def report_chat(meta: dict, out_dir: Path) -> dict:
    """What a chat dataset's preparation says: what did not fit, and what was written."""
    c = meta["chat"]
    report_dropped(meta)
    print(f"{c['shortened']:,} conversations longer than block_size + 1 = {c['block_size'] + 1} "
          f"tokens lost their oldest exchanges; {c['dropped']:,} whose last exchange alone is "
          "longer were left out")
    example = f", e.g. {meta['example']!r}" if "example" in meta else ""
    print(f"wrote {out_dir}: {c['train_conversations']:,} train and {c['val_conversations']:,} "
          f"val conversations, {meta['tokenizer']} tokens, vocab_size {meta['vocab_size']:,} "
          f"(4 markers), the longest {c['max_len']} tokens{example}")
    return meta


def choose_tokenizer(args) -> tuple[str, dict | None]:
    """The tokenizer (--tokenizer; else --vocab_from's; else GPT-2 BPE for 'shakespeare' and
    characters otherwise), and the meta of --vocab_from's vocabulary, if given."""
    if not args.vocab_from:
        return args.tokenizer or ("gpt2" if args.dataset == "shakespeare" else "char"), None
    given = {**vocabulary_of(Path(args.vocab_from)), "vocab_from": args.vocab_from}
    if args.tokenizer not in (None, given["tokenizer"]):
        raise UserError(f"--tokenizer {args.tokenizer}, but {args.vocab_from} uses "
                           f"{given['tokenizer']}: drop --tokenizer")
    if given["tokenizer"] != "char" and args.drop_unknown:
        raise UserError(f"--drop_unknown does not apply: {args.vocab_from} uses a BPE, which "
                           "has ids for every text")
    if given["tokenizer"] == "gpt2":
        print(f"{args.vocab_from} uses GPT-2 BPE: every text has the same ids there, so there "
              "is nothing to map")
    if given["tokenizer"] == "bpe":
        print(f"{args.vocab_from} uses a byte-level BPE: the text is written with its "
              f"{len(given['bpe']['merges']):,} merges, so there is nothing to map")
    return given["tokenizer"], given


if __name__ == "__main__":
    main()
