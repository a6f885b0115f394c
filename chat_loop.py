"""
A conversation with a model at the terminal: each message rendered with chat.py's template,
each reply streamed a token at a time.

    talk = Chat(model, meta, args, encode, decode, token_bytes, ctx, name=...)
    talk.loop()                      # a message a line, until Ctrl-D
    talk.one("Reverse 123")          # one message, the reply alone on stdout
    answer_problem(talk, "123+456")  # a task model's answer, checked

sample.py --chat (and sample.py with a task model) builds the Chat: the flags, the model and
its tokenizer are sample.py's; the template is the one saved in the checkpoint.
"""

import sys

import torch

import chat
from corpus import one_text
from errors import UserError
from inference import generate_stream
from tasks import make_problem, task_problem, verdict
from tokenizer import StreamDecoder, encode_text

# -----------------------------------------------------------------------------
# Chat: replies to messages, from a model fine-tuned on conversations (chat.py's template)


def saved_template(meta: dict, name: str) -> dict:
    """The chat template the checkpoint was trained with; one with none is refused, as a
    UserError that names the checkpoint: name (its path, or GPT-2's weights by name)."""
    if "chat" in meta:
        return meta["chat"]
    if meta.get("task"):
        raise UserError(f"{name} is a task model from before tasks were "
                        "conversations: prepare the task and train it again (see the README)")
    raise UserError(f"{name} was not trained on conversations: --chat needs a "
                    "model fine-tuned on prepare.py's conversations (see the README)")


def reply_tokens(model, prompt: list[int], max_new: int, stops: set, sampling: dict):
    """Yield the reply's token ids as they are generated, up to a stop id (not yielded) or
    max_new tokens. sampling: generate_stream's temperature, top_k, top_p, generator."""
    x = torch.tensor([prompt], dtype=torch.long, device=next(model.parameters()).device)
    for tok in generate_stream(model, x, max_new, **sampling):
        if (t := tok.item()) in stops:
            return
        yield t


class Chat:
    """A conversation with the model. Each message is rendered after the history with the
    template saved in the checkpoint (chat.render_prompt); the reply is generated a token at a
    time, streamed through a StreamDecoder, until the model writes <|end|> (not printed) or
    --max_new_tokens, and joins the history. Any other marker, or GPT-2's <|endoftext|>, ends
    the reply too: the model would be starting a turn that is not its own.

    The prompt is kept within block_size by dropping the oldest exchanges first
    (chat.fit_history), leaving the reply room for min(--max_new_tokens, block_size // 4)
    tokens; a message too long for that may fill all block_size tokens (the window then slides
    as the model replies), and one longer is refused. Messages are encoded as prepare.py
    encodes a document: a literal "<|endoftext|>" is plain text, and no text is a marker.

    args: sample.py's flags (max_new_tokens, temperature, top_k, top_p, seed, stream); ctx:
    the autocast context; name: the checkpoint, as saved_template's refusal names it."""

    def __init__(self, model, meta, args, encode, decode, token_bytes, ctx, *, name: str):
        self.model, self.meta, self.args, self.ctx = model, meta, args, ctx
        self.tmpl = saved_template(meta, name)
        self.encode, self.decode, self.token_bytes = encode, decode, token_bytes
        self.stops = set(self.tmpl["markers"].values()) | {meta.get("eot_token")}
        self.block_size = model.config.block_size
        self.limits = (self.block_size - min(args.max_new_tokens, self.block_size // 4),
                       self.block_size)  # what the prompt may take: leaving room, or not
        device = next(model.parameters()).device
        self.sampling = {"temperature": args.temperature, "top_k": args.top_k,
                         "top_p": args.top_p,
                         "generator": torch.Generator(device=device).manual_seed(args.seed)}
        self.show = (lambda s: print(s, end="", flush=True)) if args.stream else (lambda s: None)
        self.history = []  # the messages so far, {"role": ..., "content": ...}

    def one(self, text: str) -> str:
        """One message, text (--start's or all of stdin), and the reply alone on stdout."""
        if not (message := text.rstrip("\n")):
            raise UserError("the message is empty")
        return self.answer(message)

    def loop(self) -> list[str]:
        """Talk: a message a line, each reply streamed. /reset forgets the conversation; Ctrl-D
        (or Ctrl-C at the prompt) quits; Ctrl-C during a reply stops it there, and what it said
        stays in the history. A message that cannot be read is said so, and the chat goes on."""
        print("chat: type a message and Enter; /reset forgets the conversation, Ctrl-C stops "
              "a reply, Ctrl-D quits", file=sys.stderr)
        if hasattr(sys.stdin, "reconfigure"):  # a byte that is not UTF-8: named, not fatal
            sys.stdin.reconfigure(errors="surrogateescape")
        replies = []
        while True:
            try:
                message = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)  # end the prompt's line
                return replies
            try:  # read as a file's text is: a lone "\r" (a CRLF line's) is a line end
                message = one_text(message, "that line", from_bytes=True).rstrip("\n")
            except UserError as e:
                print(f"sample.py: {e}; type it again", file=sys.stderr)
                continue
            if message.strip() == "/reset":
                self.history = []
                print("(the conversation is forgotten)", file=sys.stderr)
            elif message.strip():
                try:
                    replies.append(self.answer(message, interruptible=True))
                except UserError as e:
                    print(f"sample.py: {e}", file=sys.stderr)

    def answer(self, message: str, interruptible: bool = False) -> str:
        """Reply to message, shown as it comes; message and reply join the history. A task
        model is asked a problem in the layout it learned (zero-padded: '12+345' is asked as
        '012+345'), and its answer is checked, on stderr: stdout holds the reply alone."""
        task = self.meta.get("task")
        if problem := task and task_problem(task, self.meta["digits"], message):
            message = problem[0]
        ids = self.prompt(message)
        stream, new = StreamDecoder(self.token_bytes), []
        try:
            with self.ctx:
                for t in reply_tokens(self.model, ids, self.args.max_new_tokens, self.stops,
                                      self.sampling):
                    new.append(t)
                    self.show(stream.push([t]))
        except KeyboardInterrupt:
            if not interruptible:
                raise
        reply = self.decode(new)
        print(stream.flush() if self.args.stream else reply)
        self.history += [{"role": "user", "content": message},
                         {"role": "assistant", "content": reply}]
        if problem:
            print(f"{message} -> {reply}   {verdict(task, reply, problem[1])}",
                  file=sys.stderr)
        return reply

    def prompt(self, message: str) -> list[int]:
        """The ids that ask for the reply to message: the history that fits, then message."""
        encode_text(self.encode, message, self.model.config.vocab_size, "message")
        messages = self.history + [{"role": "user", "content": message}]
        for limit in self.limits:
            kept, dropped = chat.fit_history(messages, self.encode, self.tmpl, limit, prompt=True)
            if kept is not None:
                break
        else:
            n = len(chat.render_prompt(messages[-1:], self.encode, self.tmpl))
            raise UserError(f"the message takes {n} tokens with the chat's markers, but the "
                            f"model reads at most {self.block_size}: shorten it")
        if dropped:
            print(f"note: forgot the oldest {dropped // 2} exchange(s) to keep the conversation "
                  f"within the model's {self.block_size} tokens", file=sys.stderr)
        self.history = kept[:-1]
        return chat.render_prompt(kept, self.encode, self.tmpl)


# -----------------------------------------------------------------------------
# Tasks: answer a reversal or addition problem


def answer_problem(talk: Chat, text: str) -> list[str]:
    """Greedily answer one problem, asked as the user's message: e.g. '123+456' -> '9750',
    which is 579 written from the ones digit up. Shorter numbers are zero-padded to the trained
    layout; the answer ends at <|end|>, or one token past the right answer's length. So few
    greedy tokens need no KV cache: they come from the lecture's loop, gpt.generate_plain."""
    task, d = talk.meta["task"], talk.meta["digits"]
    if (problem := task_problem(task, d, text)) is None:
        example = make_problem(task, 123, d)[0]
        raise UserError(f"this model answers {task} problems of up to {d} digits, like "
                        f"--start '{example}'; got {text!r}")
    prompt, right = problem
    ids = chat.render_prompt([{"role": "user", "content": prompt}], talk.encode, talk.tmpl)
    x = torch.tensor([ids], dtype=torch.long, device=next(talk.model.parameters()).device)
    with talk.ctx:
        new = talk.model.generate_plain(x, len(right) + 1, temperature=0)[0, len(ids):].tolist()
    end = next((i for i, t in enumerate(new) if t in talk.stops), len(new))  # a stop id ends it
    answer = talk.decode(new[:end])
    print(f"{prompt} -> {answer}   {verdict(task, answer, right)}")
    return [f"{prompt} -> {answer}"]
