"""Checkpoints in a run folder: save atomically, keep the last K and the best, resume, load for inference.

RUN/checkpoints/step-NNNNNN/
    model.safetensors  the weights, with the ModelConfig as JSON in the file's metadata (the file alone rebuilds the model)
    state.pt           optimizer states, loader position, RNG states, step, training time: plain tensors and
                       containers, read back with torch.load(weights_only=True), so loading never runs pickled code
    meta.json          step, val loss and bits-per-byte at that step (null when not evaluated there)
A checkpoint is written into checkpoints/.tmp-step-NNNNNN and renamed into place, and an old one is renamed to
.trash-... before it is deleted, so a `step-*` folder is always complete, whenever the process is killed.
"""

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tweetlm.errors import UserError
from tweetlm.model.llama import Llama, ModelConfig
from tweetlm.tokenizer.bpe import Tokenizer

_FILES = ("model.safetensors", "state.pt", "meta.json")


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's list of names, to disk: a rename is only as durable as what it renames."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run: Path, *, step: int, model: Llama, optimizers: list, state: dict,
                    val: dict | None, keep: int) -> Path:
    """Write RUN/checkpoints/step-NNNNNN atomically, then drop all but the last `keep` and the best."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # one metadata key: safetensors writes several in hash-map order, and the same weights should give the same bytes
    metadata = {"model_config": json.dumps(dataclasses.asdict(model.config))}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors", metadata=metadata)
    torch.save({**state, "step": step, "optimizers": [opt.state_dict() for opt in optimizers], "rng": _rng_state()},
               tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **(val or {})}) + "\n")
    for path in [*tmp.iterdir(), tmp]:
        _fsync(path)
    if final.exists():  # the same step written again (a resumed run that had got this far): replace it
        _discard(final)
    os.rename(tmp, final)
    _fsync(root)
    _prune(root, keep)
    return final


def _discard(folder: Path) -> None:
    trash = folder.with_name(".trash-" + folder.name)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash)


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (leftover .tmp and .trash folders are not listed)."""
    found = [p for p in root.glob("step-*") if all((p / f).is_file() for f in _FILES)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def _val_loss(path: Path) -> float:
    return json.loads((path / "meta.json").read_text()).get("val_loss", float("inf"))


def _best(found: list[Path]) -> Path | None:
    evaluated = [p for p in found if _val_loss(p) < float("inf")]
    return min(evaluated, key=_val_loss) if evaluated else None


def _prune(root: Path, keep: int) -> None:
    found = _checkpoints(root)
    best = _best(found)
    for path in found[:-keep]:
        if path != best:
            _discard(path)
    for leftover in root.glob(".t*-step-*"):  # from a process killed mid-write or mid-delete
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(run: Path) -> Path | None:
    found = _checkpoints(Path(run) / "checkpoints")
    return found[-1] if found else None


def best_checkpoint(run: Path) -> Path | None:
    """The checkpoint with the lowest val loss, or the latest when none was evaluated."""
    found = _checkpoints(Path(run) / "checkpoints")
    return _best(found) or (found[-1] if found else None)


def _model_config(path: Path) -> ModelConfig:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return ModelConfig(**json.loads(f.metadata()["model_config"]))


def load_checkpoint(path: Path, model: Llama, optimizers: list) -> dict:
    """Load weights and optimizer states in place (after checking the shapes match); returns the rest of the state."""
    saved = _model_config(path)
    if saved != model.config:
        diff = ", ".join(f"{f}: {getattr(saved, f)} there, {getattr(model.config, f)} here"
                         for f in saved.__dataclass_fields__ if getattr(saved, f) != getattr(model.config, f))
        raise UserError(f"checkpoint {path} holds a model of another shape ({diff}): resume with the run's own "
                        "model settings, or train into a new --out")
    model.load_state_dict(load_file(path / "model.safetensors", device=str(next(model.parameters()).device)))
    state = torch.load(path / "state.pt", weights_only=True)
    assert len(state["optimizers"]) == len(optimizers), f"{len(state['optimizers'])} optimizer states for {len(optimizers)} optimizers"
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(opt_state)
    _set_rng_state(state["rng"])
    return state


def load_model(run_dir: Path, *, device: str | torch.device = "cpu") -> tuple[Llama, Tokenizer]:
    """The best (else the latest) checkpoint of a run folder, or one checkpoint folder, ready for inference."""
    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").is_file():  # a checkpoint folder: RUN/checkpoints/step-N
        path, run_dir = run_dir, run_dir.parent.parent
    else:
        path = best_checkpoint(run_dir)
    if path is None:
        raise UserError(f"{run_dir} holds no checkpoint: train one with `tweetlm train ... --out {run_dir}`")
    with torch.device("meta"):
        model = Llama(_model_config(path))
    model.load_state_dict(load_file(path / "model.safetensors", device=str(device)), assign=True)
    return model.eval(), Tokenizer.load(run_dir / "tokenizer.json")


def _rng_state() -> dict:
    """Global RNG states. The trainer draws from its own seeded generators; these cover anything else."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
