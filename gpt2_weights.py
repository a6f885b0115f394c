"""
OpenAI's GPT-2 weights in Hugging Face's format, and the model surgery a fine-tune needs.

    from gpt2_weights import crop_block_size, from_pretrained, grow_vocab
    model = from_pretrained("gpt2")     # OpenAI's weights, via Hugging Face transformers
    crop_block_size(model, 256)         # a shorter context than GPT-2's 1024
    grow_vocab(model, 50261)            # room for new tokens, such as a chat template's markers

from_pretrained loads 'gpt2' (to 'gpt2-xl') from the Hugging Face Hub, or a folder written by
transformers' save_pretrained, into gpt.py's GPT; transformers is needed for this alone.
"""

import os
import socket
import urllib.parse
from pathlib import Path

import torch
from torch import nn

from gpt import GPT, GPTConfig

# -----------------------------------------------------------------------------
# Can the Hugging Face Hub be reached?


def hub_unreachable() -> bool:
    """True when not even a connection to the Hugging Face Hub opens. datasets and transformers
    would then retry for half a minute before failing; in offline mode they fail at once, or
    read a copy in their cache. Not checked when offline mode or a proxy is set already: those
    decide for themselves. (prepare.py's --hf_dataset and from_pretrained below ask.)"""
    if any(os.environ.get(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY",
                                       "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return True
    return False


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
