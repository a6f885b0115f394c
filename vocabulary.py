"""
Character vocabularies: ids at scale, and another model's vocabulary for new text (--vocab_from).

    from vocabulary import char_table, char_ids, codepoints
    table = char_table(codepoints("".join(meta["chars"])))   # code point -> id, -1: unknown
    ids = char_ids("ROMEO:", table)                          # uint16 ids, one numpy gather

A character's id is its place in the vocabulary, the text's sorted characters: the lecture's
stoi (tokenizer.char_codec) as a table over every code point, so that a text of any size is
looked up a piece at a time without a Python loop. A text or conversations with characters
that a given vocabulary lacks are refused, naming them, or (--drop_unknown) written without
them: refuse_unknown says which, for both.
"""

import json
from pathlib import Path

import numpy as np

from errors import UserError, first_line
from tokenizer import with_merges

# -----------------------------------------------------------------------------
# Code points and ids


def codepoints(text: str) -> np.ndarray:
    """The text's characters as Unicode code points, one uint32 each, with no Python loop."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


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


# -----------------------------------------------------------------------------
# Another model's vocabulary
#
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
    times it occurs and where first, as {char: [count, "document:line"]}, most frequent first."""
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
                    at = line + value.count("\n", 0, int(bad[i]))  # the line it is first on
                    found.setdefault(chr(c), [0, f"{doc}:{at}"])[0] += n
            line += value.count("\n") if kind == "text" else 0
    return dict(sorted(found.items(), key=lambda kv: -kv[1][0]))


def known_only(text: str, table: np.ndarray) -> str:
    """The text, less every character the vocabulary lacks (-1 in table)."""
    cps = codepoints(text)
    keep = table[cps] >= 0
    if not keep.all():
        text = cps[keep].tobytes().decode("utf-32-le", "surrogatepass")
    return text


def drop_characters(items, table: np.ndarray, counts: dict):
    """The items (documents joined by separators), less every character the vocabulary lacks
    (-1 in table). A document left with no text is left out, with its separator, and counted
    (counts["emptied"], for this read), as an empty record is never written."""
    counts["emptied"] = 0
    held, written = [], False  # a document's separator and name, until it shows some text
    for kind, value in items:
        if kind in ("sep", "doc"):
            if held and held[-1][0] == "doc":  # the document before this one had no text
                counts["emptied"] += 1
                held = [] if kind == "sep" else [i for i in held if i[0] == "sep"]
            if kind == "sep":
                value = known_only(value, table)
            held.append((kind, value))
            continue
        if kind == "text" and not (value := known_only(value, table)):
            continue
        if held:  # the first text of a document: it is written, with its separator
            yield from (i for i in held if written or i[0] != "sep")
            held, written = [], True
        yield kind, value
    counts["emptied"] += any(kind == "doc" for kind, _ in held)


def refuse_unknown(unknown: dict, what: str, given: dict, drop: bool,
                   hint: str | None = None) -> dict:
    """{char: count} of the characters to drop, from unknown ({char: [count, where first]}: the
    characters of the text or conversations (what) that given's vocabulary lacks). Without
    drop, any are refused, the first 10 named with where each is first, then hint (what to do:
    by default, --drop_unknown). Raises UserError."""
    if unknown and not drop:
        shown = ", ".join(f"{ch!r} x{n:,} (first at {where})"
                          for ch, (n, where) in list(unknown.items())[:10])
        more = f" and {len(unknown) - 10:,} more" if len(unknown) > 10 else ""
        raise UserError(f"{len(unknown):,} characters of the {what} are not in the vocabulary "
                        f"of {given['vocab_from']}: {shown}{more}. "
                        + (hint or "Drop them with --drop_unknown"))
    return {ch: n for ch, (n, _) in unknown.items()}


def fit_vocabulary(read, seen: np.ndarray, n_chars: int, given: dict, drop: bool):
    """The given character vocabulary (code points, in id order), the text reader (less the
    characters it lacks, with drop), the text's length then, what was dropped ({char: count}),
    and {"emptied": documents the reader leaves out, left with no text}. Without drop, a text
    with characters outside the vocabulary is refused, naming them."""
    vocab, counts = codepoints("".join(given["chars"])), {"emptied": 0}
    if np.isin(seen, vocab).all():
        return vocab, read, n_chars, {}, counts
    table = char_table(vocab)
    dropped = refuse_unknown(unknown_characters(read(), table), "text", given, drop)
    return (vocab, lambda: drop_characters(read(), table, counts),
            n_chars - sum(dropped.values()), dropped, counts)
