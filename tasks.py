"""
Generated conversations with known answers: tasks, instructions, questions on the play, and checks.

    from tasks import make_problem, task_problem, verdict
    question, answer = make_problem("reverse", 123, 8)    # ('00000123', '32100000')
    task_problem("addition", 3, "12+456=")                 # ('012+456', '8640'), or None
    verdict("addition", "8640", "8640")                    # '(= 468, right)'

prepare.py's --dataset reverse, addition, instruct and shakespeare_chat are made here, seeded,
and handed to conversations.py's writer. A task's problem layout is defined once, by
make_problem: prepare.py writes the problems with it, and sample.py checks a model's answers
against it.
"""

import itertools
import re
from pathlib import Path

import numpy as np

from conversations import base_vocabulary, write_conversations
from corpus import prepare_command, shakespeare_source
from errors import UserError
from vocabulary import vocabulary_of

# -----------------------------------------------------------------------------
# Tasks with known answers: each problem's layout, defined once, for prepare.py to write the
# problems and sample.py to check a model's answers


def make_problem(task: str, n: int, digits: int) -> tuple[str, str]:
    """Problem number n as (question, answer): a user turn and the assistant's reply.

    reverse:  '01234567' -> '76543210'     (the digits of n, zero-padded, reversed)
    addition: '012+345'  -> '7530'          (a + b, its digits reversed: written from
              the ones digit up, as people add, each digit depends only on what came before)
    The markers between the turns say where the question ends: no separator of its own.
    """
    if task == "reverse":
        s = f"{n:0{digits}d}"
        return s, s[::-1]
    a, b = divmod(n, 10 ** digits)
    return f"{a:0{digits}d}+{b:0{digits}d}", f"{a + b:0{digits + 1}d}"[::-1]


def task_problem(task: str, digits: int, text: str) -> tuple[str, str] | None:
    """(the problem in text as prepare.py lays it out, its right answer), or None when the text
    is not a problem of the task: '12+456=' -> ('012+456', '8640')."""
    pattern = r"(\d+)\|?" if task == "reverse" else r"(\d+)\+(\d+)=?"  # "|", "=": as once laid out
    m = re.fullmatch(pattern, text.replace(" ", "").strip())
    if m is None or any(len(n) > digits for n in m.groups()):
        return None
    numbers = [int(n) for n in m.groups()]  # problem number n, as prepare.py lays it out
    n = numbers[0] if task == "reverse" else numbers[0] * 10 ** digits + numbers[1]
    return make_problem(task, n, digits)


def verdict(task: str, answer: str, right: str) -> str:
    """'(right)' or '(wrong)', with the sum an addition answer's reversed digits spell."""
    value = f"= {int(answer[::-1])}, " if task == "addition" and answer.isdigit() else ""
    return f"({value}{'right' if answer == right else 'wrong'})"


# -----------------------------------------------------------------------------
# Tasks with known answers: is the model learning at all?


def distinct_numbers(rng: np.random.Generator, space: int, n: int) -> np.ndarray:
    """n different integers from [0, space), in random order."""
    if n > space:
        raise UserError(f"asked for {n:,} problems but only {space:,} exist: "
                           "use more --digits or fewer --num_train")
    picked = np.unique(rng.integers(0, space, size=2 * n))
    while len(picked) < n:
        picked = np.unique(np.concatenate([picked, rng.integers(0, space, size=n)]))
    return rng.permutation(picked)[:n]


def exchange(question: str, answer: str) -> list[dict]:
    """One user turn and the assistant's answer."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def prepare_task(task: str, digits: int, num_train: int, num_val: int, seed: int,
                 out_dir: Path, block_size: int) -> dict:
    """Write seeded train/val problems (disjoint: no val problem is in train) as conversations,
    through the one writer: the loss is on the answer, as for any conversation."""
    if not 1 <= digits <= (18 if task == "reverse" else 9):  # problem numbers fit in int64
        raise UserError(f"--digits must be from 1 to {18 if task == 'reverse' else 9}")
    space = 10 ** digits if task == "reverse" else 10 ** (2 * digits)
    numbers = distinct_numbers(np.random.default_rng(seed), space, num_train + num_val)
    problems = [make_problem(task, int(n), digits) for n in numbers]
    convs = [exchange(q, a) for q, a in problems]
    chars = sorted(set("0123456789") | set(problems[0][0]))
    meta = {"source": f"generated {task} problems ({digits} digits, seed {seed})",
            "task": task, "digits": digits, "example": " -> ".join(problems[0])}
    return write_conversations({"train": convs[:num_train], "val": convs[num_train:]}, "char",
                               chars, block_size, True, meta, out_dir)


# -----------------------------------------------------------------------------
# Generated conversations: instructions with checkable answers, and questions on the play
#
# --dataset instruct: five kinds of instruction, each worded several ways, answers computed.
# The characters are few (lowercase letters, digits, some punctuation, and the capitals of the
# uppercase kind's answers) and conversations short (under 64 characters), so that a small
# character model learns them all on a CPU in minutes. 100,000 of them by default: the recipe's
# 2,600 steps of 64 see each less than twice, rather than the same 30,000 five times over, and
# the held-out loss halves (0.0033 against 0.0062 at 1,900 steps; RESULTS.md).

INSTRUCT = {  # kind: its wordings ({x}: the input, {c}: a letter to count)
    "reverse": ("Reverse {x}.", "Write {x} backwards.", "What is {x} reversed?"),
    "add": ("What is {x}?", "Add {x}.", "Compute {x}."),
    "sort": ("Sort {x}.", "Put {x} in order.", "Sort these: {x}"),
    "count": ("How many {c} in {x}?", "Count the letter {c} in {x}.", "How often is {c} in {x}?"),
    "upper": ("Uppercase {x}.", "Write {x} in capitals.", "Say {x} in upper case."),
}


# how often each kind is drawn for training (val has as many of each): a small model learns
# to count a letter and to carry in addition last, so it sees more of those; reversing and
# uppercasing it has learned by a third of the recipe's steps, so it sees fewer
INSTRUCT_WEIGHTS = {"reverse": 0.5, "add": 2, "sort": 1, "count": 3, "upper": 0.5}


def made_up_word(rng: np.random.Generator) -> str:
    """3 to 8 random lowercase letters. Made-up words, not a list of real ones: with a few
    dozen words the model memorises every count and capitalisation it is shown and fails the
    held-out ones; with these it must learn to count and to capitalise."""
    return "".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(rng.integers(3, 9))))


def balanced_count(rng: np.random.Generator) -> tuple[str, str]:
    """(word, letter) for a training count instruction whose answer is 0, 1, 2 or 3 equally
    often: 3 to 8 random letters, the letter put in at k random places, none of the others it.
    A letter drawn from a random word is there once nearly every time, and a model shown
    mostly 1s answers 1 whatever the word; shown as many 2s and 3s, it learns to count."""
    n = int(rng.integers(3, 9))
    letter = chr(97 + int(rng.integers(26)))
    k = int(rng.integers(0, min(3, n) + 1))
    others = [c for c in "abcdefghijklmnopqrstuvwxyz" if c != letter]
    word = [others[int(rng.integers(25))] for _ in range(n)]
    for p in rng.choice(n, size=k, replace=False):
        word[int(p)] = letter
    return "".join(word), letter


def training_addends(rng: np.random.Generator) -> tuple[int, int]:
    """Two numbers for a training addition, each of one digit 30% of the time, else 10 to 99.
    Held-out additions draw each number with 1 or 2 digits evenly, as a person might ask, and
    about a third of them add two one-digit numbers: some 30 of those 100 problems are held
    out, never trained on. Trained on the other 70 as often, a small model learns them by heart
    and is off by one on held-out ones (2 + 2 -> 3); with fewer of them it misses fewer (adding
    97% against 94%, the mean of three seeds; RESULTS.md)."""
    a, b = (int(rng.integers(10)) if rng.random() < 0.3 else int(rng.integers(10, 100))
            for _ in range(2))
    return a, b


def instruction(kind: str, rng: np.random.Generator, train: bool = False
                ) -> tuple[str, str, str]:
    """One instruction of a kind, of a random length: (its input, the question, the answer).
    The input is what makes it a different problem; the wording does not. train: for the
    training set, where counting draws its answers evenly (balanced_count) and addition has
    fewer one-digit numbers (training_addends); held-out ones are drawn as a person would ask
    them: a letter of the word to count, numbers of 1 or 2 digits evenly."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    letter = ""
    if kind == "count" and train:
        x, letter = balanced_count(rng)
        return f"{x}|{letter}", pick(INSTRUCT[kind]).format(x=x, c=letter), str(x.count(letter))
    if kind == "reverse":  # 2 to 6 digits
        digits = int(rng.integers(2, 7))
        x = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
        answer = x[::-1]
    elif kind == "add":  # numbers of 1 or 2 digits (3 digits: a small model needs far longer)
        a, b = (training_addends(rng) if train else
                (int(rng.integers(10 ** int(rng.integers(1, 3)))) for _ in range(2)))
        x, answer = f"{a} + {b}", str(a + b)
    elif kind == "sort":  # 3 to 5 digits or letters
        pool = "0123456789" if rng.random() < 0.5 else "abcdefghijklmnopqrstuvwxyz"
        items = [pick(pool) for _ in range(int(rng.integers(3, 6)))]
        x, answer = " ".join(items), " ".join(sorted(items))
    elif kind == "count":  # a letter of a word (or, now and then, one not in it)
        x = made_up_word(rng)
        letter = pick(x.replace(" ", "") if rng.random() < 0.9 else "abcdefghijklmnopqrstuvwxyz")
        answer = str(x.count(letter))
    else:  # upper: a word
        x = made_up_word(rng)
        answer = x.upper()
    question = pick(INSTRUCT[kind]).format(x=x, c=letter)
    return f"{x}|{letter}", question, answer


def instruct_conversations(num_train: int, num_val: int, seed: int):
    """(train, val, kinds) conversations: val num_val different problems, train num_train
    problems none of which is a val problem (the same (kind, input) never in both; train may
    ask one problem twice, in other words)."""
    rng, kinds = np.random.default_rng(seed), list(INSTRUCT)
    val, val_keys, train = [], set(), []
    for tries in itertools.count():
        if len(val) == num_val:
            break
        if tries > 100 * num_val:  # the kinds' problems are not endless: adding has 10,000
            raise UserError(f"--num_val {num_val:,}: only {len(val):,} different "
                               "instructions turned up; ask for fewer")
        kind = kinds[len(val) % len(kinds)]
        key, question, answer = instruction(kind, rng)
        if (kind, key) not in val_keys:
            val_keys.add((kind, key))
            val.append(exchange(question, answer))
    weights = np.array([INSTRUCT_WEIGHTS[k] for k in kinds], dtype=float)
    while len(train) < num_train:
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        key, question, answer = instruction(kind, rng, train=True)
        if (kind, key) not in val_keys:
            train.append(exchange(question, answer))
    return train, val, kinds


def prepare_instruct(num_train: int, num_val: int, seed: int, block_size: int,
                     out_dir: Path) -> dict:
    train, val, kinds = instruct_conversations(num_train, num_val, seed)
    chars = sorted({ch for ms in train + val for m in ms for ch in m["content"]})
    meta = {"source": f"generated instructions ({', '.join(kinds)}; seed {seed})",
            "kinds": kinds, "seed": seed, "example": " -> ".join(m["content"] for m in val[0])}
    return write_conversations({"train": train, "val": val}, "char", chars, block_size, True,
                               meta, out_dir)


# Checking an instruction's answer from its wording alone: the checker that rlhf.py uses as
# the labeller (preference pairs) and as the checked reward. It parses the question; it never
# looks up a reference reply, so it checks any question of the five kinds, typed or generated.

INPUTS = {"reverse": r"(?P<x>\d+)", "add": r"(?P<x>\d+ \+ \d+)",  # what {x} may be, by kind
          "sort": r"(?P<x>[a-z0-9](?: [a-z0-9])*)", "count": r"(?P<x>[a-z]+)",
          "upper": r"(?P<x>[a-z]+)"}


def instruct_answer(question: str) -> tuple[str, str, str] | None:
    """(kind, key, the right answer) of an instruction worded as INSTRUCT words them, or None:
    'How many a in banana?' -> ('count', 'banana|a', '3'). The key is instruction()'s: the
    input that makes it a different problem, whatever the wording."""
    for kind, wordings in INSTRUCT.items():
        for w in wordings:
            pattern = re.escape(w).replace(r"\{x\}", INPUTS[kind])
            if m := re.fullmatch(pattern.replace(r"\{c\}", "(?P<c>[a-z])"), question):
                x, c = m["x"], m.groupdict().get("c") or ""
                return kind, f"{x}|{c}", solve(kind, x, c)
    return None


def solve(kind: str, x: str, c: str) -> str:
    """The right answer to an instruction of a kind with input x (and letter c, to count)."""
    if kind == "reverse":
        return x[::-1]
    if kind == "add":
        return str(sum(int(n) for n in x.split("+")))
    if kind == "sort":
        return " ".join(sorted(x.split()))
    return str(x.count(c)) if kind == "count" else x.upper()


def checkable(meta: dict) -> bool:
    """Whether a dataset's answers can be checked: instruct, reverse or addition."""
    return meta.get("kinds") == list(INSTRUCT) or meta.get("task") in ("reverse", "addition")


def right_answer(meta: dict, messages: list[dict]) -> str | None:
    """The right reply to a conversation's last user turn, for a dataset whose answers can be
    checked (instruct, reverse, addition); None when it is not a problem this checker knows."""
    question = messages[-1]["content"]
    if meta.get("kinds") == list(INSTRUCT):
        return (found := instruct_answer(question)) and found[2]
    if meta.get("task") in ("reverse", "addition"):
        return (found := task_problem(meta["task"], meta["digits"], question)) and found[1]
    return None


def fresh_instructions(meta: dict, num_train: int, num_val: int, n: int, seed: int
                       ) -> list[list[dict]]:
    """n instruct prompts (one user turn each) none of which is a problem of the dataset's
    train or val split (regenerated from meta's seed), nor another's: fresh prompts for the
    third stage, drawn as held-out ones are, the kinds in turn."""
    seed_of_data = meta.get("seed") or int(re.search(r"seed (\d+)", meta["source"])[1])
    train, val, kinds = instruct_conversations(num_train, num_val, seed_of_data)
    taken = {instruct_answer(ms[0]["content"])[:2] for ms in train + val}
    rng, prompts = np.random.default_rng(seed), []
    for tries in itertools.count():
        if len(prompts) == n:
            return prompts
        if tries > 100 * n:
            raise UserError(f"only {len(prompts):,} fresh instructions turned up; ask for fewer")
        kind = kinds[len(prompts) % len(kinds)]
        key, question, _ = instruction(kind, rng)
        if (kind, key) not in taken:
            taken.add((kind, key))
            prompts.append([{"role": "user", "content": question}])


# --dataset shakespeare_chat: questions on Tiny Shakespeare, answered from it, to fine-tune a
# model pretrained on the play. Not checkable by exact match: a line can be said by several.

SPEECH_CHARS = 200  # "Speak as NAME." is answered with a speech of at most this many characters
PLAY_QUESTIONS = ("Who says: {line}", "What comes after: {line}", "Speak as {name}.")


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of each speech: a 'NAME:' line, its lines, then a blank line."""
    found = []
    for block in text.split("\n\n"):
        lines = [line for line in block.strip("\n").split("\n") if line.strip()]
        if len(lines) > 1 and lines[0].endswith(":") and len(lines[0]) < 40:
            found.append((lines[0][:-1], lines[1:]))
    return found


def play_conversations(text: str, n: int, rng: np.random.Generator) -> list[list[dict]]:
    """n questions on the speeches of text, in turn of the three kinds."""
    talks = speeches(text)
    by_speaker = {}
    for name, lines in talks:
        if len("\n".join(lines)) <= SPEECH_CHARS:
            by_speaker.setdefault(name, []).append("\n".join(lines))
    names = sorted(by_speaker)
    convs = []
    while len(convs) < n:
        kind = len(convs) % len(PLAY_QUESTIONS)
        if kind == 2:
            name = names[int(rng.integers(len(names)))]
            said = by_speaker[name]
            convs.append(exchange(PLAY_QUESTIONS[2].format(name=name),
                                  said[int(rng.integers(len(said)))]))
            continue
        name, lines = talks[int(rng.integers(len(talks)))]
        if len(lines) < 1 + kind:  # no line after the only one
            continue
        i = int(rng.integers(len(lines) - kind))
        if len(lines[i]) < 15:  # "My lord," says everyone
            continue
        answer = name if kind == 0 else lines[i + 1]
        convs.append(exchange(PLAY_QUESTIONS[kind].format(line=lines[i].strip()), answer))
    return convs


def prepare_shakespeare_chat(num_train: int, num_val: int, seed: int, block_size: int,
                             data_dir: Path, out_dir: Path) -> dict:
    """Questions from the train part of Tiny Shakespeare for train, from its val part for val,
    in data/shakespeare_char's character ids when that is prepared (to fine-tune its model)."""
    source = shakespeare_source()
    text = "\n".join(value for kind, value in source.items() if kind == "text")
    cut = int(0.9 * len(text))  # as shakespeare_char splits it
    rng = np.random.default_rng(seed)
    splits = {"train": play_conversations(text[:cut], num_train, rng),
              "val": play_conversations(text[cut:], num_val, rng)}
    meta = {"source": f"questions on {source.describe} (seed {seed})",
            "kinds": ["who says", "what comes after", "speak as"]}
    chars = sorted(set(text))
    if (data_dir / "shakespeare_char" / "meta.json").is_file():
        given = {**vocabulary_of(data_dir / "shakespeare_char"),
                 "vocab_from": str(data_dir / "shakespeare_char")}
        convs = [("generated", ms) for ms in splits["train"] + splits["val"]]
        hint = ("Prepare shakespeare_char from Tiny Shakespeare again, which has them all "
                f"(`{prepare_command('shakespeare_char', data_dir)}`), then this")  # not --drop_unknown
        chars, _, _ = base_vocabulary(convs, given, drop_unknown=False, hint=hint)
        meta["vocab_from"] = given["vocab_from"]
    return write_conversations(splits, "char", chars, block_size, False, meta, out_dir)

