"""Word and character n-gram TF-IDF features: what the safety classifier (safety.py) scores with and saves, and
what TweetEval's floor baseline (tweetlm/eval/tweeteval.py) fits a logistic regression on.

Features: word 1-2-grams and character 2-5-grams inside word boundaries (`char_wb`, robust to the spelling
games of posts: "stuuupid", "f*ck"), each lowercased, sublinear tf x idf, L2-normalized on its own, then side
by side; an n-gram must occur in two training posts (min_df=2), which keeps 146k features of the 21k safety
training posts.
"""

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from tweetlm.errors import UserError

# (name, analyzer, ngram_range); the settings both share are in _vectorizer
KINDS = (("word", "word", (1, 2)), ("char", "char_wb", (2, 5)))


def _vectorizer(analyzer: str, ngram_range: tuple[int, int], vocabulary=None) -> TfidfVectorizer:
    return TfidfVectorizer(analyzer=analyzer, ngram_range=ngram_range, lowercase=True, sublinear_tf=True, min_df=2,
                           dtype=np.float32, vocabulary=vocabulary)


class NgramFeatures:
    """texts -> [n, n_features] float32 CSR matrix. Build with `fit` or `from_state`."""

    def __init__(self, vectorizers: list[TfidfVectorizer]):
        self.vectorizers = vectorizers

    @classmethod
    def fit(cls, texts: Sequence[str]) -> "NgramFeatures":
        vectorizers = [_vectorizer(analyzer, ngrams) for _, analyzer, ngrams in KINDS]
        try:
            for v in vectorizers:
                v.fit(texts)
        except ValueError:  # sklearn: "After pruning, no terms remain" (or "empty vocabulary")
            raise UserError(f"no n-gram occurs in two of the {len(texts)} training posts: train on more posts") from None
        return cls(vectorizers)

    def __call__(self, texts: Sequence[str]) -> sp.csr_matrix:
        return sp.hstack([v.transform(texts) for v in self.vectorizers], format="csr")

    @property
    def size(self) -> int:
        return sum(len(v.vocabulary_) for v in self.vectorizers)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able vocabularies, arrays): all `from_state` needs, without pickle."""
        vocab, arrays = {}, {}
        for (name, _, _), v in zip(KINDS, self.vectorizers):
            terms = [""] * len(v.vocabulary_)
            for term, i in v.vocabulary_.items():
                terms[i] = term
            vocab[name] = terms
            arrays[f"idf_{name}"] = v.idf_.astype(np.float32)
        return vocab, arrays

    @classmethod
    def from_state(cls, vocab: dict, arrays: dict[str, np.ndarray]) -> "NgramFeatures":
        vectorizers = []
        for name, analyzer, ngrams in KINDS:
            v = _vectorizer(analyzer, ngrams, vocabulary={term: i for i, term in enumerate(vocab[name])})
            v.idf_ = arrays[f"idf_{name}"]  # sklearn's public setter: a fixed vocabulary + its idf = a fitted vectorizer
            vectorizers.append(v)
        return cls(vectorizers)
