"""
Fast generation: the KV cache, the CUDA-graph step and its static cache, streaming, beams.

    import inference
    out = inference.generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200)
    for tok in inference.generate_stream(model, idx, 100):  # the same, one (B, 1) token at a time
        ...
    beams, scores = inference.beam_search(model, idx, max_new_tokens=50, beam_width=4)  # (1, T)

gpt.py's generate_plain is the lesson; this file gives the same tokens faster. The model meets
a cache through one argument, forward(idx, cache=cache), and calls two of its methods:
positions(T), the new tokens' positions (T,), and update(layer, k, v), which stores a layer's new
keys and values and returns every key and value to attend over with the mask of who sees whom.
KVCache is the cache; StaticKVCache is the same keys and values with every shape fixed, for the
step a CUDAGraphStep records once and replays. Shapes use gpt.py's alphabet.
"""

from contextlib import contextmanager

import torch
from torch.nn import functional as F

from gpt import GPT, GPTConfig, eval_mode, sample_next_token

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

    k[layer], v[layer]: (B, nh, block_size, hs), filled up to `pos` (an int).
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # how many positions are filled (update moves it on, after the last layer)
        self.block_size = config.block_size

    def positions(self, T: int) -> torch.Tensor:
        """The positions (T,) of T new tokens: pos, ..., pos + T - 1. Raises ValueError when
        they do not fit in block_size."""
        if self.pos + T > self.block_size:
            raise ValueError(f"sequence of {self.pos + T} tokens is longer than block_size "
                             f"{self.block_size}")
        return torch.arange(T, device=self.k[0].device) + self.pos

    def update(self, layer: int, k, v):
        """Store one layer's new keys and values k, v (B, nh, T, hs) after the `pos` kept ones.

        Returns every key and value so far (B, nh, S, hs), S = pos + T, and the mask (T, S):
        new query i sits at position pos + i and sees keys 0..pos + i. For one new token the
        mask is None: it sees every key (no mask at all is the fastest path). Once the last
        layer has stored them, pos moves on by T.
        """
        p, T = self.pos, k.size(2)
        self.k[layer][:, :, p:p + T] = k
        self.v[layer][:, :, p:p + T] = v
        mask = None if T == 1 else torch.ones(T, p + T, dtype=torch.bool,
                                              device=k.device).tril(p)
        if layer == len(self.k) - 1:  # every layer has stored these T positions
            self.pos += T
        return self.k[layer][:, :, :p + T], self.v[layer][:, :, :p + T], mask

    def reorder(self, rows: torch.Tensor):
        """Keep batch rows `rows` (beam search picks which beams survive)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


# -----------------------------------------------------------------------------
# The same step as a CUDA graph: every shape fixed, recorded once, replayed


class StaticKVCache:
    """A filled KVCache's keys and values (the same tensors), for steps of one new token
    (T = 1) with every shape and address fixed, as a CUDA graph needs.

    pos is an int, as in KVCache (CUDAGraphStep moves it on after each replay); pos_device is
    the same number, (1,), on the device: the step reads it there and moves it on itself (a
    tensor's += is in place, so a CUDA graph's replay moves its position on by itself).
    """

    def __init__(self, cache: KVCache):
        self.k, self.v, self.pos = cache.k, cache.v, cache.pos  # pos: filled, an int
        device = cache.k[0].device
        self.pos_device = torch.tensor([cache.pos], device=device)  # (1,) the same, on the device
        self.slots = torch.arange(cache.k[0].size(2), device=device)  # (block_size,)

    def positions(self, T: int) -> torch.Tensor:
        """The new token's position (1,), read on the device (T is 1)."""
        return torch.arange(T, device=self.pos_device.device) + self.pos_device

    def update(self, layer: int, k, v):
        """KVCache.update for one new token (T = 1), every shape fixed. The new key and value go
        in slot pos (index_copy_ reads pos on the device), and attention runs over all
        block_size slots (B, nh, block_size, hs), the mask (1, block_size) hiding those past
        pos: the same result, since a masked key gets a weight of exactly 0.
        """
        self.k[layer].index_copy_(2, self.pos_device, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.pos_device, v.to(self.v[layer].dtype))
        mask = (self.slots <= self.pos_device)[None, :]
        if layer == len(self.k) - 1:  # every layer has stored this position
            self.pos_device += 1
        return self.k[layer], self.v[layer], mask


@contextmanager
def written_out_attention(model: GPT):
    """Run the block with every layer's attention through the written-out formula
    (attn.explicit), then put each layer's choice back."""
    attns = [block.attn for block in model.transformer.h]
    was = [attn.explicit for attn in attns]
    for attn in attns:
        attn.explicit = True
    try:
        yield model
    finally:
        for attn, explicit in zip(attns, was):
            attn.explicit = explicit


class CUDAGraphStep:
    """The KV cache's one-token step, captured once as a CUDA graph and then replayed.

    On a GPU, one new token of a small model is a few dozen tiny kernels, and launching them
    one by one from Python takes longer than running them: the cache alone gave the baby GPT
    1.11x. A CUDA graph records the launches once; a replay submits them all in one call. It
    replays fixed work on fixed memory, so the step is written with no shape or address that
    changes: the token goes in through one buffer (self.idx), the position is a (1,) tensor on
    the device that the step advances itself, and attention covers all block_size slots of the
    cache with those past pos masked out (StaticKVCache).
    """

    def __init__(self, model: GPT, cache: KVCache):
        self.model = model
        self.cache = cache = StaticKVCache(cache)  # from now on the position is on the device
        device = cache.pos_device.device
        self.idx = torch.zeros(cache.k[0].size(0), 1, dtype=torch.long, device=device)  # (B, 1)
        # Autocast normally caches each weight's low-precision copy until its context exits;
        # a graph would keep reading that freed memory. Without the cache, the casts are
        # recorded in the graph and redone at each replay.
        on = torch.is_autocast_enabled("cuda")
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=on,
                                  cache_enabled=False)
        # The fused kernels split their work by query: one query over block_size keys keeps a
        # handful of the GPU's cores busy. The formula's two matmuls split it by key: the baby
        # GPT's graphed step went from 1,086 to 3,114 tokens/s on an H200 (bench.py). So the
        # graph records the written-out formula, whichever path the model is set to.
        with written_out_attention(model):
            side = torch.cuda.Stream(device)  # warm up off the main stream, as capture requires
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), autocast:
                for _ in range(2):  # writes slot pos only, which the first real step overwrites
                    cache.pos_device.fill_(cache.pos)
                    model(self.idx, cache=cache)
            torch.cuda.current_stream(device).wait_stream(side)
            cache.pos_device.fill_(cache.pos)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), autocast:  # records; runs nothing
                self.logits, _ = model(self.idx, cache=cache)  # (B, 1, V), rewritten each replay

    @property
    def pos(self) -> int:
        """How many positions the cache holds: an int, as KVCache.pos."""
        return self.cache.pos

    def __call__(self, idx_next):
        """The new tokens (B, 1) -> the logits (B, V) after them (valid until the next call)."""
        if self.cache.pos >= self.model.config.block_size:
            raise ValueError(f"the cache holds block_size {self.model.config.block_size} "
                             "positions, all filled")
        self.idx.copy_(idx_next)
        self.graph.replay()
        self.cache.pos += 1
        return self.logits[:, -1, :]


# -----------------------------------------------------------------------------
# The generation loop, with the cache


def next_logits(model: GPT, idx, cache, use_cache: bool = True, cuda_graph: bool = False):
    """Logits (B, V) for the token after idx (B, T), and the cache to pass next time.

    With use_cache, only the tokens the cache has not seen are fed. Learned position
    embeddings tie a key to its position, so once the context is longer than block_size the
    cached keys are stale: from then on each step re-encodes the last block_size tokens,
    exactly what the no-cache path does. With cuda_graph, the steps after the prompt replay a
    CUDAGraphStep (above), which then stands in for the cache.
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
