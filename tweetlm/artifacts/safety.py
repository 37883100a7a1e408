"""The safety classifier that `tweetlm safety train` (tweetlm/eval/safety.py) makes and that `data prepare
--drop-toxic` and `serve --moderate` load: a toxicity score in [0, 1] per post.

SAFETY/ holds no pickle, so loading it runs no code from the file:
    safety.json          {"format": 1, "threshold", "C", "val": {...}, "features", "vocabulary": {"word": [terms
                         by feature index], "char": [...]}}
    weights.safetensors  idf_word, idf_char [n_terms] float32; coef [n_features] float32; intercept [1] float32
A score is sigmoid(features(normalize(text)) . coef + intercept), in [0, 1]; a post is toxic at score >= threshold.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from tweetlm.artifacts.ngrams import NgramFeatures
from tweetlm.artifacts.text import normalize
from tweetlm.errors import UserError
from tweetlm.spec import path_and_number

FORMAT = 1
_CONFIG, _WEIGHTS = "safety.json", "weights.safetensors"


def parse_spec(spec: str) -> tuple[Path, float | None]:
    """"SAFETY" or "SAFETY:THRESHOLD" (as --drop-toxic and --moderate take it) -> (folder, threshold or None)."""
    path, threshold = path_and_number(spec)
    if threshold is not None:
        check_threshold(threshold)
    return path, threshold


def check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise UserError(f"toxicity threshold {threshold}: must be in (0, 1]; a post is toxic at score >= threshold")


class SafetyClassifier:
    """score(texts) -> toxicity in [0, 1]; `threshold` is where a score counts as toxic. Build with `load`."""

    def __init__(self, features: NgramFeatures, coef: np.ndarray, intercept: float, threshold: float, info: dict):
        assert coef.shape == (features.size,), f"{coef.shape} weights for {features.size} features"
        self.features, self.coef, self.intercept, self.threshold, self.info = features, coef, intercept, threshold, info

    @classmethod
    def load(cls, path: Path, threshold: float | None = None) -> "SafetyClassifier":
        """From a SAFETY folder; `threshold` replaces the one chosen at training."""
        path = Path(path)
        try:
            info = json.loads((path / _CONFIG).read_text())
            arrays = load_file(path / _WEIGHTS)
        except (OSError, ValueError) as e:
            raise UserError(f"no safety classifier at {path} ({e}): train one with "
                            f"`tweetlm safety train --data ../shared/data/tweeteval --out {path}`") from None
        if info.get("format") != FORMAT:
            raise UserError(f"{path / _CONFIG}: format {info.get('format')!r}, this tweetlm reads {FORMAT}: retrain it")
        if threshold is not None:
            check_threshold(threshold)
        try:
            features = NgramFeatures.from_state(info.pop("vocabulary"), arrays)
            coef, intercept, default = arrays["coef"], float(arrays["intercept"][0]), info["threshold"]
            if coef.shape != (features.size,):
                raise ValueError(f"{coef.shape} weights for {features.size} features")
        except (KeyError, ValueError) as e:
            raise UserError(f"{path} is damaged ({e}): retrain it with `tweetlm safety train`") from None
        return cls(features, coef, intercept, default if threshold is None else threshold, info)

    def save(self, path: Path) -> None:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file; pass a folder for the safety classifier")
        path.mkdir(parents=True, exist_ok=True)
        vocabulary, arrays = self.features.state()
        save_file(arrays | {"coef": self.coef, "intercept": np.array([self.intercept], np.float32)}, path / _WEIGHTS)
        info = self.info | {"format": FORMAT, "threshold": self.threshold, "features": self.features.size}
        (path / _CONFIG).write_text(json.dumps(info | {"vocabulary": vocabulary}, ensure_ascii=False) + "\n")

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts)] float64 toxicity scores; texts are normalized as `data prepare` does first."""
        if not texts:
            return np.zeros(0)
        return sigmoid(self.features([normalize(t) for t in texts]) @ self.coef + self.intercept)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
