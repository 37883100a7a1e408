"""`tweetlm safety train`: a toxicity classifier small and fast enough to score every post of a corpus
(`data prepare --drop-toxic`) and every request and reply of the server (`serve --moderate`).

    tweetlm safety train --data ../shared/data/tweeteval --out work/safety

Trained on TweetEval's offensive (OffensEval 2019: insults, threats, profanity, targeted or not) and hate
(HatEval 2019: hate speech against immigrants and women) train splits, pooled: a post is toxic when it is
labelled offensive or hateful. The two sets were annotated apart, and HatEval's "not hate" posts can still be
offensive, so the pooled labels are noisy; "toxic" means what those ~21k English posts of 2016-2019 say it is.
The model: TF-IDF word and char n-grams + logistic regression (tweetlm/eval/logistic.py), C chosen on the pooled val splits
by the F1 of the toxic class, and the default threshold there too (the one of best F1); val precision,
recall and F1 are reported beside a majority-class baseline, so a little optimistic, as tuned on val.
(tweetlm/artifacts/safety.py holds the classifier, its files and its scoring.)
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tweetlm.artifacts.ngrams import NgramFeatures
from tweetlm.artifacts.safety import SafetyClassifier, sigmoid
from tweetlm.artifacts.text import normalize
from tweetlm.errors import check
from tweetlm.eval.logistic import fit_logistic
from tweetlm.eval.tweeteval import C_GRID, load_task


@dataclass(frozen=True, kw_only=True)
class SafetyConfig:
    data: Path  # TweetEval's datasets/ layout (offensive/ and hate/ are read)
    out: Path
    max_train_examples: int | None = None  # per source set, a seeded sample: for quick runs
    seed: int = 0

    def __post_init__(self):
        check(self.max_train_examples is None or self.max_train_examples >= 1, "max_train_examples",
              self.max_train_examples, "must be at least 1")


def train_safety(cfg: SafetyConfig) -> dict:
    """Fits, chooses C and the threshold on val, saves SAFETY/ and checks that the saved classifier gives the
    same scores; returns and prints the val metrics beside the majority-class baseline's."""
    start = time.perf_counter()
    (train_texts, train_y), (val_texts, val_y) = _pooled(cfg)
    train_texts = [normalize(t) for t in train_texts]  # as score() sees them
    features = NgramFeatures.fit(train_texts)
    x_train, x_val = features(train_texts), features([normalize(t) for t in val_texts])
    best = None  # (val F1, C, threshold, coef, intercept)
    for C in C_GRID:
        model = fit_logistic(x_train, train_y, C=C, seed=cfg.seed)
        coef, intercept = model.coef_[0].astype(np.float32), float(np.float32(model.intercept_[0]))  # as saved
        threshold, f1 = best_threshold(val_y, sigmoid(x_val @ coef + intercept))
        print(f"safety train: C={C:g} val F1 {f1:.3f} at threshold {threshold:.3f}", file=sys.stderr)
        if best is None or f1 > best[0]:
            best = (f1, C, threshold, coef, intercept)
    _, C, threshold, coef, intercept = best
    info = {"C": C, "trained_on": ["offensive/train", "hate/train"], "train_posts": len(train_texts), "seed": cfg.seed}
    classifier = SafetyClassifier(features, coef, intercept, threshold, info)

    t0 = time.perf_counter()
    scores = classifier.score(val_texts)
    posts_per_s = len(val_texts) / (time.perf_counter() - t0)
    majority = np.full(len(val_y), np.bincount(train_y).argmax() == 1)
    info["val"] = {"posts": len(val_texts), "toxic_share": float(val_y.mean()),
                   **_binary_metrics(val_y, scores >= threshold), "majority": _binary_metrics(val_y, majority),
                   "posts_per_s": round(posts_per_s)}
    classifier.save(cfg.out)
    assert np.array_equal(SafetyClassifier.load(cfg.out).score(val_texts), scores), "the saved classifier scores otherwise"
    print(_summary(info["val"], threshold, C, len(train_texts), features.size, cfg.out, time.perf_counter() - start))
    return {"threshold": threshold, "C": C, "val": info["val"]}


def best_threshold(gold: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1 of the toxic class) at the threshold of best F1: midway between the lowest score flagged
    and the next one down, so that tied scores are flagged together."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], gold[order]
    tp = np.cumsum(y)
    f1 = 2 * tp / (np.arange(1, len(s) + 1) + y.sum())  # 2 tp / (2 tp + fp + fn), flagging the top k
    f1[:-1][s[:-1] == s[1:]] = -1  # no cut inside a run of tied scores
    k = int(np.argmax(f1))
    return (float(s[k] + s[k + 1]) / 2 if k + 1 < len(s) else float(s[k])), float(f1[k])


def _pooled(cfg: SafetyConfig) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """(train texts, labels), (val texts, labels) of offensive + hate; label 1 = toxic."""
    train, val = ([], []), ([], [])
    for task in ("offensive", "hate"):
        (ds,) = load_task(cfg.data, task, "val", max_train_examples=cfg.max_train_examples, seed=cfg.seed)
        for pooled, split in ((train, ds.train), (val, ds.val)):
            pooled[0].extend(split.texts)
            pooled[1].append(split.labels)
    return (train[0], np.concatenate(train[1])), (val[0], np.concatenate(val[1]))


def _binary_metrics(gold: np.ndarray, flagged: np.ndarray) -> dict:
    tp, fp = int(np.sum(flagged & (gold == 1))), int(np.sum(flagged & (gold == 0)))
    fn, tn = int(np.sum(~flagged & (gold == 1))), int(np.sum(~flagged & (gold == 0)))
    f1_toxic = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    f1_clean = 2 * tn / (2 * tn + fn + fp) if tn else 0.0
    return {"f1": f1_toxic, "precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "accuracy": (tp + tn) / len(gold), "macro_f1": (f1_toxic + f1_clean) / 2}


def _summary(val: dict, threshold: float, C: float, n_train: int, n_features: int, out: Path, seconds: float) -> str:
    m, b = val, val["majority"]
    return "\n".join([
        f"safety train: {n_train:,} posts, {n_features:,} n-gram features, C={C:g}, threshold {threshold:.3f}, "
        f"{seconds:.1f} s",
        f"  val ({val['posts']:,} posts, {val['toxic_share']:.1%} toxic)   F1 toxic  precision  recall  accuracy  macro-F1",
        f"    classifier                           {m['f1']:8.3f}  {m['precision']:9.3f}  {m['recall']:6.3f}  "
        f"{m['accuracy']:8.3f}  {m['macro_f1']:8.3f}",
        f"    majority class (never toxic)         {b['f1']:8.3f}  {b['precision']:9.3f}  {b['recall']:6.3f}  "
        f"{b['accuracy']:8.3f}  {b['macro_f1']:8.3f}",
        f"  scores {val['posts_per_s']:,} posts/s on one CPU core (a batch of {val['posts']:,})",
        f"  -> {out}/ (use it: data prepare --drop-toxic {out}, serve RUN --moderate {out}[:THRESHOLD])",
    ])
