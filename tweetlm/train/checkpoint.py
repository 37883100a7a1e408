"""Training state in checkpoints: save one (weights, optimizer states, loader position, RNG) and resume from one,
at any world size, under ddp or fsdp. The folder layouts, atomic writing and finding checkpoints are
tweetlm/artifacts/checkpoint.py's; this module adds what only training holds (optimizers, DTensor shards, RNG).
"""

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from tweetlm.artifacts import checkpoint as files
from tweetlm.errors import UserError
from tweetlm.model.llama import Llama, ModelConfig
from tweetlm.train.dist import barrier, is_distributed, is_main, like, param_names


def save_checkpoint(run: Path, *, step: int, model: Llama, optimizers: list, state: dict,
                    val: dict | None, keep: int) -> Path:
    """Write RUN/checkpoints/step-NNNNNN atomically, then drop all but the last `keep` and the best.
    Under a process group every rank calls it; it returns on all once the checkpoint is in place. A write the file
    system refuses raises an OSError naming the checkpoint, and leaves the last complete one the latest."""
    params, config = param_names(model), dataclasses.asdict(model.config)
    with files.writing(run, step):
        tmp = files.begin(run, step) if is_main() else files.staging(run, step)
        if is_distributed():
            barrier()  # the empty tmp folder exists before anyone writes into it
            files.write_sharded(tmp, _live(params, optimizers), config=config, state={**state, "step": step})
        else:
            files.write_whole(tmp, weights=params, config=config, state={
                **state, "step": step, "optimizers": [opt.state_dict() for opt in optimizers], "rng": _rng_state()})
        if is_main():
            files.commit(tmp, step=step, val=val, keep=keep)
    barrier()
    return files.step_folder(run, step)


def _live(params: dict[str, torch.nn.Parameter], optimizers: list) -> dict:
    """The tensors training holds, by name: {"model": {NAME: weight}, "optim": {NAME: {KEY: state}}}, each whole
    or this rank's DTensor shard. DCP saves them, and loads into them in place, resharding to the world at hand."""
    names = {p: name for name, p in params.items()}
    return {"model": {name: p.detach() for name, p in params.items()},
            "optim": {names[p]: dict(s) for opt in optimizers for p, s in opt.state.items()}}


def load_checkpoint(path: Path, model: Llama, optimizers: list) -> dict:
    """Load weights and optimizer states in place (after checking the shapes match), from either layout, whatever
    the world size and wrapping now and then; returns the rest of the state. Every rank calls it."""
    saved = ModelConfig(**files.read_config(path))
    if saved != model.config:
        diff = ", ".join(f"{f}: {getattr(saved, f)} there, {getattr(model.config, f)} here"
                         for f in saved.__dataclass_fields__ if getattr(saved, f) != getattr(model.config, f))
        raise UserError(f"checkpoint {path} holds a model of another shape ({diff}): resume with the run's own "
                        "model settings, or train into a new --out")
    params = param_names(model)
    if files.is_sharded(path):
        _init_optimizer_states(params, optimizers)
        files.load_sharded(_live(params, optimizers), path, alone=not is_distributed())
        return files.read_state(path)
    weights = files.read_weights(path, device=next(model.parameters()).device)
    assert weights.keys() == params.keys(), f"{sorted(weights.keys() ^ params.keys())} in only one of checkpoint and model"
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(like(weights[name], p))
    state = files.read_state(path)
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
