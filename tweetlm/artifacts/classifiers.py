"""Fine-tuned TweetEval classifiers that `tweetlm eval tweeteval RUN --save DIR` keeps (tweetlm/eval/finetune.py)
and `tweetlm classify DIR --task TASK` reads (tweetlm/eval/classify.py). No pickle: loading runs no code from the files.

    DIR/tokenizer.json       the run's, byte for byte, once for every task
    DIR/TASK/                one per task (stance: DIR/stance/TARGET/, as the prediction files are named)
      model.safetensors      the classifier's weights: the trunk's as "trunk." + its Llama names, "head.weight" [C, D],
                             "head.bias" [C]; the trunk's ModelConfig as JSON in the metadata, as in a checkpoint's
      classifier.json        {"format": 1, "pooling": "last" | "mean", "labels": [names by id, mapping.txt's], "task",
                             "target", "val_score", "epoch" (the one chosen on val), the recipe}; written last, so a
                             folder without it is not a classifier
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tweetlm.artifacts.checkpoint import read_config, read_weights, run_folder
from tweetlm.errors import UserError

FORMAT = 1
_INFO = "classifier.json"


def write(folder: Path, weights: dict[str, torch.Tensor], config: dict, info: dict) -> None:
    """One task's classifier: weights by name, the trunk's ModelConfig fields, classifier.json's other fields."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().cpu().contiguous() for name, t in weights.items()}
    save_file(weights, folder / "model.safetensors", metadata={"model_config": json.dumps(config)})
    (folder / _INFO).write_text(json.dumps({"format": FORMAT, **info}, ensure_ascii=False, indent=1) + "\n")


def read(folder: Path, *, device: torch.device) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """`write`'s weights (on `device`), ModelConfig fields and classifier.json."""
    info = json.loads((folder / _INFO).read_text())
    if info.get("format") != FORMAT:
        raise UserError(f"{folder / _INFO}: format {info.get('format')!r}, this tweetlm reads {FORMAT}: "
                        "save it again with `tweetlm eval tweeteval RUN --save DIR`")
    return read_weights(folder, device=device), read_config(folder), info


def saved_tasks(folder: Path) -> list[str]:
    """The classifiers in DIR: "irony", "stance/abortion", ... sorted."""
    return sorted(p.parent.relative_to(folder).as_posix() for p in Path(folder).rglob(_INFO))


def save_tokenizer(run: Path, folder: Path) -> None:
    """DIR/tokenizer.json, the run's byte for byte; a DIR holding another tokenizer's classifiers is refused."""
    source = (run_folder(run) / "tokenizer.json").read_bytes()
    target = folder / "tokenizer.json"
    if target.is_file() and target.read_bytes() != source:
        raise UserError(f"--save {folder} holds classifiers of a run with another tokenizer; save into a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source)
