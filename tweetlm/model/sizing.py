"""Model sizing from one dial, depth, plus parameter and FLOP counts. Pure functions.

depth -> dim = 64 * depth (nanochat's aspect ratio), heads of 64 dims (128 from dim 2048 up, as Llama 3),
kv heads = heads / 4 where that divides (Llama 3's 4:1 grouping), else / 2, SwiGLU width 8/3 * dim rounded up
to a multiple of 64 (the parameter count of a 4x GELU MLP, Shazeer 2020). Presets are names for depths, with
explicit overrides where a well-known shape is the point (the Llama 3.2 1B and Llama 3 8B shapes, and the
mixtures of experts of Grok-1 and DeepSeek-V3). An MoE has two sizes: all its parameters (memory, checkpoints)
and the active ones a token goes through (FLOPs); `num_params(cfg, active=True)` counts the latter.
"""

from tweetlm.errors import check
from tweetlm.model.llama import ModelConfig

ASPECT_RATIO = 64

# name -> (depth, overrides). Parameter counts at vocab 32768 print with `tweetlm model presets`.
PRESETS: dict[str, tuple[int, dict]] = {
    "tiny": (2, dict(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=192)),  # ~1M parameters, for tests
    "small": (4, dict(n_heads=4, n_kv_heads=2)),  # dim 256: the CPU demo
    "125m": (12, {}),  # dim 768, GPT-2 small class
    "1b": (16, dict(dim=2048, n_heads=32, n_kv_heads=8, ffn_dim=8192)),  # Llama 3.2 1B shape
    "8b": (32, dict(dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, tie_embeddings=False, rope_theta=500_000.0)),  # Llama 3 8B shape
    # small with 8 experts of half its MLP width, 2 active: small's FLOPs per token, 4x its MLP parameters (CPU).
    # Load-balancing loss at 0.1, not Switch's 0.01: at 0.01 the router collapsed within 5 steps of the CPU demo's
    # Muon LR (one expert took up to 93% of the tokens at step 100; 0.1: 0.74-1.35x the mean), val bpb at 100 steps
    # 2.477 at 0.01, 2.476 at 0.1, 2.471 at 0.3; 16 experts of 176, 4 active: 2.513 (bench/moe.py's data and batch)
    "small-moe": (4, dict(n_heads=4, n_kv_heads=2, experts=8, experts_active=2, expert_dim=352, router_aux_coef=0.1)),
    # Grok-1 (xai-org/grok-1, run.py and model.py): 64 layers, dim 6144, 48 heads of 128 (8 kv), 8 experts of width
    # 32768 (widening factor 8 x 2/3), 2 active, tied embeddings, vocab 131072: 315.7B (314B published), 26.5% active
    "grok-1": (64, dict(dim=6144, n_heads=48, n_kv_heads=8, ffn_dim=32768, experts=8, experts_active=2)),
    # DeepSeek-V3's experts (arXiv:2412.19437; config.json of deepseek-ai/DeepSeek-V3): 61 layers, dim 7168, 256 routed
    # experts of width 2048, 8 active, 1 shared, untied head, vocab 129280. Not its multi-head latent attention
    # (grouped-query attention here, 56 heads of 128 and 14 kv), nor its 3 dense first layers (all 61 are MoE here),
    # sigmoid routing with loss-free balancing, or its multi-token prediction module: 700.2B total (671B published,
    # +4.4%), 34.0B active (37B, -8.2%)
    "deepseek-v3": (61, dict(dim=7168, experts=256, experts_active=8, shared_experts=1, expert_dim=2048,
                             tie_embeddings=False)),
}


def _round_up(x: float, multiple: int) -> int:
    return int(-(-x // multiple) * multiple)


def config_from_depth(depth: int, *, vocab_size: int, max_seq_len: int = 1024, **overrides) -> ModelConfig:
    """The default shape at this depth; any ModelConfig field can be overridden by keyword."""
    check(isinstance(depth, int) and depth >= 1, "model.depth", depth, "must be a positive integer")
    dim = overrides.pop("dim", ASPECT_RATIO * depth)
    n_heads = overrides.pop("n_heads", dim // (128 if dim >= 2048 else 64) or 1)
    n_kv_heads = overrides.pop("n_kv_heads", n_heads // 4 if n_heads % 4 == 0 else n_heads // 2 if n_heads % 2 == 0 else n_heads)
    ffn_dim = overrides.pop("ffn_dim", _round_up(8 * dim / 3, 64))
    return ModelConfig(vocab_size=vocab_size, depth=depth, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       ffn_dim=ffn_dim, max_seq_len=max_seq_len, **overrides)


def preset(name: str, *, vocab_size: int, max_seq_len: int = 1024, **overrides) -> ModelConfig:
    """The named shape; keyword overrides replace its fields (--set model.experts=8 on a dense preset)."""
    check(name in PRESETS, "model.preset", name, f"choose one of {', '.join(PRESETS)}")
    depth, fields = PRESETS[name]
    return config_from_depth(depth, vocab_size=vocab_size, max_seq_len=max_seq_len, **{**fields, **overrides})


def attention_params(cfg: ModelConfig) -> int:
    """One block's attention: wq, wk, wv, wo (and the q/k norm weights)."""
    hd = cfg.head_dim
    return cfg.dim * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + (2 * hd if cfg.qk_norm else 0)


def mlp_params(cfg: ModelConfig, *, active: bool = False) -> int:
    """One block's MLP: the dense SwiGLU, or the MoE's router, experts and shared experts; active=True counts
    the experts one token goes through (experts_active of them, and the shared ones)."""
    if not cfg.experts:
        return 3 * cfg.dim * cfg.ffn_dim
    routed = cfg.experts_active if active else cfg.experts
    return cfg.dim * cfg.experts + 3 * cfg.dim * cfg.expert_width * (routed + cfg.shared_experts)


def num_params(cfg: ModelConfig, *, embedding: bool = True, active: bool = False) -> int:
    """Exact parameter count of Llama(cfg); embedding=False leaves out the input embedding table
    (a lookup, no FLOPs), keeping the output head even when tied. active=True counts, in an MoE, the
    parameters one token goes through (total and active are equal in a dense model)."""
    block = attention_params(cfg) + mlp_params(cfg, active=active) + 2 * cfg.dim  # + two RMSNorm weights
    table = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else table
    if not embedding:
        return cfg.depth * block + cfg.dim + table
    return table + cfg.depth * block + cfg.dim + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 per matrix parameter a token goes through (embedding
    lookup excluded, output head included; in an MoE the active parameters, router included) plus attention
    scores and values, 12 * depth * dim * seq_len, as in the PaLM paper's appendix B and nanochat's
    estimate_flops (causal masking not discounted). Memory, by contrast, follows all the parameters."""
    return 6 * num_params(cfg, embedding=False, active=True) + 12 * cfg.depth * cfg.dim * seq_len

