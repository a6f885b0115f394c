"""
Conversations: the chat template, defined once for prepare.py, train.py and sample.py.

    from chat import chat_template, conversation, render, render_prompt, parse
    tmpl = chat_template(base_vocab=65)            # saved in meta.json and in checkpoints
    messages = conversation({"prompt": "Reverse 123", "response": "321"})
    ids, mask = render(messages, encode, tmpl)      # mask: 1 where the loss is
    ids = render_prompt(history, encode, tmpl)      # ends with <|assistant|>: the model answers

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}:
an optional system message, then user and assistant turns in alternation, from a user. Each
message is rendered as its role's marker, its content's tokens, and an end-of-turn marker:

    <|system|>Be brief.<|end|><|user|>Reverse 123<|end|><|assistant|>321<|end|>

Each marker is one special id past the tokenizer's own: for characters, past the last
character; for GPT-2's BPE, past its 50,257 tokens (50257 to 50260, not <|endoftext|>, which
stays the document separator it was pretrained as); for a BPE trained by prepare.py, past its
<|endoftext|>, which comes right after its merges. No text can contain a marker, so a user
cannot write one, and the model's answer ends where it writes <|end|>.

The loss mask is 1 exactly on the assistant's content and on the <|end|> closing each of its
turns: the model learns to answer and to stop, never to write the user's part.
(Instruction tuning as in Ouyang et al. 2022; the markers as in OpenAI's ChatML.)
"""

from collections.abc import Callable
from pathlib import Path

from corpus import one_text
from errors import UserError

ROLES = ("system", "user", "assistant")
MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # one id each, in this order


def chat_template(base_vocab: int) -> dict:
    """The template for a tokenizer of base_vocab ids: each marker's id, past them all.
    A plain dict, so meta.json and checkpoints carry it as it is."""
    return {"markers": {m: base_vocab + i for i, m in enumerate(MARKERS)},
            "vocab_size": base_vocab + len(MARKERS)}


def marker_id(tmpl: dict, role_or_end: str) -> int:
    """The id of a role's marker ("system", "user", "assistant") or of "end"."""
    return tmpl["markers"][f"<|{role_or_end}|>"]


def chat_file(path: Path, kind: str) -> Path:
    """A chat split's other files: train.bin -> train_mask.bin, train_index.bin."""
    return path.with_name(f"{path.stem}_{kind}.bin")


# -----------------------------------------------------------------------------
# Reading: a record of a JSONL file (or a row of Parquet) -> a checked conversation


def conversation(record) -> list[dict]:
    """A record in either form, as a checked list of messages:
        {"prompt": str, "response": str}           one user turn, one assistant turn
        {"messages": [{"role": ..., "content": ...}, ...]}
    Each content is read as a text file's text is (corpus.one_text). Raises UserError with a
    one-line reason: a missing field, content that is not a string or not text (half a
    surrogate pair), an unknown role, roles out of order, an empty response, no answer."""
    if not isinstance(record, dict):
        raise UserError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError('"messages" must be a non-empty list')
    elif "prompt" in record or "response" in record:
        for field in ("prompt", "response"):
            if field not in record:
                raise UserError(f'missing field "{field}"')
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
    else:
        raise UserError('missing field "messages" (or "prompt" and "response")')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"message {i} is not an object")
        for field in ("role", "content"):
            if field not in m:
                raise UserError(f'message {i}: missing field "{field}"')
        if m["role"] not in ROLES:
            raise UserError(f"message {i}: unknown role {m['role']!r} (roles: "
                             f"{', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise UserError(f"message {i} ({m['role']}): content is "
                             f"{type(m['content']).__name__}, not a string")
    check_order([m["role"] for m in messages])
    # read as a text file's text is: CRLF as "\n", half a surrogate pair refused
    messages = [{"role": m["role"], "content": one_text(m["content"], f"message {i}")}
                for i, m in enumerate(messages)]
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise UserError(f"message {i}: an empty response")
    return messages


def check_order(roles: list[str]) -> None:
    """An optional system message first, then user, assistant, user, ... ending with the
    assistant (a conversation to learn from has an answer last)."""
    turns = roles[1:] if roles and roles[0] == "system" else roles
    for i, role in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if role != expected:
            where = i + (len(roles) - len(turns))
            raise UserError(f"roles out of order: message {where} is {role!r}, expected "
                             f"{expected!r} (system first if any, then user and assistant "
                             "in turn)")
    if not turns or turns[-1] != "assistant":
        raise UserError("roles out of order: the last message must be the assistant's")


# -----------------------------------------------------------------------------
# Rendering: messages -> token ids and the loss mask, and back


def render(messages: list[dict], encode: Callable[[str], list[int]],
           tmpl: dict) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and its loss mask (the same length): 1 on each
    assistant turn's content and its closing <|end|>, 0 elsewhere (markers, system, user)."""
    ids, mask, end = [], [], marker_id(tmpl, "end")
    for m in messages:
        body = encode(m["content"]) + [end]
        learn = int(m["role"] == "assistant")
        ids += [marker_id(tmpl, m["role"])] + body
        mask += [0] + [learn] * len(body)
    return ids, mask


def render_prompt(messages: list[dict], encode: Callable[[str], list[int]],
                  tmpl: dict) -> list[int]:
    """The ids that ask for the next answer: the conversation so far (ending with a user
    turn), then <|assistant|>. What the model writes next, up to <|end|>, is its reply."""
    ids, _ = render(messages, encode, tmpl)
    return ids + [marker_id(tmpl, "assistant")]


def parse(ids: list[int], decode: Callable[[list[int]], str], tmpl: dict) -> list[dict]:
    """render()'s inverse: ids -> messages. A turn not closed by <|end|> (a reply cut short)
    keeps what it has. Raises ValueError on ids that no conversation renders to."""
    role_of = {marker_id(tmpl, r): r for r in ROLES}
    end, messages, i = marker_id(tmpl, "end"), [], 0
    while i < len(ids):
        if ids[i] not in role_of:
            raise ValueError(f"token {i} ({ids[i]}) should start a turn")
        j = i + 1
        while j < len(ids) and ids[j] != end and ids[j] not in role_of:
            j += 1
        messages.append({"role": role_of[ids[i]], "content": decode(ids[i + 1:j])})
        i = j + (j < len(ids) and ids[j] == end)
    return messages


def fit_history(messages: list[dict], encode: Callable[[str], list[int]], tmpl: dict,
                max_tokens: int, prompt: bool = False) -> tuple[list[dict], int]:
    """The conversation shortened to at most max_tokens ids, by dropping its oldest
    exchanges (a user turn and the answer to it), never the system message nor the last
    exchange. Returns (messages, how many messages were dropped); (None, 0) if even the
    system message and the last exchange are too long. prompt: messages end with a user
    turn, rendered with render_prompt (the chat's history before a reply)."""
    length = (lambda ms: len(render_prompt(ms, encode, tmpl))) if prompt else \
        (lambda ms: len(render(ms, encode, tmpl)[0]))
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    last = 1 if prompt else 2  # the turns that must stay: the question (and its answer)
    while length(system + turns) > max_tokens:
        if len(turns) <= last:
            return None, 0
        turns, dropped = turns[2:], dropped + 2
    return system + turns, dropped
