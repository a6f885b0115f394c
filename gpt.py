"""
The GPT-2 model, written plainly, and text generation as in the lecture.

    from gpt import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    logits, loss = model(idx, targets)          # training: (B, T, vocab), scalar
    out = model.generate_plain(idx, 100, temperature=0.8, top_k=200)  # the lecture's loop

Read it top to bottom: the config, attention, the loss, the MLP, the block, the GPT, then
generation as in the lecture (a plain loop) and the sampling filters it uses; that is the
lesson. Generation again with a KV cache (the optimisation: the same tokens, faster), streamed,
and beam search are in inference.py; GPT-2's weights are in gpt2_weights.py. The model meets the
KV cache through one argument, `cache`, and two of its methods (see CausalSelfAttention).

Shapes use one alphabet: B batch, T time (sequence length), C channels (n_embd),
nh number of heads, hs head size (C // nh), V vocab_size, S keys attended to (T, or more
with a KV cache).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# the choices of GPTConfig's switches, the first of each being GPT-2's
POS_EMBS, NORMS, MLPS = ("learned", "rope"), ("layernorm", "rmsnorm"), ("gelu", "relu2", "swiglu")


@dataclass
class GPTConfig:
    block_size: int = 256  # the longest context the model ever sees
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2
    # Switches beyond GPT-2 (the defaults are GPT-2); each is written once, below:
    pos_emb: str = "learned"  # "learned": GPT-2's table of positions; "rope": rotary, on q, k
    norm: str = "layernorm"  # "layernorm", or "rmsnorm": no mean, no bias
    mlp: str = "gelu"  # "gelu" (GPT-2), "relu2": relu(x)^2, or "swiglu": a gated SiLU
    qk_norm: bool = False  # normalise each head's q and k before their dot product

    def __post_init__(self):
        for name, allowed in (("pos_emb", POS_EMBS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")


# -----------------------------------------------------------------------------
# Attention: each position gathers information from the positions before it


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.layer_idx = layer_idx  # which layer this is: its slot in a KVCache
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # False: one fused kernel (flash attention where the device has it). True: the formula
        # written out below, which also keeps the weights in self.att (sample.py --attention).
        self.explicit = False
        self.att = None
        self.qk_norm = config.qk_norm
        self.rope = config.pos_emb == "rope"
        if self.rope:  # cos, sin of every position's angles, (block_size, hs/2), in fp32
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x, cache=None):
        """x (B, T, C) -> (B, T, C). cache: None in training; while generating, inference.py's
        KV cache, the one hook: cache.positions(T) gives the new tokens' positions (T,), and
        cache.update(layer_idx, k, v) stores their keys and values and returns every key and
        value to attend over (B, nh, S, hs), with the mask (T, S) of who sees whom (None: all).
        """
        B, T, C = x.size()  # batch, time, n_embd
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # all heads in one batched computation: (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, nh, hs).transpose(1, 2)
        k = k.view(B, T, nh, hs).transpose(1, 2)
        v = v.view(B, T, nh, hs).transpose(1, 2)
        if self.qk_norm:  # QK-norm (Henry et al. 2020; Dehghani et al. 2023): unit-RMS q, k,
            q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))  # so no score can blow up
        if self.rope:  # rotate q and k by their positions' angles
            pos = positions(T, x.device, cache)  # (T,)
            cos, sin = self.cos[pos], self.sin[pos]  # (T, hs/2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal, mask = T > 1, None  # without a cache: query t sees keys 0..t
        if cache is not None:  # generating: add these keys and values to the ones kept so far
            k, v, mask = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs), mask (T, S)
            causal = False  # the mask says who sees whom (None: one new token sees them all)
        if self.explicit:
            y = self.attention_formula(q, k, v, mask, causal)
        else:  # the same math in one fused kernel; its dropout ignores eval(): switch it by hand
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attention_formula(self, q, k, v, mask, causal):
        """softmax(q k^T / sqrt(hs)) v, with the future masked out.

        Each query's dot product with each key says how much it attends there; dividing by
        sqrt(hs) keeps the scores' variance near 1, so the softmax does not saturate. A masked
        score becomes -inf, which the softmax turns into a weight of exactly 0.
        """
        T, S, hs = q.size(2), k.size(2), q.size(3)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, hs) @ (B, nh, hs, S)
        if causal:  # -> (B, nh, T, S); the lower triangle: query t sees keys 0..t
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)  # each row: weights over the keys, summing to 1
        self.att = att.detach()
        return self.attn_dropout(att) @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)


def positions(T: int, device, cache=None) -> torch.Tensor:
    """The positions (T,) of T new tokens: 0..T-1, or with a KV cache the T after the ones it
    holds, as the cache says (it raises ValueError past block_size)."""
    return torch.arange(T, device=device) if cache is None else cache.positions(T)


def rope_tables(block_size: int, hs: int, base: float = 10000.0):
    """Rotary position embeddings (Su et al. 2021, RoFormer): the angles pos * theta_i for
    every position and pair i of q's and k's channels, theta_i = base^(-2i/hs). Computed in
    fp32 (in bf16 the angles of far positions lose their precision). cos, sin: (T, hs/2)."""
    theta = base ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,)
    angles = torch.arange(block_size, dtype=torch.float32)[:, None] * theta  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair of channels (x1, x2) of x (B, nh, T, hs) by its angle:
        (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos).
    A pair is channel i with channel i + hs/2 (the halves, as GPT-NeoX and Llama's Hugging Face
    port pair them; the original pairs neighbours 2i, 2i+1: the same thing up to a fixed
    permutation of channels). After rotation q_m . k_n depends on m - n only: attention sees
    relative positions."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


# -----------------------------------------------------------------------------
# The loss, written out


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1):
    """Mean negative log-likelihood of `targets` under softmax(`logits`).

    logits (N, V), targets (N,). Positions whose target is `ignore_index` carry no loss.
    log softmax(z)_y = z_y - log sum_j exp(z_j), and subtracting max(z) first keeps exp()
    from overflowing without changing the result (it cancels in the ratio).
    """
    logits = logits.float()  # under bf16 autocast, do the sum in fp32
    z = logits - logits.max(dim=-1, keepdim=True).values.detach()  # (N, V), max entry is 0
    log_norm = z.exp().sum(dim=-1).log()  # (N,) log sum_j exp(z_j)
    keep = targets != ignore_index  # (N,)
    z_y = z.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N,)
    nll = (log_norm - z_y) * keep
    return nll.sum() / keep.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# MLP, Block and the GPT


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * g. LayerNorm without
    subtracting the mean and without a bias: cheaper, and it trains as well."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # the gain g

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C, H = config.n_embd, 4 * config.n_embd  # H: the hidden width
        self.kind = config.mlp
        if self.kind == "swiglu":  # three matrices instead of two: H = 8C/3 keeps the
            H = 8 * ((8 * C // 3 + 7) // 8)  # parameters near 2 * 4C * C (a multiple of 8)
            self.c_gate = nn.Linear(C, H, bias=config.bias)
        self.c_fc = nn.Linear(C, H, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(H, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, H)
        if self.kind == "gelu":
            h = self.gelu(h)
        elif self.kind == "relu2":  # ReLU^2 (So et al. 2021, Primer): relu(x)^2
            h = F.relu(h).square()
        else:  # SwiGLU (Shazeer 2020): (silu(x W1) * x W3) W2, W1 the gate, W3 c_fc, W2 c_proj
            h = F.silu(self.c_gate(x)) * h
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: communicate (attention), then compute (MLP)."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)  # residual connections let the
        x = x + self.mlp(self.ln_2(x))  # gradient flow straight to the bottom
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            "wpe": nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            "drop": nn.Dropout(config.dropout),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            "ln_f": make_norm(config),
        })
        if config.pos_emb == "rope":  # positions enter inside attention instead
            del self.transformer["wpe"]
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: reading a token in and writing it out use one matrix (GPT-2 does this;
        # it saves vocab_size * n_embd parameters). The Linear's weight becomes wte's.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales each residual projection by 1/sqrt(2 * n_layer): every block adds two
        # of them to the residual stream, and this keeps its variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. As GPT-2 papers report it, position embeddings are left out; the
        token embeddings stay in, since they are also the (tied) output layer."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T), logits are (B, T, V) and loss is the mean cross-entropy over the
        positions whose target is not -1. Without, only the last position's logits (B, 1, V) are
        computed: that is all generation needs. With a KV cache (inference.py), idx holds only
        the new tokens. Raises ValueError for more tokens than block_size.
        """
        B, T = idx.size()
        x = self.hidden(idx, cache)  # (B, T, C)
        if targets is None:
            # (B, 1, V); a slice, not x[:, [-1]]: a list index is a tensor copied from
            return self.lm_head(x[:, -1:, :]), None  # the host, which a CUDA graph cannot hold
        logits = self.lm_head(x)  # (B, T, V)
        loss = cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))  # may be a slice
        return logits, loss

    def hidden(self, idx, cache=None):
        """idx (B, T) -> the last block's output, normed (B, T, C): what lm_head turns into
        logits (and rlhf.py's reward head into a score). Raises ValueError past block_size."""
        T = idx.size(1)
        if cache is None and T > self.config.block_size:  # (a cache checks its own room)
            raise ValueError(f"sequence of {T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:  # learned positions, added to the token embeddings
            pos = positions(T, idx.device, cache)  # (T,)
            x = x + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache)
        return self.transformer.ln_f(x)  # (B, T, C)

    # The lecture's loop, written out below, as a method (model.generate_plain(...)); the
    # fast one, with a KV cache, the same tokens, is inference.generate(model, ...).
    def generate_plain(self, *args, **kwargs):
        return generate_plain(self, *args, **kwargs)


# -----------------------------------------------------------------------------
# Generation, as in the lecture: crop, forward, last logits, filter, sample, append


@contextmanager
def eval_mode(model: nn.Module):
    """Run the block in eval mode (no dropout), then restore the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_plain(model: GPT, idx, max_new_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None):
    """Extend idx (B, T) by max_new_tokens sampled tokens: (B, T + max_new_tokens).

    Each new token costs a forward pass over the whole (cropped) context, and no KV cache:
    inference.generate gives the same tokens faster. temperature 0 means greedy (argmax);
    top_k (None or 0: off) and top_p (None: off) are the filters of the next section.
    """
    with eval_mode(model):  # no dropout while generating; the caller's mode comes back after
        for _ in range(max_new_tokens):
            # the model has position embeddings for block_size tokens only: past that, the
            # window slides and the oldest tokens drop out of sight
            idx_cond = idx[:, -model.config.block_size:]  # (B, T') with T' <= block_size
            logits, _ = model(idx_cond)  # (B, 1, V): without targets, only the last position
            logits = logits[:, -1, :]  # (B, V) scores for the next token
            # temperature, filters, softmax, sample: below
            idx_next = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
    return idx


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B, 1): divide by the temperature, filter (top-k, top-p:
    the next section), softmax, sample. temperature 0 means greedy (argmax). One step of
    generate_plain, and of inference.py's KV-cache loop."""
    if temperature == 0:  # greedy: the likeliest token, no randomness
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float()
    # softmax(z / T) is unchanged by subtracting max(z) first, and that keeps a tiny T from
    # turning logits into inf - inf = nan: the largest becomes 0, the rest -inf
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)  # (B, V), all but k -> -inf
    if top_p is not None:
        logits = top_p_filter(logits, top_p)  # (B, V), outside the nucleus -> -inf
    probs = F.softmax(logits, dim=-1)  # (B, V), renormalised over the survivors
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


# -----------------------------------------------------------------------------
# Sampling: each filter is a small pure function on logits (B, V)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value all stay); the rest -> -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[:, [-1]]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to
    at least p; the rest -> -inf. The most likely token always survives, and a token tied
    with the last one kept stays too (as in top_k_filter), so ties never depend on sort order.
    The sums run in float64: at GPT-2's 50,257 tokens, float32's rounding in the cumulative
    sum can drop the very token that crosses p."""
    if p >= 1.0:
        return logits  # all of them: a float cumsum that rounds to 1 early must not drop any
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values  # (B, V)
    probs = sorted_logits.double().softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    keep = before < p  # a token is needed while those above it fall short of p
    cutoff = sorted_logits.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)  # (B, 1)
    return logits.masked_fill(logits < cutoff, float("-inf"))
