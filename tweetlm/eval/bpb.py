"""`tweetlm eval bpb RUN`: bits per UTF-8 byte of a run on a text file (one post per line) or a corpus split.

    tweetlm eval bpb runs/small --corpus work/corpus --split val
    tweetlm eval bpb runs/small --text posts.txt

Each post is a document as in training, `[<|endoftext|>] + encode(text)`, and one more boundary closes the
last, so every post's end is predicted too. Documents are packed in order into windows of at most the model's
context that start at a document boundary (a post longer than the window goes on in the next one), and every
token after the first is a target exactly once. bpb = nats of all targets / ln 2 / UTF-8 bytes of the posts:
boundaries count in the nats and weigh 0 bytes, as in training's val_bpb, whose arithmetic this reuses
(tweetlm.model.scoring.evaluate). Training's val_bpb reads fixed windows of the val token shards and leaves each
window's cut-off tail out, so the two differ a little; this one covers every post whole.
A text file's lines are taken as they are (a corpus's clean_text is already normalized); blank lines are skipped.
"""

import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tweetlm.data.corpus import SPLITS, iter_texts
from tweetlm.device import resolve_device
from tweetlm.errors import UserError, check
from tweetlm.model.llama import IGNORE_INDEX
from tweetlm.model.scoring import evaluate
from tweetlm.model.weights import load_model

_READ = 1000  # posts tokenized per call


@dataclass(frozen=True, kw_only=True)
class BpbConfig:
    run: Path
    text: Path | None = None  # one post per line
    corpus: Path | None = None  # a `data prepare` folder, with `split`
    split: str = "val"
    window: int | None = None  # tokens of context per window (default: the model's)
    batch_size: int = 8
    device: str = "auto"

    def __post_init__(self):
        if (self.text is None) == (self.corpus is None):
            raise UserError("give --text FILE or --corpus CORPUS (with --split), one of the two")
        check(self.split in SPLITS, "split", self.split, f"choose one of {', '.join(SPLITS)}")
        check(self.window is None or self.window >= 1, "window", self.window, "must be at least 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")


def bpb(cfg: BpbConfig) -> dict:
    """{"bpb", "loss" (nats per token), "tokens" (targets), "bytes", "posts", "window"}; also printed."""
    model, tokenizer = load_model(cfg.run, device=resolve_device(cfg.device))
    context = model.config.max_seq_len
    window = cfg.window or context
    if window > context:
        raise UserError(f"--window {window} is longer than the model's context, {context} tokens")
    counts = {"posts": 0, "tokens": 0, "bytes": 0}
    sizes = np.array(tokenizer.token_bytes(), dtype=np.int64)
    source = cfg.text if cfg.text is not None else f"{cfg.corpus} ({cfg.split})"
    with tqdm(desc="eval bpb", unit=" posts", unit_scale=True, file=sys.stderr, disable=None) as bar:
        def documents() -> Iterator[list[int]]:
            for texts in _posts(cfg):
                for ids in tokenizer.encode_batch(texts):
                    yield [tokenizer.boundary_id, *ids]
                counts["posts"] += len(texts)
                bar.update(len(texts))

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            windows = _windows(documents(), tokenizer.boundary_id, window)
            while rows := list(itertools.islice(windows, cfg.batch_size)):
                inputs, targets = _pad(rows, tokenizer.boundary_id)
                counts["tokens"] += int((targets != IGNORE_INDEX).sum())
                counts["bytes"] += int(sizes[targets[targets != IGNORE_INDEX].numpy()].sum())
                yield inputs, targets

        device = next(model.parameters()).device
        val = evaluate(model, batches(), torch.tensor(sizes, device=device), device)
    if counts["posts"] == 0:
        raise UserError(f"no posts in {source}")
    result = {"bpb": val["val_bpb"], "loss": val["val_loss"], **counts, "window": window}
    print(f"eval bpb {Path(cfg.run).name} on {source}: {result['bpb']:.4f} bits per byte "
          f"({counts['tokens']:,} tokens, {counts['bytes']:,} bytes, {counts['posts']:,} posts; "
          f"{result['loss']:.4f} nats per token, windows of {window} tokens)")
    return result


def _posts(cfg: BpbConfig) -> Iterator[list[str]]:
    """Batches of posts: the text file's non-blank lines, or the corpus split's clean_text."""
    if cfg.corpus is not None:
        yield from iter_texts(cfg.corpus, cfg.split, batch_size=_READ)
        return
    try:
        with open(cfg.text, encoding="utf-8") as f:
            while lines := list(itertools.islice(f, _READ)):
                yield [line.rstrip("\n") for line in lines if line.strip()]
    except FileNotFoundError:
        raise UserError(f"--text {cfg.text}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--text {cfg.text}: not UTF-8 ({e.reason}); convert it first") from None


def _windows(documents: Iterator[list[int]], boundary: int, window: int) -> Iterator[list[int]]:
    """Windows of at most window + 1 tokens (inputs and targets shifted by one): each ends at the last document
    boundary that fits, a boundary that is then the next window's first input; a document longer than the
    window is cut at window tokens. Every token but the stream's first is a target in exactly one window."""
    buf: list[int] = []

    def cut() -> int:
        """The window's last position: the last boundary at 1..window, else window."""
        return next((i for i in range(min(window, len(buf) - 1), 0, -1) if buf[i] == boundary), window)

    for doc in documents:
        buf += doc
        while len(buf) > window + 1:  # the window cannot grow any more: emit it
            end = cut()
            yield buf[: end + 1]
            buf = buf[end:]
    if buf:
        buf.append(boundary)  # the last post's end
    while len(buf) > 1:
        end = len(buf) - 1 if len(buf) <= window + 1 else cut()
        yield buf[: end + 1]
        buf = buf[end:]


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs [B, T] and targets [B, T] for windows of up to T + 1 tokens; padding is ignored in the loss
    (right padding: causal attention keeps it out of the real positions)."""
    width = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    for i, r in enumerate(rows):
        inputs[i, : len(r) - 1] = torch.tensor(r[:-1])
        targets[i, : len(r) - 1] = torch.tensor(r[1:])
    return inputs, targets
