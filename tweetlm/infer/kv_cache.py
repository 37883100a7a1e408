"""KVCache: preallocated keys and values for every layer, filled at explicit positions."""

import torch

from tweetlm.model.llama import ModelConfig


class KVCache:
    """Keys and values [depth, B, K, max_len, Hd]; `pos` tokens of every row are cached so far.

    The model calls `update` in each layer with the new tokens' keys and values and `advance` once
    after the last layer, so one forward of T tokens fills positions pos .. pos+T-1.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, *, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.depth, batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, K, T, Hd] at pos.. and return all keys and values so far [B, K, S, Hd] and the
        attention mask [T, S] (True = may attend), None when a single new token may see everything."""
        T = k.shape[2]
        end = self.pos + T
        assert end <= self.max_len, f"KV cache full: {end} positions > {self.max_len}"
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        mask = None
        if T > 1:
            query_pos = torch.arange(self.pos, end, device=k.device)[:, None]  # [T, 1]
            mask = torch.arange(end, device=k.device)[None, :] <= query_pos  # [T, S], causal
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask

    def advance(self, n: int) -> None:
        self.pos += n
