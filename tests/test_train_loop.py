"""`tweetlm train`: a tiny model trains on real posts, leaves a complete run folder, resumes bit-exactly
after kill -9, matches its golden losses, and refuses bad input with one line.

Regenerate the golden losses after a deliberate numeric change (or a change of the fixture data): delete
tests/golden/train_tiny_losses.json and run test_golden_losses once.
"""

import builtins
import errno
import io
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

from tweetlm.artifacts import checkpoint as checkpoint_files
from tweetlm.artifacts.checkpoint import latest_checkpoint
from tweetlm.cli import main
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


def _args(tokens: Path, tokenizer: Path, run: Path, *extra: str) -> list[str]:
    """`tweetlm train`'s arguments for the TINY settings (a later --steps replaces STEPS)."""
    sets = [f"--set={k}={v}" for k, v in TINY.items() if k not in ("model.preset", "steps")]
    return ["train", "--tokens", str(tokens), "--tokenizer", str(tokenizer), "--out", str(run), "--preset", "tiny",
            "--steps", str(STEPS), "--device", "cpu", *sets, *extra]


def _cli(tokens: Path, tokenizer: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tweetlm", *_args(tokens, tokenizer, run, *extra)]


def _latest_step(run: Path) -> int:
    checkpoint = latest_checkpoint(run)
    return int(checkpoint.name.removeprefix("step-")) if checkpoint else -1


@pytest.mark.parametrize("shape", [(), ("--set=model.experts=4", "--set=model.experts_active=2")], ids=["dense", "moe"])
def test_resume_after_kill_9_is_bit_exact(small_tokens, small_tokenizer, tmp_path, shape):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(small_tokens, small_tokenizer, straight, *shape), check=True, capture_output=True)

    proc = subprocess.Popen(_cli(small_tokens, small_tokenizer, killed, *shape, "--set=checkpoint.every=1"),
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


def test_resuming_a_finished_run_says_so_and_gives_its_final_metrics(tiny_run, tmp_path, capsys):
    run = tmp_path / "finished"
    shutil.copytree(tiny_run[0], run)
    capsys.readouterr()
    final = train(load_config(run / "config.toml", {"out": run}), resume=True)
    out = capsys.readouterr().out
    last_loss = [r["loss"] for r in _records(run) if "loss" in r][-1]
    assert f"{run} already finished at step {STEPS}: nothing to do" in out
    assert "nan" not in out and f"loss {last_loss:.4g}" in out, out
    assert {k: final[k] for k in ("step", "loss", "val_loss", "val_bpb", "tokens")} == {
        k: tiny_run[1][k] for k in ("step", "val_loss", "val_bpb", "tokens")} | {"loss": last_loss}
    assert _records(run) == _records(tiny_run[0])


# ---------------------------------------------------------------- a full disk, a read-only run folder


class _FillingDisk(io.RawIOBase):
    """A file on a disk with `room` bytes left: writes go through up to there, then fail with ENOSPC."""

    def __init__(self, file: io.FileIO, room: int):
        self._file, self._room = file, room

    def writable(self):
        return True

    def fileno(self):
        return self._file.fileno()

    def seekable(self):
        return True

    def seek(self, *args):
        return self._file.seek(*args)

    def write(self, data):
        if self._room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no file name, as write() reports it
        written = self._file.write(bytes(data)[:self._room])
        self._room -= written
        return written

    def close(self):
        self._file.close()
        super().close()


def _refuse(monkeypatch, refused, error: int, room: int = 0) -> None:
    """The file system refuses, with `error`, every write to a path for which refused(path) holds: a file opened
    for writing (by Python's open, which pathlib, DCP and torch.save into a file use), a folder made, a rename to
    it, and safetensors' own writes (in Rust, past Python's open: its error then names the cause as Rust does).
    On a full disk (ENOSPC) a file opens, takes `room` bytes, and then its writes fail."""
    from safetensors import SafetensorError

    real_open, real_mkdir, real_rename, real_save_file = io.open, os.mkdir, os.rename, checkpoint_files.save_file

    def open_(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and refused(Path(file)):
            if error != errno.ENOSPC:
                raise OSError(error, os.strerror(error), str(file))
            filling = io.BufferedWriter(_FillingDisk(io.FileIO(file, mode.replace("b", "").replace("t", "")), room))
            return filling if "b" in mode else io.TextIOWrapper(filling, encoding=encoding or "utf-8")
        return real_open(file, mode, buffering, encoding, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if not os.path.lexists(path) and refused(Path(path)):  # an existing folder: EEXIST, as the kernel says
            raise OSError(error, os.strerror(error), str(path))
        return real_mkdir(path, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        if refused(Path(dst)):
            raise OSError(error, os.strerror(error), str(src), None, str(dst))
        return real_rename(src, dst, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        if refused(Path(filename)):
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(error)} (os error {error})")
        return real_save_file(tensors, filename, *args, **kwargs)

    for module, name, fake in ((io, "open", open_), (builtins, "open", open_), (os, "mkdir", mkdir),
                               (os, "rename", rename), (checkpoint_files, "save_file", save_file)):
        monkeypatch.setattr(module, name, fake)


def _after(name: str, allowed: int):
    """A `refused` for _refuse: files and folders named NAME (or NAME.tmp), once `allowed` of them were written."""
    seen = 0

    def refused(path: Path) -> bool:
        nonlocal seen
        if not path.name.startswith(name):
            return False
        seen += 1
        return seen > allowed

    return refused


# The writes of a run, each refused in turn: (name, how many of its writes go through first, [room,] extra arguments).
# Four steps with an evaluation, a checkpoint and samples every two: a file written again is refused the second time;
# a checkpoint's files at step 4's checkpoint, after step 2's is complete. Room: the bytes the file takes before the
# disk is full, so that large files (~1 MB) fail in their middle, as torch.save and DCP then report it their way.
FSDP = ("--parallel", "fsdp", "--set=optim.name=adamw")  # one process in a group of one: DCP writes the checkpoints
RUN_WRITES = [("config.toml", 0), ("tokenizer.json", 0), ("env.json", 0), ("metrics.jsonl", 1), ("loss.png", 1),
              ("samples.txt", 1)]
CHECKPOINT_WRITES = [("model.safetensors", 1, 0, ()), ("state.pt", 1, 65536, ()), ("meta.json", 1, 0, ()),
                     ("step-000004", 0, 0, ()), ("__0_", 1, 65536, FSDP), ("state.json", 1, 0, FSDP)]


def _error_line(argv: list[str], capsys) -> str:
    """The one line of a run that stops mid-way with exit 2: on stderr after the progress bar, on a line of its own."""
    capsys.readouterr()  # drop what came before
    assert main(argv) == 2
    *bar, err, end = capsys.readouterr().err.split("\n")
    assert err.startswith("tweetlm: error: ") and end == "" and not any("tweetlm" in line for line in bar), bar + [err]
    return err


def _full_disk(name: str, allowed: int, room: int, extra, tokens, tokenizer, run, monkeypatch, capsys) -> str:
    """The one-line error of a 4-step run on a disk that is full from NAME's write number `allowed` + 1 on."""
    _refuse(monkeypatch, _after(name, allowed), errno.ENOSPC, room)
    args = _args(tokens, tokenizer, run, "--steps", "4", "--set=checkpoint.every=2", "--set=eval.every=2",
                 "--set=eval.samples_every=2", "--set=eval.samples=1", *extra)
    try:
        err = _error_line(args, capsys)
    finally:
        if torch.distributed.is_initialized():  # a failed fsdp run leaves its group of one: its process would exit
            torch.distributed.destroy_process_group()
    assert "No space left on device" in err, err
    if (run / "checkpoints").is_dir():  # what the run completed loads; a checkpoint that failed left nothing
        assert not list((run / "checkpoints").glob(".t*")), list((run / "checkpoints").iterdir())
        assert load_model(run)[0].config.depth == 2
    return err


@pytest.mark.parametrize("name, allowed", RUN_WRITES, ids=[w[0] for w in RUN_WRITES])
def test_a_full_disk_stops_the_run_with_one_line(name, allowed, small_tokens, small_tokenizer, tmp_path, monkeypatch,
                                                 capsys):
    run = tmp_path / "run"
    err = _full_disk(name, allowed, 0, (), small_tokens, small_tokenizer, run, monkeypatch, capsys)
    assert f"cannot write {run}" in err, err  # a failed write() names no file: the run folder then


@pytest.mark.parametrize("name, allowed, room, extra", CHECKPOINT_WRITES,
                         ids=[w[0] + ("-sharded" if w[3] else "") for w in CHECKPOINT_WRITES])
def test_a_full_disk_at_a_checkpoint_keeps_the_last_complete_one(name, allowed, room, extra, small_tokens,
                                                                 small_tokenizer, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    err = _full_disk(name, allowed, room, extra, small_tokens, small_tokenizer, run, monkeypatch, capsys)
    last = run / "checkpoints" / "step-000002"
    assert f"cannot write {run}/checkpoints/step-000004: No space left on device" in err, err
    assert f"--resume continues from {last}" in err, err
    assert latest_checkpoint(run) == last


def test_a_read_only_run_folder_stops_the_run_with_one_line(small_tokens, small_tokenizer, tmp_path, monkeypatch,
                                                            capsys):
    parent, run = tmp_path / "read-only", tmp_path / "run"
    parent.mkdir()
    args = _args(small_tokens, small_tokenizer, run, "--set=checkpoint.every=1")
    assert main(args + ["--steps", "2"]) == 0
    folders = [parent, run, *(p for p in run.rglob("*") if p.is_dir())]
    if os.geteuid() == 0:  # root writes whatever the modes say (CI runs as root in a container): refuse instead
        _refuse(monkeypatch, lambda path: parent in (path, *path.parents) or run in path.parents, errno.EACCES)
    else:
        for folder in folders:
            folder.chmod(0o555)
    try:
        err = _one_line_error(_args(small_tokens, small_tokenizer, parent / "run"), capsys)
        assert f"cannot write {parent}" in err and "Permission denied" in err, err
        err = _error_line(args + ["--steps", "4", "--resume"], capsys)
        assert f"cannot write {run}" in err and "Permission denied" in err, err
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert latest_checkpoint(run).name == "step-000002" and load_model(run)[0].config.depth == 2


def test_resume_after_a_failed_checkpoint_starts_from_the_last_complete_one(tiny_run, small_tokens, small_tokenizer,
                                                                           tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = _config(small_tokens, small_tokenizer, run, **{"eval.every": 8, "checkpoint.every": 8})
    with monkeypatch.context() as m:
        _refuse(m, _after("state.pt", 1), errno.ENOSPC, room=65536)  # the disk fills up in step 16's checkpoint
        with pytest.raises(UserError, match="step-000016: No space left on device"):
            train(cfg)
    assert latest_checkpoint(run).name == "step-000008" and not list((run / "checkpoints").glob(".t*"))
    train(cfg, resume=True)
    a, b = _records(tiny_run[0]), _records(run)
    assert [(r["step"], r["loss"]) for r in a if "loss" in r] == [(r["step"], r["loss"]) for r in b if "loss" in r]
    assert [r for r in a if "val_loss" in r] == [r for r in b if "val_loss" in r]
    final = f"checkpoints/step-{STEPS:06d}/model.safetensors"
    assert (tiny_run[0] / final).read_bytes() == (run / final).read_bytes()
