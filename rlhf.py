"""
The third stage: from preferences to a better model, with a reward model and PPO, or with DPO.

    python rlhf.py --stage=pairs  --init_from=out-sft                  # label preference pairs
    python rlhf.py --stage=reward --init_from=out-sft --out_dir=out-reward
    python rlhf.py --stage=ppo    --init_from=out-sft --reward_from=out-reward --out_dir=out-ppo
    python rlhf.py --stage=ppo    --init_from=out-sft --reward=checked --out_dir=out-checked
    python rlhf.py --stage=dpo    --init_from=out-sft --out_dir=out-dpo
    python sample.py --out_dir=out-ppo --chat                         # talk to the result
    python rlhf.py --init_from=resume --out_dir=out-ppo               # continue after a stop

ChatGPT was made in three stages (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback"): pretraining (train.py on text), supervised fine-tuning on
demonstrations (train.py on conversations), then RLHF (Christiano et al. 2017, "Deep
reinforcement learning from human preferences"): people compare two replies to a prompt, a
reward model learns to score replies as they would, and the policy (the SFT model) is trained
to write replies the reward model scores high, with PPO (Schulman et al. 2017), held near the
SFT model by a KL penalty so that it does not drift into replies that fool the reward model.
DPO (Rafailov et al. 2023) reaches for the same optimum without a reward model or sampling.

Demonstrations are expensive (someone writes the answer); comparisons and checks are cheap.
--stage=pairs stands in for the people who compare: it samples --num_samples replies to each
fresh prompt from the SFT model and lets the task's checker (tasks.right_answer, which parses
the question and never sees a reference reply) prefer a right one over a wrong one.

Read it top to bottom: the formulas, each once (Bradley-Terry, log-probs, the KL estimate,
DPO, advantages, PPO's clipped surrogate), the reward model, each stage's step, the loop every
stage shares (train.py's AdamW, get_lr and clip_grad_norm), then the command line. The data
(preference files, padded batches, sampled replies) is in preferences.py.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bookkeeping import last_replies, replies_right
from chat import marker_id, parse, render_prompt
from checkpoints import load_checkpoint, model_from_checkpoint, run_checkpoint, save_checkpoint
from errors import UserError, readable_output
from gpt import GPT, GPTConfig
from preferences import pad_batch, read_pairs, read_prompts, sample_replies, write_jsonl
from run_setup import make_room
from stop_signals import StopNow, StopSignals
from tasks import INSTRUCT, fresh_instructions, instruct_answer, right_answer
from tokenizer import get_tokenizer
from train import clip_grad_norm, configure_optimizer, get_lr

# -----------------------------------------------------------------------------
# The formulas. Shapes: B replies (or pairs), T tokens; log-probs are natural logs.


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """The reward model's loss: -log sigmoid(r_chosen - r_rejected), the mean over B pairs.
    Bradley and Terry (1952) model P(chosen preferred to rejected) = sigmoid(r_c - r_r);
    this is its negative log-likelihood (Christiano et al. 2017, Ouyang et al. 2022 eq. 1).
    r_chosen, r_rejected (B,) -> ()."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def token_logprobs(model: GPT, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(token t | the tokens before it) for each token t of ids (B, T), 0 where mask
    (B, T) is 0: (B, T). Token 0 has nothing before it; a reply never starts there (its prompt
    does). The model must be in eval mode: dropout would make two identical models disagree."""
    logits = model.lm_head(model.hidden(ids[:, :-1]))  # (B, T-1, V): the prediction of t+1
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return F.pad(picked, (1, 0)) * mask  # (B, T): position t holds log pi(ids[t])


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi: k3 = r - 1 - log r,
    r = pi_ref(token) / pi(token) (Schulman 2020, "Approximating KL divergence"). E_pi[r] = 1,
    so its mean is E_pi[-log r] = the KL; unlike -log r alone it is never negative
    (log x <= x - 1), so no sampled token reads as "closer than identical". Same shape in, out."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r  # (exp(log r) - 1) - log r, exact near r = 1


def dpo_loss(pi_chosen, ref_chosen, pi_rejected, ref_rejected, beta: float) -> torch.Tensor:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), the mean over B pairs:
        -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])
    each argument (B,) the summed log-probs of the chosen (y_w) or rejected (y_l) reply. The
    policy's own log-ratio to the reference is its implicit reward, beta * log(pi / pi_ref):
    Bradley-Terry on it, with no reward model. Identical models: exactly log 2."""
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def group_advantages(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Advantages from a group baseline (GRPO, Shao et al. 2024): each of a prompt's n replies
    (rewards (B,), in groups of n) minus its group's mean reward, so a reply is pushed up
    only for beating its siblings. No value head to train: the other replies to the same
    prompt are the baseline. The scale is divided out over the whole batch, not per group:
    one group whose replies differ by a hair would otherwise weigh as much as one with a
    right and a wrong reply. (B,) -> (B,)."""
    groups = rewards.view(-1, n)
    adv = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    return adv / (adv.std() + 1e-6) if adv.numel() > 1 else adv


def ppo_loss(logp, old_logp, advantages, mask, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised: the
    masked mean over every reply token of the batch of
        min(rho * A, clip(rho, 1 - clip, 1 + clip) * A),   rho = pi(token) / pi_old(token)
    logp, old_logp, mask (B, T); advantages (B,), one a reply, the same for each of its
    tokens. Where the ratio has left [1 - clip, 1 + clip] in the direction A rewards, the
    clipped term is the minimum and has no gradient: one batch of samples cannot push the
    policy far. Returns (loss, the share of reply tokens clipped)."""
    ratio = torch.exp(logp - old_logp)  # (B, T); 1 on padding (both 0) and masked out below
    A = advantages[:, None]
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - clip, 1 + clip) * A)
    n = mask.sum()
    clipped = ((ratio - 1).abs() > clip).float()
    return -(surrogate * mask).sum() / n, (clipped * mask).sum() / n


# -----------------------------------------------------------------------------
# The reward model: the GPT trunk and a scalar head


class RewardModel(nn.Module):
    """r(prompt, reply): the SFT model's trunk (GPT.hidden) and a linear head to one number,
    read at the reply's last token (its <|end|>), the one position that has seen the whole
    prompt and reply. Started from the SFT checkpoint, so it already reads the task; the head
    starts at zero (every reply scores 0 until trained)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gpt = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, last (B,) each row's last real token -> scores (B,)."""
        h = self.gpt.hidden(ids)  # (B, T, C); padding after `last` cannot reach it (causal)
        return self.head(h[torch.arange(ids.size(0), device=ids.device), last]).squeeze(-1)


def reward_model_from(path: Path, device) -> RewardModel:
    ckpt = load_checkpoint(run_checkpoint(path) or path)
    if "reward_head" not in ckpt:
        raise UserError(f"{path} is not a reward model: train one with `python rlhf.py "
                        "--stage=reward`")
    rm = RewardModel(GPTConfig(**ckpt["model_args"]))
    rm.gpt.load_state_dict(ckpt["model"])
    rm.head.load_state_dict(ckpt["reward_head"])
    return rm.to(device).eval()


# -----------------------------------------------------------------------------
# What every stage starts from: the SFT checkpoint, its tokenizer, the prompts


@dataclass
class Context:
    """The SFT model a stage starts from, and what is read with it."""
    args: argparse.Namespace
    sft: dict  # its checkpoint
    meta: dict  # its dataset's meta (tokenizer, chat template)
    tmpl: dict
    encode: object
    decode: object
    device: torch.device
    block_size: int

    def model(self) -> GPT:
        """A fresh copy of the SFT model, in eval mode (dropout off: see token_logprobs)."""
        model, _ = model_from_checkpoint(self.sft, Path(self.args.init_from))
        return model.to(self.device).eval()


def prompts_for(c: Context, n: int, seed: int) -> list[tuple[list[dict], list[int]]]:
    """(messages, rendered ids) of the stage's prompts: --prompts's file, or n fresh
    instructions (none of them a train or val problem of the dataset) for instruct data."""
    if c.args.prompts:
        ids = read_prompts(Path(c.args.prompts), c.encode, c.tmpl, c.block_size)
        return [(messages_of(c, p), p) for p in ids][:n]
    if c.meta.get("kinds") != list(INSTRUCT):
        raise UserError("this dataset makes no fresh prompts of its own: give --prompts="
                        'FILE.jsonl ({"prompt": ...} a line)')
    folder = Path(c.args.data_dir) / c.args.dataset
    counts = [np.fromfile(folder / f"{s}_index.bin", dtype="<i8").size - 1
              for s in ("train", "val")]
    out = []
    for messages in fresh_instructions(c.meta, *counts, n, seed):
        try:
            ids = render_prompt(messages, c.encode, c.tmpl)
        except KeyError:  # a character the dataset's vocabulary lacks: not one to ask
            continue
        if len(ids) < c.block_size:  # room for a reply
            out.append((messages, ids))
    return out


def messages_of(c: Context, prompt: list[int]) -> list[dict]:
    """A rendered prompt's messages, the empty assistant turn it ends with left off."""
    return parse(prompt, c.decode, c.tmpl)[:-1]


def reply_text(c: Context, reply: list[int]) -> str:
    return c.decode([t for t in reply if t != marker_id(c.tmpl, "end")])


# -----------------------------------------------------------------------------
# Stage 1, the labeller: sampled replies, and the checker's preference between them


def label_pairs(c: Context) -> dict:
    """Sample --num_samples replies to each of --num_prompts fresh prompts from the SFT model
    at --temperature, and where the checker finds a right and a wrong one, write the pair
    (one a prompt, drawn at random among them) to --pairs. Replies with no <|end|> in reach,
    or with another marker inside, are neither chosen nor rejected, and counted."""
    a, model = c.args, c.model()
    prompts = prompts_for(c, a.num_prompts, a.seed)
    answers = [right_answer(c.meta, ms) for ms, _ in prompts]
    if any(r is None for r in answers):
        raise UserError("--stage=pairs needs a checkable dataset (instruct, reverse, addition)"
                        " to label with: for others, write the pairs as JSON Lines")
    gen, rng = torch.Generator(c.device).manual_seed(a.seed), np.random.default_rng(a.seed)
    first_marker = min(c.tmpl["markers"].values())
    replies = sample_replies(model, [p for _, p in prompts], a.num_samples, a.max_new_tokens,
                             a.temperature, gen, marker_id(c.tmpl, "end"))
    records = []
    counts = {"all right": 0, "all wrong": 0, "unterminated replies": 0, "with a marker": 0}
    for k, ((messages, _), answer) in enumerate(zip(prompts, answers, strict=True)):
        mine = replies[k * a.num_samples:(k + 1) * a.num_samples]
        counts["unterminated replies"] += sum(not ended for _, ended in mine)
        text_only = [(r, ended) for r, ended in mine if max(r[:-1], default=0) < first_marker]
        counts["with a marker"] += len(mine) - len(text_only)  # <|user|> in it: not a text
        texts = [reply_text(c, r) for r, ended in text_only if ended]
        right, wrong = [t for t in texts if t == answer], [t for t in texts if t != answer]
        if right and wrong:
            prompt = ({"prompt": messages[0]["content"]} if len(messages) == 1
                      else {"messages": messages})
            records.append({**prompt, "chosen": right[rng.integers(len(right))],
                            "rejected": wrong[rng.integers(len(wrong))]})
        else:
            counts["all right" if right else "all wrong"] += 1
    if len(records) < 10:
        raise UserError(f"only {len(records)} of {len(prompts):,} prompts got both a right and "
                        "a wrong reply: sample more (--num_samples) or hotter (--temperature)")
    write_jsonl(records, pairs_path(a))
    print(f"wrote {pairs_path(a)}: {len(records):,} pairs from {len(prompts):,} prompts "
          f"({', '.join(f'{v:,} {k}' for k, v in counts.items())})")
    return {"pairs": len(records), **counts}


def pairs_path(args) -> Path:
    return Path(args.pairs) if args.pairs else Path(args.data_dir) / args.dataset / "pairs.jsonl"


def split_pairs(c: Context) -> tuple[list, list]:
    """The preference pairs, train and held out (the last --val_pairs of them)."""
    pairs = read_pairs(pairs_path(c.args), c.encode, c.tmpl, c.block_size)
    n_val = max(1, int(len(pairs) * c.args.val_pairs))
    if len(pairs) - n_val < 1:
        raise UserError(f"{pairs_path(c.args)} has {len(pairs)} pairs: too few to hold some out")
    return pairs[:-n_val], pairs[-n_val:]


def pair_batch(pairs, device):
    """Chosen rows then rejected rows, one padded batch (2B, T): ids, mask, last."""
    prompts = [p for p, _, _ in pairs] * 2
    return pad_batch(prompts, [ch for _, ch, _ in pairs] + [rj for _, _, rj in pairs], device)


# -----------------------------------------------------------------------------
# Stage 2, the reward model: Bradley-Terry on the pairs


@torch.no_grad()
def pair_accuracy(score_pairs, pairs, batch_size: int) -> float:
    """The share of pairs whose chosen reply scores above the rejected one (a tie: half, as
    a coin would break it)."""
    right = 0.0
    for i in range(0, len(pairs), batch_size):
        r_c, r_r = score_pairs(pairs[i:i + batch_size])
        right += float((r_c > r_r).sum() + 0.5 * (r_c == r_r).sum())
    return right / len(pairs)


def reward_stage(c: Context) -> "Stage":
    rm = RewardModel(GPTConfig(**c.sft["model_args"]))
    rm.gpt.load_state_dict(c.sft["model"])
    rm = rm.to(c.device).eval()
    train_pairs, val_pairs = split_pairs(c)
    batches = Batches(len(train_pairs), c.args.batch_size, c.args.seed)

    def score_pairs(pairs):
        ids, _, last = pair_batch(pairs, c.device)
        return rm(ids, last).chunk(2)  # (B,), (B,)

    def step(s: Stage) -> dict:
        r_c, r_r = score_pairs([train_pairs[i] for i in batches.next()])
        loss = bradley_terry_loss(r_c, r_r)
        norm = s.update(loss)
        return {"loss": loss.item(), "acc": (r_c > r_r).float().mean().item(), "norm": norm}

    def evaluate(s: Stage) -> dict:
        return {"val_acc": pair_accuracy(score_pairs, val_pairs, 256),
                "train_acc": pair_accuracy(score_pairs, train_pairs[:len(val_pairs)], 256)}

    def weights() -> dict:
        return {"model": rm.gpt.state_dict(), "reward_head": rm.head.state_dict()}

    return Stage(c, rm, step, evaluate, weights, batches)


# -----------------------------------------------------------------------------
# Stage 3, PPO: sample, score, subtract the KL, advantages, clipped updates


@dataclass
class Rollout:
    """One iteration's samples: every tensor (B, ...) for B = prompts_per_step x num_samples."""
    ids: torch.Tensor  # (B, T) prompt + reply, right-padded
    mask: torch.Tensor  # (B, T) 1 on reply tokens
    score: torch.Tensor  # (B,) the reward model's score, or the checker's 1 (right) / 0
    kl: torch.Tensor  # (B,) sum over the reply's tokens of k3: the reply's KL from the reference
    reward: torch.Tensor  # (B,) score - beta * kl: what the advantages are taken from
    unterminated: int  # replies with no <|end|>, given the lowest reward of the batch


def score_replies(c: Context, reward_fn, prompts, replies) -> tuple[torch.Tensor, int]:
    """Each reply's score; one with no <|end|> gets the batch's lowest, stated (a reply cut
    off is not an answer, however good its start)."""
    ids, _, last = pad_batch([p for _, p in prompts], [r for r, _ in replies], c.device)
    with torch.no_grad():  # a reward is a number to the policy, not a graph to train
        score = reward_fn(prompts, replies, ids, last)
    ended = torch.tensor([e for _, e in replies], device=c.device)
    return torch.where(ended, score, score.min()), int((~ended).sum())


def rollout(c: Context, policy, ref, reward_fn, prompts, gen) -> Rollout:
    a, n = c.args, c.args.num_samples
    replies = sample_replies(policy, [p for _, p in prompts], n, a.max_new_tokens,
                             a.temperature, gen, marker_id(c.tmpl, "end"))
    repeated = [pr for pr in prompts for _ in range(n)]
    score, unterminated = score_replies(c, reward_fn, repeated, replies)
    ids, mask, _ = pad_batch([p for _, p in repeated], [r for r, _ in replies], c.device)
    with torch.no_grad():
        kl = kl_k3(token_logprobs(policy, ids, mask), token_logprobs(ref, ids, mask))
        kl = (kl * mask).sum(dim=1)  # (B,) per reply: the reward is the whole reply's
    # The KL penalty is in the reward, per reply (Ouyang et al. 2022 eq. 2; Ziegler et al.
    # 2019): r = score - beta * KL(pi || pi_ref), and the policy gradient pushes the KL down
    # as it pushes the score up. The KL reported is this one, the one trained on.
    return Rollout(ids, mask, score, kl, score - a.beta * kl, unterminated)


def ppo_update(s: "Stage", r: Rollout) -> dict:
    """--ppo_epochs passes over the rollout in --minibatches, each an optimizer step on PPO's
    clipped surrogate. The old log-probs are computed once, before any update, on the very
    minibatches the updates see: the first minibatch's ratio is exactly 1."""
    a = s.c.args
    adv = group_advantages(r.reward, a.num_samples)
    mbs = torch.arange(len(r.ids)).chunk(a.minibatches)
    with torch.no_grad():
        old = [token_logprobs(s.model, r.ids[mb], r.mask[mb]) for mb in mbs]
    stats = {"loss": 0.0, "clipped": 0.0, "first_ratio": None}
    for _ in range(a.ppo_epochs):
        for mb, old_logp in zip(mbs, old, strict=True):
            logp = token_logprobs(s.model, r.ids[mb], r.mask[mb])
            moved = (logp - old_logp).abs().max().item()  # max |log rho|: 0 for the first
            stats["first_ratio"] = moved if stats["first_ratio"] is None else \
                stats["first_ratio"]
            stats["last_ratio"] = moved
            loss, clipped = ppo_loss(logp, old_logp, adv[mb], r.mask[mb], a.clip)
            stats["norm"] = s.update(loss)
            stats["loss"] += loss.item() / (a.ppo_epochs * len(mbs))
            stats["clipped"] += clipped.item() / (a.ppo_epochs * len(mbs))
    return stats


def reward_function(c: Context):
    """(prompts, replies, ids, last) -> scores (B,): the reward model's, or the checker's."""
    if c.args.reward == "checked":
        def checked(prompts, replies, ids, last):
            return torch.tensor([float(reply_text(c, r) == right_answer(c.meta, ms))
                                 for (ms, _), (r, _) in zip(prompts, replies, strict=True)],
                                device=c.device)
        return checked
    if not c.args.reward_from:
        raise UserError("--stage=ppo needs --reward_from=REWARD_RUN (from --stage=reward), or "
                        "--reward=checked")
    rm = reward_model_from(Path(c.args.reward_from), c.device)
    return lambda prompts, replies, ids, last: rm(ids, last)


def ppo_stage(c: Context) -> "Stage":
    a = c.args
    policy, ref = c.model(), c.model().requires_grad_(False)  # ref: the frozen SFT model
    reward_fn = reward_function(c)
    pool = prompts_for(c, a.num_prompts, a.seed + 1)
    checkable = all(right_answer(c.meta, ms) is not None for ms, _ in pool[:50])
    held_out = eval_prompts(c)
    batches = Batches(len(pool), a.prompts_per_step, a.seed)

    def step(s: Stage) -> dict:
        gen = torch.Generator(c.device).manual_seed(a.seed * 1_000_003 + s.iter_num)
        r = rollout(c, s.model, ref, reward_fn, [pool[i] for i in batches.next()], gen)
        stats = ppo_update(s, r)
        return {**stats, "score": r.score.mean().item(), "kl": r.kl.mean().item(),
                "unterminated": r.unterminated}

    def evaluate(s: Stage) -> dict:
        """On held-out prompts, replies sampled as in training: the score the reward is made
        of, the checker's share right, the KL from the reference."""
        out = {}
        if held_out:
            gen = torch.Generator(c.device).manual_seed(a.seed)
            with torch.no_grad():
                r = rollout(c, s.model, ref, reward_fn, held_out, gen)
            out |= {"val_score": r.score.mean().item(), "val_kl": r.kl.mean().item(),
                    "val_unterminated": r.unterminated}
            if checkable and a.reward != "checked":
                right = [float(reply_text(c, ids_of_reply(r, i)) ==
                               right_answer(c.meta, held_out[i // a.num_samples][0]))
                         for i in range(len(r.ids))]
                out["val_checked"] = sum(right) / len(right)
        return out

    return Stage(c, policy, step, evaluate, lambda: {"model": policy.state_dict()}, batches)


def ids_of_reply(r: Rollout, i: int) -> list[int]:
    return r.ids[i][r.mask[i].bool()].tolist()


def eval_prompts(c: Context) -> list:
    """--eval_prompts held-out prompts for the KL and scores: the val split's, for instruct."""
    folder = Path(c.args.data_dir) / c.args.dataset
    if not (folder / "val_index.bin").is_file() or not c.args.eval_prompts:
        return []
    prompts = [p.tolist() for p, _ in last_replies(folder / "val.bin", c.tmpl,
                                                  c.args.eval_prompts)]
    return [(messages_of(c, p), p) for p in prompts]


# -----------------------------------------------------------------------------
# Stage 4, DPO: the same pairs, no reward model, no sampling


def dpo_stage(c: Context) -> "Stage":
    policy, ref = c.model(), c.model().requires_grad_(False)
    train_pairs, val_pairs = split_pairs(c)
    batches = Batches(len(train_pairs), c.args.batch_size, c.args.seed)
    held_out = eval_prompts(c)

    def reply_sums(model, pairs):
        ids, mask, _ = pair_batch(pairs, c.device)
        return token_logprobs(model, ids, mask).sum(dim=1).chunk(2)  # (B,) chosen, rejected

    def step(s: Stage) -> dict:
        pairs = [train_pairs[i] for i in batches.next()]
        with torch.no_grad():
            ref_c, ref_r = reply_sums(ref, pairs)
        pi_c, pi_r = reply_sums(s.model, pairs)
        loss = dpo_loss(pi_c, ref_c, pi_r, ref_r, c.args.beta)
        margin = (pi_c - ref_c) - (pi_r - ref_r)
        return {"loss": loss.item(), "acc": (margin > 0).float().mean().item(),
                "norm": s.update(loss)}

    def implicit_rewards(pairs):  # beta * log(pi / pi_ref) of chosen and of rejected
        (pi_c, pi_r), (ref_c, ref_r) = reply_sums(policy, pairs), reply_sums(ref, pairs)
        return pi_c - ref_c, pi_r - ref_r

    def evaluate(s: Stage) -> dict:
        out = {"val_acc": pair_accuracy(implicit_rewards, val_pairs, 256)}
        if held_out:
            gen = torch.Generator(c.device).manual_seed(c.args.seed)
            replies = sample_replies(policy, [p for _, p in held_out], c.args.num_samples,
                                     c.args.max_new_tokens, c.args.temperature, gen,
                                     marker_id(c.tmpl, "end"))
            prompts = [p for _, p in held_out for _ in range(c.args.num_samples)]
            ids, mask, _ = pad_batch(prompts, [r for r, _ in replies], c.device)
            with torch.no_grad():
                kl = kl_k3(token_logprobs(policy, ids, mask), token_logprobs(ref, ids, mask))
            out["val_kl"] = ((kl * mask).sum(dim=1)).mean().item()
        return out

    return Stage(c, policy, step, evaluate, lambda: {"model": policy.state_dict()}, batches)


# -----------------------------------------------------------------------------
# The loop every stage shares: train.py's AdamW, schedule and clipping


class Batches:
    """Which items each step takes: a fresh permutation of n items per pass, batch_size a
    step, a pure function of (seed, step): a resumed run draws what it would have drawn."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.it = n, min(batch_size, n), seed, 0

    def next(self) -> list[int]:
        per_pass = self.n // self.batch_size
        epoch, k = divmod(self.it, per_pass)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        self.it += 1
        return order[k * self.batch_size:(k + 1) * self.batch_size].tolist()


@dataclass
class Stage:
    """What the loop trains: the model, a step (an iteration's updates, through update()),
    an evaluation, the weights to save, and the step's draws."""
    c: Context
    model: nn.Module
    step: object  # (Stage) -> stats
    evaluate: object  # (Stage) -> stats
    weights: object  # () -> the state dicts to save
    batches: Batches
    optimizer: torch.optim.Optimizer = None
    iter_num: int = 0
    lr: float = 0.0
    history: list = field(default_factory=list)

    def update(self, loss: torch.Tensor) -> float:
        """One optimizer step on loss: backward, clip the global gradient norm, AdamW."""
        loss.backward()
        norm = clip_grad_norm(self.model.parameters(), self.c.args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()


def checkpoint(s: Stage) -> dict:
    """An ordinary checkpoint (sample.py --chat talks to a policy's), with what resumes it."""
    a = s.c.args
    return {**{k: v for k, v in s.c.sft.items() if k in ("model_args", "meta", "vocab_grown")},
            **s.weights(), "optimizer": s.optimizer.state_dict(), "iter_num": s.iter_num,
            "best_val_loss": float("nan"), "history": s.history,
            "config": {**s.c.sft.get("config", {}), "dataset": a.dataset},
            "rlhf": {k: v for k, v in vars(a).items() if k != "init_from"},
            "started_from": {"path": str(a.init_from), "iter_num": s.c.sft.get("iter_num")}}


def log_line(s: Stage, stats: dict, t0: float) -> str:
    shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in stats.items())
    return f"iter {s.iter_num}: {shown}, lr {s.lr:.2e}, {time.perf_counter() - t0:.0f}s"


def run_stage(s: Stage) -> dict:
    """Evaluate, save, step, max_iters times: train.py's loop for a stage's own step. A stop
    signal finishes the step, saves and prints the command that resumes."""
    a = s.c.args
    out_dir = Path(a.out_dir)
    t0, stats, stopped = time.perf_counter(), {}, False
    with StopSignals() as signals:
        try:
            while True:
                s.lr = get_lr(s.iter_num, a.learning_rate, a.warmup_iters, a.max_iters,
                              a.min_lr)
                for group in s.optimizer.param_groups:
                    group["lr"] = s.lr * group["lr_scale"]
                if s.iter_num % a.eval_interval == 0 or s.iter_num >= a.max_iters:
                    with signals.interruptible():
                        stats = evaluate(s)
                    print(log_line(s, stats, t0), flush=True)
                    s.history.append({"iter": s.iter_num, **stats,
                                      "time": time.perf_counter() - t0})
                    save_checkpoint(checkpoint(s), out_dir / "ckpt.pt")
                if s.iter_num >= a.max_iters or signals.asked:
                    stopped = signals.asked
                    break
                with signals.critical():
                    step_stats = s.step(s)
                    s.iter_num += 1
                if s.iter_num % a.log_interval == 0:
                    print(log_line(s, step_stats, t0), flush=True)
        except StopNow:
            stopped = True
    if stopped:
        save_checkpoint(checkpoint(s), out_dir / "ckpt.pt")
        print(f"stopped at iteration {s.iter_num}; resume with: python rlhf.py "
              f"--init_from=resume --out_dir={a.out_dir}")
    (out_dir / "rlhf_log.json").write_text(json.dumps(s.history, indent=1))
    return {"iter_num": s.iter_num, "stopped": stopped, "history": s.history,
            "elapsed": time.perf_counter() - t0}


def evaluate(s: Stage) -> dict:
    """The stage's own evaluation, and for a policy on checkable data, held-out exact match
    (greedy, as train.py reports it) by kind."""
    stats = s.evaluate(s)
    if isinstance(s.model, GPT) and s.c.meta.get("chat"):
        stats |= exact_match_by_kind(s.c, s.model)
    return stats


def exact_match_by_kind(c: Context, model: GPT) -> dict:
    val = Path(c.args.data_dir) / c.args.dataset / "val.bin"
    if c.meta.get("kinds") is None or not val.is_file():
        return {}
    right = replies_right(model, val, c.tmpl, c.device, c.args.eval_limit)
    out = {"exact_match": sum(ok for _, ok in right) / max(len(right), 1)}
    by_kind: dict[str, list[bool]] = {}
    for prompt, ok in right:
        found = instruct_answer(messages_of(c, prompt.tolist())[-1]["content"])
        by_kind.setdefault(found[0] if found else "other", []).append(ok)
    return out | {f"em_{k}": sum(v) / len(v) for k, v in by_kind.items()}


# -----------------------------------------------------------------------------
# The command line


STAGES = {"reward": reward_stage, "ppo": ppo_stage, "dpo": dpo_stage}
BETA = {"ppo": 0.05, "dpo": 0.1}  # --beta's default: the KL penalty's weight, DPO's temperature


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The third stage: preference pairs, a reward "
                                "model, PPO against it (or the checked reward), and DPO.")
    p.add_argument("--stage", choices=["pairs", *STAGES], help="what to do (required, except "
                   "with --init_from=resume)")
    p.add_argument("--init_from", required=True,
                   help="the SFT checkpoint or run folder every stage starts from; resume: "
                   "continue the run in --out_dir")
    p.add_argument("--out_dir", default="out-rlhf")
    p.add_argument("--dataset", default=None, help="default: the SFT run's")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1337)
    g = p.add_argument_group("data")
    g.add_argument("--pairs", default=None, help="preference JSONL (default: "
                   "data/<dataset>/pairs.jsonl, what --stage=pairs writes)")
    g.add_argument("--val_pairs", type=float, default=0.1, help="share of pairs held out")
    g.add_argument("--prompts", default=None, help="prompts JSONL for pairs and PPO "
                   "(default: fresh instructions, for instruct data)")
    g.add_argument("--num_prompts", type=int, default=4000)
    g.add_argument("--num_samples", type=int, default=8, help="replies sampled a prompt")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--max_new_tokens", type=int, default=32)
    g = p.add_argument_group("PPO")
    g.add_argument("--reward", choices=["model", "checked"], default="model")
    g.add_argument("--reward_from", default=None, help="the reward model's run (--reward=model)")
    g.add_argument("--beta", type=float, default=None,
                   help=f"KL weight (PPO, default {BETA['ppo']}) or DPO's beta ({BETA['dpo']})")
    g.add_argument("--clip", type=float, default=0.2, help="PPO's epsilon")
    g.add_argument("--prompts_per_step", type=int, default=8)
    g.add_argument("--ppo_epochs", type=int, default=2)
    g.add_argument("--minibatches", type=int, default=2)
    g = p.add_argument_group("optimizer (train.py's AdamW, get_lr, clip_grad_norm)")
    g.add_argument("--max_iters", type=int, default=200)
    g.add_argument("--batch_size", type=int, default=32, help="pairs a step (reward, dpo)")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--min_lr", type=float, default=None, help="default: learning_rate / 10")
    g.add_argument("--warmup_iters", type=int, default=10)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.99)
    g.add_argument("--grad_clip", type=float, default=1.0)
    g = p.add_argument_group("evaluation and runs")
    g.add_argument("--eval_interval", type=int, default=50)
    g.add_argument("--eval_limit", type=int, default=500, help="held-out conversations scored")
    g.add_argument("--eval_prompts", type=int, default=100, help="held-out prompts for KL")
    g.add_argument("--log_interval", type=int, default=10)
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--keep_runs", type=int, default=5)
    return p


def check(a) -> None:
    positive = ("num_prompts", "num_samples", "max_new_tokens", "prompts_per_step",
                "ppo_epochs", "minibatches", "batch_size", "eval_interval", "log_interval")
    for name in positive:
        if getattr(a, name) < 1:
            raise UserError(f"--{name} must be at least 1, not {getattr(a, name)}")
    for name in ("temperature", "learning_rate", "beta", "clip", "grad_clip"):
        if not (math.isfinite(getattr(a, name)) and getattr(a, name) > 0):
            raise UserError(f"--{name} must be a positive number, not {getattr(a, name)}")
    if not 0 < a.val_pairs < 1:
        raise UserError(f"--val_pairs must be between 0 and 1, not {a.val_pairs}")
    if a.stage == "ppo" and a.num_samples < 2:
        raise UserError("--num_samples must be at least 2 for PPO: a reply's baseline is the "
                        "other replies to its prompt")
    if a.stage == "ppo" and a.minibatches > a.prompts_per_step * a.num_samples:
        raise UserError("--minibatches is more than the replies a step samples")


def parse_args(argv=None) -> argparse.Namespace:
    a = get_parser().parse_args(argv)
    if a.init_from == "resume":
        path = Path(a.out_dir) / "ckpt.pt"
        saved = load_checkpoint(path).get("rlhf")
        if saved is None:
            raise UserError(f"{path} was not written by rlhf.py: nothing to resume")
        a = argparse.Namespace(**{**saved, "init_from": "resume",
                                  "resume_from": saved["sft_path"]})
    elif a.stage is None:
        raise UserError("--stage is required: pairs, reward, ppo or dpo")
    a.beta = BETA.get(a.stage, 0.1) if a.beta is None else a.beta
    a.min_lr = a.learning_rate / 10 if a.min_lr is None else a.min_lr
    check(a)
    return a


def context(a) -> Context:
    sft_path = Path(getattr(a, "resume_from", a.init_from))
    path = run_checkpoint(sft_path)
    if path is None:
        raise UserError(f"no checkpoint at {sft_path}: train an SFT model with train.py")
    sft = load_checkpoint(path)
    a.sft_path = str(sft_path)
    a.dataset = a.dataset or sft.get("config", {}).get("dataset")
    meta = sft["meta"]
    if not meta.get("chat"):
        raise UserError(f"{path} was not trained on conversations: the third stage starts "
                        "from an SFT model (train.py on a chat dataset)")
    encode, decode = get_tokenizer(meta)
    a.init_from = str(sft_path)
    return Context(a, sft, meta, meta["chat"], encode, decode, torch.device(a.device),
                   sft["model_args"]["block_size"])


def build(a) -> Stage:
    resume = a.init_from == "resume"
    c = context(a)
    s = STAGES[a.stage](c)
    s.optimizer, _ = configure_optimizer(s.model, a.weight_decay, a.learning_rate,
                                         (a.beta1, a.beta2))
    if resume:
        ckpt = load_checkpoint(Path(a.out_dir) / "ckpt.pt")
        if "reward_head" in ckpt:
            s.model.gpt.load_state_dict(ckpt["model"])
            s.model.head.load_state_dict(ckpt["reward_head"])
        else:
            s.model.load_state_dict(ckpt["model"])
        s.optimizer.load_state_dict(ckpt["optimizer"])
        s.iter_num, s.history = ckpt["iter_num"], ckpt["history"]
        s.batches.it = s.iter_num
        print(f"resuming {a.stage} from {a.out_dir}/ckpt.pt at iteration {s.iter_num}")
    else:
        make_room(a)
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    return s


def main(argv=None) -> dict | None:
    """Run one stage; return what happened (the pairs' counts, or the run's history)."""
    readable_output()  # a name that is not UTF-8 prints, never a traceback
    try:
        a = parse_args(argv)
        torch.manual_seed(a.seed)
        if a.stage == "pairs":
            return label_pairs(context(a))
        return run_stage(build(a))
    except UserError as e:  # bad input (2), or a run that stopped by itself (1)
        print(f"rlhf.py: {e.label}: {e}", file=sys.stderr)
        sys.exit(e.status)


if __name__ == "__main__":
    main()
