"""What tweetlm does on an NVIDIA GPU: marked `cuda`, skipped where PyTorch sees none (CI), run by bench/gpu.sh.

Tolerances, from the precisions involved: bf16 keeps 8 bits of mantissa (a relative rounding of 2^-9 = 2e-3 per
value), so a forward in bf16 autocast lands within about 1e-2 of fp32 in loss and within a few 1e-2 in each
gradient's relative norm; fp32 on CUDA against fp32 on CPU differs by summation order only (1e-4 on logits of
a few units). Their CPU counterparts (the branches that choose the dtype, the policy and the device) are in
tests/test_device.py.
"""

import shutil

import pytest
import torch
from helpers import _config, _records

from tweetlm.artifacts.checkpoint import latest_checkpoint
from tweetlm.device import autocast
from tweetlm.infer.engine import Engine, SamplingParams
from tweetlm.infer.kv_cache import Batch, KVCache
from tweetlm.infer.runner import Runner
from tweetlm.model.llama import Llama
from tweetlm.model.sizing import preset
from tweetlm.model.weights import load_model, save_model
from tweetlm.tokenizer.bpe import Tokenizer
from tweetlm.train.loop import train

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
GPU = {"device": "cuda", "model.preset": "small", "model.seq_len": 128, "batch_tokens": 4096, "micro_batch": 16,
       "steps": 12, "eval.every": 6, "checkpoint.every": 6, "eval.samples": 1, "optim.name": "adamw", "optim.lr": 0.006}


def _model(vocab_size: int = 1000, seed: int = 0, name: str = "small") -> Llama:
    model = Llama(preset(name, vocab_size=vocab_size, max_seq_len=256)).to(CUDA)
    model.init_weights(torch.Generator(CUDA).manual_seed(seed))
    return model


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_autocast_forward_backward_is_fp32_to_bf16_rounding():
    model = _model()
    tokens = torch.randint(0, 1000, (4, 129), generator=torch.Generator(CUDA).manual_seed(1), device=CUDA)
    x, y = tokens[:, :-1], tokens[:, 1:]
    losses, grads = {}, {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        seen = []
        hook = model.blocks[0].attention.wq.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        with autocast(CUDA) if precision == "bf16" else torch.autocast("cuda", enabled=False):
            loss = model(x, y)
        hook.remove()
        loss.backward()
        assert seen == [torch.bfloat16 if precision == "bf16" else torch.float32]
        assert loss.dtype == torch.float32  # the loss is reduced in fp32 under autocast too
        losses[precision] = loss.item()
        grads[precision] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 1e-2, losses
    worst = max((_relative(grads["bf16"][n], g), n) for n, g in grads["fp32"].items())
    assert worst[0] < 5e-2, worst


@pytest.fixture(scope="module")
def fsdp_run(small_tokens, small_tokenizer, tmp_path_factory):
    """The small preset trained 12 steps on one GPU under FSDP2 (bf16 MixedPrecisionPolicy), checkpoints at 6 and 12."""
    run = tmp_path_factory.mktemp("cuda") / "fsdp"
    train(_config(small_tokens, small_tokenizer, run, parallel="fsdp", **GPU))
    return run


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


def test_fsdp_bf16_policy_trains_like_plain_autocast(fsdp_run, small_tokens, small_tokenizer, tmp_path):
    """FSDP2 computes with bf16 copies of the weights, plain autocast casts fp32 weights per matmul: the same
    first step to bf16 rounding, and both learn."""
    plain = tmp_path / "plain"
    train(_config(small_tokens, small_tokenizer, plain, **GPU))
    fsdp, ddp = _losses(fsdp_run), _losses(plain)
    assert fsdp.keys() == ddp.keys() == set(range(1, 13))
    assert abs(fsdp[1] - ddp[1]) < 1e-3, (fsdp, ddp)  # the same weights: bf16 rounding only (3e-5 on an H200)
    # then the two round differently at every step, and training amplifies it (0.13 apart by step 12 on an H200)
    assert abs(fsdp[12] - ddp[12]) < 0.3 and fsdp[12] < fsdp[1] - 0.5 and ddp[12] < ddp[1] - 0.5, (fsdp, ddp)


def test_dcp_checkpoint_written_on_cuda_loads_on_cuda_and_cpu_and_resumes(fsdp_run, small_tokens, small_tokenizer, tmp_path):
    final = latest_checkpoint(fsdp_run)
    assert (final / ".metadata").is_file()  # FSDP writes the sharded (DCP) layout, also in one process
    on_gpu, tokenizer = load_model(fsdp_run, device=CUDA)
    on_cpu, _ = load_model(fsdp_run)
    assert on_gpu.embed.weight.device.type == "cuda" and on_gpu.embed.weight.dtype == torch.float32
    ids = [tokenizer.boundary_id] + tokenizer.encode("good morning everyone, what a match last night")
    with torch.no_grad():
        gpu = on_gpu(torch.tensor([ids], device=CUDA)).cpu()
        cpu = on_cpu(torch.tensor([ids]))
    assert (gpu - cpu).abs().max() < 1e-3 * cpu.abs().max()

    # resumed from step 6 on the GPU: steps 7-12 again, the losses of the straight run to bf16 rounding
    run = tmp_path / "resumed"
    shutil.copytree(fsdp_run, run)
    shutil.rmtree(final)
    train(_config(small_tokens, small_tokenizer, run, parallel="fsdp", **GPU), resume=True)
    again, straight = _losses(run), _losses(fsdp_run)
    assert again.keys() == straight.keys()
    assert max(abs(again[s] - straight[s]) for s in straight) < 1e-2, (again, straight)


def test_engine_on_cuda_matches_the_model(small_tokenizer):
    tokenizer = Tokenizer.load(small_tokenizer)
    model = _model(tokenizer.vocab_size).eval()
    prompt = [tokenizer.boundary_id] + tokenizer.encode("the match tonight was")
    with torch.no_grad():
        reference = model(torch.tensor([prompt], device=CUDA))[0]  # [T, V] fp32
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        runner = Runner(model, dtype=dtype)
        cache = KVCache(model.config, 2, 64, dtype=dtype, device=CUDA)
        with torch.inference_mode():
            logits = runner.forward(torch.tensor(prompt, device=CUDA), Batch(cache, [0], [0], [len(prompt)], [True]), cache)
        assert logits.dtype == torch.float32 and cache.k.dtype == dtype
        assert _relative(logits, reference) < tolerance, (dtype, _relative(logits, reference))

    # the engine decodes in bf16 by default on CUDA, in replayed CUDA graphs: 3 requests at once, each greedy token
    # the model's argmax to bf16 rounding (an untrained model's logits are near ties), with its logprob
    prompts = [prompt, prompt[:2], [tokenizer.boundary_id] + tokenizer.encode("what a game, what a night for the fans")]
    with Engine(model, None, max_batch_size=4) as engine:
        assert engine._runner.dtype == torch.bfloat16
        requests = [engine.submit(p, SamplingParams(max_tokens=16, temperature=0, logprobs=1)) for p in prompts]
        answers = [list(r) for r in requests]
        assert engine._runner._graphs, "decoding did not run in CUDA graphs"
    for p, deltas in zip(prompts, answers):
        out = [t for d in deltas for t in d.token_ids]
        chosen = [lp.logprob for d in deltas for lp in d.logprobs]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + out], device=CUDA))[0, len(p) - 1:-1], dim=-1)  # [16, V]
        assert len(out) == len(chosen) == 16
        ours = logp[torch.arange(16, device=CUDA), torch.tensor(out, device=CUDA)]
        assert (logp.max(dim=-1).values - ours).max() < 0.1, "a greedy token that is not the model's argmax"
        assert (ours - torch.tensor(chosen, device=CUDA)).abs().max() < 0.15  # 0.05 seen: bf16's 2^-9 of logprobs ~ -4


def test_moe_engine_on_cuda_runs_eagerly_and_matches_the_model(small_tokenizer):
    """small-moe on CUDA: the runner's fp32 forward is the model's to summation order, and the engine (bf16) decodes
    without CUDA graphs (an MoE's expert groups are sized on the host) and finishes every request. Greedy tokens are
    not compared in bf16: a near tie between a token's 2nd and 3rd expert may route it otherwise than fp32."""
    tokenizer = Tokenizer.load(small_tokenizer)
    model = _model(tokenizer.vocab_size, name="small-moe").eval()
    prompt = [tokenizer.boundary_id] + tokenizer.encode("the match tonight was")
    with torch.no_grad():
        reference = model(torch.tensor([prompt], device=CUDA))[0]  # [T, V] fp32
    runner = Runner(model, dtype=torch.float32)
    cache = KVCache(model.config, 2, 64, dtype=torch.float32, device=CUDA)
    with torch.inference_mode():
        logits = runner.forward(torch.tensor(prompt, device=CUDA), Batch(cache, [0], [0], [len(prompt)], [True]), cache)
    assert _relative(logits, reference) < 1e-4, _relative(logits, reference)
    with Engine(model, None, max_batch_size=4) as engine:
        requests = [engine.submit(p, SamplingParams(max_tokens=16, temperature=0)) for p in (prompt, prompt[:2])]
        answers = [[t for d in r for t in d.token_ids] for r in requests]
        assert engine._runner.dtype == torch.bfloat16 and not engine._runner._graphs
    assert [len(a) for a in answers] == [16, 16]


def test_hf_export_gives_the_same_logits_on_cuda(small_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from tweetlm.model.hf import export_hf

    tokenizer = Tokenizer.load(small_tokenizer)
    model = _model(tokenizer.vocab_size).eval()
    save_model(model, tmp_path / "run")
    tokenizer.save(tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="sdpa").to(CUDA).eval()
    ids = torch.tensor([[tokenizer.boundary_id] + tokenizer.encode("see you at the game tomorrow")], device=CUDA)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.std() > 0.1
    assert (ours - theirs).abs().max() < 1e-4 * ours.abs().max() + 1e-5
