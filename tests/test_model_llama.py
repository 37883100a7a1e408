"""The decoder: exact sizes, stable init across presets, KV-cache decoding equal to full recomputation."""

import math

import pytest
import torch

from tweetlm.errors import ConfigError
from tweetlm.infer.generate import generate_ids
from tweetlm.model.llama import Llama, ModelConfig
from tweetlm.model.sizing import PRESETS, config_from_depth, flops_per_token, num_params, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_is_exact(name):
    cfg = preset(name, vocab_size=32768)
    with torch.device("meta"):
        model = Llama(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    assert flops_per_token(cfg, 1024) > 6 * num_params(cfg, embedding=False, active=True)


def test_presets_span_the_advertised_sizes():
    sizes = {name: num_params(preset(name, vocab_size=8192 if name == "tiny" else 128256)) for name in PRESETS}
    assert 0.5e6 < sizes["tiny"] < 1.5e6
    assert 1.0e9 < sizes["1b"] < 1.5e9  # Llama 3.2 1B: 1.24B at its 128256 vocabulary
    assert 7.5e9 < sizes["8b"] < 8.5e9  # Llama 3 8B: 8.03B
    # small-moe: small's FLOPs per token (2 of 8 experts of half the width; + the router's), 4x its MLP weights
    small, small_moe = (preset(name, vocab_size=8192) for name in ("small", "small-moe"))
    assert flops_per_token(small_moe, 1024) == pytest.approx(flops_per_token(small, 1024), rel=0.002)
    assert num_params(small_moe) - num_params(small) == pytest.approx(3 * 4 * 3 * 256 * 704, rel=0.01)


def test_qk_norm_and_untied_head_counted():
    cfg = config_from_depth(2, vocab_size=500, qk_norm=True, tie_embeddings=False)
    model = Llama(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_bad_shapes_are_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(vocab_size=100, depth=2, dim=64, n_heads=4, n_kv_heads=3, ffn_dim=128)
    with pytest.raises(ConfigError, match="n_heads"):
        ModelConfig(vocab_size=100, depth=2, dim=64, n_heads=5, n_kv_heads=5, ffn_dim=128)


@pytest.mark.parametrize("depth", [2, 6, 12])
def test_init_gives_unit_scale_logits_at_every_depth(depth):
    """A stable start: loss near ln(V) (uniform guess) and no blow-up in the residual stream, at any depth."""
    cfg = config_from_depth(depth, vocab_size=1000, max_seq_len=64)
    torch.manual_seed(0)
    model = Llama(cfg)
    model.init_weights()
    tokens = torch.randint(0, 1000, (2, 64))
    loss = model(tokens[:, :-1], tokens[:, 1:]).item()
    assert abs(loss - math.log(1000)) < 1.0, loss


def test_kv_cache_greedy_equals_full_recomputation():
    cfg = preset("tiny", vocab_size=300, max_seq_len=64)
    torch.manual_seed(0)
    model = Llama(cfg)
    model.init_weights()
    # sharpen the distribution so greedy choices are not decided by rounding noise
    model.embed.weight.data *= 4
    prompt = [5, 17, 42, 7, 99]
    cached = [t.item() for t in generate_ids(model, prompt, max_new_tokens=30, temperature=0, top_k=0, top_p=1.0)]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert cached == ids[len(prompt):]
