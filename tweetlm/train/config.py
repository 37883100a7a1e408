"""TrainConfig: everything a training run needs, as frozen dataclasses read from TOML.

A run's config comes from, in order: the defaults below, a TOML file (`--config`, or RUN/config.toml
when resuming), then a few CLI flags and `--set section.key=value` overrides. An unknown key, a value of
the wrong type or an invalid value is a UserError naming the key. The resolved config is written to
RUN/config.toml before step 0, and reading that file back gives the same TrainConfig.
Top-level keys hold paths, run length, batch, seed and device; the sections are [model], [optim], [eval]
and [checkpoint]. Examples: configs/tiny.toml, configs/demo.toml.
"""

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from tweetlm.errors import UserError, check
from tweetlm.model.llama import ModelConfig
from tweetlm.model.sizing import PRESETS, config_from_depth, preset


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """[model]: the shape, by preset name or by depth (model/sizing.py derives the rest); tiny if neither. The
    mixture-of-experts fields, when set, replace the preset's (ModelConfig in model/llama.py says what each is):
    `--set model.experts=8 --set model.experts_active=2` makes any shape an MoE."""

    preset: str | None = None
    depth: int | None = None
    seq_len: int = 256  # training context in tokens; also the model's max_seq_len
    experts: int | None = None  # routed experts per block (0: dense)
    experts_active: int | None = None  # experts per token (top-k)
    shared_experts: int | None = None  # experts every token also goes through
    expert_dim: int | None = None  # an expert's width (default: the shape's ffn_dim)
    router_aux_coef: float | None = None  # load-balancing loss weight (default 0.01)
    router_z_coef: float | None = None  # router z-loss weight (default 0.001)

    def __post_init__(self):
        check(self.preset is None or self.preset in PRESETS, "model.preset", self.preset, f"choose one of {', '.join(PRESETS)}")
        check(self.preset is None or self.depth is None, "model.depth", self.depth, "set model.preset or model.depth, not both")
        check(self.depth is None or self.depth >= 1, "model.depth", self.depth, "must be a positive integer")
        check(self.seq_len >= 8, "model.seq_len", self.seq_len, "must be at least 8")

    def experts_fields(self) -> dict:
        """The mixture-of-experts fields set here, as ModelConfig keywords."""
        names = ("experts", "experts_active", "shared_experts", "expert_dim", "router_aux_coef", "router_z_coef")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def resolve(self, *, vocab_size: int) -> ModelConfig:
        """The model's shape (ModelConfig refuses, with a ConfigError naming the field, one it cannot compute)."""
        if self.depth is not None:
            return config_from_depth(self.depth, vocab_size=vocab_size, max_seq_len=self.seq_len, **self.experts_fields())
        return preset(self.preset or "tiny", vocab_size=vocab_size, max_seq_len=self.seq_len, **self.experts_fields())


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """[optim]: optimizer and learning-rate schedule. Schedules run over the run's progress, 0 -> 1
    (steps done / steps, or training time / time budget), so one config works for both stopping rules."""

    name: str = "muon"  # "muon": Muon for hidden matrices + AdamW for the rest; "adamw": AdamW for all
    # Defaults tuned for muon on the small preset (1-minute CPU runs, lr 0.006 / 0.02 / 0.05 / 0.1 -> val bpb
    # 2.77 / 2.68 / 2.62 / 2.63). With name = "adamw", lr applies to every matrix too: use ~0.006 there.
    lr: float = 0.05  # AdamW peak LR: the embedding (also the output head when tied) and norm weights
    matrix_lr: float = 0.02  # Muon peak LR for attention and MLP matrices (nanochat's default)
    weight_decay: float = 0.0  # decoupled; on matrices and embeddings, never on norm weights
    beta1: float = 0.9
    beta2: float = 0.95
    momentum: float = 0.95  # Muon's Nesterov momentum (modded-nanogpt)
    grad_clip: float = 1.0  # clip the global gradient norm to this
    schedule: str = "wsd"  # "wsd" (warmup-stable-decay) or "cosine"
    warmup: float = 0.02  # fraction of the run spent ramping up linearly from 0
    cooldown: float = 0.4  # wsd: final fraction of the run decaying linearly to final_lr
    final_lr: float = 0.0  # LR at the end, as a fraction of the peak

    def __post_init__(self):
        check(self.name in ("muon", "adamw"), "optim.name", self.name, "choose muon or adamw")
        check(self.schedule in ("wsd", "cosine"), "optim.schedule", self.schedule, "choose wsd or cosine")
        for key in ("lr", "matrix_lr", "grad_clip"):
            check(getattr(self, key) > 0, f"optim.{key}", getattr(self, key), "must be positive")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be 0 or more")
        for key in ("beta1", "beta2", "momentum"):
            check(0 <= getattr(self, key) < 1, f"optim.{key}", getattr(self, key), "must be in [0, 1)")
        check(0 <= self.warmup < 1, "optim.warmup", self.warmup, "must be in [0, 1)")
        for key in ("cooldown", "final_lr"):
            check(0 <= getattr(self, key) <= 1, f"optim.{key}", getattr(self, key), "must be in [0, 1]")
        check(self.warmup + (self.cooldown if self.schedule == "wsd" else 0) <= 1, "optim.warmup", self.warmup,
               "warmup + cooldown must not exceed the whole run (1.0)")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """[eval]: val loss and bits-per-byte, and a few generated samples."""

    every: int = 100  # steps between val evaluations (and always at the end)
    tokens: int = 65_536  # val tokens per evaluation: the first windows of the val split, the same every time
    samples_every: int = 500  # steps between writing samples to RUN/samples.txt (and always at the end)
    samples: int = 3  # samples per write, each up to 48 new tokens, temperature 0.8

    def __post_init__(self):
        for key in ("every", "tokens", "samples_every", "samples"):
            check(getattr(self, key) >= 1, f"eval.{key}", getattr(self, key), "must be a positive integer")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """[checkpoint]: RUN/checkpoints/step-NNNNNN/, written every N steps and at the end."""

    every: int = 200
    keep: int = 2  # the last `keep` checkpoints are kept, plus the one with the best val loss

    def __post_init__(self):
        check(self.every >= 1, "checkpoint.every", self.every, "must be a positive integer")
        check(self.keep >= 1, "checkpoint.keep", self.keep, "must be at least 1 (the latest, to resume from)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    tokens: Path | None = None  # token shards folder (`tweetlm data tokenize`); fine-tuning (train/sft.py) reads none
    out: Path  # the run folder
    # The tokenizer the shards were made with (folder or tokenizer.json), copied into the run. Default: the one
    # `data tokenize` saved beside the shards, else init_from's.
    tokenizer: Path | None = None
    # Start from another run's best checkpoint (or one checkpoint folder, or an `import hf` run): its shape and
    # weights, with fresh optimizers at step 0 (continued pretraining, fine-tuning). [model] then sets seq_len only.
    init_from: Path | None = None
    steps: int | None = None  # stop after this many optimizer steps ...
    time_budget: float | None = None  # ... or after this many minutes of training (whichever comes first)
    batch_tokens: int = 16_384  # tokens per optimizer step; gradient accumulation reaches it
    micro_batch: int = 16  # sequences per forward/backward
    seed: int = 0  # weights, data order and samples: same seed, same run
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when there is one)
    compile: bool = False  # torch.compile the model
    # How the model is spread over the processes torchrun starts (docs/distributed.md): "ddp" replicates it
    # (one process: no wrapping); "fsdp" shards weights, gradients and optimizer states (FSDP2), also in one process.
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    log_every: int = 10  # steps between lines in metrics.jsonl
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.steps is None and self.time_budget is None:
            raise UserError("no stopping rule: give steps (--steps N) or time_budget in minutes (--time-budget M)")
        check(self.steps is None or self.steps >= 1, "steps", self.steps, "must be a positive integer")
        check(self.time_budget is None or self.time_budget > 0, "time_budget", self.time_budget, "must be positive (minutes)")
        check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "choose auto, cpu or cuda")
        check(self.parallel in ("ddp", "fsdp"), "parallel", self.parallel, "choose ddp or fsdp")
        # Muon orthogonalizes whole matrices; FSDP gives each rank a slice of every matrix (a gather per matrix
        # per step would undo the sharding's memory saving), so muon runs under ddp and adamw under both.
        check(not (self.parallel == "fsdp" and self.optim.name == "muon"), "parallel", self.parallel,
               "fsdp needs optim.name = adamw (--set optim.name=adamw --set optim.lr=0.006): "
               "Muon needs whole matrices; use --parallel ddp to train with Muon")
        check(self.init_from is None or (self.model.preset is None and self.model.depth is None
                                         and not self.model.experts_fields()), "init_from", self.init_from,
              "takes the model's shape from that run: drop model.preset / model.depth (--preset, --depth) and the "
              "model.experts fields")
        check(self.micro_batch >= 1, "micro_batch", self.micro_batch, "must be a positive integer")
        check(self.log_every >= 1, "log_every", self.log_every, "must be a positive integer")
        per_micro = self.micro_batch * self.model.seq_len
        check(self.batch_tokens >= per_micro and self.batch_tokens % per_micro == 0, "batch_tokens", self.batch_tokens,
               f"must be a multiple of micro_batch x model.seq_len = {self.micro_batch} x {self.model.seq_len} = {per_micro}")

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step, over all processes."""
        return self.batch_tokens // (self.micro_batch * self.model.seq_len)

    def grad_accum_per_rank(self, world: int) -> int:
        """Micro-batches per step on each of `world` processes: batch_tokens is the global batch at any world size."""
        check(self.grad_accum % world == 0, "batch_tokens", self.batch_tokens,
               f"must be a multiple of micro_batch x model.seq_len x processes = {self.micro_batch} x {self.model.seq_len} "
               f"x {world} = {self.micro_batch * self.model.seq_len * world} to split evenly over {world} processes: "
               "change batch_tokens or micro_batch")
        return self.grad_accum // world


# ---------------------------------------------------------------- TOML in and out


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path (a string)"}


def _unwrap_optional(tp):
    """int | None -> int; other types unchanged."""
    if isinstance(tp, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


def _build(cls, raw: dict, prefix: str = ""):
    """cls(**raw) with types checked and nested sections built; unknown keys name the valid ones."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        name = prefix + key
        if key not in hints:
            raise UserError(f"unknown config key {name!r}: valid keys{' in [' + prefix[:-1] + ']' if prefix else ''} are {', '.join(valid)}")
        tp = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(tp):
            check(isinstance(value, dict), name, value, f"must be a section [{name}]")
            kwargs[key] = _build(tp, value, name + ".")
            continue
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if tp is Path and isinstance(value, str):
            value = Path(value)
        check(isinstance(value, tp) and not (tp is int and isinstance(value, bool)), name, value, f"must be {_TYPE_WORDS[tp]}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing: out
        raise UserError(f"config is missing a required key ({e}): give --out, or set it in the TOML") from None


def _parse_value(text: str):
    """A --set value as TOML (3, 0.5, true, "x"); a bare word that is not TOML is a string (muon)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_set(items: list[str]) -> dict[str, object]:
    """["optim.lr=0.01", "steps=5"] -> {"optim.lr": 0.01, "steps": 5}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.01")
        out[key.strip()] = _parse_value(value.strip())
    return out


_EXCLUSIVE = {"model.depth": "preset", "model.preset": "depth"}


def load_config(path: Path | None = None, overrides: dict[str, object] | None = None) -> TrainConfig:
    """Defaults <- TOML file at `path` <- overrides {"section.key": value}; None values are left out."""
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        if dotted in _EXCLUSIVE:  # --depth on a config that names a preset (or the reverse) replaces it
            raw.get("model", {}).pop(_EXCLUSIVE[dotted], None)
        *sections, key = dotted.split(".")
        table = raw
        for section in sections:
            table = table.setdefault(section, {})
            check(isinstance(table, dict), dotted, value, f"{section} is not a section")
        table[key] = value
    return _build(TrainConfig, raw)


def _plain(obj):
    """A dataclass as TOML-ready nested dicts: Paths as strings, None left out (TOML has no null)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None}
    return str(obj) if isinstance(obj, Path) else obj


def to_toml(cfg: TrainConfig) -> str:
    return tomli_w.dumps(_plain(cfg))


# Settings a resumed run may change; any other difference would make the checkpoint mean something else.
_RESUMABLE = ("out", "steps", "time_budget", "device", "compile", "parallel", "activation_checkpointing", "log_every",
              "micro_batch", "eval.", "checkpoint.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def check_resume(saved: TrainConfig, new: TrainConfig) -> None:
    """UserError if `new` changes a setting that a resumed run must keep (model, optimizer, data, seed ...)."""
    a, b = _flat(_plain(saved)), _flat(_plain(new))
    changed = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k) and not k.startswith(_RESUMABLE)]
    if changed:
        what = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)
        raise UserError(f"--resume cannot change {what}; a resumed run may change only "
                        f"{', '.join(k.rstrip('.') for k in _RESUMABLE)}: start a new run with another --out instead")
