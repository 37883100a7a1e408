"""Checkpoints in a run folder: save atomically, keep the last K and the best, resume, load for inference.

RUN/checkpoints/step-NNNNNN/ comes in two layouts, told apart by their files.
Written by one process (no process group):
    model.safetensors  the weights, with the ModelConfig as JSON in the file's metadata (the file alone rebuilds the model)
    state.pt           optimizer states, loader position, RNG states, step, training time: plain tensors and
                       containers, read back with torch.load(weights_only=True), so loading never runs pickled code
    meta.json          step, val loss and bits-per-byte at that step (null when not evaluated there)
Written by a process group (torchrun, or fsdp), sharded with torch.distributed.checkpoint (DCP):
    .metadata          DCP's index: each tensor's name, shape, and which file holds which piece of it
    __R_0.distcp       what rank R held: "model.NAME" weights and "optim.NAME.KEY" optimizer states (NAME as in
                       Llama, "blocks.0.attention.wq.weight"; KEY exp_avg, exp_avg_sq, step or momentum); under
                       fsdp each rank's slice of rows, under ddp each tensor once
    model.json         the ModelConfig
    state.json         loader position, step, training time, tokens, last val (the RNG states are not kept:
                       training draws only from explicitly seeded generators)
    meta.json          as above
Either layout resumes at any world size, under ddp or fsdp, and `load_model` reads both.

A checkpoint is written into checkpoints/.tmp-step-NNNNNN (by every rank at once when sharded) and renamed into
place by rank 0 once every file is written and flushed, and an old one is renamed to .trash-... before it is
deleted, so a `step-*` folder is always complete, whenever any process is killed. DCP's .metadata is a pickle:
it is read by an unpickler that builds DCP's index classes only, and only tensors are ever read from a sharded
checkpoint (with torch.load(weights_only=True)), so loading never runs code from the files.
"""

import dataclasses
import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tweetlm.errors import UserError
from tweetlm.model.llama import Llama, ModelConfig
from tweetlm.tokenizer.bpe import Tokenizer
from tweetlm.train.dist import barrier, is_distributed, is_main, like, param_names

_FILES = ("model.safetensors", "state.pt", "meta.json")
_SHARDED_FILES = (".metadata", "model.json", "state.json", "meta.json")


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's list of names, to disk: a rename is only as durable as what it renames."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run: Path, *, step: int, model: Llama, optimizers: list, state: dict,
                    val: dict | None, keep: int) -> Path:
    """Write RUN/checkpoints/step-NNNNNN atomically, then drop all but the last `keep` and the best.
    Under a process group every rank calls it; it returns on all once the checkpoint is in place."""
    root = Path(run) / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    params = param_names(model)
    if is_distributed():
        from torch.distributed.checkpoint import FileSystemWriter, save

        barrier()  # the empty tmp folder exists before anyone writes into it
        save(_live(params, optimizers), storage_writer=FileSystemWriter(tmp))  # fsyncs; rank 0 writes .metadata last
        if is_main():
            (tmp / "model.json").write_text(json.dumps(dataclasses.asdict(model.config)) + "\n")
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}) + "\n")
    else:
        # one metadata key: safetensors writes several in hash-map order, and the same weights should give the same bytes
        metadata = {"model_config": json.dumps(dataclasses.asdict(model.config))}
        save_file({name: p.detach().contiguous() for name, p in params.items()}, tmp / "model.safetensors", metadata=metadata)
        torch.save({**state, "step": step, "optimizers": [opt.state_dict() for opt in optimizers], "rng": _rng_state()},
                   tmp / "state.pt")
    if is_main():
        (tmp / "meta.json").write_text(json.dumps({"step": step, **(val or {})}) + "\n")
        for path in [*tmp.iterdir(), tmp]:
            _fsync(path)
        if final.exists():  # the same step written again (a resumed run that had got this far): replace it
            _discard(final)
        os.rename(tmp, final)
        _fsync(root)
        _prune(root, keep)
    barrier()
    return final


def _live(params: dict[str, torch.nn.Parameter], optimizers: list) -> dict:
    """The tensors training holds, by name: {"model": {NAME: weight}, "optim": {NAME: {KEY: state}}}, each whole
    or this rank's DTensor shard. DCP saves them, and loads into them in place, resharding to the world at hand."""
    names = {p: name for name, p in params.items()}
    return {"model": {name: p.detach() for name, p in params.items()},
            "optim": {names[p]: dict(s) for opt in optimizers for p, s in opt.state.items()}}


def _discard(folder: Path) -> None:
    trash = folder.with_name(".trash-" + folder.name)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash)


def _is_sharded(path: Path) -> bool:
    return (path / ".metadata").is_file()


def _is_checkpoint(path: Path) -> bool:
    return all((path / f).is_file() for f in (_SHARDED_FILES if _is_sharded(path) else _FILES))


def run_folder(path: Path) -> Path:
    """The run folder of a run folder or of one of its checkpoint folders (RUN/checkpoints/step-N)."""
    return Path(path).parent.parent if _is_checkpoint(Path(path)) else Path(path)


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (leftover .tmp and .trash folders are not listed)."""
    found = [p for p in root.glob("step-*") if _is_checkpoint(p)] if root.is_dir() else []
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
    if _is_sharded(path):
        return ModelConfig(**json.loads((path / "model.json").read_text()))
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return ModelConfig(**json.loads(f.metadata()["model_config"]))


def load_checkpoint(path: Path, model: Llama, optimizers: list) -> dict:
    """Load weights and optimizer states in place (after checking the shapes match), from either layout, whatever
    the world size and wrapping now and then; returns the rest of the state. Every rank calls it."""
    saved = _model_config(path)
    if saved != model.config:
        diff = ", ".join(f"{f}: {getattr(saved, f)} there, {getattr(model.config, f)} here"
                         for f in saved.__dataclass_fields__ if getattr(saved, f) != getattr(model.config, f))
        raise UserError(f"checkpoint {path} holds a model of another shape ({diff}): resume with the run's own "
                        "model settings, or train into a new --out")
    params = param_names(model)
    if _is_sharded(path):
        _init_optimizer_states(params, optimizers)
        _load_sharded(_live(params, optimizers), path, alone=not is_distributed())
        return json.loads((path / "state.json").read_text())
    weights = load_file(path / "model.safetensors", device=str(next(model.parameters()).device))
    assert weights.keys() == params.keys(), f"{sorted(weights.keys() ^ params.keys())} in only one of checkpoint and model"
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(like(weights[name], p))
    state = torch.load(path / "state.pt", weights_only=True)
    assert len(state["optimizers"]) == len(optimizers), f"{len(state['optimizers'])} optimizer states for {len(optimizers)} optimizers"
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        held = [p for group in opt.param_groups for p in group["params"]]  # the order of opt_state's integer keys
        opt.load_state_dict({**opt_state, "state": {i: {k: like(v, held[i]) if v.shape == held[i].shape else v
                                                        for k, v in s.items()} for i, s in opt_state["state"].items()}})
    _set_rng_state(state["rng"])
    return state


def _init_optimizer_states(params: dict[str, torch.nn.Parameter], optimizers: list) -> None:
    """Create every optimizer state tensor, for DCP to load into: one step at lr 0 with zero gradients, which leaves
    the weights exactly as they are (torch's own helper for this calls step(closure=None), which Muon does not take)."""
    if all(opt.state for opt in optimizers):
        return
    for p in params.values():
        p.grad = torch.zeros_like(p)
    for opt in optimizers:
        lrs = [group["lr"] for group in opt.param_groups]
        for group in opt.param_groups:
            group["lr"] = 0.0
        opt.step()
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
    for p in params.values():
        p.grad = None


def load_model(run_dir: Path, *, device: str | torch.device = "cpu") -> tuple[Llama, Tokenizer]:
    """The best (else the latest) checkpoint of a run folder, or one checkpoint folder, ready for inference.
    One process reads a sharded checkpoint whole, whatever the world size that wrote it."""
    run_dir = Path(run_dir)
    path = run_dir if _is_checkpoint(run_dir) else best_checkpoint(run_dir)  # a checkpoint folder: RUN/checkpoints/step-N
    if path is None:
        raise UserError(f"{run_dir} holds no checkpoint: train one with `tweetlm train ... --out {run_dir}`")
    with torch.device("meta"):
        model = Llama(_model_config(path))
    if _is_sharded(path):
        model.to_empty(device=device)
        _load_sharded({"model": {name: p.detach() for name, p in model.named_parameters()}}, path, alone=True)
    else:
        model.load_state_dict(load_file(path / "model.safetensors", device=str(device)), assign=True)
    return model.eval(), Tokenizer.load(run_folder(run_dir) / "tokenizer.json")


# ---------------------------------------------------------------- reading DCP's index without running its code


def _load_sharded(tensors: dict, path: Path, *, alone: bool) -> None:
    """DCP-load the checkpoint at `path` into `tensors` in place: with the other ranks, or `alone` (whole tensors)."""
    from torch.distributed.checkpoint import load

    with warnings.catch_warnings():  # DCP warns that it "assumes" a single process even when told so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(tensors, storage_reader=_reader(path), no_dist=alone)



# What a DCP index pickles (torch 2.13): its dataclasses, torch.Size and dtypes, a layout by name, a path.
_INDEX_GLOBALS = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
    "_MEM_FORMAT_ENCODING")} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                                ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"), ("collections", "OrderedDict")}


class _IndexUnpickler(pickle.Unpickler):
    """Builds only the classes of _INDEX_GLOBALS and torch dtypes; anything else is refused (the standard
    "restricting globals" of Python's pickle documentation). Non-tensor entries (BytesStorageMetadata), which DCP
    would unpickle with weights_only=False, are refused too: tweetlm never writes them."""

    def find_class(self, module: str, name: str):
        if (module, name) in _INDEX_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UserError(f"a checkpoint index (.metadata) refers to {module}.{name}, which no tweetlm checkpoint holds: "
                        "not loading it, as it could run code; load only checkpoints written by tweetlm")


def _reader(path: Path):
    """DCP's file reader, given the index as _IndexUnpickler read it (DCP itself would call pickle.load, and turn
    any error there into a CheckpointException, so the index is read here first)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    with open(path / ".metadata", "rb") as f:
        index = _IndexUnpickler(f).load()
    assert isinstance(index, Metadata), f"{path}/.metadata holds a {type(index).__name__}"

    class CheckedIndexReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            index.storage_meta = index.storage_meta or StorageMeta()
            index.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
            return index

    return CheckedIndexReader(path)


# ---------------------------------------------------------------- global RNG states (one process)


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
