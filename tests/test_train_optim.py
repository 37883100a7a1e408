"""Optimizers and schedules: Muon's orthogonalized updates, parameter groups, LR curves."""

import dataclasses

import pytest
import torch

from tweetlm.model.llama import Llama
from tweetlm.model.sizing import preset
from tweetlm.train.config import OptimConfig
from tweetlm.train.optim import Muon, build_optimizers, lr_multiplier, orthogonalize, set_lr


@pytest.mark.parametrize("shape", [(64, 192), (192, 64)])
def test_newton_schulz_approximates_the_orthogonal_factor(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    assert s.shape == (min(shape),) and 0.6 < s.min() and s.max() < 1.25, s  # the tuned quintic's band (modded-nanogpt)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.cosine_similarity(o.flatten(), (u @ vh).flatten(), dim=0) > 0.95


def test_groups_muon_for_hidden_matrices_adamw_for_the_rest():
    model = Llama(preset("tiny", vocab_size=300))
    adam, muon = build_optimizers(model, OptimConfig(name="muon"), torch.device("cpu"))
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i].split(".")[-2] for i in muon_ids) == sorted(["wq", "wk", "wv", "wo", "w1", "w2", "w3"] * 2)
    adam_ids = [id(p) for g in adam.param_groups for p in g["params"]]
    assert len(adam_ids) + len(muon_ids) == len(names) and not set(adam_ids) & muon_ids
    (decay, no_decay) = adam.param_groups
    assert [names[id(p)] for p in decay["params"]] == ["embed.weight"] and all(p.dim() == 1 for p in no_decay["params"])
    (only,) = build_optimizers(model, OptimConfig(name="adamw"), torch.device("cpu"))
    assert sum(len(g["params"]) for g in only.param_groups) == len(names)


def test_muon_step_moves_each_matrix_by_an_orthogonal_update():
    p = torch.nn.Parameter(torch.zeros(32, 16))
    opt = Muon([p], lr=0.1, momentum=0.0)
    p.grad = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    opt.step()
    s = torch.linalg.svdvals(p.detach() / (0.1 * 2**0.5))  # lr x sqrt(rows / cols)
    assert 0.6 < s.min() and s.max() < 1.25


def test_muon_orthogonalizes_each_expert_of_a_stacked_weight_on_its_own():
    """An MoE's w1 [E, out, in] is E matrices: each expert's update is its own gradient's orthogonal factor (as if
    it were a separate nn.Linear), not a slice of the stack's."""
    p = torch.nn.Parameter(torch.zeros(4, 32, 16))
    opt = Muon([p], lr=0.1, momentum=0.0, ns_dtype=torch.float32)
    grad = torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(0))
    grad[0] *= 100  # experts' gradients of very different sizes: each is normalized on its own
    p.grad = grad
    opt.step()
    for e in range(4):
        update = p[e].detach() / (-0.1 * 2**0.5)  # lr x sqrt(rows / cols)
        s = torch.linalg.svdvals(update)
        assert 0.6 < s.min() and s.max() < 1.25, (e, s)
        torch.testing.assert_close(update, orthogonalize(grad[e], dtype=torch.float32), rtol=1e-4, atol=1e-5)


def test_moe_router_and_experts_go_to_muon():
    model = Llama(dataclasses.replace(preset("tiny", vocab_size=300), experts=4, experts_active=2))
    adam, muon = build_optimizers(model, OptimConfig(name="muon"), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    block = sorted(names[id(p)].removeprefix("blocks.0.") for g in muon.param_groups for p in g["params"]
                   if names[id(p)].startswith("blocks.0."))
    assert block == ["attention.wk.weight", "attention.wo.weight", "attention.wq.weight", "attention.wv.weight",
                     "mlp.router.weight", "mlp.w1", "mlp.w2", "mlp.w3"]


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_schedules_warm_up_peak_and_decay_to_final(schedule):
    cfg = OptimConfig(schedule=schedule, warmup=0.1, cooldown=0.4, final_lr=0.1)
    curve = [lr_multiplier(i / 100, cfg) for i in range(101)]
    assert curve[0] == 0 and curve[5] == pytest.approx(0.5) and curve[10] == pytest.approx(1.0)
    assert curve[-1] == pytest.approx(0.1) and all(a >= b - 1e-12 for a, b in zip(curve[10:], curve[11:]))
    if schedule == "wsd":
        assert curve[10:61] == [1.0] * 51 and curve[80] == pytest.approx(0.55)


def test_set_lr_scales_every_group_from_its_peak():
    model = Llama(preset("tiny", vocab_size=300))
    cfg = dataclasses.replace(OptimConfig(), lr=0.01, matrix_lr=0.05)
    opts = build_optimizers(model, cfg, torch.device("cpu"))
    set_lr(opts, 0.5)
    assert [g["lr"] for o in opts for g in o.param_groups] == [0.005, 0.005, 0.025]
