"""TweetEval's official metrics, written out so that each edge case is visible (and checked against
scikit-learn in tests/test_eval_tweeteval.py).

They follow the benchmark's own evaluation script (github.com/cardiffnlp/tweeteval, evaluation_script.py),
which reads `classification_report(gold, pred)`; so, as there:
- the classes averaged are those that occur in gold or in the predictions: a class never predicted counts
  with F1 0, a class predicted but absent from gold counts with F1 0, a class in neither does not count;
- a class's F1 is 0 when it has no true positive (precision or recall undefined counts as 0).
"""

from collections.abc import Sequence

import numpy as np


def f1(gold: Sequence[int], pred: Sequence[int], label: int) -> float:
    """F1 of one class: 2 tp / (2 tp + fp + fn), the harmonic mean of precision and recall; 0 with no tp."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    assert gold.shape == pred.shape, f"{gold.shape} gold labels but {pred.shape} predictions"
    tp = int(np.sum((gold == label) & (pred == label)))
    fp = int(np.sum((gold != label) & (pred == label)))
    fn = int(np.sum((gold == label) & (pred != label)))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Mean F1 over the classes seen in gold or predictions (emoji, emotion, hate, offensive)."""
    labels = np.union1d(gold, pred)
    return float(np.mean([f1(gold, pred, c) for c in labels])) if len(labels) else 0.0


def irony_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """F1 of the ironic class, 1 (irony)."""
    return f1(gold, pred, 1)


def stance_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Mean of the F1 of against (1) and favor (2); the five targets' labels pooled into one list first."""
    return (f1(gold, pred, 1) + f1(gold, pred, 2)) / 2
