"""`tweetlm sft BASE --data FILE[:WEIGHT]... --out RUN`: fine-tune a run into a chat model on conversations.

    tweetlm data threads work/corpus --out work/threads.jsonl --split all
    tweetlm sft runs/small --data work/threads.jsonl --data work/tasks.jsonl:0.5 --out runs/small-chat --steps 300

Conversations are JSONL, one {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} a line
(docs/CONTRACTS.md, "Conversations / SFT"). Each is rendered by the chat template that serving uses
(tokenizer/chat.py) into ids and a loss mask: the targets are the assistant messages and their closing <|end|>,
every other target is IGNORE_INDEX.
- Held out: a conversation is val when the corpus split's hash (data/split.py) of its conversation_id (else
  thread_id, id, first non-system message) falls under --val-ratio, so every path of a thread lands on one side;
  at the defaults (5%, seed 0) a thread of `data threads --split all` whose posts carry its conversation_id (API
  v2) is held out exactly when the corpus put it in its test split, which pretraining never saw. Or --val FILE:
  all of it held out, none of --data.
- Packing (train/batches.py): conversations go whole, in stream order, into windows of seq_len + 1 tokens
  (inputs, and targets shifted by one); one that does not fit starts the next window, and the rest of a window
  is padding with ignored targets. A conversation longer than a window is cut to it, one left with no assistant
  token is left out: both are counted and printed.
- Mixing: the train stream draws its next conversation's source with probability weight / sum of weights
  (seeded), and each source goes through its conversations in a seeded order, epoch after epoch: a source of
  weight 2 gives twice as many conversations as one of weight 1, whatever their sizes (a small one repeats sooner).
The run is an ordinary run folder (train/loop.py, started from BASE's best checkpoint with fresh optimizers), so
generate, chat, serve and eval load it unchanged, and `--resume` continues it; its val_bpb is the bits per byte
of the held-out assistant messages. RUN/sft.json keeps the data, their counts, and that figure before (BASE, the
step-0 evaluation), after the last step, and at the best checkpoint (the one load_model serves: on a small set of
conversations the held-out figure bottoms out early, see DEFAULTS).
"""

import json
import math
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tweetlm.artifacts.checkpoint import best_checkpoint, run_folder
from tweetlm.artifacts.files import write_text
from tweetlm.artifacts.runs import read_metrics
from tweetlm.data.split import assign_split
from tweetlm.errors import UserError, check
from tweetlm.spec import path_and_number
from tweetlm.tokenizer.bpe import Tokenizer
from tweetlm.tokenizer.chat import render_chat_with_mask
from tweetlm.train.batches import Conversation, ConversationBatches, conversation_val_batches
from tweetlm.train.config import TrainConfig, load_config
from tweetlm.train.dist import is_main, print0, rank, world_size
from tweetlm.train.loop import train

DEFAULT_VAL_RATIO = 0.05

# Fine-tuning defaults, under --steps, --time-budget, --seed and --set. A checkpoint at every evaluation: the best,
# which load_model serves, is one of them.
# LRs a tenth of pretraining's: held-out bpb 2.34 after 60 steps, 6.70 at pretraining's (docs/benchmarks.md, "Fine-tuning").
DEFAULTS = {"steps": 300, "batch_tokens": 4096, "micro_batch": 16, "model.seq_len": 256, "optim.lr": 0.005,
            "optim.matrix_lr": 0.002, "eval.every": 50, "eval.samples_every": 100, "checkpoint.every": 50, "log_every": 10}


@dataclass(frozen=True)
class Source:
    """A conversations file and its weight in the mix."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> "Source":
        """"FILE" or "FILE:WEIGHT" (a path with a colon in its last part needs the weight: "a:b.jsonl:1")."""
        path, value = path_and_number(spec)
        if value is None:
            return cls(path)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--data {spec}: the weight after ':' must be a positive number, e.g. {path}:0.5")
        return cls(path, value)


@dataclass(frozen=True, kw_only=True)
class SftConfig:
    base: Path  # the run to fine-tune (its best checkpoint), or one of its checkpoint folders
    data: tuple[Source, ...]
    out: Path  # the new run folder
    val: Path | None = None  # held-out conversations; default: --val-ratio of each --data file
    val_ratio: float | None = None  # share of each --data file held out (DEFAULT_VAL_RATIO)
    overrides: dict = field(default_factory=dict)  # TrainConfig keys over DEFAULTS: {"steps": 100, "optim.lr": 0.01}

    def __post_init__(self):
        if not self.data:
            raise UserError("no conversations: give at least one --data FILE[:WEIGHT]")
        if self.val is not None and self.val_ratio is not None:
            raise UserError("give --val FILE or --val-ratio R, not both: --val holds out that whole file instead")
        check(self.val_ratio is None or 0 < self.val_ratio < 1, "val_ratio", self.val_ratio, "must be between 0 and 1, e.g. 0.05")

    @staticmethod
    def flag_default(name: str):
        """What a flag of `tweetlm sft` left out means: val_ratio, or a TrainConfig key (steps, seed ...) as DEFAULTS
        or TrainConfig has it."""
        if name == "val_ratio":
            return DEFAULT_VAL_RATIO
        return DEFAULTS.get(name, getattr(TrainConfig, name, None))

    @property
    def held_out(self) -> float:
        """The share of each --data file held out for val."""
        return 0.0 if self.val is not None else self.val_ratio or DEFAULT_VAL_RATIO


# ---------------------------------------------------------------- reading conversations


class Conversations:
    """Rendered conversations, flat: conversation i is ids[starts[i]:starts[i + 1]] with the same slice of mask
    (5 bytes a token, where lists of Python ints would take ~40); a source of ConversationBatches."""

    def __init__(self):
        self._ids, self._mask, self._starts = array("i"), bytearray(), array("q", [0])

    def append(self, ids: list[int], mask: list[bool]) -> None:
        self._ids.extend(ids)
        self._mask.extend(mask)
        self._starts.append(len(self._ids))

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, i: int) -> Conversation:
        """(ids [n] int32, mask [n] bool) of conversation i."""
        start, end = self._starts[i], self._starts[i + 1]
        return np.frombuffer(self._ids[start:end], dtype=np.int32), np.frombuffer(self._mask[start:end], dtype=bool)

    def __iter__(self) -> Iterator[Conversation]:
        return (self[i] for i in range(len(self)))

    def tokens(self) -> int:
        return len(self._ids)

    def targets(self) -> int:
        return self._mask.count(1)


def _parse(line: str, where: str) -> tuple[list[dict], str]:
    """(messages, hold-out key) of one JSONL line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not JSON ({e.msg} at column {e.colno}): write one conversation a line") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise UserError(f'{where}: expected {{"messages": [{{"role": "user", "content": "..."}}, ...]}} '
                        "(one conversation a line, as `tweetlm data threads` writes)")
    key = (record.get("conversation_id") or record.get("thread_id") or record.get("id")
           or next((m.get("content") for m in messages if m.get("role") != "system"), ""))
    return messages, str(key)


def read_conversations(path: Path, tokenizer: Tokenizer, *, window: int, held_out: float) -> tuple[Conversations, Conversations, dict]:
    """(train, val, counts) of a JSONL file: each conversation rendered and cut to `window` tokens, the share
    `held_out` of them (by hash, see the module docstring) in val. counts: read = train + val +
    no_assistant_tokens (left out: nothing to learn in its window), and truncated (cut to the window, kept)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file: give a conversations file (JSONL), e.g. from `tweetlm data threads`")
    train_set, val_set = Conversations(), Conversations()
    counts = dict.fromkeys(("read", "train", "val", "truncated", "no_assistant_tokens"), 0)
    with open(path, encoding="utf-8") as f, tqdm(desc=f"reading {path.name}", unit=" conversations", file=sys.stderr,
                                                 disable=None if is_main() else True) as bar:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                messages, key = _parse(line, f"{path}:{number}")
                try:
                    ids, mask = render_chat_with_mask(tokenizer, messages)
                except UserError as e:
                    raise UserError(f"{path}:{number}: {e}") from None
                counts["read"] += 1
                bar.update()
                if len(ids) > window:
                    ids, mask = ids[:window], mask[:window]
                    counts["truncated"] += 1
                if not any(mask):
                    counts["no_assistant_tokens"] += 1
                    continue
                split = "val" if assign_split(key, seed=0, val_ratio=0.0, test_ratio=held_out) == "test" else "train"
                (val_set if split == "val" else train_set).append(ids, mask)
                counts[split] += 1
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None
    if counts["read"] == 0:
        raise UserError(f'{path} holds no conversations: expected one {{"messages": [...]}} object a line')
    assert counts["read"] == counts["train"] + counts["val"] + counts["no_assistant_tokens"], counts
    return train_set, val_set, counts


# ---------------------------------------------------------------- the verb


def _base_tokenizer(base: Path) -> Tokenizer:
    """BASE's tokenizer. BASE is a run folder or one of its checkpoints (RUN/checkpoints/step-N), as load_model takes."""
    if not base.exists():
        raise UserError(f"{base}: no such run: give the run to fine-tune, a folder written by `tweetlm train` or `tweetlm import hf`")
    tokenizer_json = run_folder(base) / "tokenizer.json"
    if tokenizer_json.is_file():
        return Tokenizer.load(tokenizer_json)
    raise UserError(f"{base} is not a run folder (no tokenizer.json): give a folder written by `tweetlm train` or `tweetlm import hf`")


def _train_config(cfg: SftConfig, resume: bool) -> TrainConfig:
    """DEFAULTS <- overrides for a new run; RUN/config.toml <- overrides when resuming, as `train --resume` does."""
    has_run = (cfg.out / "config.toml").is_file()
    if resume and not has_run:
        raise UserError(f"{cfg.out} is not a run folder (no config.toml): drop --resume to start a new run there")
    if not resume and has_run:
        raise UserError(f"{cfg.out} already holds a run: pass --resume to continue it, or choose another --out")
    overrides = {**cfg.overrides, "init_from": cfg.base, "out": cfg.out}
    if resume:
        return load_config(cfg.out / "config.toml", overrides)
    defaults = dict(DEFAULTS)
    if overrides.get("time_budget") is not None and overrides.get("steps") is None:
        del defaults["steps"]  # a time budget alone decides the length
    return load_config(None, {**defaults, **overrides})


def _describe(path: Path, counts: dict, window: int, weight: float | None = None) -> str:
    what = f"{path}" + (f" (weight {weight:g})" if weight is not None else "")
    return (f"{what}: {counts['read']:,} conversations, {counts['train']:,} to train, {counts['val']:,} held out; "
            f"{counts['truncated']:,} cut to {window} tokens, {counts['no_assistant_tokens']:,} left out (no assistant token)")


def _read_data(cfg: SftConfig, tokenizer: Tokenizer, window: int) -> tuple[list[Conversations], list[Conversations], dict]:
    """(train sets, one per --data file; held-out sets; what RUN/sft.json says of the data)."""
    sources, held, counts = [], [], []
    for source in cfg.data:
        train_set, val_set, source_counts = read_conversations(source.path, tokenizer, window=window, held_out=cfg.held_out)
        print0(_describe(source.path, source_counts, window, source.weight))
        if not len(train_set):
            raise UserError(f"{source.path}: no conversation left to train on ({source_counts['val']} held out, "
                            f"{source_counts['no_assistant_tokens']} without an assistant token): lower --val-ratio or add data")
        sources.append(train_set)
        held.append(val_set)
        counts.append({"file": str(source.path), "weight": source.weight, **source_counts})
    val_file = None
    if cfg.val is not None:
        _, val_set, val_counts = read_conversations(cfg.val, tokenizer, window=window, held_out=1.0)
        print0(_describe(cfg.val, val_counts, window))
        held, val_file = [val_set], {"file": str(cfg.val), **val_counts}
    return sources, held, {"base": str(cfg.base), "held_out": cfg.held_out, "data": counts, "val_file": val_file}


def sft(cfg: SftConfig, *, resume: bool = False) -> dict:
    """Fine-tune cfg.base on cfg.data into the run cfg.out (`resume` continues it); returns RUN/sft.json's record:
    the data and their counts, and "before" / "after": the held-out assistant messages' val_loss and val_bpb."""
    train_cfg = _train_config(cfg, resume)
    tokenizer = _base_tokenizer(cfg.base)
    seq_len = train_cfg.model.seq_len
    sources, held, record = _read_data(cfg, tokenizer, seq_len + 1)
    batches = ConversationBatches(sources, [s.weight for s in cfg.data], seq_len=seq_len, batch_size=train_cfg.micro_batch,
                                  pad_id=tokenizer.pad_id, seed=train_cfg.seed, rank=rank(), world=world_size())
    val, scored = conversation_val_batches((c for conversations in held for c in conversations), seq_len=seq_len,
                                           batch_size=train_cfg.micro_batch, pad_id=tokenizer.pad_id,
                                           max_windows=max(1, train_cfg.eval.tokens // seq_len), rank=rank(),
                                           world=world_size())
    if not scored:
        raise UserError("no held-out conversation to measure: raise --val-ratio, or give --val FILE")
    n_conversations, n_tokens = sum(len(s) for s in sources), sum(s.tokens() for s in sources)
    print0(f"train: {n_conversations:,} conversations, {n_tokens:,} tokens ({sum(s.targets() for s in sources) / n_tokens:.0%} "
           f"assistant targets, {n_tokens / n_conversations:.0f} a conversation); val: {scored:,} of "
           f"{sum(len(h) for h in held):,} held-out conversations (eval.tokens = {train_cfg.eval.tokens:,})")

    path = cfg.out / "sft.json"
    if resume:
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if {k: saved.get(k) for k in record} != record:
            raise UserError(f"--resume needs the data {cfg.out} was fine-tuned on ({path}): give the same --data, "
                            "--val and --val-ratio, over unchanged files, or start a new run with another --out")
    elif is_main():
        cfg.out.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(record, indent=1) + "\n")

    final = train(train_cfg, resume=resume, batches=batches, val=val)
    record["val_conversations"] = scored
    if is_main():
        before = next(r for r in read_metrics(cfg.out) if r["step"] == 0 and "val_bpb" in r)
        best = json.loads((best_checkpoint(cfg.out) / "meta.json").read_text())
        record["before"] = {"step": 0, "val_loss": before["val_loss"], "val_bpb": before["val_bpb"]}
        record["after"] = {"step": final["step"], "val_loss": final["val_loss"], "val_bpb": final["val_bpb"]}
        record["best"] = {key: best[key] for key in ("step", "val_loss", "val_bpb")}
        write_text(path, json.dumps(record, indent=1) + "\n")
        print0(f"held-out assistant bits per byte: {before['val_bpb']:.4f} ({cfg.base}) -> {final['val_bpb']:.4f} "
               f"({cfg.out}, step {final['step']}); best checkpoint (the one generate, chat and serve load): "
               f"{best['val_bpb']:.4f} at step {best['step']}; -> {path}")
    return record
