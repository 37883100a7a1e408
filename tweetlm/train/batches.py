"""Batches of packed sequences from token shards, each sequence starting at a document boundary.

A shard is a flat array of token ids in which every document is `[boundary_id] + tokens` (docs/CONTRACTS.md).
A window is seq_len + 1 tokens (inputs and the targets shifted by one) that starts at a boundary and packs
the documents that follow; the next window starts at the first boundary at or after the token where this
one's targets end, so no token is a target twice in an epoch. What lies between a window's end and the next
boundary (the cut document's tail, on average half a document) is not trained on: about 6% of the tokens
for 30-token tweets at seq_len 256, and `TokenBatches.coverage()` says how much for the data at hand.

Order: every epoch visits the shards in a seeded random order and each shard's windows in a seeded random
order, so the stream depends only on (seed, epoch) and resumes from {epoch, shard, window}, three integers.

Several processes (ranks) share one stream: each call of next() takes the next world x batch_size windows of
it, and rank r keeps the r-th run of batch_size of them, reading only their tokens. So rank r's k-th batch is
the single-process stream's batch k x world + r, a step sees the same windows at any world size, and the
position, counted in windows of the one stream, resumes at another world size.
"""

import numpy as np
import torch

from tweetlm.model.llama import IGNORE_INDEX


def window_starts(tokens: np.ndarray, boundary_id: int, seq_len: int) -> np.ndarray:
    """Start offsets of the windows of one shard [n_windows] int64, in order."""
    boundaries = np.flatnonzero(tokens == boundary_id)
    starts = []
    i = 0
    while i < len(boundaries) and boundaries[i] + seq_len + 1 <= len(tokens):
        starts.append(boundaries[i])
        i = np.searchsorted(boundaries, boundaries[i] + seq_len)  # the first boundary at or after the last target
    return np.array(starts, dtype=np.int64)


def _stack(rows: list[tuple[np.ndarray, int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows given as (shard, start) -> inputs [B, T] and targets [B, T], int64."""
    windows = torch.from_numpy(np.stack([shard[s : s + seq_len + 1] for shard, s in rows]).astype(np.int64))  # [B, T+1]
    return windows[:, :-1], windows[:, 1:]


class TokenBatches:
    """An endless, seeded, resumable stream of (inputs [B, T], targets [B, T]) int64 CPU tensors: this rank's share."""

    def __init__(self, shards: list[np.ndarray], *, boundary_id: int, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        assert shards, "no shards"
        assert 0 <= rank < world, f"rank {rank} of {world}"
        self.shards, self.boundary_id, self.seq_len, self.batch_size, self.seed = shards, boundary_id, seq_len, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.shard, self.window = 0, 0, 0
        self._order: dict = {}  # (epoch, shard position) -> (shard index, its windows in order), one cached at a time

    def _windows(self, epoch: int, position: int) -> tuple[int, np.ndarray]:
        key = (epoch, position)
        if key not in self._order:
            rng = np.random.default_rng([self.seed, epoch])
            index = int(rng.permutation(len(self.shards))[position])
            starts = window_starts(self.shards[index], self.boundary_id, self.seq_len)
            self._order = {key: (index, np.random.default_rng([self.seed, epoch, index]).permutation(starts))}
        return self._order[key]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, empty_in_a_row, wanted = [], 0, self.batch_size * self.world  # rows: (shard, start), of every rank
        while len(rows) < wanted:
            index, starts = self._windows(self.epoch, self.shard)
            take = starts[self.window : self.window + wanted - len(rows)]
            rows += [(self.shards[index], s) for s in take]
            self.window += len(take)
            empty_in_a_row = 0 if len(take) else empty_in_a_row + 1
            assert empty_in_a_row <= len(self.shards), f"no shard holds a window of {self.seq_len + 1} tokens"
            if self.window >= len(starts):
                self.shard, self.window = self.shard + 1, 0
                if self.shard == len(self.shards):
                    self.epoch, self.shard = self.epoch + 1, 0
        return _stack(rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size], self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard, self.window = state["epoch"], state["shard"], state["window"]

    def coverage(self) -> float:
        """Fraction of all tokens that are targets in an epoch (the rest are cut document tails)."""
        used = sum(len(window_starts(s, self.boundary_id, self.seq_len)) for s in self.shards) * self.seq_len
        return used / sum(len(s) for s in self.shards)


def val_batches(shards: list[np.ndarray], *, boundary_id: int, seq_len: int, batch_size: int, max_tokens: int,
                rank: int = 0, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed val set: the first max_tokens // seq_len windows of the shards in file order (at least one),
    this rank's contiguous share of them. Every rank gets the same number of batches (ranks run the forward
    together under FSDP): a share that falls short is padded with rows whose targets are all IGNORE_INDEX."""
    need = max(1, max_tokens // seq_len)
    rows = []  # (shard, start)
    for shard in shards:
        rows += [(shard, s) for s in window_starts(shard, boundary_id, seq_len)[: need - len(rows)]]
    if not rows:
        return []
    share = -(-len(rows) // world)
    mine = rows[rank * share : (rank + 1) * share]
    mine += rows[:1] * (share - len(mine))  # padding, its targets ignored below
    batches = []
    for i in range(0, share, batch_size):
        inputs, targets = _stack(mine[i : i + batch_size], seq_len)
        real = len(rows) - rank * share - i  # rows of this batch that are not padding
        if real < len(inputs):
            targets = targets.clone()  # targets and inputs are views of one array
            targets[max(0, real):] = IGNORE_INDEX
        batches.append((inputs, targets))
    return batches
