"""Training batches: packed windows that start at document boundaries, a seeded order, an exact resume."""

import numpy as np
import torch
from helpers import BOUNDARY, _shards

from tweetlm.train.batches import TokenBatches, val_batches, window_starts


def _epoch(batches: TokenBatches, shards) -> list[tuple[int, int]]:
    """(shard, start) of every row the stream yields in its first epoch, recovered from the rows' contents."""
    n = sum(len(window_starts(s, BOUNDARY, batches.seq_len)) for s in shards)
    rows = torch.cat([batches.next()[0] for _ in range(-(-n // batches.batch_size))])[:n]
    found = []
    for row in rows.numpy():
        hits = [(i, int(s)) for i, shard in enumerate(shards) for s in window_starts(shard, BOUNDARY, batches.seq_len)
                if np.array_equal(shard[s : s + batches.seq_len], row)]
        assert len(hits) == 1, "every row is one window of one shard"
        found += hits
    return found


def test_windows_start_at_a_boundary_and_no_target_repeats_in_an_epoch():
    shards, seq_len = _shards(), 64
    batches = TokenBatches(shards, boundary_id=BOUNDARY, seq_len=seq_len, batch_size=5, seed=0)
    x, y = batches.next()
    assert x.shape == y.shape == (5, seq_len) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and (x[:, 0] == BOUNDARY).all()
    rows = _epoch(TokenBatches(shards, boundary_id=BOUNDARY, seq_len=seq_len, batch_size=5, seed=0), shards)
    assert len(set(rows)) == len(rows)
    for i in range(len(shards)):
        starts = sorted(s for j, s in rows if j == i)
        assert all(b - a >= seq_len for a, b in zip(starts, starts[1:])), "targets of two windows overlap"
    assert 0.6 < batches.coverage() <= 1  # posts of ~30 tokens: a cut document's tail is not trained on


def test_order_is_seeded_and_shuffled_across_shards():
    shards = _shards()
    first = _epoch(TokenBatches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=7, seed=1), shards)
    assert first == _epoch(TokenBatches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=7, seed=1), shards)
    assert first != _epoch(TokenBatches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=7, seed=2), shards)
    assert first != sorted(first), "windows come in a shuffled order"


def test_resume_from_state_continues_the_same_stream_across_epochs():
    shards = _shards(n_shards=2, docs=30)
    straight = TokenBatches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=6, seed=0)
    expected = [straight.next()[0] for _ in range(40)]  # several epochs of ~40 windows
    assert straight.state_dict()["epoch"] >= 3
    stream = TokenBatches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=6, seed=0)
    for _ in range(17):
        stream.next()
    resumed = TokenBatches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=6, seed=0)
    resumed.load_state_dict(dict(stream.state_dict()))
    assert all(torch.equal(resumed.next()[0], want) for want in expected[17:])


def test_windows_pack_documents_and_cut_a_long_one():
    tokens = np.concatenate([[BOUNDARY], np.arange(1, 100), [BOUNDARY], np.arange(1, 10), [BOUNDARY], np.arange(1, 50)])
    # the 100-token document gives one window (its tail is skipped); the next packs documents 2 and 3
    assert window_starts(tokens.astype(np.uint16), BOUNDARY, 16).tolist() == [0, 100]
    assert window_starts(tokens.astype(np.uint16), BOUNDARY, 60).tolist() == [0]  # 100 + 61 > 160 tokens: no room


def test_val_set_is_fixed_and_in_file_order():
    shards = _shards(seed=3, n_shards=2)
    a = val_batches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=4, max_tokens=32 * 10)
    b = val_batches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=4, max_tokens=32 * 10)
    assert [x.shape[0] for x, _ in a] == [4, 4, 2]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    starts = window_starts(shards[0], BOUNDARY, 32)[:10]
    assert torch.equal(torch.cat([x for x, _ in a]), torch.from_numpy(np.stack([shards[0][s : s + 32] for s in starts]).astype(np.int64)))
