"""`tweetlm classify DIR --task TASK [TEXT ...]`: label posts with a classifier that `tweetlm eval tweeteval RUN
--save DIR` kept, so that a platform uses its own model as a classifier, not only as a score.

    tweetlm eval tweeteval work/demo/run --data ../shared/data/tweeteval --save work/classifiers
    tweetlm classify work/classifiers --task irony "Love waiting an hour for the bus in the rain"
    cut -f2 posts.tsv | tweetlm classify work/classifiers --task stance/climate -   # posts on stdin, one per line

DIR is laid out as tweetlm/artifacts/classifiers.py says (tokenizer.json, and DIR/TASK/ or DIR/stance/TARGET/).
A post is read and batched as fine-tuning read and batched the split it predicted, so the labels are those
`eval tweeteval` predicted for the same posts. One JSON object per post:
{"text", "label" (the name, from the task's mapping.txt), "probabilities" {label: p}} (softmax of the logits).
"""

from pathlib import Path

import numpy as np

from tweetlm.artifacts import classifiers
from tweetlm.device import resolve_device
from tweetlm.errors import UserError
from tweetlm.eval.finetune import load_classifier, predict_logits
from tweetlm.tokenizer.bpe import Tokenizer


def classify(folder: Path, task: str, texts: list[str], *, device: str = "auto") -> list[dict]:
    """Each post of `texts` with its label and the probability of each label, by the classifier DIR/TASK."""
    folder = Path(folder)
    saved = classifiers.saved_tasks(folder) if (folder / "tokenizer.json").is_file() else []
    if not saved:
        what = "holds no saved classifiers" if folder.is_dir() else "does not exist"
        raise UserError(f"{folder} {what}: keep a run's classifiers with "
                        f"`tweetlm eval tweeteval RUN --data ../shared/data/tweeteval --save {folder}`")
    if task not in saved:
        raise UserError(f"no {task!r} classifier in {folder}; it holds {', '.join(saved)}")
    if not texts:
        raise UserError("no posts to classify: give them as TEXT arguments, or - and posts on stdin, one per line")
    model, info = load_classifier(folder / task, device=resolve_device(device))
    logits = predict_logits(model, Tokenizer.load(folder), texts)  # [N, C]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = info["labels"]
    return [{"text": text, "label": labels[int(row.argmax())],
             "probabilities": {name: round(float(p), 4) for name, p in zip(labels, prob)}}
            for text, row, prob in zip(texts, logits, probs)]
