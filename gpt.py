"""
The GPT-2 model, written plainly, and text generation.

    from gpt import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    logits, loss = model(idx, targets)          # training: (B, T, vocab), scalar
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=200)
    out = model.generate_plain(idx, 100, temperature=0.8, top_k=200)  # the lecture's loop
    for tok in model.generate_stream(idx, 100):  # the same, one (B, 1) token at a time
        ...
    beams, scores = model.beam_search(idx, max_new_tokens=50, beam_width=4)  # idx (1, T)
    model = GPT.from_pretrained("gpt2")         # OpenAI's weights, via Hugging Face transformers

Read it top to bottom: the config, attention, the loss, the MLP, the block, the GPT, then
generation as in the lecture (a plain loop) and the sampling filters it uses; that is the
lesson. Then generation again with a KV cache (the optimisation: the same tokens, faster),
beam search, and last GPT-2's weights.

Shapes use one alphabet: B batch, T time (sequence length), C channels (n_embd),
nh number of heads, hs head size (C // nh), V vocab_size, S keys attended to (T, or more
with a KV cache).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
            pos = torch.arange(T, device=x.device) + (cache.pos if cache is not None else 0)
            cos, sin = self.cos[pos], self.sin[pos]  # (T, hs/2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal, mask, static = T > 1, None, False  # without a cache: query t sees keys 0..t
        if cache is not None:  # generating: add these keys and values to the ones kept so far
            static = torch.is_tensor(cache.pos)  # a CUDA graph's step (see CUDAGraphStep)
            k, v, mask = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs), mask (T, S)
            causal = False  # the mask says who sees whom (None: one new token sees them all)
        # The fused kernels split their work by query: one query over block_size keys keeps a
        # handful of the GPU's cores busy. The formula's two matmuls split it by key: the baby
        # GPT's graphed step went from 1,086 to 3,114 tokens/s on an H200 (bench.py).
        if self.explicit or static:
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
        computed: that is all generation needs. With a KVCache, idx holds only the new tokens.
        """
        B, T = idx.size()
        # the first new token's position: an int, or a (1,) tensor in a CUDA graph's step
        start = cache.pos if cache is not None else 0
        if isinstance(start, int) and start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:  # learned positions, added to the token embeddings
            pos = torch.arange(T, device=idx.device) + start  # (T,)
            x = x + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:  # every layer has stored these T positions (a tensor's += is
            cache.pos += T  # in place: a CUDA graph's replay moves its position on by itself)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if targets is None:
            # (B, 1, V); a slice, not x[:, [-1]]: a list index is a tensor copied from
            return self.lm_head(x[:, -1:, :]), None  # the host, which a CUDA graph cannot hold
        logits = self.lm_head(x)  # (B, T, V)
        loss = cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))  # may be a slice
        return logits, loss

    # Generation and GPT-2's weights are written out further down this file; these give them
    # nanoGPT's interface (model.generate(...), GPT.from_pretrained(...)). model.generate is
    # the fast one, with a KV cache; model.generate_plain is the lecture's loop, the same tokens.
    def generate(self, *args, **kwargs):
        return generate(self, *args, **kwargs)

    def generate_plain(self, *args, **kwargs):
        return generate_plain(self, *args, **kwargs)

    def generate_stream(self, *args, **kwargs):
        return generate_stream(self, *args, **kwargs)

    def beam_search(self, *args, **kwargs):
        return beam_search(self, *args, **kwargs)

    @staticmethod
    def from_pretrained(name_or_dir: str, dropout: float = 0.0) -> "GPT":
        return from_pretrained(name_or_dir, dropout)


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
    generate, further down, gives the same tokens faster. temperature 0 means greedy (argmax);
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
    generate_plain, and of the KV-cache loop further down."""
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


# -----------------------------------------------------------------------------
# Generation, with a KV cache: the same loop, feeding one new token per step
#
# generate_plain runs the model over the whole context for every new token, though while the
# context fits in block_size the keys and values of the old positions never change (attention
# is causal: a position never sees the ones after it). Keeping them in a cache, each step feeds
# the one new token (B, 1) and attends to the stored keys: the same logits up to rounding, far
# less work. The tests check that both loops give the same tokens.


class KVCache:
    """Each layer's keys and values so far, so generation feeds one new token per step.

    k[layer], v[layer]: (B, nh, block_size, hs), filled up to `pos`.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # how many positions are filled (GPT.forward moves it on)
        self.slots = torch.arange(config.block_size, device=device)  # (block_size,)

    def update(self, layer: int, k, v):
        """Store one layer's new keys and values k, v (B, nh, T, hs) after the `pos` kept ones.

        Returns every key and value so far (B, nh, S, hs), S = pos + T, and the mask (T, S):
        new query i sits at position pos + i and sees keys 0..pos + i. For one new token the
        mask is None: it sees every key (no mask at all is the fastest path).
        """
        if torch.is_tensor(self.pos):  # a CUDA graph's step: see update_static
            return self.update_static(layer, k, v)
        p, T = self.pos, k.size(2)
        self.k[layer][:, :, p:p + T] = k
        self.v[layer][:, :, p:p + T] = v
        mask = None if T == 1 else torch.ones(T, p + T, dtype=torch.bool,
                                              device=k.device).tril(p)
        return self.k[layer][:, :, :p + T], self.v[layer][:, :, :p + T], mask

    def update_static(self, layer: int, k, v):
        """update() for one new token (T = 1) when pos is a (1,) tensor on the device: the
        same keys and values with every shape fixed, as a CUDA graph needs. The new ones go in
        slot pos (index_copy_ reads pos on the device), and attention runs over all block_size
        slots, the mask (1, block_size) hiding those past pos: the same result, since a masked
        key gets a weight of exactly 0.
        """
        self.k[layer].index_copy_(2, self.pos, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.pos, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer], (self.slots <= self.pos)[None, :]

    def reorder(self, rows: torch.Tensor):
        """Keep batch rows `rows` (beam search picks which beams survive)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


def next_logits(model: GPT, idx, cache, use_cache: bool = True, cuda_graph: bool = False):
    """Logits (B, V) for the token after idx (B, T), and the cache to pass next time.

    With use_cache, only the tokens the cache has not seen are fed. Learned position
    embeddings tie a key to its position, so once the context is longer than block_size the
    cached keys are stale: from then on each step re-encodes the last block_size tokens,
    exactly what the no-cache path does. With cuda_graph, the steps after the prompt replay a
    CUDAGraphStep (below), which then stands in for the cache.
    """
    bs = model.config.block_size
    if not (use_cache and idx.size(1) <= bs):
        logits, _ = model(idx[:, -bs:])  # full re-encode of the (cropped) context
        return logits[:, -1, :], None
    if isinstance(cache, CUDAGraphStep):
        return cache(idx[:, -1:]), cache  # the one new token
    if cache is not None:
        logits, _ = model(idx[:, cache.pos:], cache=cache)  # only the unseen tokens
        return logits[:, -1, :], cache
    p = next(model.parameters())  # the prompt, all of it at once
    cache = KVCache(model.config, idx.size(0), p.device, p.dtype)
    logits, _ = model(idx, cache=cache)
    if cuda_graph and idx.size(1) < bs:  # room for at least one more token
        cache = CUDAGraphStep(model, cache)
    return logits[:, -1, :], cache


class CUDAGraphStep:
    """The KV cache's one-token step, captured once as a CUDA graph and then replayed.

    On a GPU, one new token of a small model is a few dozen tiny kernels, and launching them
    one by one from Python takes longer than running them: the cache alone gave the baby GPT
    1.11x. A CUDA graph records the launches once; a replay submits them all in one call. It
    replays fixed work on fixed memory, so the step is written with no shape or address that
    changes: the token goes in through one buffer (self.idx), the position is a (1,) tensor on
    the device that the step advances itself, and attention covers all block_size slots of the
    cache with those past pos masked out (KVCache.update_static).
    """

    def __init__(self, model: GPT, cache: KVCache):
        self.model, self.cache, self.pos = model, cache, cache.pos  # pos: filled, an int
        device = cache.k[0].device
        cache.pos = torch.tensor([self.pos], device=device)  # from now on on the device
        self.idx = torch.zeros(cache.k[0].size(0), 1, dtype=torch.long, device=device)  # (B, 1)
        # Autocast normally caches each weight's low-precision copy until its context exits;
        # a graph would keep reading that freed memory. Without the cache, the casts are
        # recorded in the graph and redone at each replay.
        on = torch.is_autocast_enabled("cuda")
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=on,
                                  cache_enabled=False)
        side = torch.cuda.Stream(device)  # warm up off the main stream, as capture requires
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), autocast:
            for _ in range(2):  # writes slot pos only, which the first real step overwrites
                cache.pos.fill_(self.pos)
                model(self.idx, cache=cache)
        torch.cuda.current_stream(device).wait_stream(side)
        cache.pos.fill_(self.pos)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), autocast:  # records; runs nothing
            self.logits, _ = model(self.idx, cache=cache)  # (B, 1, V), rewritten by each replay

    def __call__(self, idx_next):
        """The new tokens (B, 1) -> the logits (B, V) after them (valid until the next call)."""
        if self.pos >= self.model.config.block_size:
            raise ValueError(f"the cache holds block_size {self.model.config.block_size} "
                             "positions, all filled")
        self.idx.copy_(idx_next)
        self.graph.replay()
        self.pos += 1
        return self.logits[:, -1, :]


@torch.no_grad()
def generate_stream(model: GPT, idx, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    cuda_graph: bool | None = None):
    """Yield the next token ids (B, 1) of idx (B, T), one step at a time, as they are sampled:
    generate_plain's loop, with next_logits feeding the model only what its cache has not seen,
    and sample_next_token doing the temperature, the filters and the draw.
    cuda_graph (None: on CUDA with use_cache) replays each cached step as a CUDAGraphStep;
    True off CUDA raises ValueError."""
    if cuda_graph and not idx.is_cuda:
        raise ValueError(f"cuda_graph needs a CUDA device, not {idx.device.type}")
    cuda_graph = use_cache and (idx.is_cuda if cuda_graph is None else cuda_graph)
    cache = None
    with eval_mode(model):  # no dropout while generating; restored even if stopped early
        for _ in range(max_new_tokens):
            logits, cache = next_logits(model, idx, cache, use_cache, cuda_graph)
            idx_next = sample_next_token(logits, temperature, top_k, top_p, generator)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
            yield idx_next


@torch.no_grad()
def generate(model: GPT, idx, max_new_tokens: int, *args, **kwargs):
    """Extend idx (B, T) by max_new_tokens sampled tokens: (B, T + max_new_tokens), the same
    tokens as generate_plain, faster. Takes generate_stream's settings (temperature, top_k,
    top_p, generator, use_cache, cuda_graph)."""
    new = generate_stream(model, idx, max_new_tokens, *args, **kwargs)
    return torch.cat([idx, *new], dim=1)


# -----------------------------------------------------------------------------
# Beam search: the likeliest continuations rather than sampled ones


@torch.no_grad()
def beam_search(model: GPT, idx, max_new_tokens: int, beam_width: int,
                eot_token: int | None = None, use_cache: bool = True):
    """The beam_width most likely continuations of one prompt idx (1, T), best first.

    A beam's score is its total log-probability, sum_t log p(x_t | x_<t) over the new
    tokens. Each step extends every beam by every token and keeps the beam_width best, so
    with beam_width 1 this is greedy decoding, and with beam_width >= V^(n-1) it is an
    exhaustive search over n new tokens. Beams live in the batch dimension (K rows), and
    the KVCache rows are reordered to follow the beams that survive.
    A beam that has produced eot_token is finished: its only continuation is eot_token
    again, at no cost, so it keeps its score while the others grow. The search stops early
    once every beam is finished.
    Returns beams (K, T + steps) and their scores (K,).
    """
    eot = -1 if eot_token is None else eot_token  # -1: no token finishes a beam
    scores = torch.zeros(1, device=idx.device)  # (K,) with K = 1 beam, the prompt, at first
    done = torch.zeros(1, dtype=torch.bool, device=idx.device)  # (K,) has produced eot
    cache = None
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits, cache = next_logits(model, idx, cache, use_cache)
            logp = F.log_softmax(logits.float(), dim=-1)  # (K, V) log p(next token | beam)
            V = logp.size(-1)
            logp[done] = float("-inf")  # a finished beam can only go on with eot,
            logp[done, eot] = 0.0  # at no cost: log 1 = 0
            cand = (scores[:, None] + logp).view(-1)  # (K*V,) every beam times every token
            K = min(beam_width, int(torch.isfinite(cand).sum()))  # never keep an impossible one
            scores, best = cand.topk(K)  # (K,) sorted, best first
            rows, tokens = best // V, best % V  # (K,) the beam each extends, and its new token
            idx = torch.cat((idx[rows], tokens[:, None]), dim=1)  # (K, T+1)
            done = done[rows] | (tokens == eot)
            if cache is not None:
                cache.reorder(rows)
            if done.all():
                break
    return idx, scores


# -----------------------------------------------------------------------------
# OpenAI's GPT-2 weights, through Hugging Face transformers

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M, 1558M params


def from_pretrained(name_or_dir: str, dropout: float = 0.0) -> GPT:
    """GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl': downloaded from the Hugging
    Face hub) or a folder written by transformers' save_pretrained. Raises ValueError when
    transformers is missing or the weights cannot be loaded."""
    try:  # optional: only this function needs transformers
        from transformers import AutoConfig, GPT2LMHeadModel
    except ImportError:
        raise ValueError("GPT-2 weights need transformers: pip install transformers") from None
    if name_or_dir not in GPT2_NAMES and not Path(name_or_dir).is_dir():
        raise ValueError(f"{name_or_dir!r} is neither a folder nor one of {GPT2_NAMES}")
    # offline, the hub client retries for half a minute: look in the local cache alone
    from plumbing import hub_unreachable  # (plumbing imports this file: imported here)
    offline = not Path(name_or_dir).is_dir() and hub_unreachable()
    try:
        hf_config = AutoConfig.from_pretrained(name_or_dir, local_files_only=offline)
        if hf_config.model_type != "gpt2":
            raise ValueError(f"it holds a {hf_config.model_type!r} model, not 'gpt2'")
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir, config=hf_config,
                                             local_files_only=offline)
    except Exception as e:  # noqa: BLE001 (offline, missing files, bad JSON: many types)
        why = ("the Hugging Face hub cannot be reached and it is not in the local cache"
               if offline else e)
        raise ValueError(f"cannot load GPT-2 from {name_or_dir!r}: {why}") from None
    c = hf_config
    # Our Block is GPT-2's: GELU with the tanh approximation (HF's 'gelu_new'), LayerNorm
    # eps 1e-5 (PyTorch's default), MLP width 4C, attention scaled by 1/sqrt(hs), tied
    # input and output embeddings. Refuse variants rather than load them subtly wrong.
    if (c.activation_function not in ("gelu_new", "gelu_pytorch_tanh")
            or c.layer_norm_epsilon != 1e-5 or c.n_inner not in (None, 4 * c.n_embd)
            or not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx
            or not c.tie_word_embeddings):
        raise ValueError(f"{name_or_dir!r} is a GPT-2 variant this model does not implement")
    config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                       n_head=c.n_head, n_embd=c.n_embd, dropout=dropout, bias=True)
    model = GPT(config)
    ours = model.state_dict()  # views of our parameters: copy_ writes into the model
    # older transformers versions keep the causal mask as buffers; we build ours on the fly
    theirs = {k: v for k, v in hf.state_dict().items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if ours.keys() != theirs.keys():
        raise ValueError(f"{name_or_dir!r} has other parameters than GPT-2: "
                         f"{sorted(ours.keys() ^ theirs.keys())[:3]}")
    # HF stores these four as Conv1D, weight (in, out): the transpose of nn.Linear's (out, in)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
              "mlp.c_proj.weight")
    with torch.no_grad():
        for k, v in theirs.items():
            ours[k].copy_(v.t() if k.endswith(conv1d) else v)
    return model


def crop_block_size(model: GPT, block_size: int) -> None:
    """Use a shorter context than the model was trained with (GPT-2's 1024 is a lot for
    fine-tuning on a CPU): keep the first block_size position embeddings."""
    if block_size > model.config.block_size:
        raise ValueError(f"cannot grow the context from {model.config.block_size} to "
                         f"{block_size}")
    model.config.block_size = block_size
    if "wpe" in model.transformer:
        wpe = model.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight[:block_size].detach().clone())
        wpe.num_embeddings = block_size


def grow_vocab(model: GPT, vocab_size: int) -> None:
    """Give the model vocab_size tokens by adding rows to its token embedding, which the tied
    lm_head shares: new tokens, such as a chat template's 4 markers, for a model pretrained
    without them. Each new row is the mean of the existing rows. A new token then starts as an
    "average token": its embedding is like the tokens the model knows, and its logit is about
    their average, never one that stands out the way a random row's can (Hewitt 2021,
    "Initializing new word embeddings for pretrained language models"). The old rows are not
    touched, so for inputs of old tokens the old tokens' logits are exactly what they were."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
    wte = model.transformer.wte
    w = wte.weight.detach()
    mean = w.float().mean(dim=0, keepdim=True).to(w.dtype)  # (1, C)
    wte.weight = nn.Parameter(torch.cat([w, mean.expand(vocab_size - old, -1)]).clone())
    wte.num_embeddings = vocab_size
    model.lm_head.weight = wte.weight  # still tied: the output layer grows with it
    model.lm_head.out_features = vocab_size
    model.config.vocab_size = vocab_size
