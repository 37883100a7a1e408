"""A logistic regression over n-gram features (tweetlm/artifacts/ngrams.py): TweetEval's floor baseline
(tweeteval.py) and the safety classifier (safety.py).

The classifier is an L2-regularized logistic regression fit by SGD (scikit-learn's SGDClassifier with the log
loss; alpha = 1 / (C x n) is the same objective as LogisticRegression's C). Measured on this project's 2-core
CPU for TweetEval emoji (45k posts x 215k features, 20 classes): lbfgs took 45-175 s per fit, liblinear 63-133 s,
SGD 10-15 s, with the same val macro-F1 (0.25-0.26); the other tasks fit in under a second. Classes are
weighted by their inverse frequency, since the metrics it is tuned for are macro-averaged.
"""

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import SGDClassifier

from tweetlm.errors import UserError


def fit_logistic(features: sp.csr_matrix, labels: np.ndarray, *, C: float, seed: int) -> SGDClassifier:
    """Logistic regression with inverse regularization strength C (module docstring); deterministic for a seed."""
    if len(np.unique(labels)) < 2:
        raise UserError(f"the {len(labels)} training posts hold one class only: train on more posts")
    model = SGDClassifier(loss="log_loss", alpha=1.0 / (C * features.shape[0]), class_weight="balanced",
                          max_iter=100, tol=1e-4, random_state=seed)
    return model.fit(features, labels)
