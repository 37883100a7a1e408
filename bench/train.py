"""Benchmark of `tweetlm train` against transformers' LlamaForCausalLM of the same shape, same data, same budget.

    .venv/bin/python bench/train.py                         # small preset, 5 minutes each (~12 minutes in all)
    .venv/bin/python bench/train.py --minutes 0.5 --quick   # a smoke run

Both sides train on the same token shards, batch after batch in the same order (TokenBatches, same seed),
for the same wall-clock budget of training steps (evaluation not counted), and are scored by the same function
(val loss and bits-per-byte on the same fixed val windows, tweetlm.model.scoring.evaluate):
- tweetlm: `train()` itself, as `tweetlm train` runs it (its config: Muon + AdamW, WSD schedule over the time
  budget, compile if --compile);
- transformers: LlamaForCausalLM (same vocab, width, depth, heads, kv heads, SwiGLU width, tied embeddings,
  SDPA attention, its own init) in a plain PyTorch loop: AdamW(lr --hf-lr, betas 0.9/0.95, weight decay 0.1),
  linear warmup then cosine to 10% over the time budget, gradient clipping at 1, fp32 on CPU, bf16 autocast on CUDA.
tokens/s counts training steps only, first step (warm-up, compilation) left out; MFU = FLOPs per token
(model/sizing.py) x tokens/s / peak (train/dist.py: data sheet on CUDA, a measured matmul rate on CPU).

Data: --tokens/--tokenizer, or by default every TweetEval and XLM-T train text of ../shared/data run through
`data prepare` (split 90/5/5 by conversation), a 8192-token tokenizer and `data tokenize`, cached in --work.
Prints a table, then one line of JSON. Other processes on the machine slow both sides: the load average is printed.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TWEETLM_DATA") or ROOT.parent / "shared" / "data")  # bench/gpu.sh carries a copy


def prepare_data(work: Path, vocab_size: int) -> tuple[Path, Path]:
    from tweetlm.data.prepare import PrepareConfig, prepare
    from tweetlm.tokenizer.shards import TokenizeConfig, tokenize
    from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer

    corpus, tokenizer, tokens = work / "corpus", work / f"tokenizer-{vocab_size}", work / f"tokens-{vocab_size}"
    if not (corpus / "report.json").is_file():
        inputs = sorted(str(p) for p in SHARED.glob("*/*/train_text.txt"))
        prepare(PrepareConfig(inputs=tuple(inputs), out=corpus))
    if not (tokenizer / "tokenizer.json").is_file():
        train_tokenizer(TokenizerConfig(corpus=corpus, out=tokenizer, vocab_size=vocab_size))
    if not (tokens / "index.json").is_file():
        tokenize(TokenizeConfig(corpus=corpus, tokenizer=tokenizer, out=tokens))
    return tokens, tokenizer


class HFAdapter(torch.nn.Module):
    """LlamaForCausalLM behind tweetlm's forward(tokens, targets, reduction=...), so one evaluate() scores both."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, tokens, targets=None, *, reduction="mean"):
        logits = self.hf(input_ids=tokens).logits.float()  # [B, T, V]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)
        return loss if reduction == "mean" else loss.view(targets.shape)


def hf_model(cfg, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                         num_hidden_layers=cfg.depth, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                         head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
                         rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
                         mlp_bias=False, attn_implementation="sdpa")
    return HFAdapter(LlamaForCausalLM(hf_cfg)).to(device)


def train_hf(tcfg, model_cfg, minutes: float, lr: float) -> dict:
    """The plain loop: same batches, same budget rule (training time only), same evaluation as train()."""
    from tweetlm.device import autocast, resolve_device
    from tweetlm.model.scoring import evaluate
    from tweetlm.tokenizer.bpe import Tokenizer
    from tweetlm.tokenizer.shards import open_split, read_index
    from tweetlm.train.batches import TokenBatches, val_batches

    device = resolve_device(tcfg.device)
    torch.manual_seed(tcfg.seed)
    index = read_index(tcfg.tokens)
    model = hf_model(model_cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    seq_len = tcfg.model.seq_len
    batches = TokenBatches(open_split(tcfg.tokens, "train"), boundary_id=index["boundary_id"], seq_len=seq_len,
                           batch_size=tcfg.micro_batch, seed=tcfg.seed)
    val = val_batches(open_split(tcfg.tokens, "val"), boundary_id=index["boundary_id"], seq_len=seq_len,
                      batch_size=tcfg.micro_batch, max_tokens=tcfg.eval.tokens)
    token_bytes = torch.tensor(Tokenizer.load(tcfg.tokenizer).token_bytes(), device=device)
    budget, train_time, steps, timed_tokens, timed_time = 60 * minutes, 0.0, 0, 0, 0.0
    while train_time < budget:
        progress = train_time / budget
        warmup = 0.02
        mult = progress / warmup if progress < warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * mult
        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(tcfg.grad_accum):
            inputs, targets = (t.to(device) for t in batches.next())
            with autocast(device):
                loss = model(inputs, targets)
            (loss / tcfg.grad_accum).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        train_time, steps = train_time + dt, steps + 1
        if steps > 1:
            timed_tokens, timed_time = timed_tokens + tcfg.batch_tokens, timed_time + dt
    tok_per_s = timed_tokens / timed_time if timed_time else steps * tcfg.batch_tokens / train_time  # one step only
    return {"step": steps, "loss": loss_sum / tcfg.grad_accum, **evaluate(model, val, token_bytes, device),
            "tokens": steps * tcfg.batch_tokens, "time": train_time, "tok_per_s": tok_per_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", help="token shards (default: made from ../shared/data in --work)")
    ap.add_argument("--tokenizer", help="their tokenizer (with --tokens)")
    ap.add_argument("--work", default=Path(tempfile.gettempdir()) / "tweetlm-bench-train", type=Path, help="cache for the default data")
    ap.add_argument("--preset", default="small", help="model preset (default small)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=4096, help="tokens per optimizer step (default 4096, as configs/demo.toml)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training-time budget of each side (default 5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="tweetlm side with torch.compile")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="tweetlm config overrides (repeatable)")
    ap.add_argument("--hf-lr", type=float, default=3e-3, help="AdamW peak LR of the transformers side (default 3e-3)")
    ap.add_argument("--quick", action="store_true", help="smaller val set (8192 tokens), for smoke runs")
    a = ap.parse_args()

    from tweetlm.device import device_name, resolve_device
    from tweetlm.model.sizing import flops_per_token
    from tweetlm.tokenizer.bpe import Tokenizer
    from tweetlm.train.config import load_config, parse_set
    from tweetlm.train.dist import peak_flops
    from tweetlm.train.loop import train

    tokens, tokenizer = (Path(a.tokens), Path(a.tokenizer)) if a.tokens else prepare_data(a.work, 8192)
    out = a.work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = {"tokens": tokens, "tokenizer": tokenizer, "out": out, "model.preset": a.preset, "model.seq_len": a.seq_len,
                 "micro_batch": a.micro_batch, "batch_tokens": a.batch_tokens, "time_budget": a.minutes, "device": a.device,
                 "compile": a.compile, "eval.every": 10**9, "eval.samples_every": 10**9, "checkpoint.every": 10**9,
                 "eval.tokens": 8192 if a.quick else 65536, **parse_set(a.set)}
    tcfg = load_config(None, overrides)
    model_cfg = tcfg.model.resolve(vocab_size=Tokenizer.load(tokenizer).vocab_size)
    device = resolve_device(a.device)
    peak, peak_source = peak_flops(device)  # one figure for both sides
    load = {"before": os.getloadavg()[0]}
    ours = train(tcfg)
    load["between"] = os.getloadavg()[0]
    theirs = train_hf(tcfg, model_cfg, a.minutes, a.hf_lr)
    load["after"] = os.getloadavg()[0]
    for r in (ours, theirs):
        r["mfu"] = flops_per_token(model_cfg, tcfg.model.seq_len) * r["tok_per_s"] / peak if peak else None

    print(f"\n{a.preset} ({model_cfg.depth} layers, dim {model_cfg.dim}, vocab {model_cfg.vocab_size}), "
          f"{tcfg.micro_batch} x {tcfg.model.seq_len} x {tcfg.grad_accum} = {tcfg.batch_tokens} tokens/step, "
          f"{a.minutes:g} min each, {device_name(device)}, peak {peak / 1e12 if peak else float('nan'):.3f} TFLOP/s "
          f"({peak_source}), 1-minute load average {load}")
    print(f"{'':<14}{'steps':>7}{'tok/s':>10}{'MFU':>8}{'train loss':>12}{'val loss':>10}{'val bpb':>9}")
    for name, r in (("tweetlm", ours), ("transformers", theirs)):
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        print(f"{name:<14}{r['step']:>7}{r['tok_per_s']:>10,.0f}{mfu:>8}{r['loss']:>12.4f}{r['val_loss']:>10.4f}{r['val_bpb']:>9.4f}")
    ratio = ours["tok_per_s"] / theirs["tok_per_s"]
    print(f"tokens/s ratio {ratio:.2f}x; val bpb {ours['val_bpb']:.4f} vs {theirs['val_bpb']:.4f}")
    print(json.dumps({"bench": "train", "preset": a.preset, "minutes": a.minutes, "batch_tokens": tcfg.batch_tokens,
                      "compile": a.compile, "device": device_name(device), "peak_flops": peak, "load": load,
                      "tweetlm": ours, "transformers": theirs,
                      "tok_per_s_ratio": ratio, "argv": sys.argv[1:]}))


if __name__ == "__main__":
    main()
