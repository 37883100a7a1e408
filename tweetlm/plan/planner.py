"""The compute planner: GPUs x days -> model size, tokens, memory per GPU, a layout, time and posts.

    tweetlm plan --gpus 10000 --gpu h100 --days 30
    tweetlm plan --gpus 64 --gpu h200 --days 7 --params 8B --tokens work/tokens
    tweetlm plan --gpus 1024 --gpu h100 --days 30 --moe 8x2

The budget is C = GPUs x dense bf16 peak x MFU x seconds. Training costs C ~ 6 N D FLOPs (N parameters,
D tokens; Kaplan et al. 2020, Hoffmann et al. 2022) and the compute-optimal split keeps D = r N, so
N = sqrt(C / 6r), D = r N. With --params N is given and D = C / 6N. Memory, layout and time are then worked
out for the tweetlm shape nearest N on the one sizing dial, depth (model/sizing.py).

A mixture of experts (--moe EXPERTSxACTIVE[+SHARED]: 8x2, 256x8+1) has two sizes: its FLOPs follow the active
parameters, its memory all of them. N in 6 N D is then the active count: the compute-optimal N is taken as the
active size (the dense ratio r applied to active parameters: a first guess, as MoE scaling laws differ, e.g.
Krajewski et al. 2024), while --params names the total, as MoE models are named (Grok-1's 314B), whose active
part is the chosen shape's active fraction of it. Shapes: a preset with the same experts within ~15%, else the
depth whose shape with that many full-width experts (expert_dim = ffn_dim, as Mixtral and Grok-1) comes nearest.
"""

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from tweetlm.errors import ConfigError, UserError, check
from tweetlm.model.llama import ModelConfig
from tweetlm.model.sizing import (PRESETS, attention_params, config_from_depth, flops_per_token, mlp_params, num_params,
                                  preset)
from tweetlm.plan.accelerators import Accelerator, accelerator
from tweetlm.tokenizer.shards import read_index

DAY = 86_400.0
# Tokens per parameter at the compute optimum: ~20 in Chinchilla (Hoffmann et al. 2022, table 3: 70B on 1.4T);
# nanochat measured ~10.5 for its architecture (karpathy/nanochat scripts/base_train.py, --target-param-data-ratio).
CHINCHILLA_TOKENS_PER_PARAM = 20.0
# `make demo` on ../shared/data (TweetEval + XLM-T, vocab 8192): 2,297,846 train tokens / 85,801 posts, each post
# counted with its boundary token. A larger vocabulary gives somewhat fewer tokens per post.
DEFAULT_TOKENS_PER_POST = 26.8
DEFAULT_SOURCE = "default, measured by `make demo` on the bundled tweets at vocab 8192; --tokens DIR measures yours"
DEFAULT_VOCAB = 32768
# Left free on each GPU: CUDA context, cuBLAS/NCCL workspaces (a few GB) and allocator fragmentation.
MEMORY_RESERVE = 0.10
_MAX_DEPTH = 1024  # 4.6e13 parameters: past the optimum of a million B200s for a year (1.5e13)
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
_MOE_FIELDS = ("experts", "experts_active", "shared_experts")


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    gpus: int
    days: float
    gpu: str = "h100"
    mfu: float = 0.40  # model FLOPs utilization; Llama 3 405B reached 38-43% on 8-16k H100s (Llama 3 paper, table 4)
    params: float | None = None  # plan for this size instead of the compute-optimal one
    tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM
    seq_len: int = 2048
    vocab_size: int | None = None  # None: the token folder's, else DEFAULT_VOCAB
    optimizer: str = "muon"  # as train's optim.name: the optimizer state differs (see _memory)
    tokens_dir: Path | None = None  # a `tweetlm data tokenize` folder to measure tokens per post from
    experts: int = 0  # a mixture of experts (--moe 8x2): routed experts per block; 0: dense
    experts_active: int = 2  # experts per token
    shared_experts: int = 0  # experts every token goes through as well

    def __post_init__(self):
        check(isinstance(self.gpus, int) and self.gpus >= 1, "gpus", self.gpus, "must be a positive integer")
        check(math.isfinite(self.days) and self.days > 0, "days", self.days, "must be a positive number of days")
        check(math.isfinite(self.mfu) and 0 < self.mfu <= 1, "mfu", self.mfu, "must be in (0, 1], e.g. 0.40")
        check(self.params is None or (math.isfinite(self.params) and self.params >= 1e4), "params", self.params,
               "must be at least 10K parameters")
        check(math.isfinite(self.tokens_per_param) and self.tokens_per_param > 0, "tokens_per_param",
               self.tokens_per_param, "must be positive (20 in Chinchilla)")
        check(isinstance(self.seq_len, int) and self.seq_len >= 8, "seq_len", self.seq_len, "must be at least 8")
        check(self.vocab_size is None or self.vocab_size >= 8, "vocab_size", self.vocab_size, "must be at least 8")
        check(self.optimizer in ("muon", "adamw"), "optimizer", self.optimizer, "choose muon or adamw")
        accelerator(self.gpu)  # an unknown name fails here, listing the known ones
        check(self.experts == 0 or 2 <= self.experts_active <= self.experts, "moe", f"{self.experts}x{self.experts_active}",
              "needs 2 to EXPERTS active experts, e.g. 8x2")
        check(self.shared_experts == 0 or self.experts > 0, "moe", self.shared_experts, "shared experts need routed ones")

    @property
    def moe(self) -> dict:
        """The expert fields as ModelConfig keywords: {} for a dense plan."""
        return {name: getattr(self, name) for name in _MOE_FIELDS} if self.experts else {}


@dataclass(frozen=True, kw_only=True)
class Memory:
    """Bytes per GPU. States are sharded over the FSDP group; activations are per GPU's micro-batch."""

    weights: float
    grads: float
    optimizer: float
    buffers: float  # transient: FSDP's gathered units and the logits at the loss
    activations: float  # without activation checkpointing
    activations_checkpointed: float  # with it, per block

    def total(self, checkpointing: bool) -> float:
        acts = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.grads + self.optimizer + self.buffers + acts


@dataclass(frozen=True, kw_only=True)
class Plan:
    config: PlanConfig
    accelerator: Accelerator
    budget: float  # FLOPs
    params: float  # N: compute-optimal, or --params (an MoE's total)
    active_params: float  # the N in 6 N D: params for a dense model; an MoE's active parameters
    tokens: float  # D = budget / 6N
    model: ModelConfig  # the tweetlm shape nearest N
    shape: str  # how to ask `tweetlm train` for it: --preset NAME or --depth N (with --set model.experts=...)
    model_params: int
    model_active_params: int  # = model_params for a dense model
    model_flops_per_token: float  # training FLOPs per token, attention included (model/sizing.py)
    preset: str | None  # the nearest named preset with the same experts (None: no preset has them)
    preset_params: int | None
    preset_flops_per_token: float | None
    memory: Memory  # at the chosen layout
    usable_memory: float  # bytes per GPU after MEMORY_RESERVE
    checkpointing: bool
    fits: bool
    shard_group: int  # FSDP degree; the GPUs form gpus / shard_group replicas of it (HSDP)
    micro_batch: int  # sequences per GPU per forward/backward
    grad_accum: int
    batch_tokens: int  # global batch per optimizer step
    suggested_batch_tokens: float
    step_seconds: float
    steps: int
    days: float  # steps x step time
    tokens_per_post: float
    tokens_per_post_source: str
    posts: float
    corpus_tokens: int | None  # the train split of --tokens DIR
    notes: list[str]  # warnings and advice, one line each

    def to_dict(self) -> dict:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
        return asdict(self) | {"config": config, "memory_total": self.memory.total(self.checkpointing)}


def parse_count(text: str) -> float:
    """'70B' -> 7e10; also 405b, 1.5B, 125M, 7e9, 1T."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?)\s*([kmbt]?)\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"--params {text!r}: give a count such as 70B, 1.5B, 125M or 7e9")
    return float(match[1]) * _SUFFIX[match[2].lower()]


def parse_moe(text: str) -> dict:
    """'8x2' -> {experts: 8, experts_active: 2, shared_experts: 0}; '256x8+1' adds 1 shared expert."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*(?:\+\s*(\d+))?\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"--moe {text!r}: give EXPERTSxACTIVE[+SHARED], e.g. 8x2 (Mixtral, Grok-1) or 256x8+1 (DeepSeek-V3)")
    return dict(zip(_MOE_FIELDS, (int(match[1]), int(match[2]), int(match[3] or 0))))


def activation_bytes(cfg: ModelConfig, tokens: int, *, checkpointing: bool) -> float:
    """Bytes autograd keeps for the backward of `tokens` tokens (micro-batch x seq_len), counted per tensor as
    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4.1)
    count them, for tweetlm's block under bf16 autocast; tests/test_plan.py checks it against the bytes
    autograd saves. With SDPA (flash) attention the paper's 5 a s^2 b score term is not stored. Per token
    and layer (h = dim, f = ffn_dim, r = kv_heads / heads):
      two RMSNorms: fp32 input and fp32 normalized output (CPU's decomposed kernel; a fused one keeps less) 16h
      attention: the normalized input cast to bf16 once per projection (autocast does not cache
        activations) 3 x 2h, q 2h, k and v 2 x 2rh, the output 2h (also wo's input: flash kernels lay it
        out [B, T, H, Hd], so the reshape is a view)
      MLP: two bf16 casts of the input 4h, w1 and w3 outputs, silu output and w2's input 4 x 2f
    -> 30h + 4rh + 8f bytes (52h at r = 1/4, f = 8h/3; the paper's GPT block: 34h). The head keeps its fp32
    norm (8h), a bf16 cast (2h) and the fp32 log-softmax (4V). Full checkpointing keeps each block's fp32
    input (4h: the paper's 2sbh, at 16 bits) and one block's activations while it is recomputed.
    An MoE block (E experts, k active of width F, s shared) keeps, in place of the MLP's 4h + 8f: the router's
    fp32 input 4h (the norm's output, which the MLP's bf16 casts do not keep), its fp32 logits and probabilities
    8E; for each of the k copies of a token, the two bf16 casts of its input 4h, the expert's 8F as the MLP's,
    its bf16 output for the weighting 2h, three int64 indices (top-k, gather, unsort) and two fp32 weights 32;
    the shared experts as an MLP of width sF, 4h + 8sF."""
    h, f, r = cfg.dim, cfg.ffn_dim, cfg.n_kv_heads / cfg.n_heads
    if cfg.experts:
        shared = 4 * h + 8 * cfg.shared_experts * cfg.expert_width if cfg.shared_experts else 0
        mlp = 4 * h + 8 * cfg.experts + cfg.experts_active * (6 * h + 8 * cfg.expert_width + 32) + shared
    else:
        mlp = 4 * h + 8 * f
    layer = 26 * h + 4 * r * h + mlp
    head = 10 * h + 4 * cfg.vocab_size
    blocks = cfg.depth * 4 * h + layer if checkpointing else cfg.depth * layer
    return tokens * (blocks + head)


def plan(config: PlanConfig) -> Plan:
    acc = accelerator(config.gpu)
    budget = config.gpus * acc.bf16_flops * config.mfu * config.days * DAY
    n = config.params or math.sqrt(budget / (6 * config.tokens_per_param))
    tokens_per_post, source, corpus_tokens, index_vocab = _measure_posts(config.tokens_dir)
    vocab = config.vocab_size or index_vocab or DEFAULT_VOCAB
    # N is an MoE's total with --params, its active size at the compute optimum (one count when dense)
    by_active = config.params is None
    kind = config.moe or {"experts": 0}
    presets = {name: preset(name, vocab_size=vocab, max_seq_len=config.seq_len) for name in PRESETS}
    presets = {name: cfg for name, cfg in presets.items() if all(getattr(cfg, k) == v for k, v in kind.items())}
    gaps = {name: abs(math.log(num_params(cfg, active=by_active) / n)) for name, cfg in presets.items()}
    nearest = min(gaps, key=gaps.get, default=None)
    # A preset within ~15% of N is the shape to train (named shapes such as Llama 3 8B are what presets are
    # for); otherwise the depth whose derived shape comes nearest.
    if nearest is not None and gaps[nearest] < 0.15:
        model, shape = presets[nearest], f"--preset {nearest}"
    else:
        model = _nearest_depth(n, vocab, config.seq_len, config.moe, active=by_active)
        shape = f"--depth {model.depth}" + "".join(f" --set model.{k}={v}" for k, v in config.moe.items() if v)
    active = n if by_active else n * (num_params(model, active=True) / num_params(model))  # n itself when dense
    tokens = budget / (6 * active)
    fpt = flops_per_token(model, config.seq_len)

    # DeepSeek LLM (Bi et al. 2024, arXiv:2401.02954, section 3.1): B_opt = 0.2920 C^0.3271 tokens.
    suggested = 0.2920 * budget**0.3271
    per_sequence = config.gpus * config.seq_len  # tokens per step for each sequence of micro-batch
    # Layout: without activation checkpointing if anything fits (it costs a third more compute); then the
    # largest micro-batch (fuller matmuls) up to the suggested global batch, on the fewest GPUs per FSDP group
    # (all-gathers stay on the fastest links; the groups replicate, HSDP); gradient accumulation fills the rest.
    usable = acc.memory * (1 - MEMORY_RESERVE)
    groups = sorted({2**k for k in range(config.gpus.bit_length()) if config.gpus % 2**k == 0} | {config.gpus})
    cap = max(1, int(suggested // per_sequence))
    options = [(ckpt, g, _micro_batch(model, config, g, ckpt, usable, cap)) for ckpt in (False, True) for g in groups]
    fitting = [o for o in options if o[2]]
    fits = bool(fitting)
    pool = [o for o in fitting if o[0] == fitting[0][0]] if fits else [(True, config.gpus, 1)]
    checkpointing, group, micro = max(pool, key=lambda o: (o[2], -o[1]))
    accum = max(1, round(suggested / (micro * per_sequence)))
    batch = accum * micro * per_sequence
    step = batch * fpt / (config.gpus * acc.bf16_flops * config.mfu)
    steps = math.ceil(tokens / batch)
    memory = _memory(model, config, group, micro)

    notes = []
    if not fits:
        notes.append("does not fit even sharded over every GPU with activation checkpointing at micro-batch 1: "
                     "lower --seq-len, use GPUs with more memory, or add tensor/pipeline parallelism (not in tweetlm)")
    if checkpointing:
        notes.append("activation checkpointing recomputes each block's forward: the GPUs do ~4/3 of the model "
                     f"FLOPs, so {config.mfu:.0%} MFU means {config.mfu * 4 / 3:.0%} hardware FLOPs utilization")
    if per_sequence > suggested:
        notes.append(f"one sequence per GPU already makes a global batch of {_count(per_sequence)} tokens, "
                     f"{per_sequence / suggested:.1f}x the ~{_count(suggested)} suggested for this budget: "
                     "past it a larger batch needs more tokens for the same loss; tensor or context parallelism "
                     "(not in tweetlm) lets GPUs share a sequence")
    if config.experts:
        notes.append(f"the experts are sharded by FSDP like every weight, so each block's forward gathers all "
                     f"{config.experts} of them ({_gb(2 * mlp_params(model))} in bf16); expert parallelism (not in "
                     "tweetlm) would keep each GPU's experts local and send it the tokens instead")
    if corpus_tokens:
        epochs = tokens / corpus_tokens
        notes.append(f"the corpus's train split holds {_count(corpus_tokens)} tokens: {_count(epochs)} epochs of it"
                     + (" (beyond ~4 epochs repeated tokens are worth much less: Muennighoff et al. 2023, "
                        "'Scaling Data-Constrained Language Models')" if epochs > 4 else ""))
    preset_cfg = presets.get(nearest)
    return Plan(config=config, accelerator=acc, budget=budget, params=n, active_params=active, tokens=tokens,
                model=model, shape=shape, model_params=num_params(model),
                model_active_params=num_params(model, active=True), model_flops_per_token=fpt, preset=nearest,
                preset_params=num_params(preset_cfg) if preset_cfg else None,
                preset_flops_per_token=flops_per_token(preset_cfg, config.seq_len) if preset_cfg else None,
                memory=memory, usable_memory=usable, checkpointing=checkpointing, fits=fits,
                shard_group=group, micro_batch=micro, grad_accum=accum, batch_tokens=batch,
                suggested_batch_tokens=suggested, step_seconds=step, steps=steps, days=steps * step / DAY,
                tokens_per_post=tokens_per_post, tokens_per_post_source=source, posts=tokens / tokens_per_post,
                corpus_tokens=corpus_tokens, notes=notes)


def _measure_posts(tokens_dir: Path | None) -> tuple[float, str, int | None, int | None]:
    """(tokens per post, where it comes from, train tokens, vocab size) from a token folder's index.json."""
    if tokens_dir is None:
        return DEFAULT_TOKENS_PER_POST, DEFAULT_SOURCE, None, None
    index = read_index(tokens_dir)
    train = index["splits"].get("train", [])
    tokens, docs = sum(s["tokens"] for s in train), sum(s["docs"] for s in train)
    if not docs:
        raise UserError(f"{tokens_dir} has no train posts to measure tokens per post on: tokenize a corpus with a train split")
    source = f"measured on {tokens_dir}: {tokens:,} train tokens / {docs:,} posts, boundary tokens included"
    return tokens / docs, source, tokens, index["vocab_size"]


def _nearest_depth(n: float, vocab: int, seq_len: int, moe: dict, *, active: bool) -> ModelConfig:
    """config_from_depth (with the experts `moe`) at the depth whose parameter count (active ones if `active`)
    is nearest n (in ratio); depths whose derived head count does not divide the width are skipped."""
    best, best_gap = None, math.inf
    for depth in range(1, _MAX_DEPTH + 1):
        try:
            cfg = config_from_depth(depth, vocab_size=vocab, max_seq_len=seq_len, **moe)
        except ConfigError:  # a depth whose heads do not divide the width
            continue
        gap = math.log(num_params(cfg, active=active) / n)
        if abs(gap) < best_gap:
            best, best_gap = cfg, abs(gap)
        if gap > 0.7:  # twice n: parameters only grow with depth
            return best
    raise UserError(f"{_count(n)} parameters is beyond depth {_MAX_DEPTH}: plan for fewer GPUs or days, or give --params")


def _micro_batch(model: ModelConfig, config: PlanConfig, group: int, checkpointing: bool, usable: float, cap: int) -> int:
    """The largest power-of-two micro-batch up to cap that fits; 0 if not even one sequence does."""
    micro = 0
    while (larger := 2 * micro or 1) <= cap and _memory(model, config, group, larger).total(checkpointing) <= usable:
        micro = larger
    return micro


def _memory(model: ModelConfig, config: PlanConfig, shard: int, micro_batch: int) -> Memory:
    """FSDP2 (torch.distributed.fsdp.fully_shard per block and at the root) with mixed precision as in torchtitan
    (param_dtype bf16, reduce_dtype fp32). Per parameter, sharded over the group: fp32 weights 4 B (tweetlm keeps
    fp32 master weights and computes in bf16), fp32 gradients 4 B, optimizer state: AdamW's two fp32 moments 8 B;
    Muon's one fp32 momentum 4 B for the attention and MLP matrices, AdamW's 8 B for the rest. Transient, whole:
    two units of bf16 weights (the one computing, the one prefetched) and one unit's gradient in bf16 and fp32,
    10 B per parameter of the largest unit; and the logits at the loss, bf16 and fp32, 6 B per token and word."""
    total = num_params(model)  # an MoE's memory holds every expert
    matrices = model.depth * (attention_params(model) + mlp_params(model))  # the Muon set: wq wk wv wo, w1 w2 w3 (router)
    optimizer = 8 * total if config.optimizer == "adamw" else 4 * matrices + 8 * (total - matrices)
    root = total - matrices - 2 * model.depth * model.dim  # embedding, untied head, final norm
    tokens = micro_batch * config.seq_len
    return Memory(weights=4 * total / shard, grads=4 * total / shard, optimizer=optimizer / shard,
                  buffers=10 * max(matrices / model.depth, root) + 6 * tokens * model.vocab_size,
                  activations=activation_bytes(model, tokens, checkpointing=False),
                  activations_checkpointed=activation_bytes(model, tokens, checkpointing=True))


def _count(x: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            v = x / scale
            return (f"{v:.3g}" if v < 1000 else f"{v:,.0f}") + suffix
    return f"{x:.3g}"


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB"


def format_plan(p: Plan) -> str:
    """The human-readable report `tweetlm plan` prints."""
    c, a, m, md = p.config, p.accelerator, p.memory, p.model
    per = "active parameter" if md.experts else "parameter"
    why = f"compute-optimal at {c.tokens_per_param:g} tokens per {per}" if c.params is None else "--params"
    model = f"{_count(p.params)} parameters ({why})"
    shape = f"{md.n_heads} heads ({md.n_kv_heads} kv), ffn {md.ffn_dim}"
    params = f"{_count(p.model_params)} parameters"
    nearest = (f"{p.preset}: {_count(p.preset_params)} parameters, {p.preset_flops_per_token:.3g} FLOPs/token" if p.preset
               else "none with these experts")
    if md.experts:
        moe = f"{md.experts}x{md.experts_active}" + (f"+{md.shared_experts}" if md.shared_experts else "")
        model = (f"{_count(p.active_params)} active parameters ({why}; mixture of experts {moe})" if c.params is None
                 else f"{_count(p.params)} parameters, {_count(p.active_params)} active (--params; mixture of experts {moe})")
        shape = f"{md.n_heads} heads ({md.n_kv_heads} kv), {moe} experts of width {md.expert_width}"
        params += f" ({_count(p.model_active_params)} active: {p.model_active_params / p.model_params:.1%})"
    rows = [
        f"tweetlm plan: {c.gpus:,} x {a.name} for {c.days:g} days at {c.mfu:.0%} MFU "
        f"({a.bf16_flops / 1e12:,.0f} TFLOP/s dense bf16, {_gb(a.memory)}, {a.bandwidth / 1e12:.2f} TB/s per GPU)",
        "",
        f"compute budget   {p.budget:.3g} FLOPs",
        f"model            {model}",
        f"tokens           {_count(p.tokens)} (C / 6N: {p.tokens / p.active_params:,.1f} per {per})",
        f"tweetlm shape    {p.shape}{'' if p.shape.startswith('--depth') else f' (depth {md.depth})'}: dim {md.dim}, "
        f"{shape}, vocab {md.vocab_size}",
        f"                 {params}, {p.model_flops_per_token:.3g} FLOPs/token at seq {c.seq_len}",
        f"nearest preset   {nearest}",
        "",
        f"memory per GPU   FSDP over {p.shard_group:,} GPUs, micro-batch {p.micro_batch} x {c.seq_len} tokens",
        f"  weights        {_gb(m.weights):>11}   fp32, sharded",
        f"  gradients      {_gb(m.grads):>11}   fp32, sharded",
        f"  optimizer      {_gb(m.optimizer):>11}   {c.optimizer}, fp32, sharded",
        f"  buffers        {_gb(m.buffers):>11}   gathered bf16 blocks, logits",
        f"  activations    {_gb(m.activations):>11}   without checkpointing: total {_gb(m.total(False))}",
        f"                 {_gb(m.activations_checkpointed):>11}   with checkpointing:    total {_gb(m.total(True))}",
        f"  usable         {_gb(p.usable_memory):>11}   {'fits' if p.fits else 'DOES NOT FIT'} "
        f"{'with' if p.checkpointing else 'without'} activation checkpointing",
        "",
        f"layout           {c.gpus // p.shard_group:,} replica(s) of an FSDP group of {p.shard_group:,} GPU(s)",
        f"  per GPU        {p.micro_batch} sequence(s) of {c.seq_len} tokens x {p.grad_accum} accumulation step(s)",
        f"  global batch   {_count(p.batch_tokens)} tokens (~{_count(p.suggested_batch_tokens)} suggested: DeepSeek LLM's 0.292 C^0.327)",
        f"time             {p.step_seconds:,.2f} s per step x {p.steps:,} steps = {p.days:,.1f} days (with attention FLOPs)",
        "",
        f"posts            {_count(p.posts)} at {p.tokens_per_post:.1f} tokens per post ({p.tokens_per_post_source})",
    ]
    if p.notes:
        rows += [""] + [f"note: {n}" for n in p.notes]
    return "\n".join(rows)
