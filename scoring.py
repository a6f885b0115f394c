"""
How surprised a model is by a text, token by token, and where it looks: scoring and attention.

    nll, n = score(model, ids)                      # mean nats per token, and how many scored
    score_file(model, ids, text, token_bytes, "some.txt")   # prints loss, perplexity, bpb
    maps = attention_maps(model, idx)               # (n_layer, nh, T, T): who attends to whom
    draw_attention(model, idx, token_bytes, "attn.png")     # a heatmap each layer and head

sample.py --score and --attention call these; each takes a model and token ids, so any
caller with a model can.
"""

import math
import sys
from contextlib import nullcontext

import torch

from errors import UserError
from gpt import GPT, eval_mode
from tokenizer import bits_per_byte

# -----------------------------------------------------------------------------
# Scoring: how surprised is the model by a text?


@torch.no_grad()
def score(model: GPT, ids: torch.Tensor, stride: int = 1,
          batch_size: int = 16) -> tuple[float, int]:
    """Mean negative log-likelihood (nats/token) of ids (N,), and how many tokens it covers.

    Token t is predicted from the up to block_size tokens before it (the first token has no
    context, so it is not scored). Every window holds L = min(block_size, N-1) inputs. The
    first scores all L of its targets; each next one slides `stride` tokens right and scores
    only the targets that are new (a target of -1 carries no loss). With stride 1 every token
    sees all the context the model can take, for one window per token; with stride s a token
    past the first window sees at least L - s + 1 tokens, for 1/s of the work. A window holds
    only L targets, so a stride wider than L slides by L: every token after the first is
    scored exactly once, at any stride.
    """
    L = min(model.config.block_size, ids.numel() - 1)
    stride = min(stride, L)  # wider would skip the targets between two windows
    ends = list(range(L, ids.numel() - 1, stride)) + [ids.numel() - 1]  # inputs ids[end-L:end]
    prevs = [0] + ends[:-1]  # targets up to ids[prev] were scored by the window before
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(ends), batch_size):  # a batch of windows per forward
            end = torch.tensor(ends[i:i + batch_size], device=ids.device)[:, None]  # (B, 1)
            prev = torch.tensor(prevs[i:i + batch_size], device=ids.device)[:, None]  # (B, 1)
            pos = end - L + torch.arange(L, device=ids.device)  # (B, L) input positions
            targets = ids[pos + 1].masked_fill(pos < prev, -1)  # (B, L) only new targets count
            _, loss = model(ids[pos], targets)  # mean over the targets that count
            n = int((targets != -1).sum())
            total, count = total + loss.item() * n, count + n
    return total / count, count


def score_file(model, ids: list[int], text: str, token_bytes, name: str, stride: int = 1,
               ctx=None) -> dict:
    """The loss of text's ids (nats per scored token), its perplexity, and its bits per byte:
    the summed loss in bits over the UTF-8 bytes scored, which compares across tokenizers
    (tokenizer.bits_per_byte, here exact: the text is at hand). Every token but the first is
    scored (nothing predicts the first), so its bytes are left out.

    ids: text encoded as the model's tokenizer encodes a document; token_bytes: id -> that
    token's bytes (tokenizer.token_bytes_fn); name: the file, as the line printed names it;
    stride: score's; ctx: the autocast context (None: none). Prints one line and returns {"loss",
    "perplexity", "tokens", "bpb", "bytes"}; fewer than 2 ids is a UserError."""
    if len(ids) < 2:
        raise UserError(f"{name} holds {len(ids)} token(s); scoring needs at least 2")
    device = next(model.parameters()).device
    with ctx or nullcontext():
        nll, n = score(model, torch.tensor(ids, device=device), stride)
    n_bytes = len(text.encode("utf-8")) - len(token_bytes(ids[0]))  # >= n: a byte a token
    bpb = bits_per_byte(nll, n, n_bytes)
    print(f"{name}: {n} tokens scored, loss {nll:.4f} nats/token, "
          f"perplexity {math.exp(nll):.2f}, {bpb:.4f} bits/byte ({n_bytes:,} bytes)")
    return {"loss": nll, "perplexity": math.exp(nll), "tokens": n, "bpb": bpb,
            "bytes": n_bytes}


# -----------------------------------------------------------------------------
# A picture of attention: who looks at whom


MAX_TOKENS, MAX_PANELS, MAX_INCHES = 64, 16, 24  # the picture's caps: it fits a screen


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """Every layer's attention weights over the prompt idx (1, T): (n_layer, nh, T, T).
    Row t holds how much token t attends to each token 0..t; each row sums to 1. With `last`,
    only the last `last` queries' weights on the last `last` keys are kept, and each layer's
    are cut as soon as it has run: memory holds one layer's full weights, not all of them."""
    idx = idx[:, -model.config.block_size:]  # the model sees at most block_size tokens
    layers = [block.attn for block in model.transformer.h]
    kept = []

    def keep(attn, inputs, output):
        kept.append(attn.att[0, :, -last:, -last:].float().cpu() if last else
                    attn.att[0].float().cpu())
        attn.att = None

    hooks = [attn.register_forward_hook(keep) for attn in layers]
    with eval_mode(model):
        for attn in layers:
            attn.explicit = True  # the written-out formula, which keeps its weights
        try:
            model(idx)
        finally:
            for attn, hook in zip(layers, hooks):
                attn.explicit = False
                hook.remove()
    return torch.stack(kept)


def pick(spec: str | None, n: int, what: str) -> list[int]:
    """'0,2' -> [0, 2]; None -> all n."""
    if spec is None:
        return list(range(n))
    try:
        chosen = [int(s) for s in spec.split(",")]
    except ValueError:
        raise UserError(f"--attention_{what}s takes numbers like 0,2, not {spec!r}") from None
    if not all(0 <= c < n for c in chosen):
        raise UserError(f"--attention_{what}s {spec}: the model has {what}s 0 to {n - 1}")
    return chosen


def draw_attention(model, x, token_bytes, path, layers: str | None = None,
                   heads: str | None = None) -> torch.Tensor:
    """Draw the chosen layers' and heads' attention over the prompt x (1, T) to the image
    `path`, a heatmap each, with the tokens on both axes; returns the weights drawn
    (layers, heads, T', T'), T' = min(T, block_size, MAX_TOKENS). token_bytes: id -> that
    token's bytes (tokenizer.token_bytes_fn), for the labels; layers, heads: which, as
    --attention_layers and --attention_heads give them ('0,2'; None: all). Raises UserError
    without matplotlib, for a layer or head the model lacks, or when path cannot be written.

    The picture is capped so a screen can show it, whatever the prompt and the model: the last
    MAX_TOKENS tokens (their weights on earlier tokens are left out, so a row may sum to less
    than 1) and the first MAX_PANELS (layer, head) panels, in a grid at most MAX_INCHES wide
    and high. What was left out is said, with the flags that pick other panels."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--attention needs matplotlib: pip install matplotlib") from None
    n_layer, n_head = model.config.n_layer, model.config.n_head
    layers = pick(layers, n_layer, "layer")
    heads = pick(heads, n_head, "head")
    seen = min(x.size(1), model.config.block_size)  # the tokens the model attends over
    maps = attention_maps(model, x, MAX_TOKENS)[layers][:, heads]  # (layers, heads, T, T)
    T = maps.size(-1)
    labels = [token_bytes(i).decode("utf-8", errors="replace") for i in x[0, -T:].tolist()]
    labels = [repr(s)[1:-1] for s in labels]  # '\n' shows as \n
    panels = [(i, j) for i in range(len(layers)) for j in range(len(heads))][:MAX_PANELS]
    cols = min(len(panels), len(heads), 4)
    rows = math.ceil(len(panels) / cols)
    size = min(max(2.0, 0.25 * T), MAX_INCHES / cols, MAX_INCHES / rows)  # inches a panel
    font = max(2.0, min(6.0, 72 * size / (T + 6)))  # a label's height: what a token row has
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(size * cols, size * rows))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (i, j) in zip(axes.flat, panels):
        ax.imshow(maps[i, j].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layers[i]}, head {heads[j]}", fontsize=8)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=font)
        ax.set_yticks(range(T), labels, fontsize=font)
        ax.set_xlabel("key (attended to)", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
    print(f"wrote {path}: attention of {len(layers)} layer(s) x {len(heads)} "
          f"head(s) over {T} tokens")
    if T < seen:
        print(f"note: drew the last {T} of the prompt's {seen} tokens (their weights on the "
              f"first {seen - T} are left out); a shorter --start shows others", file=sys.stderr)
    if len(panels) < len(layers) * len(heads):
        (i, j) = panels[-1]
        print(f"note: drew {len(panels)} of {len(layers) * len(heads)} panels (layer "
              f"{layers[0]} head {heads[0]} to layer {layers[i]} head {heads[j]}); pick others "
              f"with --attention_layers and --attention_heads, e.g. "
              f"--attention_layers={layers[-1]}", file=sys.stderr)
    return maps
