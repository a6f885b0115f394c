"""
The streaming pipeline: a text source of any size -> data/<dataset>/{train.bin, val.bin, meta.json}.

    from corpus import file_source
    from pipeline import prepare
    meta = prepare(file_source(["my.txt"], "text", 1 << 20), "gpt2", Path("data/mine"))

A source (corpus.py) is read piece by piece, so memory stays flat whatever its size: a first
pass for a character vocabulary or a single text's length; for a BPE of your own, its merges
learned from the start of the train split; then the pieces are encoded (characters here, BPE
on every core) into one temporary file, whose tail becomes val. The files are renamed into
place and meta.json comes last, so a crash, Ctrl-C or a full disk leaves the previous dataset
as it was: check_out_dir, temp_bins and commit write every dataset that way (prepare.py's
plain way and conversations.py's too). For one text this writes what prepare.py's
prepare_plain does, byte for byte.
"""

import hashlib
import json
import os
import shutil
import signal
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import regex  # not `re`: \p{L} and searching from the end, (?r)

from bpe import SPLIT_PATTERNS, train_bpe, write_merges
from corpus import Source
from errors import UserError
from files import new_temp, write_atomic
from tokenizer import (
    EOT,
    MERGES_FILE,
    bpe_meta,
    gpt2_encoding,
    trained_encoding,
    without_merges,
)
from vocabulary import char_ids, char_table, codepoints, fit_vocabulary

CHUNK_CHARS = 1 << 20  # characters per piece of work: memory holds a few pieces per process
# A stretch of chunk_chars / FORCE_CUT characters with no safe cut is cut anyway (or of
# FORCE_MIN, if more: the tests' tiny pieces still are cut only safely). Such a stretch is one
# pre-token, and tiktoken (0.14) needs more memory for one the longer it is: 8 MB for 128K
# ideographs, 24 MB for 256K, 260 MB for 2M
FORCE_CUT, FORCE_MIN = 8, 4096
QUIET_BYTES = 8 << 20  # inputs smaller than this finish before a progress line would help
BINS = ("train.bin", "val.bin")  # token ids, uint16
CHAT_BINS = ("train_mask.bin", "val_mask.bin",  # uint8 beside each token: 1 = it carries loss
             "train_index.bin", "val_index.bin")  # int64: where each conversation starts
# The end of a run of letters, or of numbers: a character that ends one, before one that does
# not (searched from the end: (?r)). The cut is the match's end.
WORD_END = regex.compile(r"(?r)\p{L}(?=\P{L})|\p{N}(?=\P{N})")
# Characters a forced cut does not put first in a piece: marks, the zero-width joiner and the
# variation selectors belong with the character before them
CLINGS = regex.compile(r"[\p{M}\u200d\ufe00-\ufe0f\U000e0100-\U000e01ef]")


# -----------------------------------------------------------------------------
# Tokenizing at scale (the tokenizers themselves are in tokenizer.py)


def last_space_cut(text: str, space: str, lone: bool = False) -> int:
    """The last i > 0 where text[i] is space and text[i + 1] is not whitespace (lone: nor
    text[i - 1]), or 0. Python's isspace covers the patterns' \\s, and more."""
    end = len(text) - 1
    while (i := text.rfind(space, 1, end)) > 0:
        if not (text[i + 1].isspace() or lone and text[i - 1].isspace()):
            return i
        end = i
    return 0


def last_line_start(text: str) -> int:
    """The last i where text[i - 1] is a newline and text[i] is not whitespace, or 0."""
    end = len(text) - 1
    while (i := text.rfind("\n", 0, end)) >= 0:
        if not text[i + 1].isspace():
            return i + 1
        end = i
    return 0


def stable_category(c: str) -> str:
    """c's Unicode category if Unicode 3.2 (which Python always carries) gave it the same one,
    else "": the regex engines here and in tiktoken know such a character, and agree on it."""
    category = unicodedata.category(c)
    return category if unicodedata.ucd_3_2_0.category(c) == category != "Cn" else ""


def last_word_end(text: str) -> int:
    """The last i where a run of letters, or of numbers, ends: text[i - 1] is a letter (a
    number) and text[i] is not, both by Unicode 3.2 and Python's tables alike; or 0."""
    end = len(text)
    while m := WORD_END.search(text, 0, end):
        i = m.end()
        before, after = stable_category(text[i - 1]), stable_category(text[i])
        if before and after and before[0] in "LN" and after[0] != before[0]:
            return i
        end = i  # the next match ends earlier: its lookahead then stays inside text[:i]
    return 0


def last_safe_cut(text: str, split: str = "gpt2") -> int:
    """Where BPE with the named split pattern (gpt2 or gpt4) may cut this text in two without
    changing any token (the last such place of the first kind found), or 0 if there is none.

    Both patterns (bpe.py) split text into pre-tokens: words, numbers, punctuation and whitespace
    runs, each merged on its own. A cut is safe where the whole text has a pre-token boundary,
    no pre-token before it looks past it (only the whitespace alternatives do: `$`, `(?!\\S)`),
    and the text after it is split as if it began there (neither pattern looks behind).
    Tried in this order, the first found wins (test_safe_cuts_keep_every_chunk checks them all):

    GPT-2's (tiktoken's r50k): right before a newline, else a space, followed by a non-space. A
    whitespace run before a non-space leaves its last character to what follows (` word`) or
    alone (a newline): a pre-token starts there. (Not after "\\n\\n": at the end of a text it is
    one token, 628; before a word it is two, 198 198.)

    GPT-4's (cl100k's): right after a newline followed by a non-space. Whatever comes before,
    the whitespace run or punctuation (whose `[\\r\\n]*+` takes the newlines) holding it ends
    there: `\\s*[\\r\\n]` takes the run whole before a non-space, and `\\s++$` does at the end
    of the piece before the cut. Else a space between two non-spaces (a space after one goes
    with a word, ` on`; two would change `\\s+(?!\\S)`). Not before a newline that follows
    punctuation, which keeps it (".\\n\\n" is one pre-token).

    Both, when no such whitespace is found: right after a run of letters, or of numbers, which
    no pre-token crosses (letters and numbers are never taken by punctuation or whitespace, and
    GPT-4's punctuation prefix ("。日本") comes before its letters). CJK text has no spaces, so
    this is where it is cut. \\p{L} and \\p{N} are Unicode's, whose tables grow: only characters
    that Unicode 3.2 already put in the category they have now count (stable_category), so
    every regex engine's tables, here and in tiktoken, agree on them.
    """
    if split == "gpt2":
        found = last_space_cut(text, "\n") or last_space_cut(text, " ")
    else:
        found = last_line_start(text) or last_space_cut(text, " ", lone=True)
    return found or last_word_end(text)


def forced_cut(text: str, limit: int, near: int = 64) -> int:
    """Where to cut text (over limit characters) that has no safe cut: at limit, or a little
    before it (at most near characters), between characters of two categories, else anywhere
    that keeps marks and joined emoji with what they belong to (CLINGS). Python's str holds
    whole code points, so no cut splits a character's bytes (nor a surrogate pair)."""
    apart = [i for i in range(limit, max(limit - near, 1) - 1, -1)
             if not CLINGS.match(text[i]) and text[i - 1] != "\u200d"]
    differ = (i for i in apart if unicodedata.category(text[i - 1])
              != unicodedata.category(text[i]))
    return next(differ, apart[0] if apart else limit)


def force_limit(chunk_chars: int) -> int:
    """How long a stretch with no safe cut safe_pieces lets grow before it cuts it anyway."""
    return max(chunk_chars // FORCE_CUT, FORCE_MIN)


@dataclass
class Cuts:
    """What safe_pieces did not cut safely: how many stretches of limit characters with no safe
    place to cut it cut anyway (their tokens near the cut may differ from the whole text's)."""
    limit: int
    forced: int = 0


def cut_pieces(buf: str, until: int, limit: int, split: str, cuts: Cuts | None):
    """("text", piece) items of buf from its start, each cut at the last safe place in its
    first limit characters, until fewer than until characters are left, or none of them has a
    safe cut and they fit in limit. Returns where the rest begins. Past limit with no safe
    cut, a piece is cut there anyway (forced_cut) and counted in cuts."""
    start = 0  # where the uncut text begins (slicing buf at each cut would copy its rest)
    while len(buf) - start >= until:
        cut = last_safe_cut(buf[start:start + limit], split)
        if not cut:
            if len(buf) - start <= limit:
                break  # wait for more text: a safe cut may come
            cut = forced_cut(buf[start:start + limit + 1], limit)
            if cuts:
                cuts.forced += 1
        yield "text", buf[start:start + cut]
        start += cut
    return start


def safe_pieces(items, chunk_chars: int, split: str = "gpt2", cuts: Cuts | None = None):
    """Re-cut the text into pieces, each cut at a safe place (see last_safe_cut), so encoding
    piece by piece gives the tokens of the whole text. Text is gathered until chunk_chars
    characters, then cut at the last safe place in its first force_limit(chunk_chars)
    (cuts.limit, if given), again and again; what follows the last cut waits for more. Any
    other item, and the end, ends a piece: text on either side of a separator or a cut is
    encoded apart.

    So no piece is longer than that limit: a stretch that long with no safe cut (one pre-token:
    a line of ideographs with no punctuation, a giant word) is cut there anyway (forced_cut)
    and counted in cuts.forced. Memory stays flat whatever the text."""
    limit = cuts.limit if cuts else force_limit(chunk_chars)
    buf = ""
    for kind, value in chain(items, [("end", None)]):  # the end, too, sends the rest
        if kind == "text":
            buf += value
            buf = buf[(yield from cut_pieces(buf, chunk_chars, limit, split, cuts)):]
            continue
        # the rest goes whole, once no more than limit characters of it are left
        start = yield from cut_pieces(buf, limit + 1, limit, split, cuts)
        if buf[start:]:
            yield "text", buf[start:]
        buf = ""
        if kind != "end":
            yield kind, value


def batched(items, chunk_chars: int):
    """Lists of items holding at most chunk_chars characters of text each (or one longer piece):
    one job for a worker. Not "until past chunk_chars": safe_pieces' pieces fall just short of
    it, so jobs were two pieces, and the peak went with whichever two came together."""
    batch, size = [], 0
    for item in items:
        n = len(item[1]) if item[0] == "text" else 0
        if size + n > chunk_chars and size:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


def steady_malloc() -> None:
    """Have glibc's malloc serve every block of 128 KiB or more by mmap, returned when freed.

    By default glibc raises that threshold to the size of each such block freed, so the next
    pieces' strings and token arrays (megabytes each) come from its heap, which fragments:
    the peak crept up job after job (32 MB of CJK lines, jobs of 1M characters: 96 MB after
    the first, 122 MB after the ninth; with this, 108 MB from the second on). A fixed threshold (M_MMAP_THRESHOLD, -3) stops that, in
    prepare.py and in each worker (start_worker). Elsewhere (macOS, musl, Windows) it does
    nothing."""
    import ctypes
    import platform

    if platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).mallopt(-3, 128 << 10)


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
    steady_malloc()
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
                 bpe: dict | None = None, cuts: Cuts | None = None):
    """(kind, value, ids) for every item: the token ids of text and separators, None for the
    other items. Characters are looked up here; BPE goes to num_proc processes: GPT-2's, or
    a trained one (bpe: its meta["bpe"], with the merges), in pieces cut by safe_pieces (its
    forced cuts counted in cuts)."""
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
            for batch in batched(safe_pieces(items, chunk_chars, split, cuts), chunk_chars))
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


def bpe_training_texts(items, budget: int, val_fraction: float, split: str = "gpt2",
                       chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """The texts the merges are learned from, as prepare() reads them: the train split, from
    its start, until budget bytes of UTF-8. A single text's val starts at its ("cut", "") item;
    a collection's val is its last documents, left out when the whole collection fits in the
    budget (a larger one is read from its start, so the budget runs out before its last tenth,
    unless those few documents hold most of its bytes).

    Each document comes in pieces cut as encoding cuts them (safe_pieces with split): the split
    pattern finds the same chunks in them as in the whole, and no chunk, nor the list of them
    that count_chunks makes of a piece, grows with a document's size (a 40 MB line of ideographs
    alone was one "word" of 40 million byte ids: a 320 MB list). Its forced cuts are the ones encoding makes and counts
    (the same text, cut the same way), so none is counted here."""
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
    texts = []
    for doc in docs:
        texts += [piece for _, piece in safe_pieces((("text", v) for v in doc), chunk_chars,
                                                     split)]
        doc.clear()  # its text lives on in the pieces: never twice
    return texts


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
    meta["forced_cuts"], only when BPE met stretches of force_limit(chunk_chars) characters
    with no safe cut (safe_pieces): {"count": how many, "after_chars": that length}.
    """
    check_out_dir(out_dir)
    sep = "\n" if tokenizer == "char" else EOT
    sep_is_text = sep != EOT  # bytes per split: <|endoftext|> is a token, not text (0 bytes)
    names = BINS + ((MERGES_FILE,) if tokenizer == "bpe" else ())
    with temp_bins(out_dir, names) as temps:  # made first: a read-only folder fails now
        train_tmp, val_tmp = temps[:2]
        vocab, n_chars, bpe, counts = None, 0, None, {"emptied": 0}
        read = lambda: join_documents(source.items(), sep)  # a fresh read at each call
        if tokenizer == "char" or source.one_text:
            what = "reading (1 of 2)" if tokenizer == "char" else "counting"
            vocab, n_chars = scan(read(), tokenizer == "char", Progress(what, source.total_bytes))
        meta = {"tokenizer": tokenizer, "source": source.describe, "sha256": ""}
        if given_vocab is not None:
            meta["vocab_from"] = given_vocab["vocab_from"]
            if tokenizer == "char":
                vocab, read, n_chars, dropped, counts = fit_vocabulary(
                    read, vocab, n_chars, given_vocab, drop_unknown)
                if dropped:
                    meta["dropped_characters"] = dropped
        cut_char = int((1 - val_fraction) * n_chars)  # a single text: train, then val
        marked = lambda: mark_cut(read(), cut_char) if source.one_text else read()
        if tokenizer == "bpe":
            bpe = write_bpe(temps[2], bpe_merges(given_vocab, learn, lambda: bpe_training_texts(
                marked(), learn.train_bytes, val_fraction, learn.split_pattern, chunk_chars)))
        meta.update(tokenizer_meta(tokenizer, vocab, bpe))
        items, cuts = marked(), Cuts(force_limit(chunk_chars))
        try:
            with open(train_tmp, "wb") as f:
                w = write_tokens(encode_items(items, tokenizer, vocab, num_proc, chunk_chars, bpe,
                                              cuts),
                                 f, val_fraction, Progress("encoding", source.total_bytes),
                                 sep_is_text)
            if cuts.forced:  # only then: a dataset cut safely everywhere has the meta it had
                meta["forced_cuts"] = {"count": cuts.forced, "after_chars": cuts.limit}
            cut, cut_byte, split = where_val_starts(w, source)
            move_tail(train_tmp, val_tmp, 2 * cut)  # 2 bytes per uint16 token
            meta.update(sha256=w.sha256, train_tokens=cut, val_tokens=w.tokens - cut,
                        train_bytes=cut_byte, val_bytes=w.bytes - cut_byte, **split)
            if counts["emptied"]:  # --drop_unknown left them no text: left out
                meta["emptied_documents"] = counts["emptied"]
            commit(out_dir, names, temps, meta)
        except OSError as e:  # a full disk, say: the temporary files go, the old dataset stays
            raise UserError(f"cannot write in {out_dir}: {e.strerror or e}") from None
    return meta
