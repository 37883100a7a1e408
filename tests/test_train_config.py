"""Run configs: TOML + flags -> TrainConfig, round trip through RUN/config.toml, errors that name the key."""

from pathlib import Path

import pytest

from tweetlm.errors import UserError
from tweetlm.train.config import check_resume, load_config, parse_set, to_toml

REPO = Path(__file__).resolve().parents[1]
PATHS = {"tokens": "work/tokens", "tokenizer": "work/tokenizer", "out": "runs/x"}


def test_toml_then_flags_then_set(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 100\nmicro_batch = 8\n[model]\npreset = "small"\nseq_len = 128\n[optim]\nlr = 1\n')
    cfg = load_config(path, {**PATHS, "steps": 7, "model.depth": 3, **parse_set(["optim.name=adamw", "eval.every=5"])})
    assert (cfg.steps, cfg.micro_batch, cfg.model.depth, cfg.model.preset, cfg.model.seq_len) == (7, 8, 3, None, 128)
    assert (cfg.optim.lr, cfg.optim.name, cfg.eval.every) == (1.0, "adamw", 5)  # an int where a float goes is fine
    assert cfg.grad_accum == 16_384 // (8 * 128)
    assert cfg.model.resolve(vocab_size=1000).dim == 3 * 64  # depth 3 -> width from model/sizing.py


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, {**PATHS, "time_budget": 5, **parse_set(["optim.schedule=cosine", "compile=true"])})
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "config.toml") == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.toml")))
def test_example_configs_load(name):
    cfg = load_config(REPO / "configs" / name, PATHS)
    assert cfg.steps or cfg.time_budget


@pytest.mark.parametrize("overrides, message", [
    ({"optim.lrr": 1}, "unknown config key 'optim.lrr': valid keys in [optim] are name, lr, matrix_lr"),
    ({"stepz": 1}, "unknown config key 'stepz': valid keys are tokens, out, tokenizer, init_from, steps"),
    ({"optim.lr": "fast"}, "optim.lr = 'fast': must be a number"),
    ({"steps": True}, "steps = True: must be an integer"),
    ({"steps": None}, "no stopping rule"),
    ({"model.preset": "huge"}, "model.preset = 'huge': choose one of tiny, small"),
    ({"optim.name": "sgd"}, "optim.name = 'sgd': choose muon or adamw"),
    ({"batch_tokens": 1000}, "batch_tokens = 1000: must be a multiple of micro_batch x model.seq_len = 16 x 256 = 4096"),
    ({"optim.warmup": 0.7}, "warmup + cooldown must not exceed"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, {**PATHS, "steps": 10, **overrides})
    assert message in str(e.value)


def test_missing_paths_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="missing a required key"):
        load_config(None, {"steps": 1})
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml", PATHS)
    (tmp_path / "bad.toml").write_text("steps = = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml", PATHS)
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_set(["optim.lr"])


def test_both_preset_and_depth_in_one_file_is_an_error(tmp_path):
    (tmp_path / "c.toml").write_text('steps = 1\n[model]\npreset = "tiny"\ndepth = 4\n')
    with pytest.raises(UserError, match="set model.preset or model.depth, not both"):
        load_config(tmp_path / "c.toml", PATHS)
    assert load_config(tmp_path / "c.toml", {**PATHS, "model.preset": "small"}).model.depth is None  # a flag picks one


def test_expert_fields_make_any_shape_an_moe(tmp_path):
    cfg = load_config(None, {**PATHS, "steps": 1, **parse_set(["model.experts=8", "model.experts_active=2"])})
    model = cfg.model.resolve(vocab_size=1000)
    assert (model.experts, model.experts_active, model.dim, model.expert_width) == (8, 2, 64, 192)  # tiny, 8x2
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "config.toml") == cfg
    dense = load_config(None, {**PATHS, "steps": 1, "model.preset": "small-moe", "model.experts": 0}).model
    assert dense.resolve(vocab_size=1000).experts == 0
    with pytest.raises(UserError, match="model.experts_active = 9: must be from 2 to model.experts = 8"):
        load_config(None, {**PATHS, "steps": 1, "model.experts": 8, "model.experts_active": 9}).model.resolve(vocab_size=1000)
    with pytest.raises(UserError, match="takes the model's shape from that run"):
        load_config(None, {**PATHS, "steps": 1, "init_from": "runs/base", "model.experts": 8})


def test_resume_may_extend_a_run_but_not_change_its_model_or_optimizer():
    saved = load_config(None, {**PATHS, "steps": 100})
    check_resume(saved, load_config(None, {**PATHS, "steps": 200, "eval.every": 10, "micro_batch": 8}))
    with pytest.raises(UserError, match=r"--resume cannot change optim.lr: 0.05 -> 0.1, seed: 0 -> 1"):
        check_resume(saved, load_config(None, {**PATHS, "steps": 100, "optim.lr": 0.1, "seed": 1}))
