"""`torchrun ... -m tweetlm train --parallel ddp|fsdp` on CPU (2 gloo processes, 1 thread each): matches the
one-process run of the same global batch step for step, writes sharded checkpoints that resume at another world
size (2 -> 1 and 1 -> 2) and load for inference, never takes a half-written one, and a killed rank ends the job.

Tolerance: the ranks sum gradients in another order than one process does (each rank's micro-batches, then the
all-reduce), so losses differ by rounding only. Measured max |difference| over 12 steps of the tiny preset:
5e-7 with AdamW (ddp and fsdp; the tests allow 1e-5), 3.3e-4 with Muon (ddp), whose Newton-Schulz iteration runs
in bf16 on CPUs with AVX512-BF16 and turns a last-bit gradient difference into a bf16 rounding (2^-8 relative)
of the update (allowed: 2e-3).
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import BOUNDARY, TINY, _config, _one_thread, _records, _shards, _workers

from tweetlm.artifacts.checkpoint import latest_checkpoint
from tweetlm.cli import main
from tweetlm.errors import UserError
from tweetlm.model.llama import IGNORE_INDEX
from tweetlm.model.weights import load_model
from tweetlm.train.batches import TokenBatches, val_batches
from tweetlm.train.config import load_config
from tweetlm.train.loop import train

STEPS = 12
TOLERANCE = {"adamw": 1e-5, "muon": 2e-3}
# Micro-batches of 4 sequences: 4 per step in one process, 2 per rank with 2 ranks (accumulation in both).
DIST = {"micro_batch": 4, "steps": STEPS, "eval.every": 6, "checkpoint.every": 6, "checkpoint.keep": 3,
        "eval.samples_every": 6, "eval.samples": 1}
ADAMW = {"optim.name": "adamw", "optim.lr": 0.01}


def _torchrun(tokens: Path, tokenizer: Path, run: Path, *extra: str) -> list[str]:
    """2 processes on this machine, the settings of _config(**DIST)."""
    sets = [f"--set={k}={v}" for k, v in {**TINY, **DIST}.items() if k not in ("model.preset", "steps")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "tweetlm", "train", "--tokens", str(tokens), "--tokenizer", str(tokenizer), "--out", str(run),
            "--preset", "tiny", "--steps", str(STEPS), "--device", "cpu", *sets, *extra]


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


def _assert_close(a: dict[int, float], b: dict[int, float], optimizer: str = "adamw") -> None:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst < TOLERANCE[optimizer], f"largest loss difference {worst:.2e} over steps {sorted(a)}"


@pytest.fixture(scope="module")
def one_process(small_tokens, small_tokenizer, tmp_path_factory):
    """The reference runs, in this process: Muon (for ddp) and AdamW (for fsdp), on 1 thread as each rank runs."""
    root = tmp_path_factory.mktemp("one")
    runs = {"muon": root / "muon", "adamw": root / "adamw"}
    with _one_thread():
        train(_config(small_tokens, small_tokenizer, runs["muon"], **DIST))
        train(_config(small_tokens, small_tokenizer, runs["adamw"], **DIST, **ADAMW))
    return runs


@pytest.fixture(scope="module")
def fsdp_run(small_tokens, small_tokenizer, tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    _run(_torchrun(small_tokens, small_tokenizer, run, "--parallel", "fsdp", *(f"--set={k}={v}" for k, v in ADAMW.items())))
    return run


def test_ranks_share_the_one_stream_and_val_set():
    """Rank r's k-th micro-batch is the one-process stream's batch k x world + r, at any world size, and the ranks'
    val shares (padded to equal batch counts with ignored targets) are the one-process val set."""
    shards = _shards(n_shards=2, docs=40)
    one = TokenBatches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=3, seed=0)
    expected = [one.next()[0] for _ in range(12)]  # across an epoch boundary
    for world in (2, 3):
        ranks = [TokenBatches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=3, seed=0, rank=r, world=world)
                 for r in range(world)]
        got = [ranks[r].next()[0] for _ in range(12 // world) for r in range(world)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert ranks[0].state_dict() == one.state_dict()  # the position means the same at any world size

    def scored(batches):  # the (input row, target row) pairs that count
        return sorted((x.tolist(), y.tolist()) for xs, ys in batches for x, y in zip(xs, ys) if (y != IGNORE_INDEX).any())

    whole = val_batches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=4, max_tokens=32 * 11)
    for world in (2, 3, 4):
        shares = [val_batches(shards, boundary_id=BOUNDARY, seq_len=32, batch_size=4, max_tokens=32 * 11, rank=r, world=world)
                  for r in range(world)]
        assert len({len(s) for s in shares}) == 1, "every rank runs the same number of forwards"
        assert scored([b for s in shares for b in s]) == scored(whole)


def test_fsdp_with_muon_and_uneven_splits_are_refused(small_tokens, small_tokenizer, tmp_path):
    with pytest.raises(UserError, match="fsdp needs optim.name = adamw"):
        _config(small_tokens, small_tokenizer, tmp_path, parallel="fsdp")
    cfg = load_config(None, {"tokens": small_tokens, "tokenizer": small_tokenizer, "out": tmp_path, "steps": 1,
                             "batch_tokens": 4096, "micro_batch": 4, "model.seq_len": 256})  # 4 micro-batches
    assert cfg.grad_accum_per_rank(2) == 2
    with pytest.raises(UserError, match="to split evenly over 3 processes"):
        cfg.grad_accum_per_rank(3)


def test_ddp_matches_one_process_step_for_step(one_process, small_tokens, small_tokenizer, tmp_path):
    """With activation checkpointing too: recomputing a block's forward in backward changes no number."""
    run = tmp_path / "ddp"
    _run(_torchrun(small_tokens, small_tokenizer, run, "--parallel", "ddp", "--set=activation_checkpointing=true"))
    _assert_close(_losses(run), _losses(one_process["muon"]), "muon")
    val = [r["val_loss"] for r in _records(run) if "val_loss" in r]
    assert val == pytest.approx([r["val_loss"] for r in _records(one_process["muon"]) if "val_loss" in r], abs=TOLERANCE["muon"])
    assert json.loads((run / "env.json").read_text())["processes"] == 2
    assert (run / "samples.txt").read_text().count("step ") == 2  # rank 0 alone writes: one entry per sample step


def test_fsdp_matches_one_process_and_writes_shards_from_every_rank(one_process, fsdp_run, tmp_path):
    _assert_close(_losses(fsdp_run), _losses(one_process["adamw"]))
    final = latest_checkpoint(fsdp_run)
    assert final.name == f"step-{STEPS:06d}"
    assert {p.name for p in final.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "model.json", "state.json", "meta.json"}
    assert json.loads((final / "state.json").read_text())["loader"] == torch.load(
        latest_checkpoint(one_process["adamw"]) / "state.pt", weights_only=True)["loader"]  # one position, any world size
    # inference reads the shards whole, and the weights are those of the one-process run, to rounding
    sharded, tokenizer = load_model(fsdp_run)
    whole, _ = load_model(one_process["adamw"])
    x = torch.tensor([[tokenizer.boundary_id] + tokenizer.encode("good morning everyone")])
    assert torch.allclose(sharded(x), whole(x), atol=1e-3)
    assert main(["export", "hf", str(fsdp_run), "--out", str(tmp_path / "hf")]) == 0  # export reads it too
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_two_process_checkpoint_resumes_in_one(one_process, fsdp_run, small_tokens, small_tokenizer, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:06d}")  # back to step 6, as if killed after it
    train(_config(small_tokens, small_tokenizer, run, **DIST, **ADAMW, activation_checkpointing=True), resume=True)
    _assert_close(_losses(run), _losses(one_process["adamw"]))
    assert (latest_checkpoint(run) / "model.safetensors").is_file()  # one process writes the one-file layout
    load_model(run)  # under Llama's own parameter names, whatever wrapped the blocks


def test_one_process_checkpoint_resumes_in_two(one_process, small_tokens, small_tokenizer, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_process["adamw"], run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:06d}")
    _run(_torchrun(small_tokens, small_tokenizer, run, "--resume", "--parallel", "fsdp"))
    _assert_close(_losses(run), _losses(one_process["adamw"]))
    assert (latest_checkpoint(run) / ".metadata").is_file()


def test_half_written_checkpoint_is_never_taken(fsdp_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run)
    good = latest_checkpoint(run)
    shutil.copytree(good, run / "checkpoints" / ".tmp-step-000013")  # ranks still writing
    shutil.copytree(good, run / "checkpoints" / "step-000014")
    (run / "checkpoints" / "step-000014" / ".metadata").unlink()  # never renamed so, but a copy by hand could be
    assert latest_checkpoint(run) == good


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))  # what unpickling would run


def test_sharded_checkpoint_index_cannot_run_code(fsdp_run, tmp_path):
    """DCP's .metadata is a pickle: one that would call a function is refused, and the function never runs."""
    run, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(fsdp_run, run)
    (latest_checkpoint(run) / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match="refers to posix.mkdir, which no tweetlm checkpoint holds"):
        load_model(run)
    assert not marker.exists()


def test_killed_rank_ends_the_job_naming_it(small_tokens, small_tokenizer, tmp_path):
    run = tmp_path / "run"
    argv = _torchrun(small_tokens, small_tokenizer, run, "--steps", "100000", "--set=eval.every=100000")
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and "loss" in (run / "metrics.jsonl").read_text()):
            assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        os.kill(_workers(launcher.pid)[1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=60)  # no hang: the job ends
    finally:
        if launcher.poll() is None:  # the test failed: leave no training behind
            for pid in _workers(launcher.pid).values():
                os.kill(pid, signal.SIGKILL)
            launcher.kill()
    assert launcher.returncode != 0
    root_cause = output.split("Root Cause (first observed failure)")[-1]  # torchrun's summary
    assert "rank      : 1 (local_rank: 1)" in root_cause and "Signal 9 (SIGKILL)" in root_cause, output[-3000:]
