"""Exact and near-duplicate detection over batches of posts, first occurrence wins.

Exact: an 8-byte BLAKE2b hash of the normalized text, kept in `ExactSet`: 8 bytes per
distinct post (a sorted NumPy array per top hash byte), 80 MB for 10M posts. With 64-bit
hashes a false "duplicate" is expected about once in 6e9 posts (birthday bound, n^2 / 2^65).

Near: MinHash (datasketch) over word 3-grams of the normalized text, cut into b bands of r
rows (b, r from datasketch's MinHashLSH for the threshold: 9 x 13 of 128 permutations at 0.8);
two posts sharing all r values of any band are near duplicates (the LSH candidate rule, no
pairwise check). `BandIndex` holds one fixed-size table per band, so its memory does not
grow with the corpus: a slot keeps the latest band hash that fell into it. Once more posts
went by than a table has slots, older posts start to be forgotten: a pair d posts apart is
still caught in a given band with probability exp(-d / slots), about 0.37 at d = slots (1.9M
slots per band at 128 MB and 9 bands). Recall of far-apart pairs is traded for bounded memory;
`tweetlm data prepare --near-dup-mb` sets the trade.

The signature work (hashing shingles) is per post and runs in the workers (`MinHashBands`);
the index lookups need the global order and run in one process (`BandIndex`).
"""

import hashlib
import re

import numpy as np
from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r"\w+")
_SHINGLE = 3  # words per shingle
_NUM_PERM = 128  # datasketch's default


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class ExactSet:
    """The set of hashes seen so far; `first_seen` marks the first occurrence of each."""

    def __init__(self):
        self._parts = [np.empty(0, np.uint64) for _ in range(256)]  # by top byte, each sorted

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts)

    def first_seen(self, hashes: np.ndarray) -> np.ndarray:
        """bool[n]: True where hashes[i] was never seen, in earlier batches or earlier in this one."""
        uniq, first = np.unique(hashes, return_index=True)  # sorted, so top bytes are contiguous
        new = np.ones(len(uniq), bool)
        bounds = np.searchsorted(uniq >> np.uint64(56), np.arange(257, dtype=np.uint64))
        for part in np.flatnonzero(np.diff(bounds)):
            lo, hi = bounds[part], bounds[part + 1]
            seen, batch = self._parts[part], uniq[lo:hi]
            at = np.searchsorted(seen, batch)
            new[lo:hi] = seen[np.minimum(at, len(seen) - 1)] != batch if len(seen) else True
            self._parts[part] = np.insert(seen, at[new[lo:hi]], batch[new[lo:hi]])
        mask = np.zeros(len(hashes), bool)
        mask[first[new]] = True
        return mask


class MinHashBands:
    """texts -> uint64[n, bands]: one hash per LSH band of each text's MinHash signature."""

    def __init__(self, threshold: float, *, seed: int):
        lsh = MinHashLSH(threshold=threshold, num_perm=_NUM_PERM)  # only for its (b, r) choice
        self.bands, self.rows, self.seed = lsh.b, lsh.r, seed
        # Odd multipliers turn a band's r values (each < 2^32) into one 64-bit hash.
        rng = np.random.default_rng(seed)
        self._mix = rng.integers(1, 2**63, size=self.rows, dtype=np.uint64) | np.uint64(1)

    def __call__(self, texts: list[str]) -> np.ndarray:
        assert texts, "MinHashBands needs at least one text"
        minhashes = MinHash.bulk([_shingles(t) for t in texts], num_perm=_NUM_PERM, seed=self.seed)
        sig = np.stack([m.hashvalues[: self.bands * self.rows] for m in minhashes])  # [n, b*r], values < 2^32
        bands = (sig.reshape(len(texts), self.bands, self.rows) * self._mix).sum(axis=2, dtype=np.uint64)  # wraps mod 2^64
        bands ^= bands >> np.uint64(31)
        return bands | np.uint64(1)  # never 0, the empty slot


def _shingles(text: str) -> list[bytes]:
    words = _WORD.findall(text.lower()) or [text]
    if len(words) <= _SHINGLE:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i:i + _SHINGLE]).encode("utf-8") for i in range(len(words) - _SHINGLE + 1)]


class BandIndex:
    """Fixed-memory LSH index: one table of band hashes per band (module docstring)."""

    def __init__(self, bands: int, *, memory_mb: int):
        self.slots = max(1, memory_mb * 2**20 // (8 * bands))
        self._tables = np.zeros((bands, self.slots), np.uint64)  # 0 = empty slot

    @property
    def nbytes(self) -> int:
        return self._tables.nbytes

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        """bool[n] for keys uint64[n, bands]: True where no band matches an earlier post's.
        Every post is inserted, kept or not, so a chain of near copies keeps matching."""
        n, bands = keys.shape
        flat = self._tables.reshape(-1)
        slots = (keys % np.uint64(self.slots)).astype(np.int64) + np.arange(bands) * self.slots  # [n, bands]
        dup = (flat[slots] == keys).any(axis=1)
        # An earlier post of this batch: tag each band's hashes so one np.unique covers all bands.
        tagged = (keys ^ (np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))).ravel()
        _, first, inverse = np.unique(tagged, return_index=True, return_inverse=True)
        dup |= (first[inverse] < np.arange(n * bands)).reshape(n, bands).any(axis=1)
        # Insert; where posts of this batch share a slot, the latest wins.
        slots, keys = slots.ravel()[::-1], keys.ravel()[::-1]
        _, last = np.unique(slots, return_index=True)
        flat[slots[last]] = keys[last]
        return ~dup
