"""The tweetlm decoder: a Llama-style transformer in one file.

Token embedding -> depth x [RMSNorm -> grouped-query attention with rotary positions -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output head. No biases. Weights are laid out as in
Hugging Face's LlamaForCausalLM (rotary on split halves, "rotate_half"), so export is a rename.
With `experts > 0` each block's MLP is a mixture of SwiGLU experts (MoE: Mixtral, Grok-1), routed top-k without
dropping tokens; everything else is the same model.

This forward serves training, evaluation and reference. Decoding with a KV cache runs in infer/runner.py
on the same weights and rotary tables, tested against this forward.

Shape legend: B batch, T tokens, D dim, H query heads, K kv heads, Hd head dim, V vocabulary;
MoE: N tokens (B x T), E experts, k active experts per token, F an expert's width.
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
    # Mixture of experts (the MoE module below). experts = 0 is the dense model: an MLP of ffn_dim per block.
    experts: int = 0  # routed SwiGLU experts per block
    experts_active: int = 2  # experts each token goes through (top-k)
    shared_experts: int = 0  # experts every token also goes through, as one MLP (DeepSeek-V3: 1)
    expert_dim: int | None = None  # an expert's SwiGLU width; None: ffn_dim (Mixtral, Grok-1)
    router_aux_coef: float = 0.01  # weight of the load-balancing loss in training (Switch Transformer's alpha)
    router_z_coef: float = 0.001  # weight of the router z-loss in training (ST-MoE)

    def __post_init__(self):
        for name in ("vocab_size", "depth", "dim", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "experts_active"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"model.{name}", value, "must be a positive integer")
        for name in ("experts", "shared_experts"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, f"model.{name}", value, "must be 0 or a positive integer")
        check(self.expert_dim is None or (isinstance(self.expert_dim, int) and self.expert_dim >= 1), "model.expert_dim",
              self.expert_dim, "must be a positive integer (or left out: ffn_dim)")
        for name in ("router_aux_coef", "router_z_coef"):
            check(getattr(self, name) >= 0, f"model.{name}", getattr(self, name), "must be 0 or more")
        if self.experts:
            # with one active expert Mixtral's renormalised weight is always 1: the router would get no gradient from the loss
            check(2 <= self.experts_active <= self.experts, "model.experts_active", self.experts_active,
                  f"must be from 2 to model.experts = {self.experts}")
        check(self.shared_experts == 0 or self.experts > 0, "model.shared_experts", self.shared_experts,
              "needs routed experts too: set model.experts")
        check(self.dim % self.n_heads == 0, "model.dim", self.dim,
              f"not divisible by model.n_heads = {self.n_heads}: pick heads that divide the width")
        check(self.n_heads % self.n_kv_heads == 0, "model.n_heads", self.n_heads, f"not a multiple of model.n_kv_heads = "
              f"{self.n_kv_heads}: each kv head serves a whole group of query heads")
        check(self.head_dim % 2 == 0, "model.dim", self.dim, f"gives an odd head dim {self.head_dim} (dim / n_heads): "
              "rotary embeddings need an even one")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def expert_width(self) -> int:
        """An expert's SwiGLU width: expert_dim, else ffn_dim."""
        return self.expert_dim or self.ffn_dim


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

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """A mixture of E SwiGLU experts; each token goes through the k its router picks (plus the shared experts).

    Routing is Mixtral's: fp32 router logits [N, E], softmax over all experts, the top k, their k weights
    renormalised to sum to 1; the output is the weighted sum of the k experts' outputs. transformers'
    MixtralSparseMoeBlock computes exactly this, so a run exports to the Mixtral layout (router.weight, and
    w1 | w3 -> gate_up_proj, w2 -> down_proj) with the same logits to rounding (shared experts have no place
    there). Softmax rather than DeepSeek-V3's sigmoid: softmax scores compete (an expert gains weight only at the
    others' expense), which is what the Switch load-balancing loss below is written for (it takes the mean router
    probability per expert, a distribution); a sigmoid scores each expert alone and goes with DeepSeek-V3's
    bias-based, loss-free balancing over 256 fine-grained experts. The router runs in fp32 under autocast
    (ST-MoE, Zoph et al. 2022: the exponentials of a bf16 router were a source of instability) and holds E x D
    weights: its cost is nothing beside the experts'.

    Dropless: every token reaches its k experts, however many pick the same one (no capacity factor, nothing
    skipped), as in MegaBlocks (Gale et al. 2022) and torchtitan. The N x k (token, expert) pairs are sorted by
    expert, the tokens gathered in that order, each expert multiplies its contiguous group, and the results go back
    to the tokens' order. The per-expert loop needs the group sizes on the host (one sync per block); a grouped
    GEMM (torch._grouped_mm, bf16 on recent GPUs) would remove it.

    In training mode a forward keeps, for the trainer (Llama.router_loss, Llama.router_stats):
      aux_loss  Switch Transformer's load-balancing loss (Fedus et al. 2022, eq. 4): E x sum_e f_e P_e, f_e the
                fraction of the N x k assignments that went to expert e, P_e the mean router probability of e.
                1.0 when routing is perfectly balanced, up to E / k when every token picks the same k; only P
                carries gradient.
      z_loss    ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2, keeping the logits small.
      load      tokens per expert [E] (no gradient).
    Not in eval mode: nothing is kept there, so a model loaded for inference holds no graph (and deep-copies).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, width, D = cfg.experts, cfg.expert_width, cfg.dim
        self.k = cfg.experts_active
        self.router = nn.Linear(D, E, bias=False)
        # The experts stacked, each in nn.Linear's [out, in] layout: expert e's gate is w1[e] [F, D].
        self.w1 = nn.Parameter(torch.empty(E, width, D))  # gate
        self.w3 = nn.Parameter(torch.empty(E, width, D))  # up
        self.w2 = nn.Parameter(torch.empty(E, D, width))  # down
        self.shared = MLP(D, cfg.shared_experts * width) if cfg.shared_experts else None
        self.aux_loss = self.z_loss = self.load = None  # the last training forward's (see the docstring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # [N, D]
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # [N, E] fp32

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:  # rows [n_e, D] -> [n_e, D]
            return F.linear(F.silu(F.linear(rows, self.w1[e])) * F.linear(rows, self.w3[e]), self.w2[e])

        out, probs, load = mixture(x, logits, self.k, expert)
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training:
            E = logits.shape[1]
            fraction = load / (B * T * self.k)  # [E] f_e, sums to 1
            self.aux_loss = E * (fraction * probs.mean(dim=0)).sum()
            self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()
            self.load = load
        return out.view(B, T, D)


def mixture(x: torch.Tensor, logits: torch.Tensor, k: int, expert) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens x [N, D] by router logits [N, E] (fp32) to their top k experts and mix the outputs: Mixtral's
    routing and the dropless dispatch of MoE's docstring. expert(e, rows [n_e, D]) -> [n_e, D] runs expert e on the
    tokens routed to it (model/llama.py's MoE and infer/runner.py's decoding each multiply in their own way).
    -> the mixed output [N, D] in x's dtype, the router probabilities [N, E], tokens per expert [E]."""
    N, D = x.shape
    probs = logits.softmax(dim=-1)  # [N, E]
    weights, chosen = probs.topk(k, dim=-1)  # [N, k] each
    weights = weights / weights.sum(dim=-1, keepdim=True)  # [N, k], rows sum to 1
    # pair i = (token i // k, its (i % k)-th expert), sorted by expert, token order kept within
    pairs = chosen.flatten()  # [N*k]
    order = pairs.argsort(stable=True)  # [N*k]
    load = torch.bincount(pairs, minlength=logits.shape[1])  # [E] tokens per expert
    grouped = x[order // k]  # [N*k, D], expert 0's tokens first
    outputs = [expert(e, rows) for e, rows in enumerate(grouped.split(load.tolist())) if len(rows)]
    y = torch.cat(outputs)[order.argsort()].view(N, k, D)  # [N, k, D], back in token order
    return (y * weights[..., None]).sum(dim=1).to(x.dtype), probs, load


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.experts else MLP(cfg.dim, cfg.ffn_dim)

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
        In an MoE block each expert is initialised as the dense MLP (w1[e], w3[e] as inputs, w2[e] as a residual
        write; the shared experts' MLP likewise): the output is a convex combination of experts (the k weights sum
        to 1), so it starts at the dense MLP's scale. The router is an input matrix like the others: unit-scale
        logits, so at init the softmax is neither flat (top-k ties) nor saturated, routing follows the token and
        spreads the load (tests/test_model_moe.py measures it on real posts).
        Tested to train stably from `tiny` to `125m` (tests/test_model_llama.py); larger presets keep the same rules.
        """
        cfg = self.config
        std = cfg.dim**-0.5
        for name, p in self.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", "mlp.w2")):  # mlp.w2: the experts' stacked down matrices
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

    def router_loss(self) -> torch.Tensor:
        """What training adds to the cross-entropy for an MoE model, from the last training-mode forward:
        router_aux_coef x the load-balancing loss + router_z_coef x the z-loss, each the mean over the blocks (so
        a coefficient means the same at any depth; Switch sums over layers). The trainer calls it right after
        each forward and backpropagates the sum with the loss (train/loop.py): being plain tensors of that
        forward's graph, the terms need nothing from torch.compile, DDP or FSDP2 beyond what the loss does."""
        layers = self._moe_layers()
        aux = torch.stack([m.aux_loss for m in layers]).mean()
        z = torch.stack([m.z_loss for m in layers]).mean()
        return self.config.router_aux_coef * aux + self.config.router_z_coef * z

    @torch.no_grad()
    def router_stats(self) -> torch.Tensor:
        """[MoE blocks, 2 + E] from the last training-mode forward: per block the load-balancing loss, the
        z-loss (both without their coefficients) and the tokens routed to each expert; one tensor, so that the
        trainer sums it over micro-batches and ranks in one all-reduce."""
        return torch.stack([torch.cat([m.aux_loss[None], m.z_loss[None], m.load.float()]) for m in self._moe_layers()])

    def _moe_layers(self) -> list[MoE]:
        layers = [m for m in self.modules() if isinstance(m, MoE)]  # found through any wrapper of the blocks
        assert layers and layers[0].aux_loss is not None, "router terms need an MoE model and a training-mode forward"
        return layers
