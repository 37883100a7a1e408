"""The tweetlm decoder: a Llama-style transformer in one file.

Token embedding -> depth x [RMSNorm -> grouped-query attention with rotary positions -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output head. No biases. Weights are laid out as in
Hugging Face's LlamaForCausalLM (rotary on split halves, "rotate_half"), so export is a rename.

This forward serves training, evaluation and reference. Decoding with a KV cache runs in infer/runner.py
on the same weights and rotary tables, tested against this forward.

Shape legend: B batch, T tokens, D dim, H query heads, K kv heads, Hd head dim, V vocabulary.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tweetlm.errors import check

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (padding, prompt tokens in SFT)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int
    depth: int  # number of blocks; the one sizing dial (see model/sizing.py)
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int = 1024
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm on queries and keys per head (OLMo 2, Qwen 3): steadier at high LR
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "depth", "dim", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"model.{name}", value, "must be a positive integer")
        check(self.dim % self.n_heads == 0, "model.dim", self.dim,
              f"not divisible by model.n_heads = {self.n_heads}: pick heads that divide the width")
        check(self.n_heads % self.n_kv_heads == 0, "model.n_heads", self.n_heads, f"not a multiple of model.n_kv_heads = "
              f"{self.n_kv_heads}: each kv head serves a whole group of query heads")
        check(self.head_dim % 2 == 0, "model.dim", self.dim, f"gives an odd head dim {self.head_dim} (dim / n_heads): "
              "rotary embeddings need an even one")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [T, Hd], for integer positions [T]. Computed per forward in fp32: no buffers to
    carry through meta-device construction or checkpoints, and it costs T x Hd/2 multiplications."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, Hd/2]
    angles = torch.cat((angles, angles), dim=-1)  # [T, Hd], halves as in HF's rotate_half layout
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, Hd] rotated by position: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Hd]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, Hd]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, Hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, D]


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Every parameter's initialization, in one place (call once, after moving off the meta device):
        - embed, output and every attention/MLP input matrix: normal(0, dim^-1/2), so that with unit-RMS
          activations each projection (and the tied logits) starts at unit scale whatever the width;
        - attention wo and MLP w2 (the writes into the residual stream): additionally / sqrt(2 * depth), as
          GPT-2 scales residual projections, so the stream's variance stays put as depth grows;
        - every RMSNorm weight: 1.
        Tested to train stably from `tiny` to `125m` (tests/test_model_llama.py); larger presets keep the same rules.
        """
        cfg = self.config
        std = cfg.dim**-0.5
        for name, p in self.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / (2 * cfg.depth) ** 0.5, generator=generator)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> the final normed hidden states [B, T, D] that the output head reads (a
        classification head pools them: eval/finetune.py). Causal: position t sees tokens 0..t only."""
        B, T = tokens.shape
        assert T <= self.config.max_seq_len, f"{T} positions > max_seq_len {self.config.max_seq_len}"
        cos, sin = rotary(torch.arange(T, device=tokens.device), self.config.head_dim, self.config.rope_theta)
        x = self.embed(tokens)  # [B, T, D]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *, reduction: str = "mean"):
        """tokens [B, T] -> logits [B, T, V] (fp32), or with targets [B, T] the cross-entropy loss:
        a scalar for reduction="mean", [B, T] for "none" (0 where targets == IGNORE_INDEX)."""
        B, T = tokens.shape
        x = self.hidden(tokens)  # [B, T, D]
        logits = F.linear(x, self.embed.weight if self.output is None else self.output.weight).float()  # [B, T, V]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=IGNORE_INDEX, reduction=reduction)
        return loss if reduction == "mean" else loss.view(B, T)
