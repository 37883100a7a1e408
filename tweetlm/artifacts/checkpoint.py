"""Checkpoint folders of a run: their two layouts, writing one atomically, keeping the last K and the best, finding
the latest and the best, and reading one's weights whole in one process (tweetlm/model/weights.py builds the model
from them; tweetlm/train/checkpoint.py saves and resumes training state with these functions).

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
deleted, so a `step-*` folder is always complete, whenever any process is killed or the disk fills up (`writing`
then removes the staging folder and raises the file system's error as an OSError naming the checkpoint).
DCP's .metadata is a pickle: it is read by an unpickler that builds DCP's index classes only, and only tensors are
ever read from a sharded checkpoint (with torch.load(weights_only=True)), so loading never runs code from the files.
"""

import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tweetlm.errors import UserError

_FILES = ("model.safetensors", "state.pt", "meta.json")
_SHARDED_FILES = (".metadata", "model.json", "state.json", "meta.json")


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's list of names, to disk: a rename is only as durable as what it renames."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- writing


def step_folder(run: Path, step: int) -> Path:
    """RUN/checkpoints/step-NNNNNN, the checkpoint of `step`."""
    return Path(run) / "checkpoints" / f"step-{step:06d}"


def staging(run: Path, step: int) -> Path:
    """The folder a checkpoint of `step` is written into before `commit` renames it into place."""
    return step_folder(run, step).with_name(f".tmp-step-{step:06d}")


@contextlib.contextmanager
def writing(run: Path, step: int):
    """Around writing `step`'s checkpoint, from `begin` through `commit`, on every rank. If the block fails, rank 0
    removes the staging folder (where the file system lets it; else the next commit does) and a write the file
    system refused (full disk, read-only folder) comes out as an OSError naming the checkpoint, whichever library
    met it. No step-N folder appears but by commit's rename of a whole one: the last complete checkpoint stays."""
    try:
        yield
    except BaseException as e:
        if _is_main():
            shutil.rmtree(staging(run, step), ignore_errors=True)
        refused = _refused_write(e)
        if refused is None:
            raise
        final = step_folder(run, step)  # once in place, what failed was dropping an old one: RUN/checkpoints then
        raise OSError(refused.errno, refused.strerror, str(final.parent if _is_checkpoint(final) else final)) from e


def _refused_write(e: BaseException | None, depth: int = 0) -> OSError | None:
    """The OSError behind a failed write, or None: `e` itself, or what a library wrapped it in. torch.save raises
    a RuntimeError ("unexpected pos") while handling it, DCP a CheckpointException holding each rank's error, and
    safetensors (whose writes are in Rust) an error naming it only in its message, as Rust does: "... (os error 28)"."""
    from torch.distributed.checkpoint.api import CheckpointException

    if e is None or depth > 8:
        return None
    if isinstance(e, OSError) and e.errno is not None:  # not io.UnsupportedOperation and the like
        return e
    if isinstance(e, SafetensorError) and (code := re.search(r"\(os error (\d+)\)", str(e))):
        return OSError(int(code[1]), os.strerror(int(code[1])))
    inner = [e.__cause__, e.__context__]
    if isinstance(e, CheckpointException):
        inner += [failure for failure, _ in e.failures.values()]
    return next((found for x in inner if (found := _refused_write(x, depth + 1)) is not None), None)


def begin(run: Path, step: int) -> Path:
    """An empty staging folder for `step` (rank 0 makes it; under a process group the others wait at a barrier
    before writing into it)."""
    tmp = staging(run, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def write_whole(folder: Path, *, weights: dict[str, torch.Tensor], config: dict, state: dict) -> None:
    """The one-process layout: model.safetensors (the ModelConfig `config` in its metadata) and state.pt."""
    # one metadata key: safetensors writes several in hash-map order, and the same weights should give the same bytes
    save_file({name: w.detach().contiguous() for name, w in weights.items()}, folder / "model.safetensors",
              metadata={"model_config": json.dumps(config)})
    # into a file opened here: torch.save's own file reports a full disk as a bare RuntimeError; with this one the
    # RuntimeError keeps the OSError as its context, where `writing` finds it
    with open(folder / "state.pt", "wb") as f:
        torch.save(state, f)


def write_sharded(folder: Path, tensors: dict, *, config: dict, state: dict) -> None:
    """The sharded layout, by every rank of the process group at once: DCP writes each rank's share of `tensors`
    ({"model": {NAME: weight}, "optim": {NAME: {KEY: state}}}, whole or DTensor shards), rank 0 the JSON files."""
    from torch.distributed.checkpoint import save

    save(tensors, storage_writer=_writer(folder))  # fsyncs; rank 0 writes .metadata last
    if _is_main():
        (folder / "model.json").write_text(json.dumps(config) + "\n")
        (folder / "state.json").write_text(json.dumps(state) + "\n")


def _writer(folder: Path):
    """DCP's file writer, raising a write the file system refused (full disk) as the OSError it is. DCP writes each
    tensor with torch.save, whose RuntimeError keeps the OSError only as its __context__, and sends it through its
    collectives, pickled, which drops the context: this writer raises the OSError before that (DCP writes here, in
    write_data, with the default thread_count of 1)."""
    from torch.distributed.checkpoint import FileSystemWriter

    class RefusedWriteWriter(FileSystemWriter):
        def write_data(self, *args, **kwargs):
            try:
                return super().write_data(*args, **kwargs)
            except Exception as e:
                refused = _refused_write(e)
                if refused is None:
                    raise
                raise refused from e

    return RefusedWriteWriter(folder)


def commit(folder: Path, *, step: int, val: dict | None, keep: int) -> Path:
    """Rank 0, once every file of the staging `folder` is written: meta.json, flush, rename to step-NNNNNN (a
    checkpoint of the same step written before is replaced), then drop all but the last `keep` and the best."""
    root, final = folder.parent, folder.parent / f"step-{step:06d}"
    (folder / "meta.json").write_text(json.dumps({"step": step, **(val or {})}) + "\n")
    for path in [*folder.iterdir(), folder]:
        _fsync(path)
    if final.exists():  # the same step written again (a resumed run that had got this far): replace it
        _discard(final)
    os.rename(folder, final)
    _fsync(root)
    _prune(root, keep)
    return final


def _discard(folder: Path) -> None:
    trash = folder.with_name(".trash-" + folder.name)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash)


def _prune(root: Path, keep: int) -> None:
    found = _checkpoints(root)
    best = _best(found)
    for path in found[:-keep]:
        if path != best:
            _discard(path)
    for leftover in root.glob(".t*-step-*"):  # from a process killed mid-write or mid-delete
        shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------- finding


def is_sharded(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def _is_checkpoint(path: Path) -> bool:
    return all((path / f).is_file() for f in (_SHARDED_FILES if is_sharded(path) else _FILES))


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


def latest_checkpoint(run: Path) -> Path | None:
    found = _checkpoints(Path(run) / "checkpoints")
    return found[-1] if found else None


def best_checkpoint(run: Path) -> Path | None:
    """The checkpoint with the lowest val loss, or the latest when none was evaluated."""
    found = _checkpoints(Path(run) / "checkpoints")
    return _best(found) or (found[-1] if found else None)


def checkpoint_to_load(path: Path) -> Path:
    """A checkpoint folder as it is, or a run folder's best (else latest) checkpoint; UserError if there is none."""
    path = Path(path)
    found = path if _is_checkpoint(path) else best_checkpoint(path)
    if found is None:
        raise UserError(f"{path} holds no checkpoint: train one with `tweetlm train ... --out {path}`")
    return found


# ---------------------------------------------------------------- reading


def read_config(path: Path) -> dict:
    """The ModelConfig fields a checkpoint was written with."""
    if is_sharded(path):
        return json.loads((path / "model.json").read_text())
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return json.loads(f.metadata()["model_config"])


def read_weights(path: Path, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint, whole, by parameter name, in one process, whatever the world size that wrote it."""
    if not is_sharded(path):
        return load_file(path / "model.safetensors", device=str(device))
    entries = _read_index(path).state_dict_metadata
    weights = {key.removeprefix("model."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device=device)
               for key, meta in entries.items() if key.startswith("model.")}
    load_sharded({"model": weights}, path, alone=True)
    return weights


def read_state(path: Path) -> dict:
    """What a checkpoint holds besides tensors (loader position, step, training time, tokens, val; and, in the
    one-process layout, the optimizer state_dicts and RNG states)."""
    if is_sharded(path):
        return json.loads((path / "state.json").read_text())
    return torch.load(path / "state.pt", weights_only=True)


def load_sharded(tensors: dict, path: Path, *, alone: bool) -> None:
    """DCP-load the checkpoint at `path` into `tensors` in place: with the other ranks, or `alone` (whole tensors)."""
    from torch.distributed.checkpoint import load

    with warnings.catch_warnings():  # DCP warns that it "assumes" a single process even when told so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(tensors, storage_reader=_reader(path), no_dist=alone)


# ---------------------------------------------------------------- reading DCP's index without running its code


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


def _read_index(path: Path):
    """DCP's index of a sharded checkpoint, as _IndexUnpickler reads it."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path / ".metadata", "rb") as f:
        index = _IndexUnpickler(f).load()
    assert isinstance(index, Metadata), f"{path}/.metadata holds a {type(index).__name__}"
    return index


def _reader(path: Path):
    """DCP's file reader, given the index as _IndexUnpickler read it (DCP itself would call pickle.load, and turn
    any error there into a CheckpointException, so the index is read here first)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    index = _read_index(path)

    class CheckedIndexReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            index.storage_meta = index.storage_meta or StorageMeta()
            index.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
            return index

    return CheckedIndexReader(path)
