"""
Conversations written to disk for instruction tuning: a chat dataset's ids, loss masks, index.

    from conversations import write_conversations
    meta = write_conversations({"train": [messages, ...], "val": [...]}, "char", chars,
                               block_size=256, checkable=True, meta={"source": ...},
                               out_dir=Path("data/mine_chat"))

The conversations come from .jsonl, .json or .parquet files (prepare.py --input, read by
corpus.py) or are generated (tasks.py); chat.py's template renders each.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

import chat
from corpus import DOCUMENT_SUFFIXES, file_records
from errors import UserError
from files import write_synced
from pipeline import (
    BpeSettings,
    bpe_merges,
    bpe_training_texts,
    check_out_dir,
    commit,
    temp_bins,
    tokenizer_meta,
    val_documents,
    write_bpe,
)
from tokenizer import MERGES_FILE, char_codec, gpt2_encoding, trained_encoding
from vocabulary import char_table, codepoints, known_only, refuse_unknown

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
                    drop_unknown: bool, hint: str | None = None
                    ) -> tuple[list[str], dict, list[tuple[str, list[dict]]]]:
    """The character vocabulary of conversations: their characters, or --vocab_from's. A
    character outside the given one is refused, naming where it is first (and hint, what to
    do), or (drop_unknown) dropped from the contents. Returns the vocabulary, {char: count} of
    what was dropped, and the conversations to keep: one that dropping leaves without an
    answer is left out (and counted by the caller), as one too long for the block is."""
    chars = sorted({ch for _, ms in convs for m in ms for ch in m["content"]})
    if given is None:
        return chars, {}, convs
    known = set(given["chars"])
    unknown = {}  # char -> [count, where first]
    for where, messages in convs:
        for m in messages:
            for ch in sorted(set(m["content"]) - known):  # sorted: the same order every run
                unknown.setdefault(ch, [0, where])[0] += m["content"].count(ch)
    dropped = refuse_unknown(unknown, "conversations", given, drop_unknown, hint)
    table = char_table(codepoints("".join(given["chars"])))
    kept = []
    for where, messages in convs:
        if any(set(m["content"]) - known for m in messages):
            cleaned = [{**m, "content": known_only(m["content"], table)} for m in messages]
            try:
                messages = chat.conversation({"messages": cleaned})
            except UserError:  # e.g. a reply that was all unknown characters: nothing to learn
                continue
        kept.append((where, messages))
    return list(given["chars"]), dropped, kept


def base_encoder(tokenizer: str, chars: list[str] | None,
                 bpe: dict | None = None) -> tuple[Callable, int]:
    """encode (text -> ids, never a marker nor a special token) and the base vocabulary size
    (the markers' first id): for a BPE, its tokens and <|endoftext|>."""
    if tokenizer == "gpt2":
        return gpt2_encoding().encode_ordinary, 50257  # text never spells <|endoftext|>
    if tokenizer == "bpe":
        enc = trained_encoding(bpe)
        return enc.encode_ordinary, enc.n_vocab
    return char_codec(chars)[0], len(chars)


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
        chars, dropped, kept = base_vocabulary(convs, given, drop_unknown)
        if dropped:
            meta["dropped_characters"] = dropped
            meta["emptied_conversations"] = len(convs) - len(kept)
        if len(kept) < 2:
            raise UserError(f"after --drop_unknown, {len(kept)} of {len(convs)} conversations "
                            "keep an answer (the others' answers are characters that "
                            f"{given['vocab_from']} lacks), and val holds whole conversations: "
                            "two or more must")
        convs = kept
    if given is not None:
        meta["vocab_from"] = given["vocab_from"]
    n_val = val_documents(len(convs), val_fraction)
    messages = [ms for _, ms in convs]
    meta["val_from"] = convs[-n_val][0]
    bpe = None
    if tokenizer == "bpe":  # learned from the train conversations, a message a document
        items = [item for ms in messages[:-n_val] for m in ms
                 for item in (("doc", ""), ("text", m["content"]))] + [("cut", "")]  # then val
        bpe = bpe_merges(given, learn, lambda: bpe_training_texts(
            items, learn.train_bytes, val_fraction, learn.split_pattern))
    return write_conversations({"train": messages[:-n_val], "val": messages[-n_val:]},
                               tokenizer, chars, block_size, False, meta, out_dir, bpe)

