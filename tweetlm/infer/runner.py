"""The decoder's forward for inference: model/llama.py's math over a KV cache, on the model's weights
rearranged for decoding. model/llama.py stays the reference (training, evaluation, export); tests hold this
forward's logits to its.

What differs from Llama.forward, and why (measured on the small preset, 2-core CPU, torch 2.13):
- q/k/v and gate/up are each one matrix (7 -> 4 matmuls per block): a decode step is a few hundred small
  ops with microseconds of overhead each, so fewer ops is speed.
- On CPU in fp32 the matrices are prepacked for oneDNN (`mkldnn._reorder_linear_weight`, as inductor's
  freezing does) and multiplied by `mkldnn._linear_pointwise`. This is what makes batches invariant:
  MKL's sgemm (F.linear) rounds a row differently with the number of rows M (classes M = 1, M = 2-3, and
  rows of a partial block of 4 when M < 12), while the packed oneDNN product gave the same bits for every
  row at every M tried (1 to 69, and up to 1100), at 1, 2, 3, 4 and 8 threads. It is also faster: the 17 matmuls of
  a step take 0.34 ms at M = 1 and 0.45 ms at M = 8, against 0.50 and 1.33 ms with MKL. Elsewhere (CUDA,
  other dtypes) plain F.linear runs and batch invariance is not promised.
- The weights are cast to `dtype`, by default device.inference_dtype: bf16 on CUDA (the model itself may stay fp32),
  fp32 on CPU.
- SiLU is written out as x / (1 + exp(-x)): F.silu's vectorized and scalar loops round differently (838 of
  20,000 values), and which loop a value meets depends on where a multi-threaded kernel splits the tensor,
  i.e. on the batch (a hazard; no test caught it here). exp, division and the other elementwise ops used
  here agree bitwise in both loops (200,000 values).
- Only each row's last token goes through the output head (a 256-token prompt chunk needs one row of logits),
  unless the prompt is being scored (SamplingParams.prompt_logprobs).
"""

import torch
import torch.nn.functional as F

from tweetlm.device import inference_dtype
from tweetlm.infer.kv_cache import Batch, KVCache
from tweetlm.model.llama import Llama


class Runner:
    """Holds the model's weights, fused and packed; `forward` runs one step of rows (see kv_cache.Batch)."""

    def __init__(self, model: Llama, *, dtype: torch.dtype | None = None):
        self.config = cfg = model.config
        weight = model.embed.weight
        self.device = weight.device
        self.dtype = inference_dtype(self.device) if dtype is None else dtype
        self._packed = self.device.type == "cpu" and self.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        self.embed = self._vector(weight)
        self.layers = []
        for block in model.blocks:
            a, m = block.attention, block.mlp
            self.layers.append({
                "attention_norm": self._vector(block.attention_norm.weight),
                "wqkv": self._matrix(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight])),
                "q_norm": self._vector(a.q_norm.weight) if cfg.qk_norm else None,
                "k_norm": self._vector(a.k_norm.weight) if cfg.qk_norm else None,
                "wo": self._matrix(a.wo.weight),
                "mlp_norm": self._vector(block.mlp_norm.weight),
                "w13": self._matrix(torch.cat([m.w1.weight, m.w3.weight])),
                "w2": self._matrix(m.w2.weight),
            })
        self.norm = self._vector(model.norm.weight)
        self.head = self._matrix(weight if model.output is None else model.output.weight)

    def _vector(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach().to(self.dtype)

    def _matrix(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach().to(self.dtype).contiguous()
        # the batch-size hint only picks the packed layout: every M gives the same bits with any of 2, 8, 32;
        # 32 was fastest at M = 1 and 8 (0.34 and 0.45 ms for the small preset's 17 matrices, hot caches)
        return torch.ops.mkldnn._reorder_linear_weight(w, 32) if self._packed else w

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._packed:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return F.linear(x, w)

    def forward(self, tokens: torch.Tensor, batch: Batch, cache: KVCache) -> torch.Tensor:
        """tokens [N] (the rows' new tokens, flat) -> logits [M, V] fp32 at batch.outputs (each row's last token,
        every token of a scored prompt; batch.ends[i] is row i's last). Call it under
        torch.inference_mode() (the engine's thread runs in it). Shapes: N tokens, R rows, D dim, H query heads,
        K kv heads, Hd head dim."""
        cfg = self.config
        H, K, Hd, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
        x = F.embedding(tokens, self.embed)  # [N, D]
        for i, layer in enumerate(self.layers):
            qkv = self._linear(F.rms_norm(x, (cfg.dim,), layer["attention_norm"], eps), layer["wqkv"])
            qk, v = qkv.view(-1, H + 2 * K, Hd).split((H + K, K), dim=1)  # [N, H + K, Hd], [N, K, Hd]
            if cfg.qk_norm:
                qk = torch.cat((F.rms_norm(qk[:, :H], (Hd,), layer["q_norm"], eps),
                                F.rms_norm(qk[:, H:], (Hd,), layer["k_norm"], eps)), dim=1)
            qk = (qk * batch.cos + qk.roll(Hd // 2, -1) * batch.sin).to(qk.dtype)  # rotary in fp32, as the model
            q, k = qk.split((H, K), dim=1)  # [N, H, Hd], [N, K, Hd]
            x += self._linear(cache.attend(i, q, k, v, batch), layer["wo"])
            gate, up = self._linear(F.rms_norm(x, (cfg.dim,), layer["mlp_norm"], eps), layer["w13"]).chunk(2, dim=-1)
            x += self._linear(gate / (1 + torch.exp(-gate)) * up, layer["w2"])  # SiLU(gate) * up
        if batch.outputs is not None:  # only the rows' last tokens (and scored prompts) need logits
            x = x[batch.outputs]  # [M, D]
        x = F.rms_norm(x, (cfg.dim,), self.norm, eps)
        return self._linear(x, self.head).float()  # [M, V]
