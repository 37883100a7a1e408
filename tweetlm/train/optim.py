"""Optimizers and learning-rate schedules.

- "adamw": AdamW for every parameter (fused kernel on CUDA), weight decay on matrices and embeddings only.
- "muon": Muon for the hidden matrices (attention wq/wk/wv/wo, MLP w1/w2/w3; in an MoE the router and the
  experts' stacked w1/w2/w3) and AdamW for the rest (embedding, output head, norm weights), as in modded-nanogpt
  (KellerJordan/modded-nanogpt, train_gpt.py) and nanochat (karpathy/nanochat, nanochat/muon.py). Muon is SGD
  with Nesterov momentum whose update is replaced by the nearest semi-orthogonal matrix, computed with a few
  Newton-Schulz iterations. A stacked expert weight [E, out, in] is E matrices, not one: each expert's update is
  orthogonalized on its own, all E in one batched iteration, and scaled by its own out/in, exactly as if each
  expert were a separate nn.Linear (orthogonalizing the [E*out, in] concatenation instead would couple the
  experts' updates and shrink each by ~sqrt(E)). The router [E, D] is a hidden matrix like the others: under
  AdamW's lr here (the embedding's 0.05) each of its weights would move by about its whole initial scale a step.

Schedules map the run's progress (0 -> 1) to a multiplier of each group's peak LR, stored in the group as
"peak_lr"; `set_lr` applies them.
"""

import math

import torch
from torch import nn

from tweetlm.train.config import OptimConfig

# Coefficients of the quintic Newton-Schulz iteration, tuned by Keller Jordan (modded-nanogpt) to push
# singular values towards 1 as fast as possible in 5 steps (they end in ~[0.7, 1.2], which trains as well as exact).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """g [m, n], or a stack [E, m, n] of E matrices each on its own, -> an approximation of U V^T where
    g = U S V^T (all singular values ~1). The iteration is stable in bf16 (modded-nanogpt runs it so), which is
    where it is cheap."""
    a, b, c = _NS_COEFFS
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix x x^T
        x = x.mT
    # spectral norm <= Frobenius norm <= 1, inside the iteration's basin (per matrix of a stack)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT  # [m, m], or [E, m, m]
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalized updates for 2D parameters (and stacks of them, [E, rows, cols], matrix by
    matrix); lr is scaled by sqrt(max(1, rows/cols)) so that tall and wide matrices get the same per-element
    update RMS (modded-nanogpt's rule)."""

    def __init__(self, params, *, lr: float, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = orthogonalize(p.grad.lerp(buf, group["momentum"]), dtype=self.ns_dtype)  # Nesterov
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)


def _ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where matmuls run natively in it: CUDA, and CPUs with AVX512-BF16 (where Newton-Schulz on a
    256 x 704 matrix takes 2.0 ms in bf16 against 6.7 ms in fp32, Zen 5, 2 threads); fp32 on other CPUs,
    where bf16 matmuls are emulated and slower."""
    if device.type == "cuda" or torch.cpu._is_avx512_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    return p.dim() in (2, 3) and name.startswith("blocks.")  # 3: an MoE's stacked experts


def build_optimizers(model: nn.Module, cfg: OptimConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """One or two optimizers whose groups carry "peak_lr"; step them all, in order, each step."""
    named = list(model.named_parameters())
    muon = [p for n, p in named if cfg.name == "muon" and _is_hidden_matrix(n, p)]
    adam = [(n, p) for n, p in named if not (cfg.name == "muon" and _is_hidden_matrix(n, p))]
    adam_groups = [
        dict(params=[p for _, p in adam if p.dim() >= 2], weight_decay=cfg.weight_decay, lr=cfg.lr, peak_lr=cfg.lr),
        dict(params=[p for _, p in adam if p.dim() < 2], weight_decay=0.0, lr=cfg.lr, peak_lr=cfg.lr),  # norm weights
    ]
    optimizers = [torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=device.type == "cuda")]
    if muon:
        muon_group = dict(params=muon, lr=cfg.matrix_lr, peak_lr=cfg.matrix_lr)
        optimizers.append(Muon([muon_group], lr=cfg.matrix_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               ns_dtype=_ns_dtype(device)))
    return optimizers


def _wsd(progress: float, cfg: OptimConfig) -> float:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): linear up, flat, linear down to final_lr."""
    if progress < cfg.warmup:
        return progress / cfg.warmup
    if progress <= 1 - cfg.cooldown:
        return 1.0
    return cfg.final_lr + (1 - cfg.final_lr) * (1 - progress) / cfg.cooldown


def _cosine(progress: float, cfg: OptimConfig) -> float:
    """Linear warmup, then half a cosine from the peak down to final_lr (Loshchilov & Hutter 2017)."""
    if progress < cfg.warmup:
        return progress / cfg.warmup
    t = (progress - cfg.warmup) / (1 - cfg.warmup)
    return cfg.final_lr + (1 - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * t))


SCHEDULES = {"wsd": _wsd, "cosine": _cosine}


def lr_multiplier(progress: float, cfg: OptimConfig) -> float:
    return SCHEDULES[cfg.schedule](min(max(progress, 0.0), 1.0), cfg)


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * multiplier
