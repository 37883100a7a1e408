"""`tweetlm tokenizer train`: a byte-level BPE (bpe.py) trained on a corpus's train split.

    tweetlm tokenizer train work/corpus --vocab-size 16384 --out work/tokenizer
    tweetlm tokenizer train work/corpus --vocab-size 16384 --out work/tokenizer --sample 1000000

--sample N trains on N posts of the train split drawn uniformly by a seeded reservoir (Vitter's algorithm R)
while the shards stream by, so memory holds the N posts and one batch, never the corpus.
"""

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from tweetlm.data.corpus import iter_texts, shard_paths
from tweetlm.errors import UserError, check
from tweetlm.tokenizer.bpe import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the specials
_VAL_SAMPLE_CHARS = 10_000_000  # bytes per token is measured on about this much of val


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    corpus: Path
    out: Path
    vocab_size: int = 16384  # special tokens included
    # Training text cap, as nanochat's speedrun trains its tokenizer on ~2e9 chars (runs/speedrun.sh).
    max_chars: int = 2_000_000_000
    sample: int | None = None  # train on this many posts drawn at random from the train split; None: all of it
    seed: int = 0  # of the sample

    def __post_init__(self):
        check(self.vocab_size >= _MIN_VOCAB, "vocab_size", self.vocab_size, f"too small: byte-level BPE needs at least "
              f"{_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        check(self.max_chars >= 1, "max_chars", self.max_chars, "must be positive")
        check(self.sample is None or self.sample >= 1, "sample", self.sample, "must be at least 1 post")


def train_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """Train on the train split's clean_text, save to config.out, print vocab size and bytes per token on val."""
    if not shard_paths(config.corpus, "train"):
        raise UserError(f"{config.corpus}/train has no Parquet shards to train on: is the corpus empty?")
    hf = HFTokenizer(BPE())
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=config.vocab_size, special_tokens=list(SPECIAL_TOKENS),
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=sys.stdout.isatty())  # off a terminal it only prints blank lines
    t0 = time.perf_counter()
    texts = iter_texts(config.corpus, "train")
    if config.sample is not None:
        texts = [sample(texts, config.sample, seed=config.seed)]
    hf.train_from_iterator(_capped(texts, config.max_chars), trainer)
    tokenizer = Tokenizer(hf.to_str(pretty=True))
    tokenizer.save(config.out)

    note = "" if tokenizer.vocab_size == config.vocab_size else f" (asked {config.vocab_size}: the corpus has no more pairs to merge)"
    print(f"trained in {time.perf_counter() - t0:.1f}s: vocab {tokenizer.vocab_size}{note} -> {config.out}/tokenizer.json")
    n_bytes, n_tokens, examples = 0, 0, []
    for batch in _capped(iter_texts(config.corpus, "val"), _VAL_SAMPLE_CHARS):
        for text, ids in zip(batch, tokenizer.encode_batch(batch)):
            n_bytes, n_tokens = n_bytes + len(text.encode()), n_tokens + len(ids)
            if len(examples) < 2 and text:
                examples.append(ids)
    if n_tokens:
        print(f"val: {n_bytes / n_tokens:.2f} bytes per token ({n_bytes:,} bytes, {n_tokens:,} tokens)")
    else:
        print("val: empty split, bytes per token not measured")
    for ids in examples:
        print("  " + "|".join(tokenizer.decode([i]) for i in ids))
    return tokenizer


def sample(batches: Iterable[list[str]], n: int, *, seed: int) -> list[str]:
    """n texts drawn uniformly without replacement (all if fewer), in their order in `batches`: algorithm R, one
    random draw per text, vectorized per batch."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, str]] = []  # (position, text)
    seen = 0
    for batch in batches:
        fill = min(n - len(kept), len(batch))
        kept += zip(range(seen, seen + fill), batch[:fill])
        positions = np.arange(seen + fill, seen + len(batch))  # the i-th text replaces a slot with probability n/(i+1)
        slots = (rng.random(len(positions)) * (positions + 1)).astype(np.int64)
        for i in np.flatnonzero(slots < n):
            kept[slots[i]] = (int(positions[i]), batch[fill + i])
        seen += len(batch)
    return [text for _, text in sorted(kept)]


def _capped(batches: Iterator[list[str]], max_chars: int) -> Iterator[list[str]]:
    """Batches until about max_chars characters have gone by (whole batches)."""
    seen = 0
    for batch in batches:
        if seen >= max_chars:
            return
        yield batch
        seen += sum(map(len, batch))
