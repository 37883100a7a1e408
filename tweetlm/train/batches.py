"""Batches of packed windows of seq_len + 1 tokens (inputs, and the targets shifted by one): from token shards
for pretraining (TokenBatches, val_batches) and from rendered conversations for fine-tuning (ConversationBatches,
conversation_val_batches; train/sft.py reads and renders them).

Token shards. A shard is a flat array of token ids in which every document is `[boundary_id] + tokens`
(docs/CONTRACTS.md). A window starts at a boundary and packs the documents that follow; the next window starts
at the first boundary at or after the token where this one's targets end, so no token is a target twice in an
epoch. What lies between a window's end and the next boundary (the cut document's tail, on average half a
document) is not trained on: about 6% of the tokens for 30-token tweets at seq_len 256, and
`TokenBatches.coverage()` says how much for the data at hand. Every epoch visits the shards in a seeded random
order and each shard's windows in a seeded random order, so the stream depends only on (seed, epoch) and
resumes from {epoch, shard, window}, three integers.

Conversations. Each is (ids, mask) as tokenizer/chat.py renders it, at most a window long. They go whole, in
stream order, into windows: one that does not fit starts the next window, the rest of a window is padding, and
a target is the next token where the mask is true, IGNORE_INDEX elsewhere. The stream draws each conversation's
source with probability weight / sum of weights (seeded), and each source goes through its conversations in a
seeded order, epoch after epoch; it resumes from {drawn, taken: [of each source]}.

Several processes (ranks) share one stream: each call of next() takes the next world x batch_size windows of
it, and rank r keeps the r-th run of batch_size of them (of token shards, reading only their tokens). So rank
r's k-th batch is the single-process stream's batch k x world + r, a step sees the same windows at any world
size, and the position, counted in the one stream, resumes at another world size.
"""

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from tweetlm.model.llama import IGNORE_INDEX

# ---------------------------------------------------------------- token shards


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


# ---------------------------------------------------------------- conversations


Conversation = tuple[np.ndarray, np.ndarray]  # (ids [n] int32, mask [n] bool: True where the id is a target)

# Source choices drawn per generator call. The block number seeds its draw, so another value is another stream
# (and a saved position would resume elsewhere).
_SOURCE_BLOCK = 4096


def _stack_conversations(rows: list[list[Conversation]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows given as lists of (ids, mask) -> inputs [B, T] and targets [B, T] int64: a target is the next
    token where the mask is true, IGNORE_INDEX elsewhere (user and system turns, role tokens, padding)."""
    ids = np.full((len(rows), seq_len + 1), pad_id, dtype=np.int64)  # [B, T+1]
    learn = np.zeros((len(rows), seq_len + 1), dtype=bool)
    for row, pieces in enumerate(rows):
        at = 0
        for piece_ids, piece_mask in pieces:
            ids[row, at : at + len(piece_ids)] = piece_ids
            learn[row, at : at + len(piece_ids)] = piece_mask
            at += len(piece_ids)
        assert at <= seq_len + 1, f"{at} tokens packed in a window of {seq_len + 1}"
    targets = np.where(learn[:, 1:], ids[:, 1:], IGNORE_INDEX)
    return torch.from_numpy(ids[:, :-1].copy()), torch.from_numpy(targets)


class ConversationBatches:
    """An endless, seeded, resumable stream of (inputs [B, T], targets [B, T]) int64 CPU tensors of packed
    conversations mixed from `sources` by `weights`: this rank's share. As in TokenBatches, each next() packs the
    next world x batch_size windows of the one stream and rank r keeps the r-th run of batch_size, so rank r's
    k-th batch is the single-process batch k x world + r. The position is JSON:
    {"drawn": conversations placed, "taken": [of each source]}."""

    def __init__(self, sources: list[Sequence[Conversation]], weights: list[float], *, seq_len: int, batch_size: int,
                 pad_id: int, seed: int, rank: int = 0, world: int = 1):
        assert sources and len(sources) == len(weights) and all(len(s) for s in sources), (len(sources), weights)
        assert 0 <= rank < world, f"rank {rank} of {world}"
        self.sources, self.seq_len, self.batch_size, self.pad_id, self.seed = sources, seq_len, batch_size, pad_id, seed
        self.rank, self.world = rank, world
        self.p = np.array(weights, dtype=np.float64) / sum(weights)
        self.drawn, self.taken = 0, [0] * len(sources)
        self._choices: tuple[int, np.ndarray] | None = None  # (block, the sources drawn for it)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its conversations in order)

    def _peek(self) -> tuple[int, Conversation]:
        """(source, conversation) at the stream's position."""
        block, at = divmod(self.drawn, _SOURCE_BLOCK)
        if self._choices is None or self._choices[0] != block:
            rng = np.random.default_rng([self.seed, 0, block])
            self._choices = (block, rng.choice(len(self.sources), size=_SOURCE_BLOCK, p=self.p))
        source = int(self._choices[1][at])
        epoch, i = divmod(self.taken[source], len(self.sources[source]))
        if source not in self._orders or self._orders[source][0] != epoch:
            order = np.random.default_rng([self.seed, 1, source, epoch]).permutation(len(self.sources[source]))
            self._orders[source] = (epoch, order)
        return source, self.sources[source][int(self._orders[source][1][i])]

    def _window(self) -> list[Conversation]:
        pieces, used = [], 0
        while True:
            source, (ids, mask) = self._peek()
            if used + len(ids) > self.seq_len + 1:
                break
            pieces.append((ids, mask))
            used += len(ids)
            self.drawn, self.taken[source] = self.drawn + 1, self.taken[source] + 1
        assert pieces, f"a conversation of {len(ids)} tokens is longer than a window of {self.seq_len + 1}"
        return pieces

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._window() for _ in range(self.batch_size * self.world)]
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _stack_conversations(mine, self.seq_len, self.pad_id)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "taken": list(self.taken)}

    def load_state_dict(self, state: dict) -> None:
        assert len(state["taken"]) == len(self.sources), f"a position over {len(state['taken'])} sources, not {len(self.sources)}"
        self.drawn, self.taken = state["drawn"], list(state["taken"])


def conversation_val_batches(conversations: Iterable[Conversation], *, seq_len: int, batch_size: int, pad_id: int,
                             max_windows: int, rank: int = 0,
                             world: int = 1) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """(batches, conversations in them): the fixed val set. Conversations packed in order (as ConversationBatches
    packs) into at most max_windows windows, this rank's contiguous share of them, padded with empty windows (all
    targets ignored) so that every rank has as many batches."""
    rows, pieces, used = [], [], 0
    for ids, mask in conversations:
        if used + len(ids) > seq_len + 1:
            rows.append(pieces)
            pieces, used = [], 0
            if len(rows) == max_windows:
                break
        pieces.append((ids, mask))
        used += len(ids)
    else:
        if pieces:
            rows.append(pieces)
    share = -(-len(rows) // world)
    mine = rows[rank * share : (rank + 1) * share]
    mine += [[]] * (share - len(mine))
    batches = [_stack_conversations(mine[i : i + batch_size], seq_len, pad_id) for i in range(0, share, batch_size)]
    return batches, sum(len(pieces) for pieces in rows)
