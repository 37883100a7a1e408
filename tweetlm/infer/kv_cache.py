"""The KV cache: keys and values of every layer, preallocated once for a fixed number of sequence slots.

A forward's rows are described by a Batch: row i feeds `lengths[i]` new tokens to the sequence held in cache
slot `slots[i]`, which already holds `starts[i]` tokens (a prompt chunk, or 1 token when decoding). Rows of
different lengths and positions run in one forward; their tokens are laid flat, one after another.

Attention runs row by row, each over exactly its own cached tokens. A batched call over a padded, masked
[B, S_max] would make a row's numbers depend on its neighbours: measured on this CPU (torch 2.13), masked
and unmasked SDPA, and softmax over a padded length, round differently, so a row's logits changed with the
longest row beside it. Row by row, a request computes the same thing alone or among 31 others.
"""

import torch
import torch.nn.functional as F

from tweetlm.model.llama import ModelConfig, rotary


class Batch:
    """The rows of one forward, with the index tensors every layer shares, built once per step."""

    def __init__(self, slots: list[int], starts: list[int], lengths: list[int], *, device: torch.device):
        assert len(slots) == len(starts) == len(lengths) and min(lengths) >= 1, (slots, starts, lengths)
        self.rows = []  # (slot, start, length, offset of the row's first token in the flat layout)
        positions, token_slots, offset = [], [], 0
        for slot, start, n in zip(slots, starts, lengths):
            self.rows.append((slot, start, n, offset))
            positions += range(start, start + n)
            token_slots += [slot] * n
            offset += n
        self.positions = torch.tensor(positions, device=device)  # [N] each token's position in its sequence
        self.token_slots = torch.tensor(token_slots, device=device)  # [N] each token's cache slot
        self.last = torch.tensor([off + n - 1 for _, _, n, off in self.rows], device=device)  # [R] each row's last token
        # a chunk after the first attends to the cached tokens before it and causally within itself: [n, start + n]
        self.masks = {i: torch.arange(start + n, device=device)[None, :] <= torch.arange(start, start + n, device=device)[:, None]
                      for i, (_, start, n, _) in enumerate(self.rows) if n > 1 and start > 0}


class KVCache:
    """Keys and values [depth, slots, K, max_len, Hd]. Allocated with torch.empty: memory is touched only as
    sequences grow, and a row never reads past its own length, so stale values from an earlier request in
    the same slot are never seen."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.depth, slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        # rotary tables [max_len, Hd], once: a step looks its positions up instead of recomputing cos and sin
        self.cos, self.sin = rotary(torch.arange(max_len, device=device), cfg.head_dim, cfg.rope_theta)

    def rotary(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [N, 1, Hd] at each token's position, broadcast over heads."""
        return self.cos[batch.positions][:, None, :], self.sin[batch.positions][:, None, :]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Store the new tokens' k, v [N, K, Hd] in their slots, then attend with q [N, H, Hd] row by row over
        each row's own cached tokens. Returns [N, H * Hd]."""
        keys, values = self.k[layer], self.v[layer]  # [slots, K, max_len, Hd]
        keys[batch.token_slots, :, batch.positions] = k
        values[batch.token_slots, :, batch.positions] = v
        out = []
        for i, (slot, start, n, off) in enumerate(batch.rows):
            end = start + n
            y = F.scaled_dot_product_attention(
                q[None, off:off + n].transpose(1, 2),  # [1, H, n, Hd]
                keys[slot:slot + 1, :, :end], values[slot:slot + 1, :, :end],  # [1, K, end, Hd]
                attn_mask=batch.masks.get(i), is_causal=n > 1 and start == 0, enable_gqa=True)
            out.append(y.transpose(1, 2).reshape(n, -1))  # [n, H * Hd]
        return torch.cat(out) if len(out) > 1 else out[0]
