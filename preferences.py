"""
Preferences and replies: the data the third stage (rlhf.py) learns from.

    pairs = read_pairs(Path("pairs.jsonl"), encode, tmpl, block_size)  # [(prompt, chosen, rejected)]
    prompts = read_prompts(Path("prompts.jsonl"), encode, tmpl, block_size)  # [prompt ids]
    replies = sample_replies(model, prompts, 8, 32, 1.0, gen, end_id)  # 8 a prompt, in order
    ids, mask, last = pad_batch(prompt_list, reply_list, device)    # for the formulas

A preference is a prompt with a chosen reply and a rejected one, one JSON object a line:

    {"prompt": "Reverse 123.", "chosen": "321", "rejected": "312"}
    {"messages": [{"role": "user", "content": ...}, ...], "chosen": ..., "rejected": ...}

Each is checked as a conversation is (chat.conversation: the prompt a user turn, or messages
that end with one) and rendered through the one chat template: the prompt by
chat.render_prompt (ending with <|assistant|>), each reply as its tokens and <|end|>, exactly
the tokens the model would write. A bad line stops reading with one line naming the file and
line: a missing field, a reply that is not a string, chosen equal to rejected, a character the
model lacks, a prompt and reply that do not fit the model's block_size.
"""

import json
from pathlib import Path

import torch

from chat import conversation, marker_id, render_prompt
from corpus import file_records
from errors import UserError
from files import write_atomic
from tokenizer import encode_text

Ids = list[int]


# -----------------------------------------------------------------------------
# Reading: a JSONL file of preferences, or of prompts, checked and rendered


def prompt_of(record: dict) -> list[dict]:
    """A record's prompt as checked messages ending with a user turn: {"prompt": str} or
    {"messages": [...]} (checked as chat.conversation checks a conversation). UserError."""
    if not isinstance(record, dict):
        raise UserError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise UserError('"messages" must be a list')
        stand_in = {"role": "assistant", "content": "."}  # lets conversation() check the order
        return conversation({"messages": record["messages"] + [stand_in]})[:-1]
    if "prompt" not in record:
        raise UserError('missing field "prompt" (or "messages")')
    return conversation({"prompt": record["prompt"], "response": "."})[:-1]


def reply_ids(text, field: str, encode, tmpl: dict) -> Ids:
    """A reply's ids as the model writes one: its tokens, then <|end|>."""
    if not isinstance(text, str):
        raise UserError(f'"{field}" is {type(text).__name__}, not a string')
    messages = conversation({"prompt": ".", "response": text})  # read as a message is
    return encode_text(encode, messages[1]["content"], tmpl["vocab_size"], field) + \
        [marker_id(tmpl, "end")]


def fits(prompt: Ids, reply_len: int, block_size: int, what: str) -> None:
    # prompt and reply in one window: the reward model reads the reply's last token there
    if len(prompt) + reply_len > block_size:
        raise UserError(f"the prompt ({len(prompt)} tokens) and {what} ({reply_len}) do not "
                        f"fit the model's block_size {block_size}")


def read_pairs(path: Path, encode, tmpl: dict, block_size: int) -> list[tuple[Ids, Ids, Ids]]:
    """(prompt, chosen, rejected) ids for every line of a preference file. Raises UserError
    'file:line: reason' for the first bad line, or for a file with no pairs."""
    if not path.is_file():
        raise UserError(f"no preference pairs at {path}: make them with `python rlhf.py "
                        "--stage=pairs`, or give --pairs=FILE.jsonl")
    pairs = []
    for where, record in file_records(path):
        try:
            prompt = render_prompt(prompt_of(record), lambda s: encode_text(
                encode, s, tmpl["vocab_size"], "prompt"), tmpl)
            for field in ("chosen", "rejected"):
                if field not in record:
                    raise UserError(f'missing field "{field}"')
            chosen, rejected = (reply_ids(record[f], f, encode, tmpl)
                                for f in ("chosen", "rejected"))
            if chosen == rejected:
                raise UserError("chosen and rejected are the same reply: nothing to prefer")
            fits(prompt, max(len(chosen), len(rejected)), block_size, "the longer reply")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        pairs.append((prompt, chosen, rejected))
    if not pairs:
        raise UserError(f"{path} holds no preference pairs")
    return pairs


def read_prompts(path: Path, encode, tmpl: dict, block_size: int) -> list[Ids]:
    """Rendered prompts (each ending with <|assistant|>), one a line of a JSONL file of
    {"prompt": ...} or {"messages": [...]} records. UserError 'file:line: reason'."""
    if not path.is_file():
        raise UserError(f"no prompts at {path}")
    prompts = []
    for where, record in file_records(path):
        try:
            ids = render_prompt(prompt_of(record), lambda s: encode_text(
                encode, s, tmpl["vocab_size"], "prompt"), tmpl)
            fits(ids, 1, block_size, "a one-token reply")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        prompts.append(ids)
    return prompts


def write_jsonl(records: list[dict], path: Path) -> None:
    """All the records or nothing (files.write_atomic): one JSON object a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                               for r in records).encode())


# -----------------------------------------------------------------------------
# Batches: prompts and replies side by side, padded on the right


def pad_batch(prompts: list[Ids], replies: list[Ids], device) -> tuple[torch.Tensor, ...]:
    """prompt + reply for each row, padded on the right with 0 to the longest:
    ids (B, T) int64, mask (B, T) float (1 on the reply's tokens, the ones whose log-probs and
    reward count), last (B,) int64 (the index of each row's last real token, where a reward
    is read). Attention is causal, so padding after a row's end changes nothing before it."""
    rows = [p + r for p, r in zip(prompts, replies, strict=True)]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T)
    for i, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p):len(p) + len(r)] = 1.0
    last = torch.tensor([len(row) - 1 for row in rows])
    return ids.to(device), mask.to(device), last.to(device)


# -----------------------------------------------------------------------------
# Sampling replies: n a prompt, at a temperature, each cut at its <|end|>


@torch.no_grad()
def sample_replies(model, prompts: list[Ids], n: int, max_new_tokens: int, temperature: float,
                   generator: torch.Generator, end_id: int) -> list[tuple[Ids, bool]]:
    """n replies to each prompt, in order (prompt 0's n, then prompt 1's, ...): (ids, ended),
    the ids up to and with the first <|end|>; a reply with none in max_new_tokens (or in what
    is left of block_size) keeps every token it wrote and ended=False. Prompts of one length
    are sampled in one batch, which stops when every row has ended."""
    from inference import generate_stream  # generation's own module; imported where used
    device = next(model.parameters()).device
    out: list = [None] * (len(prompts) * n)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for P, which in by_length.items():
        idx = torch.tensor([prompts[i] for i in which for _ in range(n)], device=device)
        room = min(max_new_tokens, model.config.block_size - P)
        ended = torch.zeros(len(idx), dtype=torch.bool, device=device)
        steps = []
        for tok in generate_stream(model, idx, room, temperature=temperature,
                                   generator=generator):
            steps.append(tok)
            ended |= tok[:, 0] == end_id
            if ended.all():
                break
        new = torch.cat(steps, dim=1).tolist()  # (B, steps)
        for row, ids in enumerate(new):
            stop = ids.index(end_id) + 1 if end_id in ids else len(ids)
            out[which[row // n] * n + row % n] = (ids[:stop], end_id in ids)
    return out
