"""
Generate text from a trained checkpoint.

    python sample.py                                        # from out/ckpt.pt
    python sample.py --start "ROMEO:" --num_samples 3 --max_new_tokens 200
    python sample.py --temperature 0                        # greedy: always the likeliest token
    python sample.py --top_p 0.9 --temperature 0.8          # nucleus sampling
    python sample.py --start FILE:prompt.txt

The tokenizer is rebuilt from the meta saved inside the checkpoint, so samples always use the
vocabulary the model was trained with.
"""

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from gpt import GPT, GPTConfig
from prepare import get_tokenizer
from train import UserError, load_checkpoint, pick_device, str2bool


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample text from a trained GPT checkpoint.")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    p.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=5, help="how many samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens per sample")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="<1 sharper, >1 more random, 0 greedy")
    p.add_argument("--top_k", type=int, default=200, help="keep only the k likeliest (0: all)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="keep the smallest set of tokens with probability >= p (1: all)")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False,
                   help="torch.compile the model")
    return p


def check_args(a) -> None:
    if not 0 < a.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {a.top_p}")
    if a.temperature < 0:
        raise UserError(f"--temperature cannot be negative, got {a.temperature}")
    if a.top_k < 0 or a.num_samples <= 0 or a.max_new_tokens < 0:
        raise UserError("--top_k must be >= 0, --num_samples > 0 and --max_new_tokens >= 0")


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        path = Path(start[5:])
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompt file {path}: {e}") from None
    return start


def load_model(out_dir: Path, device) -> tuple[GPT, dict]:
    """Rebuild the model from a checkpoint alone: its config, weights and dataset meta."""
    ckpt = load_checkpoint(out_dir / "ckpt.pt", map_location=device)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval().to(device)
    return model, ckpt["meta"]


def main(argv=None) -> list[str]:
    args = get_parser().parse_args(argv)
    try:
        return sample(args)
    except UserError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def sample(args) -> list[str]:
    check_args(args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model, meta = load_model(Path(args.out_dir), device)
    if args.compile:
        model = torch.compile(model)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else \
            "float32"
    ctx = (torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))
           if dtype != "float32" else nullcontext())
    encode, decode = get_tokenizer(meta)
    prompt = read_prompt(args.start)
    try:
        start_ids = encode(prompt)
    except KeyError as e:
        raise UserError(f"{e.args[0]}; the prompt must use the training text's characters")
    if not start_ids:
        raise UserError("the prompt is empty")
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]  # (1, T)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    samples = []
    for _ in range(args.num_samples):
        t0 = time.perf_counter()
        with ctx:
            y = model.generate(x, args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k or None, top_p=args.top_p, generator=gen)
        new = y[0, len(start_ids):].tolist()
        if meta["tokenizer"] == "gpt2" and meta.get("eot_token") in new:
            new = new[:new.index(meta["eot_token"])]  # a document ended: stop there
        text = decode(start_ids + new)
        samples.append(text)
        print(text)
        dt = time.perf_counter() - t0
        print(f"---------------  ({len(new)} tokens, {len(new) / dt:.0f} tokens/s)")
    return samples


if __name__ == "__main__":
    main()
