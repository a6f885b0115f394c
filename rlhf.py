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
DPO, advantages, PPO's clipped surrogate), the reward model, each stage's step, then the
command line. The loop every stage shares (train.py's AdamW, get_lr and clip_grad_norm, with
its checkpoints, stops and evaluation) is in rlhf_runs.py; the data (preference files, padded
batches, sampled replies) in preferences.py.

    python rlhf.py --stage=eval --init_from=out-sft --out_dir=out-ppo     # score any model
    python rlhf.py --plot out-ppo out-ppo-beta0.2 --out_dir=out-ppo        # reward_vs_kl.png
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chat import marker_id
from checkpoints import load_checkpoint, model_from_checkpoint, run_checkpoint
from errors import UserError, readable_output
from gpt import GPT, GPTConfig
from preferences import pad_batch, read_pairs, sample_replies, write_jsonl
from rlhf_runs import (
    Batches,
    Context,
    Stage,
    context,
    eval_prompts,
    exact_match_by_kind,
    kind_of,
    prompts_for,
    reply_text,
    run_stage,
)
from run_setup import make_room
from runlog import plot_reward_vs_kl
from tasks import INSTRUCT, checkable, right_answer
from train import configure_optimizer

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
# Stage 1, the labeller: sampled replies, and the checker's preference between them


def label_pairs(c: Context) -> dict:
    """Sample --num_samples replies to each of --num_prompts fresh prompts from the SFT model
    at --temperature, and where the checker finds a right and a wrong one, write the pair
    (one a prompt, drawn at random among them) to --pairs. Replies with no <|end|> in reach,
    with another marker inside, or empty, are neither chosen nor rejected, and counted: the
    file holds only what read_pairs accepts."""
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
    counts = {"all right": 0, "all wrong": 0, "unterminated replies": 0, "with a marker": 0,
              "empty": 0}
    for k, ((messages, _), answer) in enumerate(zip(prompts, answers, strict=True)):
        mine = replies[k * a.num_samples:(k + 1) * a.num_samples]
        counts["unterminated replies"] += sum(not ended for _, ended in mine)
        text_only = [(r, ended) for r, ended in mine if max(r[:-1], default=0) < first_marker]
        counts["with a marker"] += len(mine) - len(text_only)  # <|user|> in it: not a text
        texts = [reply_text(c, r) for r, ended in text_only if ended]
        counts["empty"] += sum(not t.strip() for t in texts)  # no reply at all: not a text
        texts = [t for t in texts if t.strip()]
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

    by_kind: dict[str, list] = {}  # instruct's held-out pairs by kind: what it learned to judge
    for pair in val_pairs if c.meta.get("kinds") == list(INSTRUCT) else []:
        by_kind.setdefault(kind_of(c, pair[0]), []).append(pair)

    def evaluate(s: Stage) -> dict:
        return {"val_acc": pair_accuracy(score_pairs, val_pairs, 256),
                "train_acc": pair_accuracy(score_pairs, train_pairs[:len(val_pairs)], 256),
                **{f"acc_{k}": pair_accuracy(score_pairs, v, 256) for k, v in by_kind.items()}}

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


def checked_reward(c: Context):
    """(prompts, replies, ids, last) -> (B,): 1 where the task's checker finds the reply right.
    None for data with no checker."""
    if not checkable(c.meta):
        return None

    def checked(prompts, replies, ids, last):
        return torch.tensor([float(reply_text(c, r) == right_answer(c.meta, ms))
                             for (ms, _), (r, _) in zip(prompts, replies, strict=True)],
                            device=c.device)
    return checked


def reward_function(c: Context):
    """(prompts, replies, ids, last) -> scores (B,): the reward model's, or the checker's."""
    if c.args.reward == "checked":
        if (checked := checked_reward(c)) is None:
            raise UserError("--reward=checked needs a checkable dataset (instruct, reverse, "
                            "addition)")
        return checked
    if not c.args.reward_from:
        raise UserError(f"--stage={c.args.stage} needs --reward_from=REWARD_RUN (from "
                        "--stage=reward), or --reward=checked")
    rm = reward_model_from(Path(c.args.reward_from), c.device)
    return lambda prompts, replies, ids, last: rm(ids, last)


@torch.no_grad()
def held_out_scores(c: Context, policy, ref, reward_fn, held_out) -> dict:
    """On held-out prompts, --num_samples replies each, sampled as in training (the same
    seed each time): the mean score (reward_fn's, else the checker's, else none), the KL from the reference, the replies
    cut off, and where the score is not the checker's but a checker exists, the checker's
    share right. These are what Gao et al. (2022) plot against each other."""
    if not held_out:
        return {}
    gen = torch.Generator(c.device).manual_seed(c.args.seed)
    checked = checked_reward(c)
    score_fn = reward_fn or checked
    r = rollout(c, policy, ref, score_fn or no_score, held_out, gen)
    out = {"val_kl": r.kl.mean().item(), "val_unterminated": r.unterminated}
    if score_fn is not None:
        out["val_score"] = r.score.mean().item()
    if checked is not None and reward_fn is not None and c.args.reward != "checked":
        n = c.args.num_samples
        replies = [(ids_of_reply(r, i), True) for i in range(len(r.ids))]
        right = checked([held_out[i // n] for i in range(len(r.ids))], replies, None, None)
        out["val_checked"] = right.mean().item()
    return out


def no_score(prompts, replies, ids, last) -> torch.Tensor:
    """Every reply 0: for data with neither a reward model nor a checker (the KL alone)."""
    return torch.zeros(len(replies), device=ids.device)


def ppo_stage(c: Context) -> "Stage":
    a = c.args
    policy, ref = c.model(), c.model().requires_grad_(False)  # ref: the frozen SFT model
    reward_fn = reward_function(c)
    pool = prompts_for(c, a.num_prompts, a.seed + 1)
    held_out = eval_prompts(c)
    batches = Batches(len(pool), a.prompts_per_step, a.seed)

    def step(s: Stage) -> dict:
        gen = torch.Generator(c.device).manual_seed(a.seed * 1_000_003 + s.iter_num)
        r = rollout(c, s.model, ref, reward_fn, [pool[i] for i in batches.next()], gen)
        stats = ppo_update(s, r)
        return {**stats, "score": r.score.mean().item(), "kl": r.kl.mean().item(),
                "unterminated": r.unterminated}

    def evaluate(s: Stage) -> dict:
        return held_out_scores(c, s.model, ref, reward_fn, held_out)

    return Stage(c, policy, step, evaluate, lambda: {"model": policy.state_dict()}, batches)


def ids_of_reply(r: Rollout, i: int) -> list[int]:
    return r.ids[i][r.mask[i].bool()].tolist()


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
        return {"val_acc": pair_accuracy(implicit_rewards, val_pairs, 256),
                **held_out_scores(c, policy, ref, None, held_out)}

    return Stage(c, policy, step, evaluate, lambda: {"model": policy.state_dict()}, batches)



# -----------------------------------------------------------------------------
# Scoring any model as the stages score theirs, and the picture of over-optimisation


def eval_stage(c: Context) -> dict:
    """Score --out_dir's model (a stage's policy, or any train.py checkpoint of the dataset,
    say SFT continued) as PPO scores its own: greedy held-out exact match by kind, and on
    held-out prompts the score (the reward model's with --reward_from, else the checker's),
    the checker's share right and the KL from the SFT model. Writes nothing; prints JSON."""
    path = run_checkpoint(Path(c.args.out_dir))
    if path is None:
        raise UserError(f"no checkpoint in {c.args.out_dir} to score")
    ckpt = load_checkpoint(path)
    if "reward_head" in ckpt or ckpt.get("meta") != c.meta:
        raise UserError(f"{path} is not a policy of {c.args.init_from}'s data: --stage=eval "
                        "scores a model trained on the same conversations")
    model = model_from_checkpoint(ckpt, path)[0].to(c.device).eval()
    reward_fn = reward_function(c) if c.args.reward_from or c.args.reward == "checked" else None
    stats = (held_out_scores(c, model, c.model(), reward_fn, eval_prompts(c))
             | exact_match_by_kind(c, model))
    print(json.dumps({"out_dir": c.args.out_dir, **stats}))
    return stats


def plot_runs(runs: list[str], out_dir: Path) -> Path:
    """Draw the held-out score and the checker's share right against the KL, one line each
    PPO run (each evaluation in its rlhf_log.json), to out_dir/reward_vs_kl.png."""
    curves = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in map(Path, runs):
        try:
            log = json.loads((run / "rlhf_log.json").read_text(encoding="utf-8"))
            a, history = log["rlhf"], log["history"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{run} is not a run of rlhf.py (no rlhf_log.json in it)") from None
        label = f"{run.name}: beta {a.get('beta')}, reward {a.get('reward')}"
        curves[label] = [e for e in history if "val_kl" in e]
    try:
        return plot_reward_vs_kl(curves, out_dir / "reward_vs_kl.png")
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None


# -----------------------------------------------------------------------------
# The command line


STAGES = {"reward": reward_stage, "ppo": ppo_stage, "dpo": dpo_stage}
BETA = {"ppo": 0.05, "dpo": 0.1}  # --beta's default: the KL penalty's weight, DPO's temperature


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The third stage: preference pairs, a reward "
                                "model, PPO against it (or the checked reward), and DPO.")
    p.add_argument("--stage", choices=["pairs", *STAGES, "eval"], help="what to do (required, "
                   "except with --init_from=resume)")
    p.add_argument("--init_from", default=None,
                   help="the SFT checkpoint or run folder every stage starts from; resume: "
                   "continue the run in --out_dir")
    p.add_argument("--out_dir", default="out-rlhf")
    p.add_argument("--plot", nargs="+", metavar="RUN", default=None, help="draw these PPO runs' "
                   "held-out scores against their KL to OUT_DIR/reward_vs_kl.png, and stop")
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
    if a.plot:
        return a
    if a.init_from is None:
        raise UserError("--init_from is required: the SFT run a stage starts from, or resume")
    if a.init_from == "resume":
        path = Path(a.out_dir) / "ckpt.pt"
        saved = load_checkpoint(path).get("rlhf")
        if saved is None:
            raise UserError(f"{path} was not written by rlhf.py: nothing to resume")
        a = argparse.Namespace(**{**saved, "init_from": "resume",
                                  "resume_from": saved["sft_path"], "plot": None})
    elif a.stage is None:
        raise UserError("--stage is required: pairs, reward, ppo, dpo or eval")
    a.beta = BETA.get(a.stage, 0.1) if a.beta is None else a.beta
    a.min_lr = a.learning_rate / 10 if a.min_lr is None else a.min_lr
    check(a)
    return a



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
    """Run one stage; return what happened (the pairs' counts, the scores, or the run's
    history)."""
    readable_output()  # a name that is not UTF-8 prints, never a traceback
    try:
        a = parse_args(argv)
        if a.plot:
            print(f"wrote {plot_runs(a.plot, Path(a.out_dir))}")
            return None
        torch.manual_seed(a.seed)
        if a.stage in ("pairs", "eval"):  # no training: nothing to resume, no run folder
            return {"pairs": label_pairs, "eval": eval_stage}[a.stage](context(a))
        return run_stage(build(a))
    except UserError as e:  # bad input (2), or a run that stopped by itself (1)
        print(f"rlhf.py: {e.label}: {e}", file=sys.stderr)
        sys.exit(e.status)


if __name__ == "__main__":
    main()
