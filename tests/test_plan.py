"""`tweetlm plan`: the compute planner against published runs, its memory model against autograd, its CLI.

Published figures and where they come from:
- Chinchilla (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", section 4):
  70B parameters on 1.4T tokens, trained with Gopher's compute budget, 5.76e23 FLOPs.
- Llama 3 405B ("The Llama 3 Herd of Models", 2024): 405B parameters, 15.6T tokens, 3.8e25 FLOPs (sections 1, 3);
  16,384 H100s at 400 TFLOP/s per GPU = 41% bf16 MFU, 8,192-token sequences, 16M tokens per batch (table 4);
  a 54-day snapshot of pre-training (section 3.3.4: a part of it, not all of it). Llama 3.1 model card
  (meta-llama/llama-models, MODEL_CARD.md, "Training Factors"): 30.84M H100-hours for 405B = 78.4 days on
  16,384 GPUs (the whole of it: long-context stage and downtime; the paper reports >90% effective training time).
- Grok-1 (xai-org/grok-1, README and model.py; x.ai/blog/grok-os): 314B parameters, a mixture of 8 experts with 2
  active, "25% of the weights active on a given token"; 64 layers, dim 6144, 48 query and 8 kv heads, vocab 131072.
- DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437, sections 2-4): 671B parameters, 37B active per token; 61 layers,
  dim 7168, 1 shared + 256 routed experts of width 2048, 8 active, vocab 129280; 14.8T tokens; 2.664M H800
  GPU-hours of pre-training (table 1).
"""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tweetlm.cli import main
from tweetlm.data.corpus import iter_texts
from tweetlm.errors import UserError
from tweetlm.model.llama import Llama
from tweetlm.model.sizing import config_from_depth
from tweetlm.plan.accelerators import ACCELERATORS
from tweetlm.plan.planner import DAY, PlanConfig, activation_bytes, format_plan, parse_count, parse_moe, plan
from tweetlm.tokenizer.bpe import Tokenizer
from tweetlm.tokenizer.shards import TokenizeConfig, tokenize


def _days_for(flops: float, gpus: int, gpu: str, mfu: float) -> float:
    return flops / (gpus * ACCELERATORS[gpu].bf16_flops * mfu * DAY)


def test_chinchilla_budget_gives_chinchilla_size_and_tokens():
    budget = 5.76e23
    p = plan(PlanConfig(gpus=1024, gpu="a100", days=_days_for(budget, 1024, "a100", 0.4), mfu=0.4))
    assert p.budget == pytest.approx(budget, rel=1e-9)
    # Tolerance 5%: the paper rounds to 70B / 1.4T (6 x 70B x 1.4T = 5.88e23, 2% above its budget).
    assert p.params == pytest.approx(70e9, rel=0.05)
    assert p.tokens == pytest.approx(1.4e12, rel=0.05)
    # nanochat's ratio, same budget: a model sqrt(20 / 10.5) larger on fewer tokens, same 6ND.
    q = plan(PlanConfig(gpus=1024, gpu="a100", days=p.config.days, mfu=0.4, tokens_per_param=10.5))
    assert q.params / p.params == pytest.approx(math.sqrt(20 / 10.5))
    assert q.tokens / q.params == pytest.approx(10.5)


def test_llama3_405b_flops_and_training_time():
    days = _days_for(6 * 405e9 * 15.6e12, 16384, "h100", 0.41)
    p = plan(PlanConfig(gpus=16384, gpu="h100", days=days, mfu=0.41, params=405e9, seq_len=8192))
    assert p.tokens == pytest.approx(15.6e12, rel=1e-9)
    # 6ND is the paper's own FLOPs convention: 3.8e25 within its rounding (2%).
    assert p.budget == pytest.approx(3.8e25, rel=0.02)
    # Step by step (attention FLOPs included) the planner's time must fall between the paper's 54-day
    # snapshot (part of pre-training) and the model card's 78.4 days (all of it, with downtime).
    assert 54 <= p.days <= 78.4
    # FSDP alone on 16,384 GPUs means at least one 8K sequence per GPU per step: 134M tokens, 8x Llama 3's
    # 16M batch; the plan says so and points at the parallelism Llama 3 used.
    assert p.batch_tokens >= 16384 * 8192 > 16e6
    assert any("tensor or context parallelism" in n for n in p.notes)


def test_grok1_shape_is_reproduced(capsys):
    """`--params 314B --moe 8x2` at Grok-1's vocabulary gives the grok-1 preset: 315.7B parameters (314B published:
    within 1%; tweetlm's block has 2 RMSNorms where Grok-1's has 4, and no softcapping, which hold no weights to
    speak of) and 26.5% of them active (published: "25%", i.e. ~78.5B; allowed 25% +- 2 points: the attention,
    embedding and router are active for every token, so 2 of 8 experts make a little more than a quarter)."""
    assert main(["plan", "--gpus", "4096", "--gpu", "h100", "--days", "30", "--params", "314B", "--moe", "8x2",
                 "--vocab-size", "131072", "--seq-len", "8192", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["shape"] == "--preset grok-1" and p["model"]["experts"] == 8 and p["model"]["experts_active"] == 2
    assert p["model_params"] == pytest.approx(314e9, rel=0.01)
    assert p["model_active_params"] / p["model_params"] == pytest.approx(0.25, abs=0.02)
    assert p["budget"] == pytest.approx(6 * p["active_params"] * p["tokens"])  # FLOPs follow the active parameters
    assert any("expert parallelism" in n for n in p["notes"])


def test_deepseek_v3_shape_is_reproduced():
    """DeepSeek-V3's budget (its 2.664M pre-training GPU-hours on H800s, whose bf16 peak is the H100's) and `--params
    671B --moe 256x8+1` give the deepseek-v3 preset. tweetlm's shape lacks multi-head latent attention (grouped-query
    attention here: 129M weights a layer against MLA's 187M), the 3 dense first layers (all 61 layers are MoE here,
    +33B), sigmoid routing with bias balancing, and the multi-token-prediction module (outside the 671B too). Result:
    700.2B total (671B published, +4.4%; allowed 5%), 34.0B active (37B, -8.2%; allowed 10%)."""
    gpus, hours = 2048, 2.664e6
    p = plan(PlanConfig(gpus=gpus, gpu="h100", days=hours / gpus / 24, mfu=0.35, params=671e9, vocab_size=129280,
                        seq_len=4096, **parse_moe("256x8+1")))
    assert p.shape == "--preset deepseek-v3"
    assert (p.model.experts, p.model.experts_active, p.model.shared_experts, p.model.expert_width) == (256, 8, 1, 2048)
    assert p.model_params == pytest.approx(671e9, rel=0.05)
    assert p.model_active_params == pytest.approx(37e9, rel=0.10)
    # at 35% MFU that budget is 6 x 37B x 14.8T (3.3e24): the published token count, to the active-count gap
    assert p.budget == pytest.approx(6 * 37e9 * 14.8e12, rel=0.02)
    assert p.tokens == pytest.approx(14.8e12 * 37e9 / p.active_params, rel=0.02)


@settings(max_examples=60, deadline=None)
@given(gpus=st.integers(1, 20000), gpu=st.sampled_from(sorted(ACCELERATORS)), days=st.floats(0.01, 100),
       mfu=st.floats(0.05, 0.8), params=st.one_of(st.none(), st.floats(1e7, 1e12)),
       seq_len=st.sampled_from([256, 2048, 8192]), optimizer=st.sampled_from(["muon", "adamw"]),
       moe=st.sampled_from([None, "8x2", "64x6+2"]))
def test_plan_is_consistent(gpus, gpu, days, mfu, params, seq_len, optimizer, moe):
    c = PlanConfig(gpus=gpus, gpu=gpu, days=days, mfu=mfu, params=params, seq_len=seq_len, optimizer=optimizer,
                   **(parse_moe(moe) if moe else {}))
    p = plan(c)
    assert p.budget == pytest.approx(6 * p.active_params * p.tokens)
    assert p.params == (params or pytest.approx(p.tokens / 20))
    # --params is an MoE's total; the compute-optimal N its active size (one count when dense)
    size = p.model_params if params else p.model_active_params
    # within 2x of the planned size; small MoEs step coarsely with depth (64 experts: 4.6M at depth 1, 24M at 2)
    assert abs(math.log(size / p.params)) < math.log(2) or (moe and p.params < 1e9), (size, p.params)
    assert p.model.experts == c.experts and p.active_params <= p.params if params else p.active_params == p.params
    assert p.batch_tokens == gpus * p.micro_batch * seq_len * p.grad_accum and gpus % p.shard_group == 0
    assert (p.steps - 1) * p.batch_tokens < p.tokens <= p.steps * p.batch_tokens
    assert p.days == pytest.approx(p.steps * p.step_seconds / DAY)
    if p.fits:
        assert p.memory.total(p.checkpointing) <= p.usable_memory
        # checkpointing only when nothing fits without it
        assert not (p.checkpointing and p.memory.total(False) <= p.usable_memory)
    else:
        assert p.checkpointing and p.micro_batch == 1 and p.shard_group == gpus
    assert p.posts == pytest.approx(p.tokens / 26.8)


def _saved_bytes(model: Llama, tokens: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward, under CPU bf16 autocast."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens, tokens)
    return sum(saved.values())


@pytest.mark.parametrize("moe", [{}, dict(experts=8, experts_active=2), dict(experts=16, experts_active=4, expert_dim=128,
                                                                               shared_experts=1)],
                         ids=["dense", "8x2", "16x4+1"])
def test_activation_estimate_matches_what_autograd_saves(moe):
    cfg = config_from_depth(4, vocab_size=1000, max_seq_len=256, **moe)  # dim 256, 4 heads, 1 kv head, SwiGLU 704
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, cfg.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    # Two lengths: what does not grow with tokens (bf16 copies of the weights, kept by autocast) cancels out.
    per_token = (_saved_bytes(model, ids) - _saved_bytes(model, ids[:, :128])) / (2 * 128)
    # Tolerance 2% (measured: 0.6% under dense, 0.5% MoE): the estimate leaves out the rotary tables, per-head
    # softmax statistics and per-token RMS values.
    assert activation_bytes(cfg, 1, checkpointing=False) == pytest.approx(per_token, rel=0.02)
    assert activation_bytes(cfg, 1, checkpointing=True) < per_token / 2


def test_tokens_per_post_measured_on_real_posts(small_corpus, small_tokenizer, tmp_path):
    tokenize(TokenizeConfig(corpus=small_corpus, tokenizer=small_tokenizer, out=tmp_path))
    tok = Tokenizer.load(small_tokenizer)
    texts = [t for batch in iter_texts(small_corpus, "train") for t in batch]
    p = plan(PlanConfig(gpus=8, gpu="h100", days=1, tokens_dir=tmp_path))
    # every post costs its tokens plus one boundary token
    assert p.tokens_per_post == pytest.approx(np.mean([len(tok.encode(t)) + 1 for t in texts]))
    assert p.posts == pytest.approx(p.tokens / p.tokens_per_post)
    assert p.model.vocab_size == tok.vocab_size, "the model's vocabulary follows the token folder's"
    assert p.corpus_tokens == sum(len(tok.encode(t)) + 1 for t in texts)
    assert any("epochs" in n for n in p.notes)


def test_given_size_uses_the_named_preset_and_reports_it(capsys):
    assert main(["plan", "--gpus", "64", "--gpu", "H200", "--days", "7", "--params", "8B"]) == 0
    out = capsys.readouterr().out
    assert "--preset 8b (depth 32)" in out and "fits without activation checkpointing" in out
    assert main(["plan", "--gpus", "64", "--gpu", "h200", "--days", "7", "--params", "8B", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    p = plan(PlanConfig(gpus=64, gpu="h200", days=7, params=8e9))
    assert data["tokens"] == pytest.approx(p.tokens) and data["shape"] == "--preset 8b" and data["model"]["dim"] == 4096
    assert out.strip() == format_plan(p)


@pytest.mark.parametrize("text, value", [("70B", 70e9), ("405b", 405e9), ("1.5B", 1.5e9), ("125M", 125e6),
                                         ("7e9", 7e9), ("1T", 1e12), (" 64k ", 64e3)])
def test_parse_count(text, value):
    assert parse_count(text) == pytest.approx(value)


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "8", "--gpu", "tpu", "--days", "1"], "unknown gpu 'tpu'"),
    (["--gpus", "8", "--days", "0"], "--days"),
    (["--gpus", "8", "--days", "1", "--params", "abc"], "--params 'abc'"),
    (["--gpus", "8", "--days", "1", "--params", "-5B"], "--params"),
    (["--gpus", "0", "--days", "1"], "--gpus"),
    (["--gpus", "8", "--days", "1", "--mfu", "1.5"], "--mfu"),
    (["--gpus", "8", "--days", "1", "--tokens", "no/such/folder"], "index.json"),
    (["--gpus", "8", "--days", "1", "--moe", "8"], "--moe '8': give EXPERTSxACTIVE"),
    (["--gpus", "8", "--days", "1", "--moe", "8x1"], "--moe '8x1': needs 2 to EXPERTS active"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_empty_train_split_is_a_user_error(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"vocab_size": 1000, "splits": {"train": []}}))
    with pytest.raises(UserError, match="no train posts"):
        plan(PlanConfig(gpus=1, days=1, tokens_dir=tmp_path))
