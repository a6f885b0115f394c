"""
Muon: an optimizer for the weight matrices inside the blocks, beside AdamW for the rest.

    optimizer = Muon(groups, AdamW.adamw_step, lr=1e-3, betas=(0.9, 0.99))  # as train.py makes it

The groups marked "muon" take Muon's update; every other group takes the AdamW update it is
given (train.py's AdamW.adamw_step: train.py imports this file, so this file does not import
it). One optimizer holds every group's state, so a checkpoint has one state_dict for both.
"""

from collections.abc import Callable

import torch

from devices import cpu_has_native_bf16

# -----------------------------------------------------------------------------
# Muon, with the AdamW update for the other groups


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024: MomentUm Orthogonalized by Newton-Schulz) for the groups
    marked "muon", the weight matrices inside the blocks; AdamW for the other groups.

    For a weight matrix W (rows x cols) with gradient G, at each step:
        B <- mu * B + G                       momentum
        U = G + mu * B                        Nesterov: the gradient one step ahead
        O = newton_schulz(U)                  U's singular values all set to about 1
        W <- W - lr * sqrt(max(1, rows / cols)) * O
    Every direction of the update moves by the same amount, whatever its gradient's size:
    rare directions learn as fast as common ones. The fused attention matrix c_attn holds
    three maps (q, k, v) with separate jobs: each third is orthogonalised on its own.

    adamw_update(optimizer, group) updates one of the other groups, keeping its moments in
    optimizer.state: train.py gives AdamW.adamw_step.
    """

    def __init__(self, params, adamw_update: Callable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1e-2):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.adamw_update = adamw_update

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("muon"):
                self.muon_step(group)
            else:
                self.adamw_update(self, group)
        return loss

    def muon_step(self, group):
        lr, mu = group["lr"], group["momentum"]
        by_shape = {}  # (rows, cols) -> [(p, U)]: orthogonalised together, in one batch
        for p, pieces in zip(group["params"], group["pieces"], strict=True):
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf = state["momentum_buffer"]
            g = p.grad.float()
            buf.mul_(mu).add_(g)
            u = g.add(buf, alpha=mu).view(pieces, -1, p.size(1))  # (pieces, rows, cols)
            by_shape.setdefault(tuple(u.shape[1:]), []).append((p, u))
        for (rows, cols), todo in by_shape.items():
            o = newton_schulz(torch.cat([u for _, u in todo]))  # (all pieces, rows, cols)
            for (p, u), o_p in zip(todo, o.split([u.size(0) for _, u in todo]), strict=True):
                p.add_(o_p.view_as(p).to(p.dtype), alpha=-lr * max(1.0, rows / cols) ** 0.5)


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About U V^T for G = U S V^T (..., rows, cols): the nearest matrix with every singular
    value 1. Scaled so no singular value exceeds 1, X takes `steps` of the quintic iteration
        A = X X^T,  X <- a X + (b A + c A^2) X,  (a, b, c) = (3.4445, -4.7750, 2.0315)
    which maps each singular value s to a s + b s^3 + c s^5, pulling it into a band around 1
    in a few matmuls (the coefficients trade exactness for speed: s ends in about [0.7, 1.2];
    one that starts far below the rest, as a square matrix's smallest can, may lag behind).
    bf16 where matmuls run it natively: a GPU, or a CPU with AVX512-BF16 or AMX (there about
    twice as fast as fp32, and the iteration does not need fp32's precision); fp32 on other
    CPUs, which emulate bf16 and are slower in it."""
    a, b, c = 3.4445, -4.7750, 2.0315
    bf16 = G.is_cuda or (G.device.type == "cpu" and cpu_has_native_bf16())
    X = G.bfloat16() if bf16 else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide side: A is then the smaller of X X^T and X^T X
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)  # Frobenius >= spectral norm
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)
