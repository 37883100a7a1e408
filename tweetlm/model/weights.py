"""A model's weights in a run folder: `load_model` for inference (the weights of a run's best checkpoint in a
Llama, and the run's tokenizer; the run folder alone suffices: the checkpoint holds the ModelConfig, the run its
tokenizer.json), and `save_model` for a checkpoint of weights alone (an imported model, a benchmark's).

    model, tokenizer = load_model("runs/small")              # best (else latest) checkpoint
    model, tokenizer = load_model("runs/small/checkpoints/step-000400", device="cuda")
"""

import dataclasses
from pathlib import Path

import torch

from tweetlm.artifacts import checkpoint
from tweetlm.artifacts.checkpoint import checkpoint_to_load, read_config, read_weights, run_folder
from tweetlm.model.llama import Llama, ModelConfig
from tweetlm.tokenizer.bpe import Tokenizer


def load_model(run_dir: Path, *, device: str | torch.device = "cpu") -> tuple[Llama, Tokenizer]:
    """The best (else the latest) checkpoint of a run folder, or one checkpoint folder, in eval mode on `device`.
    One process reads a sharded checkpoint whole, whatever the world size that wrote it."""
    path = checkpoint_to_load(run_dir)
    with torch.device("meta"):
        model = Llama(ModelConfig(**read_config(path)))
    model.load_state_dict(read_weights(path, device=device), assign=True)
    return model.eval(), Tokenizer.load(run_folder(run_dir) / "tokenizer.json")


def save_model(model: Llama, run: Path, *, step: int = 0) -> Path:
    """RUN/checkpoints/step-NNNNNN holding `model`'s weights and no training state; load_model reads it."""
    with checkpoint.writing(run, step):  # a refused write names the checkpoint and leaves no half of it
        folder = checkpoint.begin(run, step)
        checkpoint.write_whole(folder, weights=dict(model.named_parameters()), config=dataclasses.asdict(model.config),
                               state={"step": step})
        return checkpoint.commit(folder, step=step, val=None, keep=1)
