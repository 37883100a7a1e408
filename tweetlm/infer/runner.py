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
- A mixture of experts routes as the model does (llama.mixture: the same fp32 router logits, softmax, top k); each
  expert multiplies the group of tokens routed to it with its packed matrices, and since the packed product gives
  a row the same bits at any M, a token's output does not depend on which tokens share its experts: batch
  invariance holds as for the dense model (tests/test_infer_engine.py). The groups' sizes are read on the host
  (one sync per block), which a CUDA graph cannot hold: on CUDA an MoE's decode steps run eagerly.
- Only each row's last token goes through the output head (a 256-token prompt chunk needs one row of logits),
  unless the prompt is being scored (SamplingParams.prompt_logprobs).
"""

import torch
import torch.nn.functional as F

from tweetlm.device import inference_dtype
from tweetlm.infer.kv_cache import Batch, KVCache
from tweetlm.model.llama import Llama, MoE, mixture


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
                **(self._experts(m) if cfg.experts else {"mlp": self._swiglu_weights(m.w1.weight, m.w3.weight, m.w2.weight)}),
            })
        self.norm = self._vector(model.norm.weight)
        self.head = self._matrix(weight if model.output is None else model.output.weight)
        self._graphs = {}  # (rows, keys) -> (static inputs, CUDA graph, its logits): decode's captured steps
        self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    def _swiglu_weights(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._matrix(torch.cat([w1, w3])), self._matrix(w2)  # gate | up, down

    def _experts(self, moe: MoE) -> dict:
        """An MoE block's weights: the router (kept in fp32, as the model routes), each expert's pair, the shared MLP's."""
        return {"router": self._matrix(moe.router.weight, torch.float32),
                "experts": [self._swiglu_weights(*w) for w in zip(moe.w1, moe.w3, moe.w2)],
                "shared": self._swiglu_weights(moe.shared.w1.weight, moe.shared.w3.weight, moe.shared.w2.weight) if moe.shared else None}

    def _vector(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach().to(self.dtype)

    def _matrix(self, w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = w.detach().to(dtype or self.dtype).contiguous()
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
        x = self._blocks(F.embedding(tokens, self.embed), batch.cos, batch.sin,
                         lambda i, q, k, v: cache.attend(i, q, k, v, batch))  # [N, D]
        if batch.outputs is not None:  # only the rows' last tokens (and scored prompts) need logits
            x = x[batch.outputs]  # [M, D]
        return self._head(x)

    def decode(self, tokens: list[int], slots: list[int], positions: list[int], cache: KVCache) -> torch.Tensor:
        """One decoding step, one new token per row, on CUDA: rows padded to a power of two (padding rows write
        the cache's padding slot) and keys to a power of two of positions (masked), so that each of these few
        shapes is captured once as a CUDA graph and replayed: a 1b step is ~250 kernels, each launched from
        Python in ~20 us (8.3 ms a step on an H200 for 0.5 ms of memory traffic), while a replay launches them
        all at once. Elsewhere (tests on CPU) the same padded step runs eagerly. -> logits [R, V] fp32."""
        rows = len(tokens)
        B = 1 << (rows - 1).bit_length()
        L = min(cache.k.shape[3], max(64, 1 << max(positions).bit_length()))  # keys 0..max position, rounded up
        pad = B - rows
        inputs = torch.tensor([tokens + [0] * pad, slots + [cache.k.shape[1] - 1] * pad, positions + [0] * pad])
        if self.device.type != "cuda" or self.config.experts:  # an MoE's expert groups are sized on the host
            return self._decode(*inputs, cache, L)[:rows]
        if (B, L) not in self._graphs:
            self._graphs[B, L] = self._capture(inputs, cache, L)
        static, graph, logits = self._graphs[B, L]
        static.copy_(inputs)
        graph.replay()
        return logits[:rows]

    def _capture(self, inputs: torch.Tensor, cache: KVCache, L: int):
        """A CUDA graph of _decode at these shapes, over static inputs; all graphs share one memory pool (they
        never run at once). Warm-up on a side stream first, as torch.cuda.graphs asks."""
        static = inputs.to(self.device)
        static[1] = cache.k.shape[1] - 1  # warm-up and capture write the padding slot only
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._decode(*static, cache, L)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._decode(*static, cache, L)
        return static, graph, logits

    def _decode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                L: int) -> torch.Tensor:
        """tokens, slots, positions [B] -> logits [B, V]: every shape fixed by (B, L)."""
        positions = positions.to(self.device)
        mask = torch.arange(L, device=self.device)[None, :] <= positions[:, None]  # [B, L] the row's keys so far
        x = self._blocks(F.embedding(tokens.to(self.device), self.embed), cache.cos[positions][:, None],
                         cache.sin[positions][:, None],
                         lambda i, q, k, v: cache.attend_padded(i, q, k, v, slots.to(self.device), positions, mask))
        return self._head(x)

    def _blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """The decoder blocks over x [N, D]; cos, sin [N, 1, Hd]; attend(layer, q, k, v) -> [N, H * Hd]."""
        cfg = self.config
        H, K, Hd, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
        for i, layer in enumerate(self.layers):
            qkv = self._linear(F.rms_norm(x, (cfg.dim,), layer["attention_norm"], eps), layer["wqkv"])
            qk, v = qkv.view(-1, H + 2 * K, Hd).split((H + K, K), dim=1)  # [N, H + K, Hd], [N, K, Hd]
            if cfg.qk_norm:
                qk = torch.cat((F.rms_norm(qk[:, :H], (Hd,), layer["q_norm"], eps),
                                F.rms_norm(qk[:, H:], (Hd,), layer["k_norm"], eps)), dim=1)
            qk = (qk * cos + qk.roll(Hd // 2, -1) * sin).to(qk.dtype)  # rotary in fp32, as the model
            q, k = qk.split((H, K), dim=1)  # [N, H, Hd], [N, K, Hd]
            x += self._linear(attend(i, q, k, v), layer["wo"])
            x += self._mlp(F.rms_norm(x, (cfg.dim,), layer["mlp_norm"], eps), layer)
        return x

    def _mlp(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        """The block's MLP on x [N, D]: the SwiGLU, or the mixture of experts (see the module docstring)."""
        if "router" not in layer:
            return self._swiglu(x, *layer["mlp"])
        logits = self._linear(x.float(), layer["router"])  # [N, E] fp32
        out, _, _ = mixture(x, logits, self.config.experts_active, lambda e, rows: self._swiglu(rows, *layer["experts"][e]))
        return out if layer["shared"] is None else out + self._swiglu(x, *layer["shared"])

    def _swiglu(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        gate, up = self._linear(x, w13).chunk(2, dim=-1)
        return self._linear(gate / (1 + torch.exp(-gate)) * up, w2)  # SiLU(gate) * up

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (self.config.dim,), self.norm, self.config.norm_eps)
        return self._linear(x, self.head).float()  # [M, V]
