"""The KV cache: keys and values of every layer, preallocated once for a fixed number of sequence slots.

One forward's rows are a Batch: row i feeds lengths[i] new tokens to the sequence held in cache slot
slots[i], which already holds starts[i] tokens (a prompt chunk, or 1 token when decoding). Rows of
different lengths and positions run in one forward, their tokens laid flat one after another.

Attention runs row by row, each over exactly its own cached tokens. Batched calls make a row's numbers
depend on its neighbours: measured on this CPU (torch 2.13), masked SDPA over a padded [B, S_max] rounds
differently from unmasked SDPA over the row alone, and even rows of equal length batched together
([B, H, 1, Hd], B > 1, 17 keys or more) differ from the same rows one by one. Row by row, a request
computes the same thing alone or among 31 others.
"""

import torch
import torch.nn.functional as F

from tweetlm.model.llama import ModelConfig, rotary


class KVCache:
    """Keys and values [depth, slots, K, max_len, Hd]. `attend` never reads past a row's own length, so stale
    values from an earlier request in the same slot are never seen. `attend_padded` (decoding on CUDA) reads up to
    a rounded length and masks the rest, which must be finite (a masked weight is 0, and 0 x NaN is NaN): the
    cache is zeroed on CUDA, and left unset on CPU, where memory is then touched only as sequences grow."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.depth, slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        new = torch.zeros if torch.device(device).type == "cuda" else torch.empty
        self.k = new(shape, dtype=dtype, device=device)
        self.v = new(shape, dtype=dtype, device=device)
        # rotary tables [max_len, Hd], once: a step looks its positions up instead of recomputing cos and sin.
        # sin's first half is negated, so that rotating is x * cos + x.roll(Hd / 2) * sin, the same numbers as
        # llama.apply_rotary's x * cos + cat(-x2, x1) * sin (a sign flip is exact) in 4 ops instead of 7.
        self.cos, sin = rotary(torch.arange(max_len, device=device), cfg.head_dim, cfg.rope_theta)
        self.sin = torch.cat((-sin[:, :cfg.head_dim // 2], sin[:, cfg.head_dim // 2:]), dim=-1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: "Batch") -> torch.Tensor:
        """Store the new tokens' k, v [N, K, Hd] in their slots, then attend with q [N, H, Hd] row by row over
        each row's own cached tokens. Returns [N, H * Hd]."""
        self.k[layer][batch.token_slots, :, batch.positions] = k
        self.v[layer][batch.token_slots, :, batch.positions] = v
        queries = q.transpose(0, 1)[None].split(batch.lengths, dim=2)  # per row [1, H, n, Hd]
        out = [F.scaled_dot_product_attention(query, keys[layer], values[layer], attn_mask=mask, is_causal=causal,
                                              enable_gqa=True)
               for query, keys, values, mask, causal in zip(queries, batch.keys, batch.values, batch.masks, batch.causal)]
        y = torch.cat(out, dim=2) if len(out) > 1 else out[0]  # [1, H, N, Hd]
        return y[0].transpose(0, 1).reshape(q.shape[0], -1)  # [N, H * Hd]


    def attend_padded(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                      positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoding, B rows of one token each, in shapes fixed by B and L (runner.decode captures them as CUDA
        graphs): store k, v [B, K, Hd] at (slots, positions), then attend with q [B, H, Hd] over the first L keys
        of each row's slot, mask [B, L] hiding those past its position. The query heads that share a kv head are
        that head's queries ([B, K, H / K, Hd]), so no kernel needs to support grouped heads. Returns [B, H * Hd]."""
        B, H, Hd = q.shape
        K, L = k.shape[1], mask.shape[1]
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v
        keys, values = self.k[layer][slots, :, :L], self.v[layer][slots, :, :L]  # [B, K, L, Hd]
        y = F.scaled_dot_product_attention(q.view(B, K, H // K, Hd), keys, values, attn_mask=mask[:, None, None, :])
        return y.reshape(B, H * Hd)


class Batch:
    """The rows of one forward and what all its layers share, built once per step: row i feeds lengths[i] new
    tokens to the sequence in cache slot slots[i], which holds starts[i] tokens already. Logits come out for each
    row's last token, and for every token of the rows where every[i] (a prompt being scored)."""

    def __init__(self, cache: KVCache, slots: list[int], starts: list[int], lengths: list[int],
                 every: list[bool] | None = None):
        assert len(slots) == len(starts) == len(lengths) and min(lengths) >= 1, (slots, starts, lengths)
        device = cache.k.device
        self.lengths = lengths
        positions, token_slots, outputs, self.ends = [], [], [], []
        for slot, start, n, all_tokens in zip(slots, starts, lengths, every or [False] * len(slots)):
            outputs += range(len(positions), len(positions) + n) if all_tokens else [len(positions) + n - 1]
            self.ends.append(len(outputs) - 1)  # [R] where each row's last token is among the logits
            positions += range(start, start + n)
            token_slots += [slot] * n
        self.positions = torch.tensor(positions, device=device)  # [N] each token's position in its sequence
        self.token_slots = torch.tensor(token_slots, device=device)  # [N] each token's cache slot
        # [M] the tokens whose logits are needed; None when that is every token (decoding: one token a row)
        self.outputs = None if len(outputs) == len(positions) else torch.tensor(outputs, device=device)
        self.cos = cache.cos[self.positions][:, None, :]  # [N, 1, Hd], broadcast over heads
        self.sin = cache.sin[self.positions][:, None, :]
        # each row's keys and values, new tokens included, as one view [1, K, start + n, Hd] per layer
        self.keys = [cache.k[:, s:s + 1, :, :start + n].unbind(0) for s, start, n in zip(slots, starts, lengths)]
        self.values = [cache.v[:, s:s + 1, :, :start + n].unbind(0) for s, start, n in zip(slots, starts, lengths)]
        # a first chunk is causal; a later one attends to the cached tokens before it and causally within
        # itself: mask [n, start + n]; a single token sees everything
        self.causal = [n > 1 and start == 0 for start, n in zip(starts, lengths)]
        self.masks = [torch.arange(start + n, device=device)[None, :] <= torch.arange(start, start + n, device=device)[:, None]
                      if n > 1 and start > 0 else None for start, n in zip(starts, lengths)]
