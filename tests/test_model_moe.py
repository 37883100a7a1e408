"""Mixture of experts: the MoE block against a naive per-token loop, its router losses, its init, exact sizes; a tiny
MoE run on real posts through `tweetlm train --set model.experts=4`, resumed, under 2-process FSDP, fine-tuned (SFT,
TweetEval); decoded by the engine and exported to transformers' Mixtral."""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DATA, TINY, _config, _real_posts, _records

from tweetlm.cli import main
from tweetlm.errors import ConfigError, UserError
from tweetlm.eval.finetune import finetune
from tweetlm.eval.tweeteval import load_task
from tweetlm.infer.engine import Engine, SamplingParams
from tweetlm.model.hf import export_hf
from tweetlm.model.llama import MLP, Llama, ModelConfig, MoE
from tweetlm.model.sizing import config_from_depth, flops_per_token, num_params, preset
from tweetlm.model.weights import load_model
from tweetlm.train.config import load_config
from tweetlm.train.loop import train
from tweetlm.train.sft import SftConfig, Source, sft

MOE = {"model.experts": 4, "model.experts_active": 2}
STEPS = 12


def _moe(experts=4, active=2, **fields) -> ModelConfig:
    return replace(preset("tiny", vocab_size=300, max_seq_len=64), experts=experts, experts_active=active, **fields)


def _naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """x [N, D] -> [N, D]: each token alone through the softmax, its top-k experts and the shared ones."""
    rows = []
    for token in x:
        probs = torch.softmax(moe.router.weight @ token, dim=-1)
        weights, chosen = probs.topk(moe.k)
        weights = weights / weights.sum()
        y = sum(w * (moe.w2[e] @ (F.silu(moe.w1[e] @ token) * (moe.w3[e] @ token))) for w, e in zip(weights, chosen))
        rows.append(y + (moe.shared(token) if moe.shared is not None else 0))
    return torch.stack(rows)


# ---------------------------------------------------------------- the block


def test_dense_shape_is_unchanged_and_identical_experts_are_the_dense_mlp():
    """experts = 0 builds today's model, names and all; and an MoE whose experts are all the dense MLP computes the
    dense model's logits (the k weights sum to 1), so routing adds nothing but the choice of experts."""
    dense_cfg = preset("tiny", vocab_size=300, max_seq_len=64)
    dense = Llama(dense_cfg)
    dense.init_weights(torch.Generator().manual_seed(0))
    block = [n.removeprefix("blocks.0.") for n, _ in dense.named_parameters() if n.startswith("blocks.0.")]
    assert block == ["attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                     "attention.wo.weight", "mlp_norm.weight", "mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight"]
    assert isinstance(dense.blocks[0].mlp, MLP) and dense_cfg.experts == 0
    moe = Llama(_moe())
    state = {n: p for n, p in dense.state_dict().items() if ".mlp." not in n}
    for i, b in enumerate(dense.blocks):
        for name in ("w1", "w2", "w3"):
            state[f"blocks.{i}.mlp.{name}"] = getattr(b.mlp, name).weight.detach().expand(4, -1, -1)
        state[f"blocks.{i}.mlp.router.weight"] = torch.randn(4, dense_cfg.dim)
    moe.load_state_dict(state)
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens), dense(tokens), rtol=1e-5, atol=1e-5)


def test_moe_forward_and_backward_reach_every_weight():
    cfg = _moe(shared_experts=1, expert_dim=48)
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, MoE) and isinstance(mlp.shared, MLP)
    shapes = {n.removeprefix("blocks.0.mlp."): tuple(p.shape) for n, p in model.named_parameters() if ".0.mlp." in n}
    assert shapes == {"router.weight": (4, 64), "w1": (4, 48, 64), "w3": (4, 48, 64), "w2": (4, 64, 48),
                      "shared.w1.weight": (48, 64), "shared.w3.weight": (48, 64), "shared.w2.weight": (64, 48)}
    tokens = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(1))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    router = model.router_loss()
    (loss + router).backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the router losses alone reach the router: that is what balances it
    model.zero_grad()
    model(tokens[:, :-1], tokens[:, 1:])
    model.router_loss().backward()
    assert mlp.router.weight.grad.abs().sum() > 0
    model.eval()  # evaluation keeps nothing: a loaded model holds no graph and deep-copies
    model.blocks[0].mlp.aux_loss = None
    with torch.no_grad():
        model(tokens)
    assert model.blocks[0].mlp.aux_loss is None


@pytest.mark.parametrize("skewed", [False, True], ids=["spread", "one-expert-takes-most"])
def test_dropless_routing_equals_a_naive_per_token_loop(skewed):
    cfg = _moe(experts=8, active=2, shared_experts=1, expert_dim=40)
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2, generator=g)
    x = torch.randn(3, 50, cfg.dim, generator=g)
    if skewed:  # a feature every token has, which only expert 5 reads
        x[..., 0] = 4.0
        moe.router.weight.data[5, 0] = 3.0
    y = moe(x)
    load = moe.load
    assert load.sum() == 3 * 50 * 2  # every token reached its 2 experts: none dropped
    if skewed:
        assert load[5] >= 0.95 * 150 and load.max() / load.float().mean() > 3.5, load
    torch.testing.assert_close(y.view(-1, cfg.dim), _naive(moe, x.view(-1, cfg.dim)), rtol=1e-5, atol=1e-5)


def test_load_balancing_loss_is_one_when_balanced_and_grows_with_imbalance():
    """Switch form: E x sum_e f_e P_e = 1.0 for perfectly balanced routing; Llama.router_loss is then the coef
    (plus the z-loss's share)."""
    cfg = ModelConfig(vocab_size=16, depth=1, dim=8, n_heads=2, n_kv_heads=1, ffn_dim=16, experts=4, experts_active=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.w1), torch.nn.init.normal_(moe.w2), torch.nn.init.normal_(moe.w3)
    x = torch.eye(8)[:4].repeat(5, 1)[None]  # 20 tokens, 4 kinds
    balanced = torch.zeros(4, 8)
    for i in range(4):  # kind i prefers experts i and i + 1: each expert gets a quarter of the assignments
        balanced[i, i] = balanced[(i + 1) % 4, i] = 10.0
    moe.router.weight.data = balanced
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert (moe.load == 10).all()
    unbalanced = torch.zeros(4, 8)
    unbalanced[:2, :4] = 10.0  # every token prefers experts 0 and 1
    moe.router.weight.data = unbalanced
    moe(x)
    assert moe.aux_loss.item() > 1.9 and moe.load.tolist() == [20, 20, 0, 0]
    # the model's router loss: coefficients times the means over blocks
    model = Llama(_moe())
    model.init_weights(torch.Generator().manual_seed(0))
    model(torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1)))
    layers = [b.mlp for b in model.blocks]
    expected = 0.01 * sum(m.aux_loss for m in layers) / 2 + 0.001 * sum(m.z_loss for m in layers) / 2
    assert model.router_loss().item() == pytest.approx(expected.item(), rel=1e-6)


def test_init_statistics_on_real_posts(tokenizer):
    """Each expert starts as the dense MLP would; the router gives unit-scale logits, spreads real posts' tokens
    over the experts, and the loss starts at the uniform guess."""
    cfg = config_from_depth(4, vocab_size=tokenizer.vocab_size, max_seq_len=128, experts=8, experts_active=2)
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    std = cfg.dim**-0.5
    for block in model.blocks:
        for e in range(8):
            assert block.mlp.w1[e].std().item() == pytest.approx(std, rel=0.05)
            assert block.mlp.w3[e].std().item() == pytest.approx(std, rel=0.05)
            assert block.mlp.w2[e].std().item() == pytest.approx(std / (2 * cfg.depth) ** 0.5, rel=0.05)
    logits = []
    model.blocks[2].mlp.register_forward_pre_hook(lambda m, args: logits.append(F.linear(args[0], m.router.weight)))
    ids = [tokenizer.boundary_id]
    for post in _real_posts()[:400]:
        ids += tokenizer.encode(post) + [tokenizer.boundary_id]
    tokens = torch.tensor(ids[:16 * 129]).view(16, 129)
    with torch.no_grad():
        loss = model(tokens[:, :-1], tokens[:, 1:]).item()
    assert abs(loss - math.log(tokenizer.vocab_size)) < 1.0, loss
    assert 0.7 < logits[0].std().item() < 1.3
    for block in model.blocks:
        balance = block.mlp.load / block.mlp.load.float().mean()
        assert 0.4 < balance.min() and balance.max() < 1.8, balance


def test_expert_fields_are_checked():
    with pytest.raises(ConfigError, match="model.experts_active = 5: must be from 2 to model.experts = 4"):
        _moe(experts=4, active=5)
    with pytest.raises(ConfigError, match="model.experts_active = 1"):
        _moe(experts=4, active=1)
    with pytest.raises(ConfigError, match="model.shared_experts = 1: needs routed experts"):
        replace(preset("tiny", vocab_size=300), shared_experts=1)
    with pytest.raises(ConfigError, match="model.expert_dim = 0"):
        _moe(expert_dim=0)


@pytest.mark.parametrize("fields", [dict(), dict(shared_experts=2, expert_dim=48, qk_norm=True, tie_embeddings=False)],
                         ids=["4x2", "4x2+2-untied"])
def test_total_and_active_parameters_are_exact(fields):
    cfg = _moe(**fields)
    model = Llama(cfg)
    total = sum(p.numel() for p in model.parameters())
    one_expert = sum(p[0].numel() for p in (model.blocks[0].mlp.w1, model.blocks[0].mlp.w2, model.blocks[0].mlp.w3))
    assert num_params(cfg) == total
    assert num_params(cfg, active=True) == total - cfg.depth * (cfg.experts - cfg.experts_active) * one_expert
    assert flops_per_token(cfg, 64) == 6 * num_params(cfg, embedding=False, active=True) + 12 * cfg.depth * cfg.dim * 64


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def moe_run(small_tokens, small_tokenizer, tmp_path_factory):
    """12 steps of the tiny preset with 4 experts, 2 active, through `tweetlm train --set model.experts=4 ...`;
    checkpoints at 6 and 12. Also what `tweetlm train` printed on stderr (the progress line)."""
    run = tmp_path_factory.mktemp("moe") / "run"
    sets = [f"--set={k}={v}" for k, v in {**TINY, **MOE, "eval.every": 6, "checkpoint.every": 6}.items()
            if k not in ("model.preset", "steps")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", "--tokens", str(small_tokens), "--tokenizer", str(small_tokenizer), "--out", str(run),
                     "--preset", "tiny", "--steps", str(STEPS), "--device", "cpu", *sets]) == 0
    return run, err.getvalue()


def test_tiny_moe_trains_and_logs_its_router(moe_run):
    run, progress = moe_run
    records = _records(run)
    train_records = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(train_records) == STEPS and val[-1] < val[0] - 0.3, val
    for r in train_records:
        assert {"router_aux", "router_z", "expert_load_min", "expert_load_max"} <= set(r)
        assert 1.0 <= r["router_aux"] < 2.0 and r["router_z"] > 0  # Switch form: 1.0 is balanced
        assert 0 <= r["expert_load_min"] <= 1 <= r["expert_load_max"] <= 4
    assert " aux " in progress and " load " in progress, progress[-500:]
    model, _ = load_model(run)
    assert model.config.experts == 4 and isinstance(model.blocks[0].mlp, MoE)


def test_the_load_balancing_loss_balances_the_experts(moe_run, small_tokens, small_tokenizer, tmp_path):
    """The trainer minimizes the router loss with the cross-entropy: a strong coefficient holds the load level (aux
    ~1.01, the busiest expert ~1.2x the mean, measured) where the default 0.01 lets it drift (~1.14, ~1.6x)."""
    run = tmp_path / "balanced"
    train(_config(small_tokens, small_tokenizer, run, **MOE, **{"model.router_aux_coef": 1.0, "eval.every": STEPS}))

    def last(run, key):
        return np.mean([r[key] for r in _records(run) if "loss" in r][-4:])

    assert last(run, "router_aux") < last(moe_run[0], "router_aux") - 0.05
    assert last(run, "expert_load_max") < last(moe_run[0], "expert_load_max") - 0.2


def test_resume_gives_the_straight_runs_losses(moe_run, small_tokens, small_tokenizer, tmp_path):
    straight = moe_run[0]
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:06d}")  # back to step 6, as if killed after its checkpoint
    train(load_config(run / "config.toml", {"out": run}), resume=True)
    keys = ("step", "loss", "router_aux", "router_z", "expert_load_min", "expert_load_max")
    a, b = _records(straight), _records(run)
    assert [[r[k] for k in keys] for r in a if "loss" in r] == [[r[k] for k in keys] for r in b if "loss" in r]
    assert [r for r in a if "val_loss" in r] == [r for r in b if "val_loss" in r]


def test_two_process_fsdp_matches_one_process_and_resumes_in_one(small_tokens, small_tokenizer, tmp_path):
    """2 gloo processes (1 thread each), experts sharded by FSDP2 with the rest: the 1-process losses and router
    figures to rounding, and its sharded checkpoint resumes in 1 process. AdamW (FSDP needs it); 4 micro-batches of 4
    sequences a step."""
    settings = {**TINY, **MOE, "micro_batch": 4, "steps": 4, "eval.every": 2, "checkpoint.every": 2,
                "eval.samples": 1, "optim.name": "adamw", "optim.lr": 0.01}
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_config(small_tokens, small_tokenizer, one, **settings))
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    sets = [f"--set={k}={v}" for k, v in settings.items() if k not in ("model.preset", "steps")]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "tweetlm", "train", "--tokens", str(small_tokens), "--tokenizer", str(small_tokenizer),
                           "--out", str(two), "--preset", "tiny", "--steps", "4", "--device", "cpu", "--parallel", "fsdp",
                           *sets], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def losses(run):
        return {r["step"]: (r["loss"], r["router_aux"]) for r in _records(run) if "loss" in r}

    def assert_close(a, b):
        assert a.keys() == b.keys()
        worst = max(abs(x - y) for s in a for x, y in zip(a[s], b[s]))
        assert worst < 1e-5, f"largest difference {worst:.2e}"  # measured: 1e-6

    assert_close(losses(two), losses(one))
    assert (two / "checkpoints" / "step-000004" / ".metadata").is_file()
    shutil.rmtree(two / "checkpoints" / "step-000004")
    # with activation checkpointing too: recomputing a block in backward changes neither the losses nor the figures
    train(_config(small_tokens, small_tokenizer, two, **settings, activation_checkpointing=True), resume=True)
    assert_close(losses(two), losses(one))


# ---------------------------------------------------------------- later stages


def test_sft_and_tweeteval_fine_tuning_accept_an_moe_run(moe_run, tokenizer, tmp_path):
    run = moe_run[0]
    conversations = tmp_path / "chat.jsonl"
    posts = _real_posts()[:40]
    conversations.write_text("".join(json.dumps({"id": str(i), "messages": [
        {"role": "user", "content": a}, {"role": "assistant", "content": b}]}) + "\n"
        for i, (a, b) in enumerate(zip(posts[::2], posts[1::2]))))
    record = sft(SftConfig(base=run, data=(Source(conversations),), out=tmp_path / "chat", val_ratio=0.3,
                           overrides={"steps": 2, "model.seq_len": 64, "micro_batch": 4, "batch_tokens": 256,
                                      "eval.tokens": 256, "eval.samples": 1}))
    assert record["after"]["step"] == 2 and load_model(tmp_path / "chat")[0].config.experts == 4

    trunk, _ = load_model(run)
    (ds,) = load_task(DATA / "tweeteval", "irony", "val", max_train_examples=32)
    few = replace(ds.val, texts=ds.val.texts[:16], labels=ds.val.labels[:16])
    ds = replace(ds, val=few, eval=few)

    class Bar:
        def reset(self, total=None): ...
        def update(self, n=1): ...
        def set_postfix_str(self, s="", refresh=True): ...

    pred = finetune(trunk, tokenizer, ds, epochs=1, lr=1e-3, batch_size=8, seed=0, progress=Bar())
    assert pred.shape == (16,) and set(np.unique(pred)) <= {0, 1}


def test_a_trained_moe_run_generates_and_exports_to_transformers(moe_run, tmp_path, capsys):
    """The engine scores real posts with a trained MoE run as the model's forward does, and transformers computes
    its logits from the exported Mixtral folder (random-init shapes, decoding: test_infer_engine.py, test_model_hf.py)."""
    from transformers import AutoModelForCausalLM

    run = moe_run[0]
    model, tokenizer = load_model(run)
    prompt = [t for post in _real_posts()[:20] for t in (tokenizer.boundary_id, *tokenizer.encode(post))][:63]
    with Engine(model, tokenizer) as engine:
        scored = engine.submit(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0))
        list(scored)
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0].log_softmax(-1)  # row t predicts token t + 1
    assert [lp.logprob for lp in scored.prompt_logprobs[1:]] == pytest.approx(
        full[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist(), abs=1e-4)
    assert main(["generate", str(run), "--prompt", "good morning", "--max-new-tokens", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("good morning")

    export_hf(run, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert type(hf).__name__ == "MixtralForCausalLM" and (hf(ids).logits - model(ids)).abs().max() <= 1e-5
