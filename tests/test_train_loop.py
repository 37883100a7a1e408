"""`tweetlm train`: a tiny model trains on real posts, leaves a complete run folder, resumes bit-exactly
after kill -9, matches its golden losses, and refuses bad input with one line.

Regenerate the golden losses after a deliberate numeric change (or a change of the fixture data): delete
tests/golden/train_tiny_losses.json and run test_golden_losses once.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import STEPS, TINY, _config, _one_line_error, _records

from tweetlm.artifacts.checkpoint import latest_checkpoint
from tweetlm.errors import UserError
from tweetlm.model.llama import Llama
from tweetlm.model.sizing import preset
from tweetlm.model.weights import load_model
from tweetlm.tokenizer.trainer import TokenizerConfig, train_tokenizer
from tweetlm.train.checkpoint import load_checkpoint
from tweetlm.train.config import load_config
from tweetlm.train.loop import train

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "train_tiny_losses.json"


@pytest.fixture(scope="module")
def tiny_run(small_tokens, small_tokenizer, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    final = train(_config(small_tokens, small_tokenizer, run, **{"eval.every": 8, "checkpoint.every": 8}))
    return run, final


def test_tiny_model_loss_falls_on_real_posts(tiny_run):
    run, final = tiny_run
    records = _records(run)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 8, 16, 24]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.5, val  # from ~ln(1000) = 6.9
    assert final["val_loss"] == val[-1]["val_loss"] and final["step"] == STEPS
    assert 0 < final["val_bpb"] < val[0]["val_bpb"]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS and sum(losses[-4:]) < sum(losses[:4]) - 1.0


def test_run_folder_is_complete_and_self_sufficient(tiny_run, small_tokens, small_tokenizer):
    run, final = tiny_run
    assert load_config(run / "config.toml") == _config(small_tokens, small_tokenizer, run, **{"eval.every": 8, "checkpoint.every": 8})
    env = json.loads((run / "env.json").read_text())
    assert env["packages"]["torch"] == torch.__version__ and env["device"].startswith("cpu")
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "samples.txt").read_text().startswith("step 24\n  - ")
    train_records = [r for r in _records(run) if "loss" in r]
    assert set(train_records[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "tok_per_s", "mfu", "time"}
    # keep = 2: steps 16 and 24 remain (24 is also the best)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000016", "step-000024"]
    model, tokenizer = load_model(run)
    assert tokenizer.hash == json.loads((small_tokens / "index.json").read_text())["tokenizer_hash"]
    x = torch.tensor([[tokenizer.boundary_id] + tokenizer.encode("good morning")])
    assert model(x).shape == (1, x.shape[1], tokenizer.vocab_size)


def test_init_from_continues_from_that_runs_best_weights(tiny_run, small_tokens, tmp_path):
    """Continued pretraining / fine-tuning start: shape and weights from a run, tokenizer from beside the shards."""
    run, _ = tiny_run
    best_val = min(r["val_loss"] for r in _records(run) if "val_loss" in r)
    shape = {k: v for k, v in TINY.items() if k != "model.preset"}
    out = tmp_path / "continued"
    train(load_config(None, {"tokens": small_tokens, "out": out, "init_from": run, **shape, "steps": 2}))
    first = next(r for r in _records(out) if "val_loss" in r)
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(best_val, rel=1e-6)  # not a fresh init (~6.9)
    assert load_model(out)[0].config == load_model(run)[0].config
    with pytest.raises(UserError, match="drop model.preset"):
        load_config(None, {"tokens": small_tokens, "out": out, "init_from": run, **TINY})


def test_golden_losses(tiny_run):
    """Habit 10: the tiny model's first losses at seed 0 are pinned, exactly on CPU with the same threads."""
    losses = [r["loss"] for r in _records(tiny_run[0]) if "loss" in r][:8]
    # what decides the order of float sums: torch build, threads, CPU kernels (Muon's dtype follows AVX512-BF16)
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}
    if not GOLDEN.exists():
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({**machine, "losses": losses}, indent=1) + "\n")
        pytest.fail(f"no golden losses were checked in; wrote {GOLDEN}: review and commit it")
    golden = json.loads(GOLDEN.read_text())
    if {k: golden[k] for k in machine} == machine:
        assert losses == golden["losses"], "numerics changed: if on purpose, regenerate (see module docstring)"
    else:
        assert losses == pytest.approx(golden["losses"], rel=1e-3)


def _cli(tokens: Path, tokenizer: Path, run: Path, *extra: str) -> list[str]:
    sets = [f"--set={k}={v}" for k, v in TINY.items() if k not in ("model.preset", "steps")]
    return [sys.executable, "-m", "tweetlm", "train", "--tokens", str(tokens), "--tokenizer", str(tokenizer),
            "--out", str(run), "--preset", "tiny", "--steps", str(STEPS), "--device", "cpu", *sets, *extra]


def _latest_step(run: Path) -> int:
    checkpoint = latest_checkpoint(run)
    return int(checkpoint.name.removeprefix("step-")) if checkpoint else -1


def test_resume_after_kill_9_is_bit_exact(small_tokens, small_tokenizer, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(small_tokens, small_tokenizer, straight), check=True, capture_output=True)

    proc = subprocess.Popen(_cli(small_tokens, small_tokenizer, killed, "--set=checkpoint.every=1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while _latest_step(killed) < STEPS // 2 and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert STEPS // 2 <= _latest_step(killed) < STEPS

    subprocess.run(_cli(small_tokens, small_tokenizer, killed, "--resume"), check=True, capture_output=True)
    # every train loss and the final val loss, to the last bit (json round-trips floats exactly)
    a, b = _records(straight), _records(killed)
    assert [(r["step"], r["loss"]) for r in a if "loss" in r] == [(r["step"], r["loss"]) for r in b if "loss" in r]
    assert [r for r in a if "val_loss" in r] == [r for r in b if "val_loss" in r]
    final = f"checkpoints/step-{STEPS:06d}/model.safetensors"
    assert (straight / final).read_bytes() == (killed / final).read_bytes()


def test_bad_input_is_one_line_and_exit_2(tiny_run, small_tokens, small_tokenizer, small_corpus, tmp_path, capsys):
    def args(tokenizer=small_tokenizer, out=tmp_path / "new", extra=()):
        return ["train", "--tokens", str(small_tokens), "--tokenizer", str(tokenizer), "--out", str(out), "--steps", "2", *extra]

    assert "'optim.lrr': valid keys in [optim] are name, lr," in _one_line_error(args(extra=["--set", "optim.lrr=1"]), capsys)
    other = tmp_path / "other-tokenizer"
    train_tokenizer(TokenizerConfig(corpus=small_corpus, out=other, vocab_size=600))
    assert "shards were made with tokenizer" in _one_line_error(args(other), capsys)
    assert "already holds a run" in _one_line_error(args(out=tiny_run[0]), capsys)
    assert "--resume cannot change model.depth" in _one_line_error(["train", "--out", str(tiny_run[0]), "--resume", "--depth", "3"], capsys)
    no_tokens = ["train", "--tokenizer", str(small_tokenizer), "--out", str(tmp_path / "none"), "--steps", "2"]
    assert "no training data: give token shards" in _one_line_error(no_tokens, capsys)


def test_checkpoint_of_another_shape_is_refused(tiny_run, small_tokens, small_tokenizer, tmp_path, capsys):
    """A checkpoint folder copied in from a run of another shape: resume stops with one line, exit 2."""
    other = tmp_path / "other"
    train(_config(small_tokens, small_tokenizer, other, steps=1, **{"model.preset": None, "model.depth": 1}))
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    shutil.copytree(latest_checkpoint(other), run / "checkpoints" / "step-999999")
    err = _one_line_error(["train", "--out", str(run), "--resume"], capsys)
    assert "step-999999 holds a model of another shape (depth: 1 there, 2 here" in err
    with pytest.raises(UserError, match="max_seq_len: 64 there, 128 here"):
        load_checkpoint(latest_checkpoint(tiny_run[0]), Llama(preset("tiny", vocab_size=1000, max_seq_len=128)), [])


def test_time_budget_ends_the_run(small_tokens, small_tokenizer, tmp_path):
    cfg = _config(small_tokens, small_tokenizer, tmp_path / "run", steps=None, time_budget=0.002)  # 0.12 s
    final = train(cfg)
    assert final["time"] >= 0.12 and final["step"] >= 1
    assert latest_checkpoint(tmp_path / "run").name == f"step-{final['step']:06d}"
